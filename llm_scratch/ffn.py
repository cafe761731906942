"""Activation functions, written out, and the feed-forward blocks of transformer families.

Activations (element-wise):
- relu(x) = max(x, 0)
- gelu(x) = x · Φ(x), Φ the standard normal CDF (Hendrycks & Gimpel 2016, arXiv:1606.08415, eq. 1),
  exactly via erf; gelu_tanh its tanh approximation, 0.5x(1 + tanh(√(2/π)(x + 0.044715x³))), used by
  GPT-2 and Gemma.
- silu(x) = x · σ(x), also called Swish-1 (Ramachandran et al. 2017, arXiv:1710.05941).
- relu2(x) = relu(x)² (So et al. 2021, "Primer", arXiv:2109.08668).

Feed-forward blocks, applied to each position independently:
- MLP (GPT-2; Vaswani et al. 2017 eq. 2): down(act(up(x))), hidden 4·d, with biases.
- GatedMLP (Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202, eqs. 5-6):
  down(act(gate(x)) ⊙ up(x)), no biases. SwiGLU uses SiLU (Llama, Qwen, DeepSeek), GeGLU GELU-tanh
  (Gemma). Three matrices instead of two, so at equal parameters the hidden size is 2/3 of the MLP's;
  `ffn_hidden_size` gives each family's rule.

Layer names follow Llama's (`gate_proj`, `up_proj`, `down_proj`) so checkpoints map one to one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "GatedMLP",
    "GeGLU",
    "SwiGLU",
    "ffn_hidden_size",
    "gelu",
    "gelu_tanh",
    "get_activation",
    "relu",
    "relu2",
    "silu",
]


def relu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.zeros_like(x))


def gelu(x: torch.Tensor) -> torch.Tensor:
    """x·Φ(x) with Φ(x) = (1 + erf(x/√2)) / 2."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation (Hendrycks & Gimpel, section 2): max error 4.7e-4, near |x| ≈ 2.7."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def silu(x: torch.Tensor) -> torch.Tensor:
    """x·σ(x): Swish with β = 1."""
    return x * torch.sigmoid(x)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return relu(x).pow(2)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": relu,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "silu": silu,
    "relu2": relu2,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _check_sizes(d_model: int, hidden: int) -> None:
    for arg, value in (("d_model", d_model), ("hidden", hidden)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")


class MLP(nn.Module):
    """down(act(up(x))): GPT-2's block with activation "gelu_tanh" and hidden = 4·d_model."""

    def __init__(self, d_model: int, hidden: int | None = None, activation: str = "gelu_tanh", bias: bool = True):
        super().__init__()
        hidden = 4 * d_model if hidden is None else hidden
        _check_sizes(d_model, hidden)
        self.activation = activation
        self.act = get_activation(activation)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class GatedMLP(nn.Module):
    """down(act(gate(x)) ⊙ up(x)): a gated linear unit (Shazeer 2020) with the given activation."""

    def __init__(self, d_model: int, hidden: int, activation: str = "silu", bias: bool = False):
        super().__init__()
        _check_sizes(d_model, hidden)
        self.activation = activation
        self.act = get_activation(activation)
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class SwiGLU(GatedMLP):
    """The gated MLP with SiLU (Swish) gates: Llama, Qwen, DeepSeek, Mistral."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False):
        super().__init__(d_model, hidden, activation="silu", bias=bias)


class GeGLU(GatedMLP):
    """The gated MLP with GELU gates, tanh-approximated as in Gemma (`gelu_pytorch_tanh`)."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False):
        super().__init__(d_model, hidden, activation="gelu_tanh", bias=bias)


def ffn_hidden_size(
    family: str,
    d_model: int,
    *,
    multiple_of: int = 256,
    ffn_dim_multiplier: float | None = None,
    expansion: float | None = None,
) -> int:
    """The FFN hidden size each family derives from d_model.

    - "gpt2": 4·d_model.
    - "llama": Meta's rule for SwiGLU: h = int(2/3 · 4·d); h = int(ffn_dim_multiplier · h) if given;
      then rounded up to a multiple of `multiple_of`. The 2/3 keeps the three-matrix block at the
      parameter count of a 4·d two-matrix MLP. Llama 2 7B (d 4096, multiple 256) -> 11008; Llama 3 8B
      (multiplier 1.3, multiple 1024) -> 14336; Llama 3.2 1B (d 2048, multiplier 1.5) -> 8192.
    - "gemma": a fixed `expansion` times d_model (Gemma 1: 8 for 2B and 7B; Gemma 3 1B: 6; 4B-27B: 4),
      which its configs store directly as intermediate_size.
    """
    if not isinstance(d_model, int) or d_model <= 0:
        raise ValueError(f"d_model must be a positive int, got {d_model!r}")
    if family == "gpt2":
        return 4 * d_model
    if family == "llama":
        if not isinstance(multiple_of, int) or multiple_of <= 0:
            raise ValueError(f"multiple_of must be a positive int, got {multiple_of!r}")
        hidden = int(2 * 4 * d_model / 3)
        if ffn_dim_multiplier is not None:
            if not ffn_dim_multiplier > 0:
                raise ValueError(f"ffn_dim_multiplier must be > 0, got {ffn_dim_multiplier!r}")
            hidden = int(ffn_dim_multiplier * hidden)
        return multiple_of * math.ceil(hidden / multiple_of)
    if family == "gemma":
        if expansion is None or not expansion > 0:
            raise ValueError(f"family 'gemma' needs expansion > 0 (intermediate_size / d_model), got {expansion!r}")
        hidden = expansion * d_model
        if hidden != int(hidden):
            raise ValueError(f"expansion {expansion} x d_model {d_model} is not an integer size")
        return int(hidden)
    raise ValueError(f"unknown family {family!r}; known: gpt2, llama, gemma")
