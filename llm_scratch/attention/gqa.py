"""Grouped-query attention (Ainslie et al. 2023), which covers MHA and MQA as its two ends.

H query heads share K key/value heads, H / K queries per group:
- K = H: multi-head attention (Vaswani et al. 2017);
- K = 1: multi-query attention (Shazeer 2019);
- in between: GQA, e.g. Llama 3 8B with H = 32, K = 8.
Only the key and value projections shrink (to K·D outputs); the KV cache shrinks with them by H / K.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_scratch.attention.kv_cache import KVCache, SlidingWindowKVCache
from llm_scratch.attention.sdpa import max_logits_per_head, scaled_dot_product_attention
from llm_scratch.position.rope import RotaryEmbedding

__all__ = ["GroupedQueryAttention"]


class GroupedQueryAttention(nn.Module):
    """Self-attention with `n_heads` query heads and `n_kv_heads` key/value heads.

    Args:
        d_model: model width C.
        n_heads: query heads H.
        n_kv_heads: key/value heads K; must divide H. None means K = H (MHA).
        head_dim: D; defaults to C / H (which must then divide evenly).
        bias: whether the q, k, v and output projections have biases.
        dropout: dropout on the attention weights, active in training mode only.
        causal: decoder (True) or bidirectional encoder (False) attention.
        window: sliding-window size (keys each query sees, itself included); implies causal.
        rope: a RotaryEmbedding for D channels applied to q and k, or None.
        scale: the score scale; None means 1/√D (Gemma uses query_pre_attn_scalar^-1/2 instead).
        softcap: soft-cap the scores at ±softcap (Gemma 2), or None.

    Subclasses change how q, k, v are made by overriding `project` (Qwen3's QK-norm does).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = False,
        dropout: float = 0.0,
        causal: bool = True,
        window: int | None = None,
        rope: RotaryEmbedding | None = None,
        scale: float | None = None,
        softcap: float | None = None,
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model < 1 or n_heads < 1 or n_kv_heads < 1:
            raise ValueError(f"d_model, n_heads, n_kv_heads must be >= 1, got {d_model}, {n_heads}, {n_kv_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model}) when head_dim is not given")
            head_dim = d_model // n_heads
        if window is not None and (not causal or window < 1):
            raise ValueError(f"window must be a positive int and needs causal=True, got window={window}")
        if rope is not None and rope.head_dim != head_dim:
            raise ValueError(f"rope covers {rope.head_dim} channels but head_dim is {head_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        for name, value in (("scale", scale), ("softcap", softcap)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None or > 0, got {value!r}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.dropout, self.causal, self.window, self.rope = dropout, causal, window, rope
        self.scale, self.softcap = scale, softcap
        # QK-Clip (training/optim.py): when True, every forward folds each query head's largest pre-softmax
        # logit into max_logits (H,), a running max until qk_clip reads and clears it. Off: no cost.
        self.record_max_logits, self.max_logits = False, None
        # Magnitude-QK-Clip: the largest ‖q‖ of each query head (H,) and ‖k‖ of each kv head (K,), no logits needed
        self.record_qk_norms, self.max_q_norm, self.max_k_norm = False, None, None
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)

    def init_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> KVCache | SlidingWindowKVCache:
        """An empty KV cache shaped for this layer (dtype and device default to the weights'); a
        sliding-window layer gets a cache that keeps only the last window - 1 tokens."""
        w = self.k_proj.weight
        dtype, device = dtype or w.dtype, device or w.device
        if self.window is not None:
            return SlidingWindowKVCache(batch_size, max_len, self.n_kv_heads, self.head_dim, self.window,
                                        dtype=dtype, device=device)
        return KVCache(batch_size, max_len, self.n_kv_heads, self.head_dim, dtype=dtype, device=device)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, H, T, D), k and v (B, K, T, D), before RoPE."""
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)
        return q, k, v

    def _rotate(self, q, k, positions, start: int):
        if self.rope is None:
            return q, k
        if positions is None:
            positions = torch.arange(start, start + q.shape[2], device=q.device)
        return self.rope(q, positions), self.rope(k, positions)

    @torch.no_grad()
    def attention_scores(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The pre-softmax scores q·kᵀ·scale (soft-capped if set), before any mask: (B, H, T, T).

        For looking inside (e.g. how large attention logits grow during training), not for the forward pass.
        """
        q, k, _ = self.project(x)
        q, k = self._rotate(q, k, positions, 0)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # query head h reads kv head h // G
        scale = self.head_dim ** -0.5 if self.scale is None else self.scale
        scores = (q @ k.transpose(-2, -1)) * scale
        return scores if self.softcap is None else self.softcap * torch.tanh(scores / self.softcap)

    def forward(
        self,
        x: torch.Tensor,
        *,
        padding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        naive: bool = False,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        padding_mask: (B, T) for x's tokens, True = real. With a cache, the cache remembers the
            padding of earlier tokens, so pass only the new tokens' mask.
        cache: appended to with this call's keys and values; queries attend over all of it.
        positions: (T,) or (B, T) RoPE positions; default cache.length + 0..T-1.
        attn_mask: (B, T, Tk) bool, True = query may attend to key; combined with the causal (or window)
            and padding masks, e.g. the block-diagonal mask of packed sequences.
        naive: use the explicit softmax(QKᵀ/√D)V path instead of the fused kernel.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, T, {self.d_model}), got {tuple(x.shape)}")
        if attn_mask is not None and attn_mask.dim() != 3:
            raise ValueError(f"attn_mask must have shape (B, T, Tk), got {tuple(attn_mask.shape)}")
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.project(x)  # (B, H, T, D), (B, K, T, D), (B, K, T, D)
        # the default RoPE start is the cached length, read only when needed: a static cache's length is a device
        # sync that a compiled decode step (which passes positions) must not make
        q, k = self._rotate(q, k, positions, cache.length if cache is not None and positions is None else 0)
        if cache is not None:
            k, v, padding_mask = cache.update(k, v, padding_mask)
        if self.record_qk_norms:
            self._record_norms(q, k, padding_mask)
        if self.record_max_logits:
            self._record(max_logits_per_head(q, k, self.scale, None if attn_mask is None else attn_mask[:, None],
                                             self.causal, padding_mask, self.window))
        out = scaled_dot_product_attention(
            q, k, v,
            attn_mask=None if attn_mask is None else attn_mask[:, None],  # (B, 1, T, Tk): same for every head
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal,
            enable_gqa=K != H,
            padding_mask=padding_mask,
            window=self.window,
            scale=self.scale,
            softcap=self.softcap,
            naive=naive,
        )  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D))

    @torch.no_grad()
    def _record_norms(self, q, k, padding_mask) -> None:
        q_norm, k_norm = q.float().norm(dim=-1), k.float().norm(dim=-1)  # (B, H, T), (B, K, Tk); RoPE keeps norms
        if padding_mask is not None:  # padding tokens' q and k never meet a real token
            k_norm = k_norm.masked_fill(~padding_mask[:, None], 0.0)
            q_norm = q_norm.masked_fill(~padding_mask[:, None, -q.shape[2]:], 0.0)
        q_max, k_max = q_norm.amax(dim=(0, 2)), k_norm.amax(dim=(0, 2))
        self.max_q_norm = q_max if self.max_q_norm is None else torch.maximum(self.max_q_norm, q_max)
        self.max_k_norm = k_max if self.max_k_norm is None else torch.maximum(self.max_k_norm, k_max)

    def _record(self, logits: torch.Tensor) -> None:
        self.max_logits = logits if self.max_logits is None else torch.maximum(self.max_logits, logits)

    def extra_repr(self) -> str:
        extra = f", window={self.window}" if self.window is not None else ""
        extra += f", scale={self.scale}" if self.scale is not None else ""
        extra += f", softcap={self.softcap}" if self.softcap is not None else ""
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}{extra}")
