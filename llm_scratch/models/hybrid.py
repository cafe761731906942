"""A hybrid decoder: Llama 3's blocks with the sequence mixer chosen per layer by a pattern.

    pattern "LLLA" over 8 layers -> L L L A L L L A

- "A": softmax attention (grouped-query, RoPE), with a KV cache that grows with the text;
- "L": Lightning attention (MiniMax-01, arXiv:2501.08313): linear attention with a per-head decay, a fixed-size
  state; MiniMax-01 puts one softmax layer after every seven of these;
- "G": gated linear attention (Yang et al. 2024, arXiv:2312.06635), a data-dependent decay;
- "M": Mamba-2 (Dao & Gu 2024, arXiv:2405.21060), a selective state-space layer with a fixed-size state.
Hybrids of this kind (Jamba, arXiv:2403.19887; MiniMax-01; Qwen3-Next) keep a few softmax layers for exact
recall over the whole context and let the cheap linear layers do the rest: decoding memory grows only in the
"A" layers. Everything else (RMSNorm, SwiGLU, embedding, head, generation) is Llama's.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llm_scratch.attention.linear import GatedLinearAttention, LightningAttention, refuse_attn_mask
from llm_scratch.models.llama3 import Llama3, Llama3Config
from llm_scratch.ssm.mamba2 import Mamba2, Mamba2State

__all__ = ["HybridConfig", "HybridLM", "MIXERS", "Mamba2Mixer"]

MIXERS = {"A": "softmax attention (GQA + RoPE)", "L": "lightning attention", "G": "gated linear attention",
          "M": "Mamba-2"}


class Mamba2Mixer(Mamba2):
    """Mamba-2 behind the attention layers' interface: its state is the layer's cache; positions are unused
    (order comes from the recurrence and the causal convolution)."""

    def init_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> Mamba2State:
        return self.init_state(batch_size, dtype=dtype, device=device)  # fixed size: max_len is not needed

    def forward(self, x, *, padding_mask=None, cache: Mamba2State | None = None, positions=None, attn_mask=None):
        refuse_attn_mask(attn_mask)
        if padding_mask is not None and not bool(padding_mask.all()):
            raise ValueError("Mamba-2 layers do not support padding (the state would absorb the pads)")
        return super().forward(x, state=cache)


@dataclass
class HybridConfig(Llama3Config):
    """Llama3Config plus the layer pattern (cycled over the layers) and the linear layers' chunk size.
    Defaults are a small model, not a released one."""

    vocab_size: int = 4099
    context_length: int = 1024
    d_model: int = 128
    n_layers: int = 8
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    ffn_hidden: int = 384
    rope_base: float = 10000.0
    rope_scaling: dict | None = None
    pattern: str = "LLLA"
    chunk_size: int = 64
    ssm_state: int = 16  # Mamba-2's N
    ssm_head_dim: int = 32  # Mamba-2's P (its heads: 2·d_model / P)

    presets = {}

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.pattern, str) or not self.pattern or set(self.pattern) - set(MIXERS):
            raise ValueError(f"pattern must be a non-empty string of {', '.join(MIXERS)} ({MIXERS}), "
                             f"got {self.pattern!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")

    @property
    def layer_types(self) -> list[str]:
        return [self.pattern[i % len(self.pattern)] for i in range(self.n_layers)]


class HybridLM(Llama3):
    config_class = HybridConfig

    def make_attention(self, layer: int) -> nn.Module:
        cfg = self.cfg
        kind = cfg.layer_types[layer]
        if kind == "A":
            return super().make_attention(layer)
        if kind == "L":
            return LightningAttention(cfg.d_model, cfg.n_heads, layer, cfg.n_layers, head_dim=cfg.head_dim,
                                      block_size=cfg.chunk_size, eps=cfg.norm_eps)
        if kind == "M":
            return Mamba2Mixer(cfg.d_model, d_state=cfg.ssm_state, head_dim=cfg.ssm_head_dim,
                               chunk_size=cfg.chunk_size, norm_eps=cfg.norm_eps)
        return GatedLinearAttention(cfg.d_model, cfg.n_heads, chunk_size=cfg.chunk_size)
