"""A readable pretraining loop: AdamW, warm-up + cosine schedule, clipping, accumulation, evaluation,
checkpoints that resume exactly.

    trainer = Trainer(model, train_data, val_data, TrainConfig(max_steps=500, batch_size=16, lr=3e-3))
    history = trainer.train()          # {"step": [...], "train_loss": [...], "val_loss": [...], ...}
    trainer.save("data/cache/run")     # model, optimizer, RNG and data position
    Trainer.resume("data/cache/run", model, train_data, val_data).train()   # continues bit for bit

One optimizer step = `grad_accum_steps` micro-batches of `batch_size` windows, each micro-batch's mean
loss weighted by its share of the step's targets, so the gradient equals that of one batch of
batch_size x grad_accum_steps (also when ignore_index masks a different number of targets in each).

Data comes from `ResumableBatches`, a shuffled pass over a dataset per epoch whose order depends only
on (seed, epoch): its position is two integers, so a resumed run sees exactly the batches the
uninterrupted run would have seen. (A DataLoader's shuffle state lives inside its iterator and cannot
be saved.) With the RNG state and the optimizer state restored too, the loss after resuming equals
the uninterrupted run's exactly on the same device.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from llm_scratch.checkpoint import load_tensors, save_tensors
from llm_scratch.device import get_device, get_rng_states, set_rng_states
from llm_scratch.training.losses import count_targets, cross_entropy_loss

__all__ = ["ResumableBatches", "TrainConfig", "Trainer", "lr_at", "param_groups", "stack_pairs"]

Batch = tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]  # (model inputs, targets)


def stack_pairs(items: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
    """The default collate: a list of (x, y) windows of equal length -> (x (B, T), y (B, T))."""
    xs, ys = zip(*items, strict=True)
    return torch.stack(xs), torch.stack(ys)


def _to_device(inputs, device):
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


@dataclass
class TrainConfig:
    max_steps: int
    batch_size: int = 16
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    grad_accum_steps: int = 1
    eval_every: int = 100  # steps; 0 = only at the end
    eval_batches: int = 10
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast; weights and optimizer stay fp32
    compile: bool = False  # torch.compile the model (worth it on CUDA)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum_steps", "eval_batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError(f"need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0; got {self.lr}, "
                             f"{self.min_lr_ratio}, {self.warmup_steps}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        self.betas = tuple(self.betas)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr over warmup_steps, then cosine decay to lr · min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decoupled weight decay (Loshchilov & Hutter 2019) on the matrices of linear layers
    only; none on biases, norm gains or embeddings (decaying an embedding pulls rare tokens to zero)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ResumableBatches:
    """Endless shuffled batches of a dataset; the order depends only on (seed, epoch).

    Each epoch is a fresh permutation from torch.Generator().manual_seed(seed + epoch); incomplete final
    batches are dropped. state_dict() is {"epoch", "index"}, enough to continue exactly where it stopped.
    `collate` turns a list of items into (inputs, targets); the default stacks (x, y) tensor pairs.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0,
                 collate: Callable[[list], Batch] = stack_pairs):
        if len(dataset) < batch_size:
            raise ValueError(f"the dataset has {len(dataset)} examples, fewer than batch_size={batch_size}")
        self.dataset, self.batch_size, self.seed, self.collate = dataset, batch_size, seed, collate
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if (self.index + 1) * self.batch_size > len(self.dataset):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        chosen = self._order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return self.collate([self.dataset[int(i)] for i in chosen])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


@dataclass
class History:
    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


class Trainer:
    """Trains `model` (ids (B, T) -> logits (B, T, V)) on a dataset of (x, y) windows such as TokenWindows,
    or on any dataset with a `collate` that makes (inputs, targets) batches: inputs a tensor (the model's
    first argument) or a dict of keyword arguments (e.g. input_ids, padding_mask, attn_mask, positions)."""

    def __init__(self, model: nn.Module, train_data, val_data, cfg: TrainConfig,
                 device: torch.device | str | None = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_loss,
                 on_step_end: Callable[[Trainer], None] | None = None,
                 collate: Callable[[list], Batch] = stack_pairs):
        """loss_fn(logits, targets) -> scalar; on_step_end(trainer) runs after every optimizer step (e.g.
        DeepSeek-V3's router-bias update, or logging); collate(list of dataset items) -> (inputs, targets)."""
        self.cfg = cfg
        self.collate = collate
        self.on_step_end = on_step_end
        self.device = torch.device(device) if device is not None else get_device()
        self.model = model.to(self.device)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.loss_fn = loss_fn
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        self.train_batches = ResumableBatches(train_data, cfg.batch_size, seed=cfg.seed, collate=collate)
        self.val_data = val_data
        self.step, self.tokens_seen = 0, 0
        self.history = History()
        torch.manual_seed(cfg.seed)  # dropout and anything else random in the forward pass

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _model_output(self, inputs):
        return self.forward(**inputs) if isinstance(inputs, dict) else self.forward(inputs)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first eval_batches batches of the validation set, in order (the same every time)."""
        was_training = self.model.training
        self.model.eval()
        losses = []
        n = min(self.cfg.eval_batches, len(self.val_data) // self.cfg.batch_size)
        if n == 0:
            raise ValueError(f"the validation set has fewer than batch_size={self.cfg.batch_size} windows")
        size = self.cfg.batch_size
        for b in range(n):
            x, y = self.collate([self.val_data[i] for i in range(b * size, (b + 1) * size)])
            x, y = _to_device(x, self.device), y.to(self.device)
            with self._autocast():
                losses.append(self.loss_fn(self._model_output(x), y).item())
        self.model.train(was_training)
        return sum(losses) / len(losses)

    def train_step(self) -> float:
        """One optimizer step (grad_accum_steps micro-batches); returns the step's mean loss per target."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        micro = [next(self.train_batches) for _ in range(cfg.grad_accum_steps)]
        counts = [count_targets(y) for _, y in micro]
        total_targets = max(sum(counts), 1)
        total = 0.0
        for (x, y), n in zip(micro, counts, strict=True):
            x, y = _to_device(x, self.device), y.to(self.device)
            with self._autocast():
                loss = self.loss_fn(self._model_output(x), y)  # mean over this micro-batch's n targets
            # weight by n / all targets, so the summed gradient is the mean over every target of the step,
            # exactly the big batch's, even when ignore_index leaves micro-batches with different counts
            (loss * (n / total_targets)).backward()
            total += loss.item() * n / total_targets
            self.tokens_seen += n
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.on_step_end is not None:
            self.on_step_end(self)
        return total  # already the mean over the step's targets

    def train(self, steps: int | None = None) -> History:
        """Run until max_steps (or `steps` more); evaluate every eval_every steps and at the end."""
        cfg = self.cfg
        end = cfg.max_steps if steps is None else min(cfg.max_steps, self.step + steps)
        bar = tqdm(range(self.step, end), desc="training", disable=not cfg.progress)
        for _ in bar:
            start, tokens = time.perf_counter(), self.tokens_seen
            loss = self.train_step()
            if self.device.type != "cpu":
                torch.accelerator.synchronize()
            h = self.history
            h.step.append(self.step)
            h.train_loss.append(loss)
            h.lr.append(lr_at(self.step - 1, cfg))
            h.tokens_per_s.append((self.tokens_seen - tokens) / (time.perf_counter() - start))
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.max_steps:
                h.val_step.append(self.step)
                h.val_loss.append(self.evaluate())
                bar.set_postfix(loss=f"{loss:.3f}", val=f"{h.val_loss[-1]:.3f}")
        return self.history

    # --- checkpoints -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Model, optimizer, step, tokens seen, data position, RNG state and history, atomically."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt = self.optimizer.state_dict()
        for index, state in opt["state"].items():
            for name, value in state.items():
                tensors[f"optimizer.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        tensors.update({f"rng.{k}": v for k, v in get_rng_states(self.device).items()})
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
        record = {"kind": "training_state", "train_config": dataclasses.asdict(self.cfg), "step": self.step,
                  "tokens_seen": self.tokens_seen, "data": self.train_batches.state_dict(),
                  "optimizer_param_groups": groups, "history": dataclasses.asdict(self.history)}
        save_tensors(path, tensors, record)

    @classmethod
    def resume(cls, path: str | os.PathLike, model: nn.Module, train_data, val_data,
               device: torch.device | str | None = None,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_loss,
               on_step_end: Callable[[Trainer], None] | None = None, collate: Callable[[list], Batch] = stack_pairs,
               **overrides) -> Trainer:
        """A Trainer in exactly the state `save` wrote (model weights loaded into `model`); loss_fn,
        on_step_end and collate as in the constructor (they are code, so the checkpoint cannot hold them)."""
        tensors, record = load_tensors(path)
        if record.get("kind") != "training_state":
            raise ValueError(f"{path} is not a training state written by Trainer.save")
        saved = record["train_config"]
        cfg = TrainConfig(**{**saved, "betas": tuple(saved["betas"]), **overrides})
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        trainer = cls(model, train_data, val_data, cfg, device, loss_fn=loss_fn, on_step_end=on_step_end,
                      collate=collate)
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        groups = [{**g, "params": ref["params"]} for g, ref in
                  zip(record["optimizer_param_groups"], trainer.optimizer.state_dict()["param_groups"], strict=True)]
        trainer.optimizer.load_state_dict({"state": state, "param_groups": groups})
        trainer.step, trainer.tokens_seen = record["step"], record["tokens_seen"]
        trainer.train_batches.load_state_dict(record["data"])
        trainer.history = History(**record["history"])
        set_rng_states({k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}, trainer.device)
        return trainer
