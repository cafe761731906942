"""Fully sharded data parallel (FSDP2: `torch.distributed.fsdp.fully_shard`), and sharded checkpoints.

DDP keeps a full copy of the weights, gradients and AdamW's two moments on every rank: 16 bytes per
parameter in float32, whatever the number of GPUs. FSDP (Zhao et al. 2023, arXiv:2304.11277; the ZeRO-3
idea of Rajbhandari et al. 2020, arXiv:1910.02054) keeps only 1/N of each on each of N ranks:

    forward of a unit:   all-gather its parameters -> compute -> free the gathered copy
    backward of a unit:  all-gather again -> compute gradients -> reduce-scatter them, so each rank
                         receives the sum (FSDP divides by N: the mean, as DDP) for its own 1/N
    optimizer step:      on the local shard only (AdamW is element-wise, so no communication)

A "unit" is what `fully_shard` was applied to: here each transformer block, then the root (which
takes the embedding, the final norm and the head). Gathering one block at a time keeps the peak at
one block's full weights, and the next block's all-gather overlaps the current block's compute.

FSDP2 stores each parameter as a DTensor sharded on dim 0 (`Shard(0)`) over the mesh: `p.to_local()`
is this rank's rows, `p.full_tensor()` gathers the whole.

Checkpoints: `torch.distributed.checkpoint` (DCP) writes one file per rank with that rank's shards,
plus metadata, and reads them back into any sharding (resharding on load). `get_state_dict` /
`set_state_dict` turn the model and optimizer into such state dicts with fully-qualified names.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from llm_scratch.distributed.process_group import default_mesh, is_distributed, is_main_process

__all__ = ["apply_fsdp", "load_sharded", "local_parameter_bytes", "parameter_bytes_per_rank", "save_sharded"]


def apply_fsdp(model: nn.Module, mesh: DeviceMesh | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` in place with FSDP2: each of `model.blocks` is one unit, the root the last; returns it.

    mesh: a 1-D DeviceMesh of the data-parallel ranks; None = every process (`default_mesh()`).
    reshard_after_forward: free the gathered weights after each unit's forward (ZeRO-3; gathered again
        in backward). False keeps them until backward: more memory, one all-gather less (ZeRO-2 like).
    The model's parameters must be equal on every rank (build it after seeding identically, or load the
    same weights), since each rank keeps its slice of its own copy.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"model must have a non-empty nn.ModuleList `blocks` (one FSDP unit each); "
                         f"{type(model).__name__} has {type(blocks).__name__}")
    mesh = default_mesh() if mesh is None else mesh
    if mesh.ndim != 1:
        raise ValueError(f"mesh must be 1-D (the data-parallel ranks), got {mesh.ndim}-D of shape {tuple(mesh.shape)}")
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # the root: what no block owns (embedding, final norm, head); its parameters stay gathered from the
    # start of forward to the end of backward, as the root is the first unit in and the last out
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds: the local shard of each DTensor, the whole of any other tensor."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def parameter_bytes_per_rank(model: nn.Module) -> list[int]:
    """`local_parameter_bytes` of every rank, in rank order (a collective: call it on every rank)."""
    mine = local_parameter_bytes(model)
    if not is_distributed():
        return [mine]
    everyone: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [int(b) for b in everyone]


def save_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Write model and optimizer shards and the step to the directory `path` with DCP (call on every rank).

    Atomic as the package's other checkpoints: everything is written to `<path>.tmp`, and rank 0 renames
    it to `path` once every rank has finished, so `path` is either the old checkpoint or the new one.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    if is_distributed():
        dist.barrier()  # nobody writes into tmp before rank 0 has cleared it
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state, "step": torch.tensor(step)}, checkpoint_id=tmp)
    if is_distributed():
        dist.barrier()  # every rank's shard file is complete
    if is_main_process():
        old = path.with_name(path.name + ".old")
        if path.exists():
            os.replace(path, old)  # a directory cannot be replaced in one rename: move the old one aside first
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    if is_distributed():
        dist.barrier()  # the checkpoint is at `path` when save_sharded returns on any rank


def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load what save_sharded wrote into `model` and `optimizer` (sharded the same way or not); returns the step.

    DCP reads in place: the state dicts of the new model and optimizer say which shard each rank needs,
    and each rank reads those bytes only.
    """
    path = pathlib.Path(path)
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"no sharded checkpoint at {path} (expected the .metadata file DCP writes)")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state, "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return int(state["step"])
