"""Preference data and the training loop that DPO and reward models share.

    data = PreferenceDataset(tokenizer, make_preference_pairs(200, "train"))
    batch = data.collate([data[i] for i in range(8)])   # 16 rows: the 8 chosen answers, then the 8 rejected

A preference pair is one prompt with two answers. Both answers are encoded as complete conversations in the
chat template SFT trained on, with a mask over the assistant's tokens, and a batch of B pairs is one padded
batch of 2B rows so that a single forward pass scores both answers of every pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llm_scratch.device import get_device
from llm_scratch.tasks import PreferencePair
from llm_scratch.tokenizer.chat import encode_chat
from llm_scratch.training.engine import ResumableBatches, TrainConfig, lr_at, param_groups
from llm_scratch.training.sft import task_messages  # the conversation layout SFT trained on

__all__ = ["PreferenceDataset", "PreferenceHistory", "PreferenceTrainer", "collate_pairs", "encode_pair"]


# --- data ---------------------------------------------------------------------------------------------------

def encode_pair(tokenizer, pair: PreferencePair) -> tuple[tuple[list[int], list[bool]], tuple[list[int], list[bool]]]:
    """((chosen ids, completion mask), (rejected ids, completion mask)): the same user turn, then each answer
    as the assistant's turn; the mask marks the assistant's tokens (its answer and <|im_end|>), as in SFT."""
    user = task_messages(pair.example, with_answer=False)
    return tuple(encode_chat(tokenizer, user + [{"role": "assistant", "content": answer}])
                 for answer in (pair.chosen, pair.rejected))


class PreferenceDataset:
    """Preference pairs encoded with the chat template; items are ((chosen ids, mask), (rejected ids, mask))."""

    def __init__(self, tokenizer, pairs: Sequence[PreferencePair], context_length: int | None = None):
        if not pairs:
            raise ValueError("pairs is empty")
        self.pairs = list(pairs)
        self.items = [encode_pair(tokenizer, p) for p in self.pairs]
        if context_length is not None:
            for i, item in enumerate(self.items):
                longest = max(len(ids) for ids, _ in item)
                if longest > context_length:
                    raise ValueError(f"pair {i} needs {longest} tokens, more than context_length={context_length}")
        self.pad_id = self.items[0][0][0][0]  # any id: padding is masked out

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def collate(self, items) -> dict[str, torch.Tensor]:
        return collate_pairs(items, self.pad_id)


def collate_pairs(items, pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one right-padded batch of 2B rows, the B chosen rows first, then the B rejected ones.

    Returns input_ids and padding_mask (2B, T) for the model, loss_mask (2B, T) marking the completions.
    One forward pass scores both answers of every pair.
    """
    rows = [item[0] for item in items] + [item[1] for item in items]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    padding_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    loss_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for r, (ids, mask) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        padding_mask[r, :len(ids)] = True
        loss_mask[r, :len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "padding_mask": padding_mask, "loss_mask": loss_mask}


# --- the shared loop --------------------------------------------------------------------------------------

@dataclass
class PreferenceHistory:
    step: list[int] = field(default_factory=list)
    train: dict[str, list[float]] = field(default_factory=dict)  # metric -> its value at every step
    val_step: list[int] = field(default_factory=list)
    val: dict[str, list[float]] = field(default_factory=dict)  # metric -> its value at every evaluation


class PreferenceTrainer:
    """AdamW on batches of pairs with the engine's schedule and clipping; subclasses say what a batch's loss is.

    A subclass implements `batch_loss(data, indices) -> (loss, metrics)`: the mean loss of the pairs `indices`
    of `data` (a tensor to differentiate) and a dict of float metrics averaged over those pairs.
    """

    def __init__(self, model: nn.Module, train_data: PreferenceDataset, val_data: PreferenceDataset | None,
                 cfg: TrainConfig, device: torch.device | str | None = None):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else get_device()
        self.model = model.to(self.device)
        self.train_data, self.val_data = train_data, val_data
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        self.batches = ResumableBatches(range(len(train_data)), cfg.batch_size, seed=cfg.seed,  # pair indices
                                        collate=lambda items: items)
        self.step = 0
        self.history = PreferenceHistory()
        torch.manual_seed(cfg.seed)

    def batch_loss(self, data: PreferenceDataset, indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def train_step(self) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        self.model.train()
        loss, metrics = self.batch_loss(self.train_data, next(self.batches))
        loss.backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return metrics

    @torch.no_grad()
    def evaluate(self, data: PreferenceDataset | None = None, batch_size: int = 64) -> dict[str, float]:
        """The metrics over a whole dataset (the validation set by default), averaged over its pairs."""
        data = data if data is not None else self.val_data
        if data is None:
            raise ValueError("no validation data: pass a dataset")
        was_training = self.model.training
        self.model.eval()
        totals: dict[str, float] = {}
        for start in range(0, len(data), batch_size):
            indices = list(range(start, min(start + batch_size, len(data))))
            _, metrics = self.batch_loss(data, indices)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v * len(indices)
        self.model.train(was_training)
        return {k: v / len(data) for k, v in totals.items()}

    def train(self, steps: int | None = None) -> PreferenceHistory:
        """Run until cfg.max_steps (or `steps` more), evaluating every eval_every steps and at the end."""
        cfg, h = self.cfg, self.history
        end = cfg.max_steps if steps is None else min(cfg.max_steps, self.step + steps)
        for _ in tqdm(range(self.step, end), desc=type(self).__name__, disable=not cfg.progress):
            metrics = self.train_step()
            h.step.append(self.step)
            for k, v in metrics.items():
                h.train.setdefault(k, []).append(v)
            if self.val_data is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                              or self.step == cfg.max_steps):
                h.val_step.append(self.step)
                for k, v in self.evaluate().items():
                    h.val.setdefault(k, []).append(v)
        return h
