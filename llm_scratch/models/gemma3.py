"""Gemma 3, text only (Gemma Team 2025, "Gemma 3 Technical Report", arXiv:2503.19786), as Llama 3 changed
in these places (each is a few lines below):

- local and global layers, 5:1: five sliding-window layers for every global one (Gemma 3 report,
  section 2; a window of 1,024 tokens there, 512 in the released 270M and 1B configs). Only global
  layers need a KV cache as long as the text; the local ones keep window - 1 tokens
  (`SlidingWindowKVCache`), which is most of the cache saved.
- two RoPE bases: 10⁴ on local layers, 10⁶ on global ones (whose RoPE alone may be scaled for long
  context).
- QK-norm, as Qwen3, and attention scores scaled by query_pre_attn_scalar^-1/2 rather than D^-1/2.
- four norms per block, "sandwich" style: RMSNorm before *and after* the attention and the MLP, the
  after-norms inside the residual branch (Gemma 2, arXiv:2408.00118, section 2).
- RMSNorm stores w and multiplies by (1 + w), so weights start at 0 (a re-parametrization).
- GeGLU (tanh GELU gates) instead of SwiGLU; embeddings multiplied by √d_model; head always tied.
- Gemma 2's soft-capping, s -> cap · tanh(s / cap), of attention scores (cap 50) and final logits
  (cap 30) is kept as options; Gemma 3 replaced it with QK-norm and leaves both off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm_scratch.ffn import GeGLU
from llm_scratch.models.llama3 import Llama3, Llama3Config
from llm_scratch.models.qwen3 import QKNormAttention
from llm_scratch.norm import RMSNorm

__all__ = ["Gemma3", "Gemma3Block", "Gemma3Config"]

LAYER_TYPES = ("sliding_attention", "full_attention")  # Hugging Face's names for local and global layers

_PRESETS = {
    "gemma-3-270m": dict(d_model=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256, ffn_hidden=2048),
    "gemma-3-1b": dict(d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1, head_dim=256, ffn_hidden=6912),
}


@dataclass
class Gemma3Config(Llama3Config):
    """Defaults are Gemma 3 1B's.

    rope_base, rope_scaling: RoPE of the global layers; rope_local_base: of the sliding-window layers.
    layer_types: per layer, "sliding_attention" or "full_attention"; None derives it from
        sliding_window_pattern p: layer i is global when (i + 1) % p == 0 (p = 6: five local, one global).
    """

    vocab_size: int = 262144
    context_length: int = 32768
    d_model: int = 1152
    n_layers: int = 26
    n_heads: int = 4
    n_kv_heads: int = 1
    head_dim: int | None = 256
    ffn_hidden: int = 6912
    rope_base: float = 1_000_000.0
    rope_scaling: dict | None = None
    norm_eps: float = 1e-6
    rope_local_base: float = 10_000.0
    sliding_window: int = 512
    sliding_window_pattern: int = 6
    layer_types: list[str] | None = None
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None

    presets = _PRESETS

    def __post_init__(self):
        super().__post_init__()
        window = self.sliding_window
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"sliding_window must be a positive int (keys each query sees), got {window!r}")
        if not isinstance(self.sliding_window_pattern, int) or self.sliding_window_pattern < 1:
            raise ValueError(f"sliding_window_pattern must be a positive int, got {self.sliding_window_pattern!r}")
        if self.layer_types is None:
            p = self.sliding_window_pattern
            self.layer_types = [LAYER_TYPES[(i + 1) % p == 0] for i in range(self.n_layers)]
        self.layer_types = list(self.layer_types)
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad or len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types must list one of {LAYER_TYPES} per layer ({self.n_layers}); "
                             f"got {len(self.layer_types)} entries" + (f" with unknown {bad}" if bad else ""))
        for name in ("attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None or > 0, got {value!r}")
        for name in ("query_pre_attn_scalar", "rope_local_base"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


class Gemma3Block(nn.Module):
    """Sandwich norms: x + post_attn_norm(attn(attn_norm(x))), then x + post_mlp_norm(mlp(mlp_norm(x)))."""

    def __init__(self, cfg: Gemma3Config, attn: QKNormAttention, make_norm):
        super().__init__()
        self.attn_norm, self.attn, self.post_attn_norm = make_norm(cfg.d_model), attn, make_norm(cfg.d_model)
        self.mlp_norm, self.mlp, self.post_mlp_norm = make_norm(cfg.d_model), GeGLU(cfg.d_model, cfg.ffn_hidden), \
            make_norm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, padding_mask=None, cache=None, positions=None, attn_mask=None):
        h = self.attn(self.attn_norm(x), padding_mask=padding_mask, cache=cache, positions=positions,
                      attn_mask=attn_mask)
        x = x + self.dropout(self.post_attn_norm(h))
        return x + self.dropout(self.post_mlp_norm(self.mlp(self.mlp_norm(x))))


class Gemma3(Llama3):
    config_class = Gemma3Config

    def make_norm(self, dim: int) -> nn.Module:
        return RMSNorm(dim, self.cfg.norm_eps, offset=True)  # gain 1 + w, computed in float32

    def make_attention(self, layer: int) -> QKNormAttention:
        cfg = self.cfg
        if not hasattr(self, "_rope_local"):
            self._rope_local = self.make_rope(cfg.rope_local_base, None)
            self._rope_global = self.make_rope(cfg.rope_base, cfg.rope_scaling)
        local = cfg.layer_types[layer] == "sliding_attention"
        return QKNormAttention(
            cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, bias=False, dropout=cfg.dropout,
            window=cfg.sliding_window if local else None,
            rope=self._rope_local if local else self._rope_global,
            scale=cfg.query_pre_attn_scalar ** -0.5, softcap=cfg.attn_logit_softcap, norm=self.make_norm,
        )

    def make_block(self, layer: int) -> nn.Module:
        return Gemma3Block(self.cfg, self.make_attention(layer), self.make_norm)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        # × √d_model, the factor rounded to the embedding's dtype first, as the released code does
        return x * torch.tensor(self.cfg.d_model ** 0.5, dtype=x.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)
