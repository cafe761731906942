"""A reward model: a decoder with a scalar head, trained on preference pairs with the Bradley-Terry loss.

    reward_model = RewardModel(sft_model)                      # r(prompt + answer) -> one number
    trainer = RewardTrainer(reward_model, PreferenceDataset(tok, pairs), PreferenceDataset(tok, held_out), cfg)
    trainer.train(); trainer.evaluate()["accuracy"]             # share of held-out pairs ranked right

Bradley & Terry (1952) model a comparison as P(y_w preferred to y_l | x) = σ(r(x, y_w) − r(x, y_l)): only reward
*differences* matter, so the reward's offset is free. InstructGPT (Ouyang et al. 2022, Eq. 1) trains the
reward model by maximizing the log-likelihood of the human comparisons under it, i.e. minimizing
−log σ(r_chosen − r_rejected). The reward is read from the hidden state of the last real token (the only one
that has seen the whole prompt and answer in a causal model), with the classifier's pooling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llm_scratch.device import get_device
from llm_scratch.models.classifier import SequenceClassifier
from llm_scratch.training.dpo import PreferenceDataset
from llm_scratch.training.engine import ResumableBatches, TrainConfig, lr_at, param_groups

__all__ = ["RewardModel", "RewardTrainer", "bradley_terry_loss"]


class RewardModel(SequenceClassifier):
    """`SequenceClassifier` with one output: forward(input_ids, padding_mask) -> rewards (B,).

    The head `score` is nn.Linear(C, 1, bias=False), the layout of Hugging Face's sequence-classification
    reward models (num_labels=1). train_last_blocks as in SequenceClassifier.
    """

    def __init__(self, base_model: nn.Module, pooling: str = "last", train_last_blocks: int | None = None):
        super().__init__(base_model, 1, pooling, train_last_blocks)

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(input_ids, padding_mask)[:, 0]  # (B,)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair −log σ(r_chosen − r_rejected) (B,): the negative log-likelihood of the preference."""
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
                         f"{tuple(rejected_rewards.shape)} must have the same shape")
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


@dataclass
class RewardHistory:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)  # share of the batch's pairs with r_chosen > r_rejected
    val_step: list[int] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)


class RewardTrainer:
    """Trains a RewardModel on a PreferenceDataset with the Bradley-Terry loss (AdamW, the engine's schedule)."""

    def __init__(self, model: RewardModel, train_data: PreferenceDataset, val_data: PreferenceDataset | None,
                 cfg: TrainConfig, device: torch.device | str | None = None):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else get_device()
        self.model = model.to(self.device)
        self.train_data, self.val_data = train_data, val_data
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        self.batches = ResumableBatches(range(len(train_data)), cfg.batch_size, seed=cfg.seed,  # pair indices
                                        collate=lambda items: items)
        self.step = 0
        self.history = RewardHistory()
        torch.manual_seed(cfg.seed)

    def rewards(self, data: PreferenceDataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen rewards (B,), rejected rewards (B,)) of the pairs `indices`, in one forward pass."""
        batch = data.collate([data[i] for i in indices])
        r = self.model(batch["input_ids"].to(self.device), batch["padding_mask"].to(self.device))
        return r[:len(indices)], r[len(indices):]

    def train_step(self) -> tuple[float, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        self.model.train()
        chosen, rejected = self.rewards(self.train_data, next(self.batches))
        loss = bradley_terry_loss(chosen, rejected).mean()
        loss.backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item(), (chosen > rejected).float().mean().item()

    @torch.no_grad()
    def evaluate(self, data: PreferenceDataset | None = None, batch_size: int = 64) -> dict[str, float]:
        """Loss, pairwise accuracy and mean chosen / rejected reward over a whole dataset (validation by default)."""
        data = data if data is not None else self.val_data
        if data is None:
            raise ValueError("no validation data: pass a dataset")
        was_training = self.model.training
        self.model.eval()
        chosen, rejected = [], []
        for start in range(0, len(data), batch_size):
            c, r = self.rewards(data, list(range(start, min(start + batch_size, len(data)))))
            chosen.append(c)
            rejected.append(r)
        self.model.train(was_training)
        c, r = torch.cat(chosen), torch.cat(rejected)
        return {"loss": bradley_terry_loss(c, r).mean().item(), "accuracy": (c > r).float().mean().item(),
                "chosen_reward": c.mean().item(), "rejected_reward": r.mean().item()}

    def train(self, steps: int | None = None) -> RewardHistory:
        cfg = self.cfg
        end = cfg.max_steps if steps is None else min(cfg.max_steps, self.step + steps)
        for _ in tqdm(range(self.step, end), desc="reward model", disable=not cfg.progress):
            loss, accuracy = self.train_step()
            h = self.history
            h.step.append(self.step)
            h.loss.append(loss)
            h.accuracy.append(accuracy)
            if self.val_data is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                              or self.step == cfg.max_steps):
                h.val_step.append(self.step)
                h.val.append(self.evaluate())
        return self.history
