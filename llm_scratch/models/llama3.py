"""Llama 3 and 3.2 (Grattafiori et al. 2024, "The Llama 3 Herd of Models", arXiv:2407.21783), as GPT-2
changed in five places:

    GPT-2                                  Llama 3
    LayerNorm (mean and variance, bias)    RMSNorm (scale only; Zhang & Sennrich 2019)
    learned absolute positions (wpe)       RoPE on q and k in every layer, with Llama 3.1's scaling
    multi-head attention with biases       grouped-query attention, no biases (8 kv heads)
    GELU MLP, width 4·C                    SwiGLU (Shazeer 2020), width from Meta's 2/3 rule
    head always tied to the embedding      tied in 1B/3B, separate in 8B

    token ids (B, T) -> embed -> n_layers x Block -> RMSNorm -> lm_head -> logits (B, T, V)
    Block(x) = x + attn(attn_norm(x)),  then  x + mlp(mlp_norm(x))     (pre-norm, as GPT-2)

`Llama3` is written so that its descendants change only what differs: Qwen3 swaps the attention
(`make_attention`), Gemma 3 the block, the embedding scale and the final logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llm_scratch.attention import GroupedQueryAttention, KVCache, next_positions
from llm_scratch.embedding import TiedLMHead
from llm_scratch.ffn import SwiGLU
from llm_scratch.models.gpt2 import check_input_ids, token_embeddings
from llm_scratch.models.presets import PresetConfig
from llm_scratch.norm import RMSNorm
from llm_scratch.position.rope import RopeScaling, RotaryEmbedding

__all__ = ["Llama3", "Llama3Config", "LlamaBlock"]

# Llama 3.1 / 3.2's context extension from 8,192 trained tokens to 131,072 (factor 32)
LLAMA31_ROPE_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}

# name -> sizes that differ from the dataclass defaults (from the released config.json files)
_PRESETS = {
    "llama-3.2-1b": dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192),
    "llama-3.2-3b": dict(d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_hidden=8192),
    "llama-3-8b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                       context_length=8192, rope_scaling=None, tie_embeddings=False),
}


def _check_positive_ints(cfg, names) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class Llama3Config(PresetConfig):
    """Defaults are Llama 3.2 1B's.

    head_dim: None means d_model / n_heads.
    rope_scaling: a Hugging Face style `rope_parameters` dict (see `RopeScaling`), or None for plain RoPE.
    """

    vocab_size: int = 128256
    context_length: int = 131072
    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int | None = None
    ffn_hidden: int = 8192
    rope_base: float = 500000.0
    rope_scaling: dict | None = field(default_factory=lambda: dict(LLAMA31_ROPE_SCALING))
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    presets = _PRESETS  # class attribute (no annotation): not a dataclass field

    def __post_init__(self):
        _check_positive_ints(self, ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                    "ffn_hidden"))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}), "
                                 "or give head_dim explicitly")
            self.head_dim = self.d_model // self.n_heads
        _check_positive_ints(self, ("head_dim",))
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE (channels rotate in pairs), got {self.head_dim}")
        if not self.rope_base > 0:
            raise ValueError(f"rope_base must be > 0, got {self.rope_base}")
        if self.rope_scaling is not None:
            RopeScaling.from_dict(self.rope_scaling)  # validates; raises a clear error on a bad dict
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")




class LlamaBlock(nn.Module):
    """x + attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg: Llama3Config, attn: GroupedQueryAttention):
        super().__init__()
        # cast_before_weight: Hugging Face's Llama rounds the normalized x to the input dtype before the
        # gain (the same function in float32; in bf16 it matches their rounding)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cast_before_weight=True)
        self.attn = attn
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cast_before_weight=True)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, padding_mask=None, cache=None, positions=None, attn_mask=None):
        x = x + self.dropout(self.attn(self.attn_norm(x), padding_mask=padding_mask, cache=cache, positions=positions,
                                       attn_mask=attn_mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Llama3(nn.Module):
    config_class = Llama3Config

    def __init__(self, cfg: Llama3Config):
        super().__init__()
        if type(cfg) is not self.config_class:  # a Qwen3Config is a Llama3Config, but not Llama's
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(self.make_block(i) for i in range(cfg.n_layers))
        self.norm = self.make_norm(cfg.d_model)
        self.lm_head = TiedLMHead(self.embed) if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size,
                                                                                    bias=False)
        self.reset_parameters()

    # --- the pieces descendants replace ---------------------------------------------------------------

    def make_norm(self, dim: int) -> nn.Module:
        return RMSNorm(dim, self.cfg.norm_eps, cast_before_weight=True)

    def make_rope(self, base: float, scaling: dict | None) -> RotaryEmbedding:
        return RotaryEmbedding(self.cfg.head_dim, base, scaling=RopeScaling.from_dict(scaling) if scaling else None)

    def make_attention(self, layer: int) -> GroupedQueryAttention:
        cfg = self.cfg
        if not hasattr(self, "_rope"):  # one RoPE table shared by every layer (it holds no parameters)
            self._rope = self.make_rope(cfg.rope_base, cfg.rope_scaling)
        return GroupedQueryAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, bias=False,
                                     dropout=cfg.dropout, rope=self._rope)

    def make_block(self, layer: int) -> nn.Module:
        return LlamaBlock(self.cfg, self.make_attention(layer))

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    # --- shared machinery -----------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std²) for every linear and embedding weight (Hugging Face's `initializer_range`);
        norms start at the identity. Skipped on the meta device, where there is nothing to fill."""
        if self.embed.weight.is_meta:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.zeros_(module.weight) if module.offset else nn.init.ones_(module.weight)

    def init_caches(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> list:
        """One empty KV cache per layer for up to max_len tokens (sliding-window layers keep only their window)."""
        if max_len > self.cfg.context_length:
            raise ValueError(f"max_len {max_len} exceeds the context length {self.cfg.context_length}")
        return [block.attn.init_cache(batch_size, max_len, dtype=dtype, device=device) for block in self.blocks]

    def hidden_states(self, input_ids: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                      caches: list[KVCache] | None = None, positions: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> the final norm's output (B, T, C), what the LM head (or a classifier) reads.

        padding_mask: (B, T), True for real tokens (pad on the left for generation); positions count real
            tokens only, so a left-padded row is computed as without its padding.
        caches: from init_caches; each call appends this call's keys and values.
        positions: (T,) or (B, T) position ids, overriding the default.
        attn_mask: (B, T, Tk) bool, True = may attend, on top of the causal mask (packed sequences).
        inputs_embeds: (B, T, C) to use instead of embed_tokens(input_ids) (already scaled where the model scales
            its embeddings, as Gemma's embed_tokens does).
        """
        x = token_embeddings(self.embed_tokens, input_ids, inputs_embeds, self.cfg.d_model)  # (B, T, C)
        check_input_ids(x[..., 0], caches, self.cfg.context_length)  # x[..., 0]: a (B, T) stand-in for the shape
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches must hold one cache per layer ({len(self.blocks)}), got {len(caches)}")
        if positions is None:
            positions = next_positions(caches, x[..., 0], padding_mask)
        for i, block in enumerate(self.blocks):
            x = block(x, padding_mask=padding_mask, cache=caches[i] if caches else None, positions=positions,
                      attn_mask=attn_mask)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                caches: list[KVCache] | None = None, positions: torch.Tensor | None = None,
                last_only: bool = False, attn_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) (or inputs_embeds (B, T, C)) -> logits (B, T, V), or (B, 1, V) with last_only (what
        generation needs). The other arguments are hidden_states'."""
        h = self.hidden_states(input_ids, padding_mask, caches, positions, attn_mask, inputs_embeds)
        if last_only:  # generation needs the next token's logits only: skip the (T-1)·C·V head flops
            h = h[:, -1:]
        return self.logits(h)  # (B, T, V)
