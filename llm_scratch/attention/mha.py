"""Multi-head attention (Vaswani et al. 2017, section 3.2.2).

    MultiHead(X) = Concat(head_1, ..., head_H) W_O,   head_h = Attention(X W_Q^h, X W_K^h, X W_V^h)

It is grouped-query attention with one key/value head per query head, so it *is* that class with
n_kv_heads = n_heads: one implementation, no copy. `load_from_torch` copies the weights of a
`torch.nn.MultiheadAttention`, the reference the tests compare against.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_scratch.attention.gqa import GroupedQueryAttention
from llm_scratch.position.rope import RotaryEmbedding

__all__ = ["MultiHeadAttention", "load_from_torch"]


class MultiHeadAttention(GroupedQueryAttention):
    """H heads of width C / H, each with its own keys and values. Biases on by default (as GPT-2)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        bias: bool = True,
        dropout: float = 0.0,
        causal: bool = True,
        window: int | None = None,
        rope: RotaryEmbedding | None = None,
    ):
        super().__init__(d_model, n_heads, n_kv_heads=n_heads, bias=bias, dropout=dropout,
                         causal=causal, window=window, rope=rope)


@torch.no_grad()
def load_from_torch(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> MultiHeadAttention:
    """Copy a (batch_first or not) `nn.MultiheadAttention`'s weights into `ours`; returns `ours`.

    torch packs W_Q, W_K, W_V into one `in_proj_weight` of shape (3C, C), in that order.
    """
    C = ours.d_model
    if theirs.embed_dim != C or theirs.num_heads != ours.n_heads or not theirs._qkv_same_embed_dim:
        raise ValueError(
            f"shape mismatch: ours has d_model={C}, n_heads={ours.n_heads}; theirs has "
            f"embed_dim={theirs.embed_dim}, num_heads={theirs.num_heads}, kdim={theirs.kdim}, vdim={theirs.vdim}"
        )
    has_bias = theirs.in_proj_bias is not None
    if has_bias != (ours.q_proj.bias is not None):
        raise ValueError(f"bias mismatch: theirs has bias={has_bias}, ours bias={ours.q_proj.bias is not None}")
    for i, proj in enumerate((ours.q_proj, ours.k_proj, ours.v_proj)):
        proj.weight.copy_(theirs.in_proj_weight[i * C : (i + 1) * C])
        if has_bias:
            proj.bias.copy_(theirs.in_proj_bias[i * C : (i + 1) * C])
    ours.o_proj.weight.copy_(theirs.out_proj.weight)
    if has_bias:
        ours.o_proj.bias.copy_(theirs.out_proj.bias)
    return ours
