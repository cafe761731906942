"""Relative positions: Shaw et al.'s relative keys and values, T5's bucketed bias, and ALiBi.

Absolute embeddings tell each token where it is; these methods instead tell attention how far
apart a query and a key are, through the relative position j - i of key j from query i.

- Shaw, Uszkoreit & Vaswani 2018, "Self-Attention with Relative Position Representations"
  (arXiv:1803.02155): learned vectors a^K_ij, a^V_ij for the clipped distance, added to the keys
  and to the values inside attention (eqs. 3-4).
- Raffel et al. 2020, T5 (arXiv:1910.10683, section 2.1): one learned scalar per head and per
  bucket of relative positions, added to the attention logits; buckets are exact for small
  distances and logarithmically wider for larger ones, up to max_distance.
- Press, Smith & Lewis 2022, ALiBi (arXiv:2108.12409, section 3): no parameters at all; head h adds
  -m_h · (i - j) to the logit of key j, with a fixed geometric sequence of slopes m_h.

T5's and ALiBi's biases are (H, Tq, Tk) tensors that go to `scaled_dot_product_attention` as a
float `attn_mask` (added to the scaled scores). Shaw's value term changes the weighted sum itself,
so it has its own attention function, `shaw_attention`.

Positions are aligned to the lower right like our causal mask: with Tq <= Tk queries (the newest
tokens after Tk - Tq cached ones), query i sits at absolute position i' = i + Tk - Tq.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llm_scratch.attention.sdpa import build_attn_mask

__all__ = [
    "relative_positions",
    "shaw_attention",
    "ShawRelativePosition",
    "t5_relative_position_bucket",
    "T5RelativeBias",
    "alibi_slopes",
    "alibi_bias",
]


def relative_positions(q_len: int, k_len: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """(Tq, Tk) int64 matrix of j - i': how far key j is from query i (negative = in the past).

    Lower-right aligned: query i is at absolute position i' = i + Tk - Tq, so the last query is at
    the last key and decoding one token (Tq = 1) gets the last row of the full matrix.
    """
    k_len = q_len if k_len is None else k_len
    _check_lengths(q_len, k_len)
    q_pos = torch.arange(k_len - q_len, k_len, device=device)  # (Tq,) absolute positions of the queries
    k_pos = torch.arange(k_len, device=device)  # (Tk,)
    return k_pos[None, :] - q_pos[:, None]  # (Tq, Tk)


# ----------------------------------------------------------------------------------------------
# Shaw et al. 2018: relative position representations
# ----------------------------------------------------------------------------------------------


def shaw_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_k: torch.Tensor | None,
    rel_v: torch.Tensor | None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    padding_mask: torch.Tensor | None = None,
    naive: bool = False,
) -> torch.Tensor:
    """Attention with relative keys and values (Shaw et al. 2018, eqs. 3-4):

        e_ij = q_i · (k_j + a^K_ij) · scale            (eq. 4, scale = 1/√D)
        α_ij = softmax_j(e_ij)                           (eq. 2)
        z_i  = Σ_j α_ij (v_j + a^V_ij)                   (eq. 3)

    Shapes: q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv), rel_k (Tq, Tk, D), rel_v
    (Tq, Tk, Dv) -> (B, H, Tq, Dv). The tables are shared by every head and every sequence
    (section 3.3); either may be None (no relative term there). Masks as in
    `scaled_dot_product_attention` (bool = may attend, float = added; `is_causal` lower-right).

    naive=True builds k_j + a^K_ij and v_j + a^V_ij for every (i, j) pair, a (B, H, Tq, Tk, D)
    tensor, and reads as the equations. The default splits each sum in two, as section 3.3 does:
    q_i · k_j is the usual matrix product and q_i · a^K_ij is one einsum against the table, so
    nothing of size B·H·Tq·Tk·D is ever built.
    """
    _check_shaw_inputs(q, k, v, rel_k, rel_v)
    B, H, Tq, D = q.shape
    Tk = k.shape[-2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    mask = build_attn_mask(
        Tq, Tk, attn_mask=attn_mask, is_causal=is_causal, padding_mask=padding_mask, batch_size=B, n_heads=H,
        device=q.device,
    )

    if naive:
        keys = k[:, :, None] if rel_k is None else k[:, :, None] + rel_k  # (B, H, Tq, Tk, D): k_j + a^K_ij
        scores = (q[:, :, :, None, :] * keys).sum(-1) * scale  # (B, H, Tq, Tk)
    else:
        scores = q @ k.transpose(-2, -1)  # (B, H, Tq, Tk): q_i · k_j
        if rel_k is not None:
            scores = scores + torch.einsum("bhqd,qkd->bhqk", q, rel_k)  # q_i · a^K_ij
        scores = scores * scale

    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
    # A query with every key masked attends to nothing (zeros, not NaN), as in our sdpa.
    weights = weights.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)

    if naive:
        values = v[:, :, None] if rel_v is None else v[:, :, None] + rel_v  # (B, H, Tq, Tk, Dv): v_j + a^V_ij
        return (weights[..., None] * values).sum(-2)  # (B, H, Tq, Dv)
    out = weights @ v  # (B, H, Tq, Dv): Σ_j α_ij v_j
    if rel_v is not None:
        out = out + torch.einsum("bhqk,qkd->bhqd", weights, rel_v)  # Σ_j α_ij a^V_ij
    return out


class ShawRelativePosition(nn.Module):
    """Learned relative key and value embeddings of the clipped distance (Shaw et al. 2018, section 3.2):

        a^K_ij = w^K_clip(j - i, k),   a^V_ij = w^V_clip(j - i, k),   clip(x, k) = max(-k, min(k, x))

    so there are 2k + 1 vectors of each kind, k = `max_distance` (the paper finds k >= 2 enough).
    `forward(q, k, v, ...)` is `shaw_attention` with the tables for these lengths.
    """

    def __init__(self, max_distance: int, head_dim: int):
        super().__init__()
        for name, value in (("max_distance", max_distance), ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.max_distance, self.head_dim = max_distance, head_dim
        # row r holds w_(r - k): distances -k .. k
        self.w_k = nn.Embedding(2 * max_distance + 1, head_dim)
        self.w_v = nn.Embedding(2 * max_distance + 1, head_dim)
        # The paper does not say; small like GPT-2's embeddings, so a fresh module barely moves attention.
        nn.init.normal_(self.w_k.weight, std=0.02)
        nn.init.normal_(self.w_v.weight, std=0.02)

    def index(self, q_len: int, k_len: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """(Tq, Tk) row of the tables for each pair: clip(j - i', k) + k, in 0 .. 2k."""
        rel = relative_positions(q_len, k_len, device=device)
        return rel.clamp(-self.max_distance, self.max_distance) + self.max_distance

    def tables(self, q_len: int, k_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """a^K and a^V for these lengths, each (Tq, Tk, D)."""
        idx = self.index(q_len, k_len, device=self.w_k.weight.device)
        return self.w_k(idx), self.w_v(idx)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        scale: float | None = None,
        *,
        padding_mask: torch.Tensor | None = None,
        naive: bool = False,
    ) -> torch.Tensor:
        """q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D)."""
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"q and k must have shape (B, H, T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
        rel_k, rel_v = self.tables(q.shape[-2], k.shape[-2])
        return shaw_attention(
            q, k, v, rel_k.to(q.dtype), rel_v.to(v.dtype), attn_mask, is_causal, scale,
            padding_mask=padding_mask, naive=naive,
        )

    def extra_repr(self) -> str:
        return f"max_distance={self.max_distance}, head_dim={self.head_dim}"


def _check_shaw_inputs(q, k, v, rel_k, rel_v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, T, D), got {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "q (B, H, Tq, D), k (B, H, Tk, D) and v (B, H, Tk, Dv) disagree: got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    Tq, Tk = q.shape[-2], k.shape[-2]
    for name, t, d in (("rel_k", rel_k, q.shape[-1]), ("rel_v", rel_v, v.shape[-1])):
        if t is not None and tuple(t.shape) != (Tq, Tk, d):
            raise ValueError(f"{name} must have shape (Tq, Tk, {d}) = ({Tq}, {Tk}, {d}), got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------
# T5: bucketed relative attention bias
# ----------------------------------------------------------------------------------------------


def t5_relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's bucket (0 .. num_buckets - 1) of each relative position j - i (Raffel et al. 2020, 2.1).

    Bidirectional (the encoder): half the buckets for keys before or at the query, half for keys
    after it. Causal (the decoder): every bucket for the past; keys in the future share bucket 0
    with distance 0 (the causal mask hides them anyway). Within a direction of n buckets, distances
    below n/2 get a bucket each; larger ones share log-spaced buckets up to max_distance, and every
    distance from max_distance on falls in the last bucket. Same arithmetic (float32 logarithms,
    truncation) as Mesh TensorFlow's and Hugging Face's, so pretrained tables line up exactly.
    """
    if not isinstance(relative_position, torch.Tensor) or relative_position.is_floating_point() \
            or relative_position.dtype == torch.bool:
        raise ValueError(
            f"relative_position must be an integer tensor, got {getattr(relative_position, 'dtype', relative_position)}"
        )
    if not isinstance(num_buckets, int) or (bidirectional and num_buckets % 2):
        raise ValueError(f"num_buckets must be an int, even when bidirectional, got {num_buckets!r}")
    n = num_buckets // 2 if bidirectional else num_buckets  # buckets per direction
    if n < 2:
        raise ValueError(
            f"num_buckets must leave at least 2 buckets per direction, got num_buckets={num_buckets} "
            f"(bidirectional={bidirectional})"
        )
    max_exact = n // 2
    if not isinstance(max_distance, int) or max_distance <= max_exact:
        raise ValueError(
            f"max_distance must be an int > {max_exact} (the last exactly-bucketed distance + 1), got {max_distance!r}"
        )

    relative_position = relative_position.long()
    if bidirectional:
        bucket = (relative_position > 0).long() * n  # keys after the query use the upper half
        distance = relative_position.abs()
    else:
        bucket = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)  # how far back; the future counts as 0
    # log-spaced buckets: distance max_exact maps to bucket max_exact, max_distance to n (then clipped)
    # (the clamp only touches distances < max_exact, whose log would be -inf and which torch.where drops)
    log_ratio = torch.log(distance.float().clamp(min=max_exact) / max_exact) / math.log(max_distance / max_exact)
    if_large = (max_exact + (log_ratio * (n - max_exact)).long()).clamp(max=n - 1)
    return bucket + torch.where(distance < max_exact, distance, if_large)


class T5RelativeBias(nn.Module):
    """T5's learned relative attention bias: forward(q_len, k_len) -> (H, Tq, Tk).

    One scalar per (bucket, head), looked up by `t5_relative_position_bucket(j - i')`. The table is
    named `relative_attention_bias` (shape (num_buckets, H)) as in T5 checkpoints. T5 computes one
    bias in the first layer and adds it in every layer; it also leaves out the 1/√D scale (folded
    into the initialisation), so use `scaled_dot_product_attention(..., attn_mask=bias, scale=1.0)`.
    """

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        if not isinstance(n_heads, int) or n_heads <= 0:
            raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
        t5_relative_position_bucket(torch.zeros(1, dtype=torch.long), bidirectional, num_buckets, max_distance)
        self.n_heads, self.num_buckets = n_heads, num_buckets
        self.max_distance, self.bidirectional = max_distance, bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)

    def forward(self, q_len: int, k_len: int | None = None) -> torch.Tensor:
        rel = relative_positions(q_len, k_len, device=self.relative_attention_bias.weight.device)  # (Tq, Tk)
        buckets = t5_relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)  # (Tq, Tk, H) -> (H, Tq, Tk)

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
            f"bidirectional={self.bidirectional}"
        )


# ----------------------------------------------------------------------------------------------
# ALiBi: attention with linear biases
# ----------------------------------------------------------------------------------------------


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The head-specific slopes m_h, shape (H,), float32 (Press et al. 2022, section 3).

    For H a power of two: the geometric sequence that starts at 2^(-8/H) with that same ratio,
    m_h = 2^(-8h/H) for h = 1 .. H (H = 8: 1/2, 1/4, ..., 1/256). For other H the paper's code
    takes the slopes of the closest smaller power of two, P, and appends the first H - P of every
    other slope of the 2P sequence, 2^(-8(2h - 1)/(2P)) for h = 1 .. H - P (those lie between the
    first ones).
    """
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads <= 0:
        raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    p = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = power_of_two(p) + power_of_two(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(
    n_heads: int,
    q_len: int,
    k_len: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(H, Tq, Tk) additive bias -m_h · (i' - j): 0 on the diagonal, -m_h per step into the past.

    Pass it as `attn_mask` together with `is_causal=True`: ALiBi is defined for causal attention
    (the paper adds m·[-(i-1), ..., -2, -1, 0] to the scores of query i). Entries above the
    diagonal hold -m_h · |i' - j| (a symmetric extension) so that a forgotten causal mask at least
    does not favour the future; the mask hides them.
    """
    slopes = alibi_slopes(n_heads).to(device)  # (H,)
    distance = relative_positions(q_len, k_len, device=device).abs().to(torch.float32)  # (Tq, Tk): |i' - j|
    return (-slopes[:, None, None] * distance).to(dtype or torch.get_default_dtype())  # (H, Tq, Tk)


def _check_lengths(q_len: int, k_len: int) -> None:
    for name, value in (("q_len", q_len), ("k_len", k_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if q_len > k_len:
        raise ValueError(
            f"q_len ({q_len}) > k_len ({k_len}): positions are lower-right aligned, so every query needs a key at "
            "its own position (the keys are the cached ones plus the new ones)"
        )
