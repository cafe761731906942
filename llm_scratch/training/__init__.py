"""Training: the pretraining loop (engine) and losses; later chapters add fine-tuning and alignment."""

from llm_scratch.training.engine import ResumableBatches, TrainConfig, Trainer, lr_at, param_groups
from llm_scratch.training.losses import IGNORE_INDEX, count_targets, cross_entropy_loss

__all__ = [
    "IGNORE_INDEX",
    "ResumableBatches",
    "TrainConfig",
    "Trainer",
    "count_targets",
    "cross_entropy_loss",
    "lr_at",
    "param_groups",
]
