"""What the 2-process workers and the single-process references in tests/test_distributed.py both build:
the same tiny models, data and training configuration, from fixed seeds."""

from __future__ import annotations

import torch

from llm_scratch.models import Gemma3, Gemma3Config, Llama3, Llama3Config, Qwen3, Qwen3Config
from llm_scratch.training import IGNORE_INDEX, TrainConfig

VOCAB, T = 32, 8
SMALL = dict(vocab_size=VOCAB, context_length=16, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=32,
             rope_scaling=None)
# Gemma 3 with one sliding-window layer (window 4 < T, so the window matters) and one global layer
GEMMA = dict(SMALL, head_dim=8, sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=8.0)
MODELS = {"llama3": (Llama3, Llama3Config, SMALL), "qwen3": (Qwen3, Qwen3Config, dict(SMALL, head_dim=8)),
          "gemma3": (Gemma3, Gemma3Config, GEMMA)}

# DDP: 2 ranks x batch 2 per rank = global batch 4, 2 accumulation steps, 3 optimizer steps
WORLD_SIZE, PER_RANK_BATCH, STEPS = 2, 2, 3


def tiny_model(name: str = "llama3", seed: int = 0) -> torch.nn.Module:
    cls, config_cls, sizes = MODELS[name]
    torch.manual_seed(seed)
    return cls(config_cls(**sizes))


def windows(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (x, y) windows of T tokens; window i has its first (i * 3) % T targets set to IGNORE_INDEX, so the
    two ranks' shares of a batch have different target counts (what the count all-reduce must handle)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T + 1), generator=g)
    out = []
    for i in range(n):
        y = ids[i, 1:].clone()
        y[: (i * 3) % T] = IGNORE_INDEX
        out.append((ids[i, :-1], y))
    return out


def train_config(batch_size: int) -> TrainConfig:
    # lr large enough that the 3 steps move the weights far more than any reduction-order difference;
    # dropout 0 (the models' default), so the only difference from one process is the order of float sums
    return TrainConfig(max_steps=STEPS, batch_size=batch_size, lr=1e-2, warmup_steps=1, grad_accum_steps=2,
                       eval_every=0, eval_batches=2, progress=False, seed=0)
