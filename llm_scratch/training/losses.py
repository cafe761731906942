"""Losses for language-model training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "count_targets", "cross_entropy_loss"]

IGNORE_INDEX = -100  # targets with this value (padding, prompt tokens in fine-tuning) contribute nothing


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross entropy over the targets that are not ignore_index.

    logits (B, T, V) are the predictions for targets (B, T) (already shifted: targets[t] = input[t + 1]).
    Computed in float32 whatever the logits' dtype: a bf16 log-softmax over 50k classes loses digits.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} plus a vocab dim")
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)


def count_targets(targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """How many tokens a batch trains on (the token accounting behind tokens seen and tokens/s)."""
    return int((targets != ignore_index).sum())
