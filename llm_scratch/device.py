"""Where tensors live, and reproducible randomness.

`get_device()` is the one place in the package that names an accelerator; everything else takes
the device it is given, so the same code runs on CPU, CUDA and Apple's MPS. Code that only exists on
CUDA (NCCL, CUDA graphs) asks `is_cuda(device)`.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

DEVICE_ENV_VAR = "LLM_SCRATCH_DEVICE"


def get_device(preferred: str | torch.device | None = None) -> torch.device:
    """The best available device: CUDA, then MPS, then CPU.

    `preferred` (or, when it is None, the environment variable LLM_SCRATCH_DEVICE) overrides the
    choice, e.g. ``LLM_SCRATCH_DEVICE=cpu`` to run the notebooks on the CPU of a GPU machine.
    An override naming a device that is not available raises ValueError instead of failing later.
    """
    choice = preferred if preferred is not None else os.environ.get(DEVICE_ENV_VAR) or None
    if choice is not None:
        device = torch.device(choice)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available here")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


CUDA = "cuda"  # the one spelling of the accelerator type other modules compare against (through is_cuda)


def is_cuda(device: torch.device | str) -> bool:
    """True for a CUDA device: code paths that exist only there (NCCL, CUDA graphs, device names and peaks)."""
    return torch.device(device).type == CUDA


def cuda_device(index: int) -> torch.device:
    """CUDA device number `index` (e.g. a distributed process's LOCAL_RANK); ValueError if there is no such GPU."""
    if not torch.cuda.is_available() or not 0 <= index < torch.cuda.device_count():
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ValueError(f"CUDA device {index} was asked for, but this machine has {count} GPU(s)")
    return torch.device(CUDA, index)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (all devices') generators with `seed`."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """PyTorch's generator states that a training step on `device` consumes: the CPU's, and the GPU's if any."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what get_rng_states returned (a GPU state is restored only on a GPU device)."""
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
