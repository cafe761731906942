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

import re

import torch
import torch.nn.functional as F
from torch import nn

from llm_scratch.models.classifier import SequenceClassifier
from llm_scratch.tasks import Example
from llm_scratch.tokenizer.chat import CHAT_SPECIAL_TOKENS, encode_chat
from llm_scratch.training.engine import TrainConfig
from llm_scratch.training.preference import PreferenceDataset, PreferenceTrainer
from llm_scratch.training.sft import task_messages

__all__ = ["RewardModel", "RewardTrainer", "bradley_terry_loss", "score_completions"]


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


class RewardTrainer(PreferenceTrainer):
    """Trains a RewardModel on a PreferenceDataset with the Bradley-Terry loss (AdamW, the engine's schedule).
    Metrics: loss, accuracy (share of pairs ranked right), chosen_reward and rejected_reward (means)."""

    def __init__(self, model: RewardModel, train_data: PreferenceDataset, val_data: PreferenceDataset | None,
                 cfg: TrainConfig, device: torch.device | str | None = None):
        super().__init__(model, train_data, val_data, cfg, device)

    def rewards(self, data: PreferenceDataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen rewards (B,), rejected rewards (B,)) of the pairs `indices`, in one forward pass."""
        batch = data.collate([data[i] for i in indices])
        r = self.model(batch["input_ids"].to(self.device), batch["padding_mask"].to(self.device))
        return r[:len(indices)], r[len(indices):]

    def batch_loss(self, data: PreferenceDataset, indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = self.rewards(data, indices)
        loss = bradley_terry_loss(chosen, rejected).mean()
        return loss, {"loss": loss.item(), "accuracy": (chosen > rejected).float().mean().item(),
                      "chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item()}


@torch.no_grad()
def score_completions(reward_model: RewardModel, tokenizer, examples: list[Example], completions: list[str],
                      batch_size: int = 64, cut_at_special: bool = False) -> torch.Tensor:
    """r(prompt, completion) for each (example, completion) pair -> (N,) float32 on the CPU.

    Each completion is scored as the assistant's answer to its example, encoded exactly as the reward model saw
    its training pairs (the chat template, closing <|im_end|> included). Rows go through in order of length, so
    that a batch holds rows of similar length; the model is put in eval mode and left there.

    A completion holding a chat marker's text (a policy that wrote <|im_start|> where <|im_end|> belongs) cannot
    be one assistant turn: it raises ValueError, or with cut_at_special=True it is scored up to the first marker
    (the turn the template can represent; the rest of the sample is ignored).
    """
    if len(examples) != len(completions):
        raise ValueError(f"examples ({len(examples)}) and completions ({len(completions)}) must have the same length")
    if cut_at_special:
        cut = re.compile("|".join(re.escape(t) for t in CHAT_SPECIAL_TOKENS))
        completions = [cut.split(c, maxsplit=1)[0] for c in completions]
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    rows = [encode_chat(tokenizer, task_messages(ex, with_answer=False) + [{"role": "assistant", "content": c}])[0]
            for ex, c in zip(examples, completions, strict=True)]
    device = next(reward_model.parameters()).device
    reward_model.eval()
    scores = torch.zeros(len(rows))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        T = max(len(rows[i]) for i in idx)
        input_ids = torch.zeros(len(idx), T, dtype=torch.long)
        padding_mask = torch.zeros(len(idx), T, dtype=torch.bool)
        for r, i in enumerate(idx):
            input_ids[r, :len(rows[i])] = torch.tensor(rows[i])
            padding_mask[r, :len(rows[i])] = True
        scores[idx] = reward_model(input_ids.to(device), padding_mask.to(device)).float().cpu()
    return scores
