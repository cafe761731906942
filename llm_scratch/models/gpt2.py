"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"), from the parts of
the earlier chapters.

    token ids (B, T) -> wte + wpe -> n_layers x Block -> LayerNorm -> logits = h · wteᵀ (tied)
    Block(x) = x + attn(ln_1(x)),  then  x + mlp(ln_2(x))        (pre-LN; GPT-2 section 2.3)

Multi-head causal attention with biases, learned absolute positions, a GELU-tanh MLP of width 4·C,
LayerNorm with bias (ε = 1e-5), the LM head tied to the token embedding. Initialization follows
section 2.3: N(0, 0.02²) everywhere, and the two projections that write into the residual stream
scaled by 1/√(2·n_layers), since each block adds two of them to the stream.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from llm_scratch.attention import KVCache, MultiHeadAttention, next_positions
from llm_scratch.embedding import TiedLMHead
from llm_scratch.ffn import MLP
from llm_scratch.norm import LayerNorm
from llm_scratch.position.absolute import LearnedPositionEmbedding

__all__ = ["GPT2", "GPT2Config", "check_input_ids", "token_embeddings"]

# name -> (d_model, n_layers, n_heads), from the paper's Table 2 and the released checkpoints
_PRESETS = {
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    context_length: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPT2Config:
        """One of the four released sizes ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")."""
        if name not in _PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; known: {', '.join(_PRESETS)}")
        d_model, n_layers, n_heads = _PRESETS[name]
        return cls(**{"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_input_ids(input_ids: torch.Tensor, caches, context_length: int) -> None:
    """input_ids must be (B, T), and the cached tokens plus these must fit in the context (every decoder's check)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
    # Under torch.compile the cached length is not read: a StaticKVCache keeps it in a tensor, and reading it
    # would be a device sync and a graph break; the caller of a compiled step checks the bounds beforehand.
    cached = caches[0].length if caches and not torch.compiler.is_compiling() else 0
    total = cached + input_ids.shape[1]
    if total > context_length:
        raise ValueError(f"sequence of {total} tokens exceeds the context length {context_length}")


def token_embeddings(embed_tokens, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                     d_model: int) -> torch.Tensor:
    """The (B, T, C) vectors the first block reads: embed_tokens(input_ids), or inputs_embeds as given (e.g. text
    embeddings with image features spliced in, as a vision-language model builds them). Exactly one of the two."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids (B, T) and inputs_embeds (B, T, C)")
    if inputs_embeds is None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        return embed_tokens(input_ids)
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != d_model:
        raise ValueError(f"inputs_embeds must have shape (B, T, {d_model}), got {tuple(inputs_embeds.shape)}")
    return inputs_embeds


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, bias=True, dropout=cfg.dropout)
        self.ln_2 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.mlp = MLP(cfg.d_model, 4 * cfg.d_model, activation="gelu_tanh", bias=True)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, padding_mask=None, cache=None, attn_mask=None):
        x = x + self.dropout(self.attn(self.ln_1(x), padding_mask=padding_mask, cache=cache, attn_mask=attn_mask))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = LearnedPositionEmbedding(cfg.context_length, cfg.d_model, init_std=0.02)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.lm_head = TiedLMHead(self.wte)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)  # GPT-2 section 2.3
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("attn.o_proj", "mlp.down_proj")) else 0.02
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def init_caches(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> list[KVCache]:
        """One empty KV cache per layer, for decoding up to max_len tokens in all (dtype and device default
        to the weights')."""
        if max_len > self.cfg.context_length:
            raise ValueError(f"max_len {max_len} exceeds the context length {self.cfg.context_length}")
        return [block.attn.init_cache(batch_size, max_len, dtype=dtype, device=device) for block in self.blocks]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> token embeddings (B, T, C), before positions are added."""
        return self.wte(input_ids)

    def hidden_states(self, input_ids: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                      caches: list[KVCache] | None = None, positions: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> the final LayerNorm's output (B, T, C), what the LM head (or a classifier) reads.

        padding_mask: (B, T) True for real tokens (pad on the left for generation). Positions then
            count real tokens only, so a left-padded sequence gets the same positions as unpadded.
        caches: from init_caches; each call appends this call's keys and values.
        positions: (B, T) or (T,) position ids, overriding the default.
        attn_mask: (B, T, Tk) bool, True = may attend, on top of the causal mask (packed sequences).
        inputs_embeds: (B, T, C) token embeddings to use instead of wte(input_ids); positions are added as usual.
        """
        x = token_embeddings(self.embed_tokens, input_ids, inputs_embeds, self.cfg.d_model)  # (B, T, C)
        check_input_ids(x[..., 0], caches, self.cfg.context_length)  # x[..., 0]: a (B, T) stand-in for the shape
        if positions is None:
            positions = next_positions(caches, x[..., 0], padding_mask)  # real tokens only: padding shifts nothing
        x = self.dropout(x + self.wpe(positions))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, padding_mask=padding_mask, cache=caches[i] if caches else None, attn_mask=attn_mask)
        return self.ln_f(x)

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

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> next-token logits (..., V): the tied head (for callers that need only some
        positions' logits, e.g. the log-probabilities of a completion)."""
        return self.lm_head(h)
