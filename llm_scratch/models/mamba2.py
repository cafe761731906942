"""A Mamba-2 language model (Dao & Gu 2024, arXiv:2405.21060, Sec. 7 and 9): a Llama-style pre-norm stack
with every attention + MLP pair replaced by one Mamba-2 mixer (`llm_scratch.ssm.Mamba2`).

    token ids (B, T) -> embed -> n_layers x Block -> RMSNorm -> lm_head -> logits (B, T, V)
    Block(x) = x + mixer(norm(x))

There is no position encoding (the recurrence is ordered by construction) and no context length: decoding
carries a constant-size state per layer (`init_caches`) instead of a KV cache that grows with every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from llm_scratch.embedding import TiedLMHead
from llm_scratch.models.presets import PresetConfig
from llm_scratch.norm import RMSNorm
from llm_scratch.ssm import Mamba2, Mamba2State

__all__ = ["Mamba2Block", "Mamba2Config", "Mamba2LM"]

# name -> sizes that differ from the dataclass defaults. The defaults are Mistral's Mamba-Codestral 7B, as in
# Hugging Face's `Mamba2Config` defaults (hidden 4096, 64 layers, 128 heads of 64, state 128, 8 groups).
_PRESETS = {
    "mamba-codestral-7b": dict(),
}


@dataclass
class Mamba2Config(PresetConfig):
    """Defaults are Mamba-Codestral 7B's (Hugging Face's `Mamba2Config` defaults).

    expand·d_model channels inside each mixer, in (expand·d_model) / head_dim heads; n_groups groups of heads
    share B and C. dt_limit clamps the softplus'ed time step (Hugging Face's `time_step_limit`).
    """

    vocab_size: int = 32768
    d_model: int = 4096
    n_layers: int = 64
    d_state: int = 128
    head_dim: int = 64
    expand: int = 2
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 256
    norm_eps: float = 1e-5
    bias: bool = False
    conv_bias: bool = True
    dt_limit: tuple[float, float] = (0.0, math.inf)
    tie_embeddings: bool = False
    init_std: float = 0.02

    presets = _PRESETS  # class attribute (no annotation): not a dataclass field

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "head_dim", "expand", "n_groups",
                     "conv_kernel", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        d_inner = self.expand * self.d_model
        if d_inner % self.head_dim:
            raise ValueError(f"head_dim ({self.head_dim}) must divide expand·d_model ({d_inner})")
        if (d_inner // self.head_dim) % self.n_groups:
            raise ValueError(f"n_groups ({self.n_groups}) must divide the number of heads ({d_inner // self.head_dim})")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        self.dt_limit = tuple(float(v) for v in self.dt_limit)
        if len(self.dt_limit) != 2 or not 0 <= self.dt_limit[0] <= self.dt_limit[1]:
            raise ValueError(f"dt_limit must be (low, high) with 0 <= low <= high, got {self.dt_limit!r}")

    @property
    def n_heads(self) -> int:
        return self.expand * self.d_model // self.head_dim




class Mamba2Block(nn.Module):
    """x + mixer(RMSNorm(x))."""

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cast_before_weight=True)  # as HF's Mamba2RMSNorm
        self.mixer = Mamba2(cfg.d_model, cfg.d_state, cfg.head_dim, cfg.expand, cfg.n_groups, cfg.conv_kernel,
                            cfg.chunk_size, cfg.norm_eps, cfg.bias, cfg.conv_bias, cfg.dt_limit)

    def forward(self, x: torch.Tensor, state: Mamba2State | None = None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), state=state)


class Mamba2LM(nn.Module):
    config_class = Mamba2Config

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        if not isinstance(cfg, Mamba2Config):
            raise TypeError(f"Mamba2LM needs a Mamba2Config, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Mamba2Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cast_before_weight=True)
        self.lm_head = TiedLMHead(self.embed) if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size,
                                                                                    bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std²) for the embedding and linear weights, the conv at PyTorch's default, norms at one and
        the SSM's A_log, D, dt_bias as in Mamba (`Mamba2.reset_ssm_parameters`). Skipped on the meta device."""
        if self.embed.weight.is_meta:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Mamba2):
                module.reset_ssm_parameters()

    def init_caches(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> list[Mamba2State]:
        """One zero state per layer. max_len is accepted for `generate`'s interface and unused: the state's
        size does not depend on the sequence length."""
        return [block.mixer.init_state(batch_size, dtype=dtype, device=device) for block in self.blocks]

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
                caches: list[Mamba2State] | None = None, last_only: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or (B, 1, V) with last_only.

        caches: from init_caches; each call continues from them and updates them in place.
        padding_mask: only an all-True mask is accepted. A recurrent state has no mask to skip pad tokens with;
            zeroing their inputs (as Hugging Face does) still lets them decay the state, so left-padded rows would
            not equal the unpadded ones: an error rather than a silent difference.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        if padding_mask is not None and not bool(padding_mask.all()):
            raise ValueError("padding_mask has False entries: Mamba2LM does not support padding; "
                             "run sequences of different lengths separately")
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches must hold one state per layer ({len(self.blocks)}), got {len(caches)}")
        x = self.embed(input_ids)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, state=caches[i] if caches is not None else None)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # (B, T, V)
