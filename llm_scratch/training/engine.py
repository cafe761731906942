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

Data parallel (DDP; Li et al. 2020, "PyTorch Distributed", arXiv:2006.15704). Launched by torchrun with a
process group of N > 1 ranks (`llm_scratch.distributed.init_distributed()`), the Trainer
- wraps the model in DistributedDataParallel, which all-reduces the gradients during backward
  (overlapped with it, bucket by bucket) and divides them by N;
- gives each rank its own `batch_size` windows of every global batch: the global batch is
  batch_size x N windows, the same seeded permutation on every rank, rank r taking windows
  r·batch_size .. (r+1)·batch_size - 1 of it. So N ranks with batch_size B see exactly the batches
  of one process with batch_size N·B, and train the same model (up to float reduction order);
- weights each micro-batch by its share of the targets of the whole step on all ranks (the target count
  is all-reduced first) and multiplies by N to undo DDP's division: the summed gradient is then the
  mean over every target of the global batch, as on one process, also with ignore_index;
- skips the gradient all-reduce on all but the last micro-batch of an accumulation (`no_sync()`): the
  gradients accumulate locally and the last backward all-reduces the sum once;
- averages the evaluation loss over ranks (each rank evaluates its part of each validation batch);
- draws progress bars and writes checkpoints on rank 0 only (`save` returns on every rank once written).
Each rank's dropout RNG is seeded with seed + rank, so the ranks do not drop the same units.
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
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from llm_scratch.checkpoint import load_tensors, save_tensors
from llm_scratch.device import get_device, get_rng_states, is_cuda, set_rng_states
from llm_scratch.training.efficiency import checkpoint_blocks
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
    # autocast: matmuls in bf16 or fp16, weights and optimizer state stay fp32; fp16's narrow exponent needs the
    # loss scaled up before backward (a GradScaler) so small gradients do not flush to zero. On a CPU without fp16
    # arithmetic fp16 is emulated and several times slower than fp32 (10x measured in notebook 13/04)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False  # torch.compile the model (worth it on CUDA)
    activation_checkpointing: bool = False  # recompute each block in backward (training.efficiency)
    fused_adamw: bool = False  # AdamW's fused kernel (one kernel for all parameters; CUDA, CPU and MPS builds)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum_steps", "eval_batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError(f"need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0; got {self.lr}, "
                             f"{self.min_lr_ratio}, {self.warmup_steps}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
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

    Distributed sampling: with world_size N, each step takes a global batch of batch_size x N items of the
    permutation (the same on every rank) and returns rank `rank`'s batch_size of them, so the ranks see
    disjoint parts whose union is the global batch of one process with batch_size x N.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0,
                 collate: Callable[[list], Batch] = stack_pairs, rank: int = 0, world_size: int = 1):
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank!r}, "
                             f"world_size={world_size!r}")
        if len(dataset) < batch_size * world_size:
            raise ValueError(f"the dataset has {len(dataset)} examples, fewer than batch_size={batch_size}"
                             + (f" x world_size={world_size}" if world_size > 1 else ""))
        self.dataset, self.batch_size, self.seed, self.collate = dataset, batch_size, seed, collate
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        global_size = self.batch_size * self.world_size
        if (self.index + 1) * global_size > len(self.dataset):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        start = self.index * global_size + self.rank * self.batch_size  # this rank's part of the global batch
        chosen = self._order[start:start + self.batch_size]
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
    first argument) or a dict of keyword arguments (e.g. input_ids, padding_mask, attn_mask, positions).

    Under torchrun with more than one process it trains data-parallel (see the module docstring):
    cfg.batch_size is then per rank, and `self.model` stays the unwrapped model (`self.ddp` the wrapper)."""

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
        # a process group exists when the script called llm_scratch.distributed.init_distributed() under torchrun
        grouped = dist.is_available() and dist.is_initialized()
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
        self.model = model.to(self.device)
        if cfg.activation_checkpointing:
            checkpoint_blocks(self.model)
        self.ddp = None
        if self.world_size > 1:
            # DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts equal
            device_ids = None
            if is_cuda(self.device):
                device_ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        wrapped = self.ddp if self.ddp is not None else self.model
        self.forward = torch.compile(wrapped) if cfg.compile else wrapped
        self.loss_fn = loss_fn
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                           fused=True if cfg.fused_adamw else None)
        # fp16 only: scales the loss, unscales the gradients, skips a step whose gradients overflowed
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.train_batches = ResumableBatches(train_data, cfg.batch_size, seed=cfg.seed, collate=collate,
                                              rank=self.rank, world_size=self.world_size)
        self.val_data = val_data
        self.step, self.tokens_seen = 0, 0
        self.history = History()
        torch.manual_seed(cfg.seed + self.rank)  # dropout and anything else random in the forward pass

    def _all_reduce_sum(self, value: float) -> float:
        """The sum of `value` over ranks (the value itself on one process), in float64."""
        if self.world_size == 1:
            return value
        t = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.item()

    def _autocast(self):
        if self.cfg.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return nullcontext()

    def _model_output(self, inputs):
        return self.forward(**inputs) if isinstance(inputs, dict) else self.forward(inputs)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first eval_batches batches of the validation set, in order (the same every time).

        Under DDP a batch is batch_size x world_size windows, rank r evaluating its batch_size of them; a
        batch's loss is the ranks' losses weighted by their target counts (all-reduced), as one process's. Under
        DDP call it on every rank (it all-reduces; a rank that skips it leaves the others waiting)."""
        was_training = self.model.training
        self.model.eval()
        size, global_size = self.cfg.batch_size, self.cfg.batch_size * self.world_size
        n = min(self.cfg.eval_batches, len(self.val_data) // global_size)
        if n == 0:
            raise ValueError(f"the validation set has fewer than batch_size={self.cfg.batch_size}"
                             + (f" x world_size={self.world_size}" if self.world_size > 1 else "") + " windows")
        sums = torch.zeros(n, 2, dtype=torch.float64)  # per batch: loss x targets, targets
        for b in range(n):
            start = b * global_size + self.rank * size
            x, y = self.collate([self.val_data[i] for i in range(start, start + size)])
            x, y = _to_device(x, self.device), y.to(self.device)
            with self._autocast():
                loss = self.loss_fn(self._model_output(x), y).item()
            count = count_targets(y)
            sums[b] = torch.tensor([loss * count, count], dtype=torch.float64)
        if self.world_size > 1:
            sums = sums.to(self.device)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            sums = sums.cpu()
        self.model.train(was_training)
        # float64: loss x count / count gives back a float32 loss exactly, so one process matches the old mean
        return (sums[:, 0] / sums[:, 1]).mean().item()

    def train_step(self) -> float:
        """One optimizer step (grad_accum_steps micro-batches); returns the step's mean loss per target."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        micro = [next(self.train_batches) for _ in range(cfg.grad_accum_steps)]
        counts = [count_targets(y) for _, y in micro]
        step_targets = int(self._all_reduce_sum(sum(counts)))  # every rank's targets of this step
        total_targets = max(step_targets, 1)
        total = 0.0
        for i, ((x, y), n) in enumerate(zip(micro, counts, strict=True)):
            x, y = _to_device(x, self.device), y.to(self.device)
            # DDP all-reduces gradients in backward; on all but the last micro-batch let them accumulate locally
            last = i == len(micro) - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
                with self._autocast():
                    loss = self.loss_fn(self._model_output(x), y)  # mean over this micro-batch's n targets
                # weight by n / all targets, so the summed gradient is the mean over every target of the step,
                # exactly the big batch's, even when ignore_index leaves micro-batches with different counts;
                # x world_size because DDP divides the all-reduced sum by world_size
                self.scaler.scale(loss * (n * self.world_size / total_targets)).backward()
            total += loss.item() * n / total_targets
        total = self._all_reduce_sum(total)
        self.tokens_seen += step_targets
        if cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones (fp16 only)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)  # = optimizer.step() unless fp16 (then skipped on inf/nan gradients)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.on_step_end is not None:
            self.on_step_end(self)
        return total  # already the mean over the step's targets

    def train(self, steps: int | None = None) -> History:
        """Run until max_steps (or `steps` more); evaluate every eval_every steps and at the end."""
        cfg = self.cfg
        end = cfg.max_steps if steps is None else min(cfg.max_steps, self.step + steps)
        bar = tqdm(range(self.step, end), desc="training", disable=not cfg.progress or self.rank != 0)
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
        """Model, optimizer, step, tokens seen, data position, RNG state and history, atomically.

        Under DDP call it on every rank: rank 0 writes (the ranks' weights and optimizer states are equal)
        with every rank's RNG state, the others wait until the files are there."""
        if self.world_size == 1:
            self._write(path, {f"rng.{k}": v for k, v in get_rng_states(self.device).items()})
            return
        states: list[dict | None] = [None] * self.world_size
        dist.all_gather_object(states, get_rng_states(self.device))
        if self.rank == 0:
            self._write(path, {f"rng.rank{r}.{k}": v for r, state in enumerate(states) for k, v in state.items()})
        dist.barrier()

    def _write(self, path: str | os.PathLike, rng: dict[str, torch.Tensor]) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt = self.optimizer.state_dict()
        for index, state in opt["state"].items():
            for name, value in state.items():
                tensors[f"optimizer.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        tensors.update(rng)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
        record = {"kind": "training_state", "train_config": dataclasses.asdict(self.cfg), "step": self.step,
                  "tokens_seen": self.tokens_seen, "data": self.train_batches.state_dict(),
                  "grad_scaler": self.scaler.state_dict(),
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
        if record.get("grad_scaler"):  # fp16 runs: the current loss scale and its growth counter
            trainer.scaler.load_state_dict(record["grad_scaler"])
        prefix = "rng."
        if any(k.startswith("rng.rank") for k in tensors):  # saved by a DDP run: one state per rank
            saved_ranks = len({k.split(".")[1] for k in tensors if k.startswith("rng.rank")})
            prefix = f"rng.rank{trainer.rank % saved_ranks}."
        set_rng_states({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, trainer.device)
        return trainer
