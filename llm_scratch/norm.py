"""Normalization layers: LayerNorm, RMSNorm and DyT, each over the last dimension of its input.

- LayerNorm (Ba et al. 2016, arXiv:1607.06450, eq. 4): y = (x - μ) / sqrt(σ² + ε) · γ + β, with the
  mean μ and the biased variance σ² of the last dimension. GPT-2 uses it with a bias; OLMo and
  some others drop β (`bias=False`).
- RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467, eq. 4): y = x / sqrt(mean(x²) + ε) · g, LayerNorm
  without the mean subtraction and the bias; Llama, Qwen, Gemma, DeepSeek. Gemma stores the gain as
  an offset from one, y = x / rms(x) · (1 + w) with w initialised to 0 (`offset=True`).
- DyT, Dynamic Tanh (Zhu et al. 2025, "Transformers without Normalization", arXiv:2503.10622, eq. 1):
  y = γ · tanh(α x) + β with a learnable scalar α (initialised to 0.5). No statistics at all: an
  element-wise squashing that mimics the S-shaped input-output map of a trained LayerNorm.

Precision. Production models compute the statistics in float32 whatever the activations' dtype and
cast back at the end; these layers do the same, so a bf16 model normalizes like a float32 one up to
the final rounding. Llama and Qwen round the normalized x to the input dtype *before* multiplying by
the gain, Gemma after (`RMSNorm(cast_before_weight=...)`); the choice changes bf16 results in the last
bit, and matching a checkpoint's family reproduces its outputs exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DyT", "LayerNorm", "RMSNorm", "check_last_dim"]


def check_last_dim(x: torch.Tensor, dim: int, name: str) -> None:
    """Raise a ValueError naming the layer when x's last dimension is not `dim`."""
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(
            f"{name} normalizes a last dimension of {dim}, got x of shape {tuple(x.shape)} "
            f"(last dimension {x.shape[-1] if x.dim() else 'none'})"
        )


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (statistics need its range and precision); float64 stays."""
    return t if t.dtype == torch.float64 else t.float()


def _check_dim_eps(dim: int, eps: float) -> None:
    if not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension, statistics in float32, with or without the bias β."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        _check_dim_eps(dim, eps)
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_last_dim(x, self.dim, "LayerNorm")
        xf = _upcast(x)
        # the formula above, as PyTorch's fused kernel: one pass instead of six element-wise ops
        # (notebook 03/01 writes it out; tests/test_norm.py checks it against the explicit mean/variance
        # form in float64). Its effect on a whole GPT-2 step was within the noise of `make bench` here.
        bias = self.bias.to(xf.dtype) if self.bias is not None else None
        return F.layer_norm(xf, (self.dim,), self.weight.to(xf.dtype), bias, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


class RMSNorm(nn.Module):
    """RMS normalization over the last dimension, computed in float32 and cast back.

    offset: Gemma's parametrization, gain = 1 + weight with weight initialised to 0 (else gain = weight,
        initialised to 1). The two compute the same function; only the stored numbers differ.
    cast_before_weight: round the normalized x to the input dtype, then multiply by the gain in that
        dtype (Llama, Qwen: `weight * x.to(dtype)`); the default multiplies in float32 and rounds once
        at the end (Gemma). Identical in float32.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, offset: bool = False, cast_before_weight: bool = False):
        super().__init__()
        _check_dim_eps(dim, eps)
        self.dim, self.eps, self.offset, self.cast_before_weight = dim, eps, offset, cast_before_weight
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_last_dim(x, self.dim, "RMSNorm")
        xf = _upcast(x)
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.cast_before_weight:
            gain = (1 + self.weight) if self.offset else self.weight
            return gain.to(x.dtype) * normed.to(x.dtype)
        weight = self.weight.to(xf.dtype)
        gain = (1 + weight) if self.offset else weight
        return (normed * gain).to(x.dtype)

    def extra_repr(self) -> str:
        text = f"{self.dim}, eps={self.eps}"
        text += ", offset=True" if self.offset else ""
        return text + (", cast_before_weight=True" if self.cast_before_weight else "")


class DyT(nn.Module):
    """Dynamic Tanh: γ · tanh(α x) + β, with α one learnable scalar and γ, β per channel.

    alpha_init: α's starting value; the paper uses 0.5 for most models and smaller values for wider
    LLMs, where the attention-block DyT and the others get different values (its Table 11).
    """

    def __init__(self, dim: int, alpha_init: float = 0.5, bias: bool = True):
        super().__init__()
        _check_dim_eps(dim, 0.0)
        if not alpha_init > 0:
            raise ValueError(f"alpha_init must be > 0, got {alpha_init!r}")
        self.dim, self.alpha_init = dim, alpha_init
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_last_dim(x, self.dim, "DyT")
        xf = _upcast(x)
        y = torch.tanh(self.alpha.to(xf.dtype) * xf) * self.weight.to(xf.dtype)
        if self.bias is not None:
            y = y + self.bias.to(xf.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, alpha_init={self.alpha_init}, bias={self.bias is not None}"
