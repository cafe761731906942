"""Scaled dot-product attention from scratch, and the masks it takes.

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V            (Vaswani et al. 2017, eq. 1)

`scaled_dot_product_attention` has the call shape of `torch.nn.functional.scaled_dot_product_attention`
(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) plus three keyword-only extras:
`padding_mask`, `window` and `naive`. Two paths compute the same thing: `naive=True` writes the
equation out with matmuls and a softmax; the default hands the combined mask to PyTorch's fused kernel.

Mask conventions (one meaning per name, as everywhere in llm_scratch):
- boolean `attn_mask`: True = this query may attend to this key (PyTorch's meaning; note that
  `torch.nn.MultiheadAttention` uses the opposite one). A float `attn_mask` is added to the scores.
- `padding_mask`: (B, Tk), True = a real key token, False = padding.
- causal: query i may see key j when j <= i + (Tk - Tq). The diagonal is aligned to the *lower
  right*: the last query sits at the last key. That is what KV-cache decoding (Tq = 1) and chunked
  prefill (a chunk of new queries after cached keys) need. PyTorch's `is_causal` aligns to the
  upper left instead; the two agree when Tq == Tk.
- `window`: sliding-window attention; each query sees at most `window` keys, itself included, so
  key j is visible from query i when i' - window < j <= i' (i' = i + Tk - Tq).

A query whose every key is masked (a padding query under left padding, for instance) gets an
output of zeros rather than NaN, as in PyTorch's own kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "causal_mask",
    "sliding_window_mask",
    "padding_to_attn_mask",
    "build_attn_mask",
    "max_logits_per_head",
    "scaled_dot_product_attention",
]


def causal_mask(q_len: int, k_len: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """(Tq, Tk) boolean mask, True where query i may see key j: j <= i + (Tk - Tq) (lower-right aligned)."""
    k_len = q_len if k_len is None else k_len
    _check_lengths(q_len, k_len)
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # absolute position of each query
    k_pos = torch.arange(k_len, device=device)[None, :]
    return k_pos <= q_pos


def sliding_window_mask(
    q_len: int, k_len: int | None = None, window: int = 1, device: torch.device | None = None
) -> torch.Tensor:
    """(Tq, Tk) causal mask that also hides keys `window` or more positions behind the query.

    Each query sees at most `window` keys, itself included: q_pos - window < j <= q_pos.
    """
    k_len = q_len if k_len is None else k_len
    _check_lengths(q_len, k_len)
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int (keys each query sees, itself included), got {window!r}")
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def padding_to_attn_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, Tk) padding mask (True = real token) -> (B, 1, 1, Tk) attention mask over keys."""
    if padding_mask.dtype != torch.bool or padding_mask.dim() != 2:
        raise ValueError(
            "padding_mask must be a bool tensor of shape (B, Tk) with True for real tokens, "
            f"got dtype {padding_mask.dtype} and shape {tuple(padding_mask.shape)}"
        )
    return padding_mask[:, None, None, :]


def build_attn_mask(
    q_len: int,
    k_len: int,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    padding_mask: torch.Tensor | None = None,
    window: int | None = None,
    batch_size: int | None = None,
    n_heads: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Combine every kind of mask into one boolean (or, if `attn_mask` is float, additive) mask.

    Returns None when nothing is masked, a tensor broadcastable to (B, H, Tq, Tk) otherwise.
    `window` implies causal. `batch_size`/`n_heads`, when given, are used to check the shapes.
    `device` defaults to that of `padding_mask` or `attn_mask`.
    """
    if device is None:
        device = next((m.device for m in (padding_mask, attn_mask) if m is not None), None)
    mask: torch.Tensor | None = None
    if window is not None:
        mask = sliding_window_mask(q_len, k_len, window, device=device)
    elif is_causal:
        mask = causal_mask(q_len, k_len, device=device)
    if padding_mask is not None:
        if padding_mask.dim() != 2 or padding_mask.shape[1] != k_len or (
            batch_size is not None and padding_mask.shape[0] != batch_size
        ):
            raise ValueError(
                f"padding_mask must have shape (B, Tk) = ({batch_size if batch_size is not None else 'B'}, "
                f"{k_len}), got {tuple(padding_mask.shape)}"
            )
        pad = padding_to_attn_mask(padding_mask)
        mask = pad if mask is None else mask & pad
    if attn_mask is not None:
        _check_attn_mask(attn_mask, q_len, k_len, batch_size, n_heads)
        if attn_mask.dtype == torch.bool:
            mask = attn_mask if mask is None else mask & attn_mask
        else:
            # A float mask is additive: turn the structural mask into 0 / -inf and add.
            if mask is not None:
                attn_mask = attn_mask.masked_fill(~mask, float("-inf"))
            mask = attn_mask
    return mask


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    padding_mask: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    naive: bool = False,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v over the last two dimensions.

    Shapes: q (B, H, Tq, D), k (B, K, Tk, D), v (B, K, Tk, Dv) -> (B, H, Tq, Dv).
    K == H, or with `enable_gqa=True` any K dividing H: query head h reads key/value head
    h // (H / K) (grouped-query attention; K = 1 is multi-query attention).

    attn_mask: bool (True = may attend) or float (added to the scores), broadcastable to
        (B, H, Tq, Tk) with each leading dimension equal to the full size or 1.
    is_causal: lower-right aligned causal mask (see the module docstring; torch's is upper-left).
    scale: defaults to 1/√D.
    padding_mask: (B, Tk), True = real key.
    window: sliding-window size (implies causal).
    softcap: soft-cap the scores before masking, s -> softcap · tanh(s / softcap), so none exceeds
        ±softcap (Gemma 2, Gemma Team 2024, arXiv:2408.00118, section 2). The fused kernel has no
        such option, so this always takes the explicit path.
    naive: compute the equation explicitly instead of calling the fused kernel.
    """
    _check_qkv(q, k, v, enable_gqa)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    B, H, Tq, D = q.shape
    Tk = k.shape[-2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = build_attn_mask(
        Tq, Tk, attn_mask=attn_mask, is_causal=is_causal, padding_mask=padding_mask, window=window,
        batch_size=B, n_heads=H, device=q.device,
    )
    if not naive and softcap is None:
        # Plain square causal attention: let the kernel build the mask itself (it is then free to
        # pick a FlashAttention backend, which takes no explicit mask).
        plain_causal = is_causal and Tq == Tk and window is None and attn_mask is None and padding_mask is None
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if plain_causal else mask, dropout_p=dropout_p, is_causal=plain_causal,
            scale=scale, enable_gqa=enable_gqa,
        )

    # --- the reference path, term by term ---
    # Grouped-query attention without copying keys: view the H query heads as K groups of G = H / K
    # (query head h = g·G + i reads kv head g, as torch's enable_gqa), and let matmul broadcast each
    # kv head over its group. K == H is plain multi-head attention with groups of one.
    K = k.shape[1]
    G = H // K
    qg = q.view(B, K, G, Tq, D)
    scores = (qg @ k[:, :, None].transpose(-2, -1)) * scale  # (B, K, G, Tq, Tk)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        mask = _group_heads(mask, K, G)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1)
    # A row with every key masked is all -inf and its softmax is 0/0 = NaN: it attends to nothing.
    weights = weights.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return (weights @ v[:, :, None]).reshape(B, H, Tq, v.shape[-1])  # (B, H, Tq, Dv)


def _group_heads(mask: torch.Tensor, K: int, G: int) -> torch.Tensor:
    """A mask broadcastable to (B, H, Tq, Tk) -> one broadcastable to (B, K, G, Tq, Tk)."""
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (b, h, Tq, Tk), b in {1, B}, h in {1, H}
    b, h, tq, tk = mask.shape
    return mask.reshape(b, K, G, tq, tk) if h != 1 else mask[:, :, None]


def _check_lengths(q_len: int, k_len: int) -> None:
    if q_len < 0 or k_len < 0:
        raise ValueError(f"sequence lengths must be non-negative, got q_len={q_len}, k_len={k_len}")
    if q_len > k_len:
        raise ValueError(
            f"q_len ({q_len}) > k_len ({k_len}): with lower-right alignment every query must have a key "
            "at its own position (the keys are the cached ones plus the new ones)"
        )


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, heads, T, head_dim), got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k head_dim ({k.shape[-1]}) must equal q head_dim ({q.shape[-1]})")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must agree on (B, K, Tk), got k {tuple(k.shape[:3])} and v {tuple(v.shape[:3])}"
        )
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k batch size ({k.shape[0]}) must equal q batch size ({q.shape[0]})")
    H, K = q.shape[1], k.shape[1]
    if enable_gqa:
        if H % K != 0:
            raise ValueError(f"with enable_gqa, the kv heads ({K}) must divide the query heads ({H})")
    elif H != K:
        raise ValueError(
            f"k has {K} heads but q has {H}; pass enable_gqa=True for grouped-query attention"
        )


def _check_attn_mask(
    attn_mask: torch.Tensor, q_len: int, k_len: int, batch_size: int | None, n_heads: int | None
) -> None:
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f"attn_mask must be bool (True = may attend) or float (additive), got {attn_mask.dtype}")
    shape = tuple(attn_mask.shape)
    ok = attn_mask.dim() in (2, 3, 4) and shape[-2:] == (q_len, k_len)
    if ok and attn_mask.dim() >= 3:
        ok = shape[-3] in (1, n_heads if n_heads is not None else shape[-3])
    if ok and attn_mask.dim() == 4:
        ok = shape[0] in (1, batch_size if batch_size is not None else shape[0])
    if not ok:
        raise ValueError(
            f"attn_mask must have shape (Tq, Tk), (H or 1, Tq, Tk) or (B or 1, H or 1, Tq, Tk) with "
            f"Tq={q_len}, Tk={k_len}, H={n_heads}, B={batch_size}; got {shape}"
        )


@torch.no_grad()
def max_logits_per_head(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                        attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                        padding_mask: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """The largest pre-softmax logit q·k·scale of each query head over every (batch, query, key) that the masks
    allow -> (H,) float32. q (B, H, Tq, D), k (B, K, Tk, D) with K dividing H (grouped as in
    scaled_dot_product_attention). What QK-Clip (Kimi K2) watches; computed explicitly, so only when asked for.
    """
    B, H, Tq, D = q.shape
    K, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = (q.view(B, K, H // K, Tq, D) @ k[:, :, None].transpose(-2, -1)) * scale  # (B, K, G, Tq, Tk)
    mask = build_attn_mask(Tq, Tk, attn_mask=attn_mask, is_causal=is_causal, padding_mask=padding_mask,
                           window=window, batch_size=B, n_heads=H, device=q.device)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError("max_logits_per_head takes boolean masks only")
        scores = scores.masked_fill(~_group_heads(mask, K, H // K), float("-inf"))
    return scores.float().amax(dim=(0, 3, 4)).reshape(H)  # query head h = g·G + i, as in the attention
