"""Multi-head latent attention (MLA): DeepSeek-V2 (arXiv:2405.04434, section 2.1), used again in DeepSeek-V3.

MHA caches a key and a value per head, 2·n_h·d_h numbers per token and layer. MLA caches one small
latent vector per token instead and rebuilds every head's keys and values from it:

    c_KV = W_DKV h                                   (eq. 9)   down-projection, d_c << n_h·d_h
    k^C  = W_UK c_KV,   v^C = W_UV c_KV              (eqs. 10-11) up-projections, per head
    c_Q  = W_DQ h,      q^C = W_UQ c_Q               (eqs. 12-13) the query is compressed too
                                                               (training memory; not cached)
RoPE cannot go on k^C (see "why decoupled" below), so position enters through extra channels:

    q^R  = RoPE(W_QR c_Q)   (d_R per head)           (eq. 14)
    k^R  = RoPE(W_KR h)     (d_R, ONE head shared by all query heads)   (eq. 15)
    q_h  = [q^C_h ; q^R_h],  k_h = [k^C_h ; k^R]     (eqs. 16-17)
    o_h  = softmax(q_hᵀ k_h / sqrt(d_h + d_R)) v^C_h (eq. 18)
    u    = W_O [o_1 ; ... ; o_H]                     (eq. 19)

The cache holds c_KV and k^R: (d_c + d_R) numbers per token, whatever n_h is.

Two inference paths compute the same numbers:
- `absorb=False`, the "naive" path: up-project the cached latent into per-head keys and values
  (eqs. 10-11), then ordinary multi-head attention.
- `absorb=True`: q^C_hᵀ k^C_h = q^C_hᵀ W_UK_h c_KV = (W_UK_hᵀ q^C_h)ᵀ c_KV, so W_UK can be folded
  into the query and the keys are the latent itself; likewise o_h = W_UV_h (Σ p·c_KV), so W_UV can
  be applied after attention. Attention then runs directly over the cache as multi-query
  attention (one kv head of width d_c + d_R, values c_KV), and no per-head key or value is ever
  materialized (section 2.1.2's "absorb W_UK into W_UQ, W_UV into W_O").

Why decoupled RoPE: RoPE rotates a query at position m by R_m and a key at position n by R_n. Put
on k^C, the score would be (R_m q^C_h)ᵀ R_n W_UK_h c_n = q^C_hᵀ R_(n-m) W_UK_h c_n: the matrix between
the query and the latent, R_(n-m) W_UK_h, changes with the distance to each key, so no single matrix
can be folded into the query, and every cached latent would have to be up-projected again at every
step. Keeping the rotated part in separate channels (q^R, k^R) leaves the compressed part
position-free and absorbable; the rope key is small (d_R) and shared, so caching it costs little.

Parameter names follow Hugging Face's `DeepseekV3Attention`, so its state_dict loads as is:
W_DQ = q_a_proj, W_UQ and W_QR stacked = q_b_proj (or one q_proj when `q_lora_rank` is None, as
in DeepSeek-V2-Lite), W_DKV and W_KR stacked = kv_a_proj_with_mqa, W_UK and W_UV stacked =
kv_b_proj, W_O = o_proj. As in DeepSeek's released code (not in the paper's equations), c_Q and
c_KV are RMS-normalized (q_a_layernorm, kv_a_layernorm) before their up-projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from llm_scratch.attention.kv_cache import MLACache
from llm_scratch.attention.sdpa import max_logits_per_head, scaled_dot_product_attention
from llm_scratch.norm import RMSNorm
from llm_scratch.position.rope import RopeScaling, RotaryEmbedding

__all__ = ["MLAConfig", "MultiHeadLatentAttention"]


@dataclass
class MLAConfig:
    """Sizes of one MLA layer, named as in Hugging Face's DeepseekV3Config (paper symbol in brackets).

    d_model: model width C [d].
    n_heads: attention heads H [n_h].
    kv_lora_rank: width of the cached latent c_KV [d_c]; DeepSeek-V2/V3 use 512 = 4·d_h.
    q_lora_rank: width of the query latent c_Q [d_c']; None = one full-rank q projection
        (DeepSeek-V2-Lite).
    qk_nope_head_dim: per-head query/key width without position [d_h].
    qk_rope_head_dim: per-head width of the decoupled RoPE query and of the shared RoPE key [d_h^R].
    v_head_dim: per-head value width (d_h in the paper; a separate number in the code).
    rope_base: RoPE's θ base. rope_interleaved: DeepSeek pairs channels (2i, 2i+1), see position/rope.py.
    rope_scaling: a Hugging Face style rope_parameters dict (e.g. DeepSeek-V3's YaRN, factor 40) for the
        decoupled RoPE's frequencies and cos/sin factor; it also sets rope_scaling_factor and mscale_all_dim.
    rope_scaling_factor, mscale_all_dim: YaRN's softmax-scale correction (see `softmax_scale`); taken from
        rope_scaling when that is given, else settable alone (the frequencies then stay unscaled).
    attention_bias: biases on q_a_proj, kv_a_proj_with_mqa and o_proj (as Hugging Face's flag).
    norm_eps: epsilon of the two latent RMSNorms.
    """

    d_model: int
    n_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_base: float = 10000.0
    rope_interleaved: bool = True
    rope_scaling: dict | None = None
    rope_scaling_factor: float | None = None
    mscale_all_dim: float = 0.0
    attention_bias: bool = False
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.rope_scaling is not None:
            scaling = RopeScaling.from_dict(self.rope_scaling)  # validates
            if scaling.rope_type != "default":
                self.rope_scaling_factor = float(scaling.factor)
                self.mscale_all_dim = float(scaling.mscale_all_dim or 0.0)
        sizes = ("d_model", "n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        for name in sizes:
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.q_lora_rank is not None and not _is_positive_int(self.q_lora_rank):
            raise ValueError(
                f"q_lora_rank must be a positive int or None (full-rank query), got {self.q_lora_rank!r}"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"qk_rope_head_dim must be even (RoPE rotates pairs of channels), got {self.qk_rope_head_dim}"
            )
        if not self.rope_base > 1:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base!r}")
        if self.rope_scaling_factor is not None and not self.rope_scaling_factor >= 1:
            raise ValueError(
                "rope_scaling_factor must be None or >= 1 (the context extension factor), "
                f"got {self.rope_scaling_factor!r}"
            )
        if not self.mscale_all_dim >= 0:
            raise ValueError(f"mscale_all_dim must be >= 0, got {self.mscale_all_dim!r}")
        if self.mscale_all_dim and self.rope_scaling_factor is None:
            raise ValueError(
                f"mscale_all_dim={self.mscale_all_dim} only acts together with rope_scaling_factor, "
                "which is None"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def qk_head_dim(self) -> int:
        """Width of one query/key head: d_h + d_h^R."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R) (eq. 18), times mscale² when YaRN extends the context.

        YaRN (Peng et al. 2023, arXiv:2309.00071, section 3.4) sharpens the softmax of a
        context-extended model by mscale = 0.1·ln(factor) + 1 applied to both q and k. DeepSeek's
        variant weights it by `mscale_all_dim`: mscale = 0.1·mscale_all_dim·ln(factor) + 1 when
        factor > 1, else 1, and folds it into the softmax scale (q and k each get one factor).
        """
        scale = self.qk_head_dim ** -0.5
        factor = self.rope_scaling_factor
        if factor is not None and factor > 1 and self.mscale_all_dim:
            mscale = 0.1 * self.mscale_all_dim * math.log(factor) + 1.0
            scale *= mscale * mscale
        return scale


class MultiHeadLatentAttention(nn.Module):
    """Causal self-attention with a low-rank key/value latent and decoupled RoPE (DeepSeek-V2/V3)."""

    def __init__(self, config: MLAConfig):
        super().__init__()
        if not isinstance(config, MLAConfig):
            raise ValueError(f"config must be an MLAConfig, got {type(config).__name__}")
        self.config = c = config
        H = c.n_heads
        # queries: eqs. 12-14. The q^C (d_h) and q^R (d_R) channels of each head come out of one
        # matrix: per head, [W_UQ_h ; W_QR_h] stacked, (H·(d_h + d_R)) outputs in all.
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.d_model, H * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.d_model, c.q_lora_rank, bias=c.attention_bias)  # W_DQ
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, H * c.qk_head_dim, bias=False)  # [W_UQ ; W_QR]
        # keys/values: [W_DKV ; W_KR] (eqs. 9 and 15) in one matrix: d_c latent + ONE d_R rope key
        self.kv_a_proj_with_mqa = nn.Linear(
            c.d_model, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.norm_eps)
        # [W_UK ; W_UV] per head (eqs. 10-11). No bias: absorption (forward's absorb=True) needs it linear.
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * c.v_head_dim, c.d_model, bias=c.attention_bias)  # W_O (eq. 19)
        scaling = RopeScaling.from_dict(c.rope_scaling) if c.rope_scaling else None
        self.rope = RotaryEmbedding(c.qk_rope_head_dim, c.rope_base, interleaved=c.rope_interleaved, scaling=scaling)
        # QK-Clip (training/optim.py): record each head's largest pre-softmax logit, as GroupedQueryAttention does
        self.record_max_logits, self.max_logits = False, None

    @property
    def softmax_scale(self) -> float:
        return self.config.softmax_scale

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> MLACache:
        """An empty latent cache shaped for this layer (dtype and device default to the weights')."""
        w = self.kv_a_proj_with_mqa.weight
        return MLACache(batch_size, max_len, self.config.kv_lora_rank, self.config.qk_rope_head_dim,
                        dtype=dtype or w.dtype, device=device or w.device)

    def forward(
        self,
        x: torch.Tensor,
        *,
        padding_mask: torch.Tensor | None = None,
        cache: MLACache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        absorb: bool = False,
        naive: bool = False,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). Always causal.

        padding_mask: (B, T) for x's tokens, True = real. With a cache, the cache remembers the
            padding of earlier tokens, so pass only the new tokens' mask.
        cache: an MLACache (see `init_cache`); this call's normalized latent c_KV and rotated k^R
            are appended to it and the queries attend over everything it holds.
        positions: (T,) or (B, T) RoPE positions; default cache.length + 0..T-1. Left-padded
            batches should pass each sequence's own positions (e.g. padding_mask.cumsum(-1) - 1).
        attn_mask: (B, T, T_k) bool, True = may attend, on top of the causal mask (packed sequences).
        absorb: attend over the latent with W_UK and W_UV folded in (see the module docstring)
            instead of expanding it into per-head keys and values. Same result.
        naive: use sdpa's explicit softmax(QKᵀ·scale)V path instead of the fused kernel.
        """
        c = self.config
        if x.dim() != 3 or x.shape[-1] != c.d_model:
            raise ValueError(f"x must have shape (B, T, {c.d_model}), got {tuple(x.shape)}")
        if cache is not None and not isinstance(cache, MLACache):
            raise ValueError(f"cache must be an MLACache (see init_cache), got {type(cache).__name__}")
        B, T, _ = x.shape
        H, Dn, Dr = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=x.device)
        elif positions.shape not in ((T,), (B, T)):
            raise ValueError(f"positions must have shape (T,) = ({T},) or (B, T) = ({B}, {T}), "
                             f"got {tuple(positions.shape)}")

        # queries (eqs. 12-14, 16): one (d_h + d_R) vector per head, split into its two parts
        if c.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, c.qk_head_dim).transpose(1, 2)  # (B, H, T, d_h + d_R)
        q_nope, q_rope = q.split([Dn, Dr], dim=-1)  # (B, H, T, d_h), (B, H, T, d_R)
        q_rope = self.rope(q_rope, positions)

        # the compressed key/value latent (eq. 9) and the shared rope key (eq. 15)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, Dr], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, T, d_c)
        k_rope = self.rope(k_rope[:, None], positions)[:, 0]  # (B, T, d_R): rotated once, then cached
        if cache is not None:  # from here on T_k = every cached token, this call's included
            latent, k_rope, padding_mask = cache.update(latent, k_rope, padding_mask)

        attend = self._attend_absorbed if absorb else self._attend_expanded
        if attn_mask is not None and attn_mask.dim() != 3:
            raise ValueError(f"attn_mask must have shape (B, T, T_k), got {tuple(attn_mask.shape)}")
        mask = None if attn_mask is None else attn_mask[:, None]  # (B, 1, T, T_k): the same for every head
        out = attend(q_nope, q_rope, latent, k_rope, padding_mask, mask, naive)  # (B, H, T, d_v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * c.v_head_dim))  # eq. 19

    def _attend_expanded(self, q_nope, q_rope, latent, k_rope, padding_mask, attn_mask, naive):
        """Naive inference: rebuild per-head keys and values from the latent, then plain MHA.

        q_nope (B, H, T, d_h), q_rope (B, H, T, d_R), latent (B, S, d_c), k_rope (B, S, d_R)
        -> (B, H, T, d_v); S = keys (cached and new).
        """
        c = self.config
        B, S, _ = latent.shape
        H, Dn = c.n_heads, c.qk_nope_head_dim
        kv = self.kv_b_proj(latent).view(B, S, H, Dn + c.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([Dn, c.v_head_dim], dim=-1)  # eqs. 10-11: (B, H, S, d_h), (B, H, S, d_v)
        # eq. 17: every head's key ends with the same rope key k^R
        k = torch.cat([k_nope, k_rope[:, None].expand(B, H, S, c.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # eq. 16
        self._record(q, k, padding_mask, attn_mask)
        return scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=True, scale=self.softmax_scale, padding_mask=padding_mask,
            naive=naive,
        )  # eq. 18

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope, padding_mask, attn_mask, naive):
        """Absorbed inference: multi-query attention directly over the cached latent. Same shapes as above."""
        c = self.config
        H, Dn, Dv = c.n_heads, c.qk_nope_head_dim, c.v_head_dim
        # kv_b_proj.weight is (H·(d_h + d_v), d_c): per head, W_UK_h (d_h, d_c) above W_UV_h (d_v, d_c)
        w_uk, w_uv = self.kv_b_proj.weight.view(H, Dn + Dv, c.kv_lora_rank).split([Dn, Dv], dim=1)
        # eqs. 10 + 16-18: q^C_hᵀ k^C_h = q^C_hᵀ (W_UK_h c_KV) = (W_UK_hᵀ q^C_h)ᵀ c_KV.
        # The rope part is untouched: its key is already position-rotated and shared.
        q_latent = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # (B, H, T, d_c)
        q = torch.cat([q_latent, q_rope], dim=-1)  # (B, H, T, d_c + d_R)
        k = torch.cat([latent, k_rope], dim=-1)[:, None]  # (B, 1, S, d_c + d_R): one kv head for all H
        self._record(q, k, padding_mask, attn_mask)
        v = latent[:, None]  # (B, 1, S, d_c)
        # The score is the same number as in the expanded path, so the scale is still 1/sqrt(d_h + d_R),
        # not 1/sqrt of this query's width.
        o_latent = scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=True, scale=self.softmax_scale, enable_gqa=True,
            padding_mask=padding_mask, naive=naive,
        )  # (B, H, T, d_c): each head's attention-weighted average of latents
        # eq. 11 + 18: Σ_j p_j W_UV_h c_j = W_UV_h Σ_j p_j c_j, so W_UV is applied once, after attention
        return torch.einsum("bhtc,hvc->bhtv", o_latent, w_uv)  # (B, H, T, d_v)

    def _record(self, q, k, padding_mask, attn_mask) -> None:
        if self.record_max_logits:  # the same scores in both inference paths
            logits = max_logits_per_head(q, k, self.softmax_scale, attn_mask, True, padding_mask)
            self.max_logits = logits if self.max_logits is None else torch.maximum(self.max_logits, logits)

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_model={c.d_model}, n_heads={c.n_heads}, kv_lora_rank={c.kv_lora_rank}, "
                f"q_lora_rank={c.q_lora_rank}, qk_nope_head_dim={c.qk_nope_head_dim}, "
                f"qk_rope_head_dim={c.qk_rope_head_dim}, v_head_dim={c.v_head_dim}")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
