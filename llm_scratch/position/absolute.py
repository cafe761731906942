"""Absolute position embeddings: the fixed sinusoids of the original transformer, and learned ones.

Attention by itself is permutation-equivariant: shuffle the tokens and the outputs are shuffled
the same way, so without help a transformer sees a bag of tokens. The original remedy adds a
vector that depends only on the position to each token embedding before the first layer.

- Sinusoidal (Vaswani et al. 2017, section 3.5):
      PE(pos, 2i)   = sin(pos / base^(2i/d))
      PE(pos, 2i+1) = cos(pos / base^(2i/d))
  Channels come in (sin, cos) pairs, interleaved as in the paper (and in Hugging Face's DistilBERT);
  tensor2tensor and fairseq put all the sines first, then all the cosines, which is the same set
  of features in another channel order. Each pair turns with its own frequency, so
  PE(pos + k) is a fixed rotation of PE(pos), whatever pos (the paper's "linear function" remark).
- Learned (GPT-2's `wpe`, BERT): a trainable table with one row per position. It can only look
  up positions it has rows for: the context length is a hard limit.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["sinusoidal_position_encoding", "SinusoidalPositionEmbedding", "LearnedPositionEmbedding"]


def sinusoidal_position_encoding(
    n_positions: int,
    d_model: int,
    base: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The (T, C) table of sinusoidal encodings for positions 0 .. n_positions - 1 (section 3.5).

    Column 2i holds sin(pos / base^(2i/C)) and column 2i + 1 the cosine of the same angle.
    """
    if not isinstance(n_positions, int) or n_positions < 0:
        raise ValueError(f"n_positions must be a non-negative int, got {n_positions!r}")
    table = _sinusoids(torch.arange(n_positions), d_model, base)  # (T, C) float64
    return table.to(device=device, dtype=dtype or torch.get_default_dtype())


def _sinusoids(positions: torch.Tensor, d_model: int, base: float) -> torch.Tensor:
    """Encodings of integer positions (...,) -> (..., C) in float64 on the CPU."""
    if not isinstance(d_model, int) or d_model <= 0 or d_model % 2:
        raise ValueError(
            f"d_model must be a positive even int (channels come in sin/cos pairs), got {d_model!r}"
        )
    if not base > 1:
        raise ValueError(f"base must be > 1, got {base!r}")
    # Angles reach thousands of radians at long positions; float32 would keep only ~3 decimals of
    # them, so the angles and their sines are taken in float64 and rounded once at the end.
    inv_freq = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (C/2,): 1 / base^(2i/C)
    angles = positions.to("cpu", torch.float64)[..., None] * inv_freq  # (..., C/2)
    # stack the pair on a new last axis, then flatten: channels sin_0, cos_0, sin_1, cos_1, ...
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (..., C)


def _check_positions(positions: torch.Tensor, limit: int | None, what: str) -> None:
    if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex() \
            or positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor, got {getattr(positions, 'dtype', type(positions))}")
    if positions.numel() == 0 or torch.compiler.is_compiling():
        # a compiled decode step must not read the positions' values (a device sync and a graph break);
        # its caller checks the bounds before decoding (generation.StaticDecoder)
        return
    lo, hi = int(positions.min()), int(positions.max())
    if lo < 0:
        raise ValueError(f"positions must be >= 0, got {lo}")
    if limit is not None and hi >= limit:
        raise ValueError(
            f"position {hi} is beyond the context length: {what} has n_positions={limit} rows "
            f"(positions 0 .. {limit - 1})"
        )


class SinusoidalPositionEmbedding(nn.Module):
    """Fixed sinusoidal encodings looked up by position: forward(positions (...)) -> (..., C).

    The first `n_positions` rows are kept in a buffer (not saved in the state dict: they are a
    function of the position). The formula is defined at every position, so a position past the
    buffer is computed on the spot instead of being refused.
    """

    def __init__(self, n_positions: int, d_model: int, base: float = 10000.0):
        super().__init__()
        self.n_positions, self.d_model, self.base = n_positions, d_model, base
        self.register_buffer("pe", sinusoidal_position_encoding(n_positions, d_model, base), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        _check_positions(positions, None, "SinusoidalPositionEmbedding")
        if positions.numel() == 0 or int(positions.max()) < self.n_positions:
            return self.pe[positions]  # (..., C)
        return _sinusoids(positions, self.d_model, self.base).to(self.pe)  # (..., C)

    def extra_repr(self) -> str:
        return f"n_positions={self.n_positions}, d_model={self.d_model}, base={self.base}"


class LearnedPositionEmbedding(nn.Embedding):
    """GPT-2's `wpe`: a trainable (n_positions, C) table; forward(positions (...)) -> (..., C).

    A plain `nn.Embedding` fails on an out-of-range index with an IndexError on the CPU and a
    device-side assert on a GPU; here a position >= n_positions raises a ValueError that names the
    context length. The weight is named `weight`, so `wpe = LearnedPositionEmbedding(...)` has the
    state-dict key `wpe.weight`, as in GPT-2 checkpoints.
    """

    def __init__(self, n_positions: int, d_model: int, init_std: float = 0.01):
        for name, value in (("n_positions", n_positions), ("d_model", d_model)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not init_std > 0:
            raise ValueError(f"init_std must be positive, got {init_std!r}")
        # OpenAI's GPT-2 code draws wpe from N(0, 0.01²) (wte from N(0, 0.02²)); Hugging Face and
        # nanoGPT use 0.02 for both. nn.Embedding's own N(0, 1) would swamp the token embeddings.
        self.init_std = init_std
        super().__init__(n_positions, d_model)  # calls reset_parameters
        self.n_positions = n_positions

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        _check_positions(positions, self.n_positions, "LearnedPositionEmbedding")
        return super().forward(positions)  # (..., C)
