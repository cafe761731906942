"""The small pretrained GPT that later chapters start from: a GPT-2-architecture model trained on Tiny
Shakespeare with the project's own 4,096-token BPE.

    model, info = load_or_pretrain()      # the committed checkpoint, or train it (minutes on a CPU)

`make artifacts` retrains it with the fixed settings below and rewrites
data/checkpoints/shakespeare_gpt.{safetensors,json}; the JSON records the config, seed, data, steps,
wall time and the train/validation loss history.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import torch

from llm_scratch.checkpoint import checkpoint_paths, load_checkpoint, read_checkpoint_info, save_checkpoint
from llm_scratch.data import TokenWindows, tokenize_corpus, train_val_split
from llm_scratch.models.gpt2 import GPT2, GPT2Config
from llm_scratch.tokenizer import get_tokenizer
from llm_scratch.training.engine import TrainConfig, Trainer

__all__ = ["SHAKESPEARE_GPT", "load_or_pretrain", "shakespeare_gpt_config", "shakespeare_gpt_data"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHAKESPEARE_GPT = REPO_ROOT / "data" / "checkpoints" / "shakespeare_gpt"
CONTEXT = 128
# 1,500 steps: the validation loss stops improving around step 1,200 (5.14) while the training loss keeps falling
TRAINING = dict(max_steps=1500, batch_size=32, lr=3e-3, min_lr_ratio=0.1, warmup_steps=30, weight_decay=0.1,
                grad_clip=1.0, eval_every=100, eval_batches=16, seed=0)


def shakespeare_gpt_config() -> GPT2Config:
    """GPT-2's architecture at toy size: 4 layers, width 128, 4 heads, context 128, our tokenizer's vocabulary."""
    return GPT2Config(vocab_size=get_tokenizer("shakespeare").n_vocab, context_length=CONTEXT, d_model=128,
                      n_layers=4, n_heads=4, dropout=0.0)


def shakespeare_gpt_data(context_length: int = CONTEXT) -> tuple[TokenWindows, TokenWindows]:
    """(train, validation) windows of Tiny Shakespeare in our tokenizer: 90/10 contiguous split; training
    windows overlap by half (stride context/2), validation windows do not."""
    train_ids, val_ids = train_val_split(tokenize_corpus("tinyshakespeare", "shakespeare"), 0.1)
    return TokenWindows(train_ids, context_length, context_length // 2), TokenWindows(val_ids, context_length)


def load_or_pretrain(path: str | pathlib.Path = SHAKESPEARE_GPT, device: torch.device | str = "cpu",
                     progress: bool = True, **training) -> tuple[GPT2, dict]:
    """The model from `<path>.safetensors` + `.json` if present (strict keys), else train it and save it."""
    st_path, json_path = checkpoint_paths(path)
    if st_path.exists() and json_path.exists():
        info = read_checkpoint_info(path)
        model = GPT2(GPT2Config(**info["config"]))
        load_checkpoint(path, model)
        return model.to(device).eval(), info
    settings = {**TRAINING, **training}
    cfg = shakespeare_gpt_config()
    torch.manual_seed(settings["seed"])
    model = GPT2(cfg)
    train, val = shakespeare_gpt_data(cfg.context_length)
    trainer = Trainer(model, train, val, TrainConfig(**settings, progress=progress), device=device)
    start = time.perf_counter()
    history = trainer.train()
    metadata = {
        **settings,
        "steps": settings["max_steps"],
        "data": "Tiny Shakespeare, tokenizer 'shakespeare' (4,096 BPE ranks), first 90% for training in windows of "
                f"{cfg.context_length} tokens with stride {cfg.context_length // 2}, last 10% for validation",
        "tokens_seen": trainer.tokens_seen,
        "train_seconds": round(time.perf_counter() - start, 1),
        "device": str(trainer.device),
        "torch": torch.__version__,
        "loss_log": {"step": history.step, "train_loss": [round(x, 4) for x in history.train_loss],
                     "val_step": history.val_step, "val_loss": [round(x, 4) for x in history.val_loss]},
    }
    save_checkpoint(path, model.cpu(), dataclasses.asdict(cfg), metadata)
    return model.to(device).eval(), read_checkpoint_info(path)
