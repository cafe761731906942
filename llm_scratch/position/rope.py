"""Rotary position embedding (RoPE; Su et al. 2021, "RoFormer", eq. 34).

RoPE rotates each pair of channels of a query or key by an angle proportional to the token's
position, θ_i = base^(-2i/D) per pair i. A rotation preserves the dot product's form, so
q_m · k_n depends on the positions only through m - n: relative position for free.

Two channel layouts are in use, and a checkpoint fixes which:
- "half" (GPT-NeoX, Hugging Face Llama): channel i pairs with channel i + D/2.
- "interleaved" (RoFormer, Meta's original Llama code, DeepSeek): channel 2i pairs with 2i + 1.
They differ by a fixed permutation of channels, so either gives the same attention scores once
the projection weights are permuted to match.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["rope_inverse_frequencies", "rope_angles", "apply_rope", "RotaryEmbedding"]


def rope_inverse_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """θ_i = base^(-2i/D) for i = 0 .. D/2 - 1, shape (D/2,), float32."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number for RoPE, got {head_dim}")
    if base <= 1:
        raise ValueError(f"base must be > 1, got {base}")
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of m·θ_i for positions m of shape (T,) or (B, T): each (..., T, D/2), float32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles behind cos/sin ((T, D/2) or (B, T, D/2)).

    Computed in float32 and cast back, so bf16 inputs do not lose the rotation's precision.
    """
    if x.shape[-1] != 2 * cos.shape[-1]:
        raise ValueError(f"x has head_dim {x.shape[-1]} but the angles cover {2 * cos.shape[-1]} channels")
    if cos.dim() == 3:  # per-sequence positions: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf.chunk(2, dim=-1)
    # (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos): a 2-D rotation of each pair
    r1, r2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    out = torch.stack((r1, r2), dim=-1).flatten(-2) if interleaved else torch.cat((r1, r2), dim=-1)
    return out.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to a (B, H, T, D) tensor at the given positions ((T,) or (B, T) integers)."""

    def __init__(self, head_dim: int, base: float = 10000.0, interleaved: bool = False):
        super().__init__()
        self.head_dim, self.base, self.interleaved = head_dim, base, interleaved
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_dim, base), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_angles(positions, self.inv_freq)
        return apply_rope(x, cos, sin, interleaved=self.interleaved)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, interleaved={self.interleaved}"
