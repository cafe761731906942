"""Joining the process group that `torchrun` sets up: one process per device, rank 0 the main one.

    torchrun --standalone --nproc_per_node=2 train.py              # one machine, 2 processes
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
             --rdzv_backend=c10d --rdzv_endpoint=host0:29400 train.py   # two machines (run on each,
                                                                        # node_rank 0 and 1)

torchrun starts the processes and gives each, in its environment, RANK (0 .. WORLD_SIZE-1 over every
machine), WORLD_SIZE (processes in all), LOCAL_RANK (0 .. processes on this machine - 1, the GPU index
on it) and MASTER_ADDR / MASTER_PORT (where rank 0's store listens). `init_distributed()` reads them,
picks the backend from the device (NCCL between GPUs, Gloo between CPU processes) and pins each
process to GPU LOCAL_RANK, so the same script runs on CPUs, on one GPU machine or on many:

    info = init_distributed()     # DistributedInfo(rank, world_size, local_rank, device)
    ...                           # train; the Trainer wraps the model in DDP when world_size > 1
    if is_main_process():
        print("done")             # log, save and draw progress bars on rank 0 only
    cleanup()

Run as a plain `python train.py`, none of those variables is set and it is a 1-process no-op: rank 0
of 1 on `get_device()`, no process group, so the same code also runs in a notebook.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llm_scratch.device import cuda_device, get_device, is_cuda

__all__ = ["DistributedInfo", "backend_for", "cleanup", "default_mesh", "get_rank", "get_world_size",
           "init_distributed", "is_distributed", "is_main_process"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits: its global rank, how many processes there are, its rank on this machine,
    and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device: torch.device | str) -> str:
    """The collective-communication library for tensors on `device`: NCCL for CUDA GPUs (GPU-to-GPU over
    NVLink / InfiniBand), Gloo for CPU tensors. MPS has no torch.distributed backend."""
    device = torch.device(device)
    if is_cuda(device):
        return "nccl"
    if device.type == "cpu":
        return "gloo"
    raise ValueError(f"torch.distributed has no backend for device {str(device)!r}; use a CUDA GPU or the CPU "
                     "(e.g. LLM_SCRATCH_DEVICE=cpu)")


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int (torchrun sets it), got {value!r}") from None
    if number < 0:
        raise ValueError(f"environment variable {name} must be >= 0, got {number}")
    return number


def init_distributed(device: torch.device | str | None = None, backend: str | None = None) -> DistributedInfo:
    """Join the process group torchrun set up, or do nothing when the process was not started by torchrun.

    device: where this process computes; None = `get_device()`. On CUDA it becomes cuda:LOCAL_RANK and is
        made the current device, so the default CUDA device and NCCL both mean this process's GPU.
    backend: None = `backend_for(device)` ("nccl" on CUDA, "gloo" on CPU).
    Calling it again once the group exists returns the same info.
    """
    if not all(name in os.environ for name in _TORCHRUN_VARS):
        missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
        if len(missing) < len(_TORCHRUN_VARS):  # some but not all: a broken launch, not a plain run
            raise ValueError(f"torchrun sets {', '.join(_TORCHRUN_VARS)} together; {', '.join(missing)} missing")
        if dist.is_available() and dist.is_initialized():  # a group made another way (mp.spawn, a notebook):
            # without LOCAL_RANK, assume one machine, where the local rank is the rank
            return DistributedInfo(dist.get_rank(), dist.get_world_size(), dist.get_rank(), get_device(device))
        return DistributedInfo(0, 1, 0, get_device(device))
    rank, world_size, local_rank = (_env_int(name) for name in _TORCHRUN_VARS)
    if not rank < world_size:
        raise ValueError(f"RANK ({rank}) must be < WORLD_SIZE ({world_size})")
    device = get_device(device)
    if is_cuda(device):
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs here: "
                             "--nproc_per_node must not exceed the GPUs per machine")
        device = cuda_device(local_rank)
        torch.cuda.set_device(device)
    backend = backend_for(device) if backend is None else backend
    if not dist.is_initialized():
        # MASTER_ADDR / MASTER_PORT come from torchrun too (the default env:// rendezvous reads them);
        # device_id binds the NCCL communicator to this GPU up front
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                device_id=device if is_cuda(device) else None)
    return DistributedInfo(rank, world_size, local_rank, device)


def is_distributed() -> bool:
    """True inside a process group of more than one process (then collectives are needed)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank; 0 outside a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes; 1 outside a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0, or any process outside a process group: the one that logs, saves and draws progress bars."""
    return get_rank() == 0


def default_mesh() -> DeviceMesh:
    """A 1-D DeviceMesh over every process, on CUDA when the group talks NCCL and on the CPU otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("default_mesh needs a process group: call init_distributed() under torchrun first")
    device_type = get_device().type if dist.get_backend() == "nccl" else "cpu"  # NCCL: the GPUs
    return init_device_mesh(device_type, (dist.get_world_size(),))


def cleanup() -> None:
    """Leave the process group (a no-op when there is none); call it once at the end of a torchrun script."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
