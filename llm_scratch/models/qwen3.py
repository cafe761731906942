"""Qwen3 (Qwen Team 2025, "Qwen3 Technical Report", arXiv:2505.09388), as Llama 3 changed in two places:

- QK-norm: an RMSNorm over each head's D channels of q and of k, before RoPE (Dehghani et al. 2023,
  arXiv:2302.05442; Wortsman et al. 2023, arXiv:2309.14322). Without it, q·k can grow during training
  until softmax saturates to one key ("attention-logit growth"); normalized q and k bound q·k/√D by
  the norms' gains. It replaces the qkv biases of Qwen2.
- head_dim is its own setting, not d_model / n_heads: Qwen3-0.6B has 16 heads of 128 on a width of
  1,024, so the attention works in 2,048 dimensions and o_proj maps them back to 1,024.

Everything else (GQA, SwiGLU, RMSNorm, RoPE with base 10⁶, tied head in the small sizes) is Llama's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_scratch.attention import GroupedQueryAttention
from llm_scratch.models.llama3 import Llama3, Llama3Config
from llm_scratch.norm import RMSNorm

__all__ = ["QKNormAttention", "Qwen3", "Qwen3Config"]

_PRESETS = {
    "qwen3-0.6b": dict(d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, ffn_hidden=3072),
    "qwen3-1.7b": dict(d_model=2048, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, ffn_hidden=6144),
}


@dataclass
class Qwen3Config(Llama3Config):
    """Defaults are Qwen3-0.6B's."""

    vocab_size: int = 151936
    context_length: int = 40960
    d_model: int = 1024
    n_layers: int = 28
    n_heads: int = 16
    n_kv_heads: int = 8
    head_dim: int | None = 128
    ffn_hidden: int = 3072
    rope_base: float = 1_000_000.0
    rope_scaling: dict | None = None
    norm_eps: float = 1e-6

    presets = _PRESETS


class QKNormAttention(GroupedQueryAttention):
    """Grouped-query attention with an RMSNorm on every head of q and of k (shared across heads).

    norm: a factory dim -> module, so Gemma can use its own (1 + w) RMSNorm.
    """

    def __init__(self, *args, eps: float = 1e-6, norm=None, **kwargs):
        super().__init__(*args, **kwargs)
        make = norm or (lambda dim: RMSNorm(dim, eps, cast_before_weight=True))
        self.q_norm = make(self.head_dim)
        self.k_norm = make(self.head_dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)  # (B, H, T, D), (B, K, T, D), (B, K, T, D)
        return self.q_norm(q), self.k_norm(k), v  # normalized over D, before RoPE


class Qwen3(Llama3):
    config_class = Qwen3Config

    def make_attention(self, layer: int) -> GroupedQueryAttention:
        cfg = self.cfg
        if not hasattr(self, "_rope"):
            self._rope = self.make_rope(cfg.rope_base, cfg.rope_scaling)
        return QKNormAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, bias=False,
                               dropout=cfg.dropout, rope=self._rope, eps=cfg.norm_eps)
