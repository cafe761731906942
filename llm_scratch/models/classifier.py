"""Sequence classification with a pretrained decoder (Radford et al. 2018, "Improving Language Understanding
by Generative Pre-Training", section 3.2): keep the transformer, drop the LM head, and put a linear layer on
one hidden state per sequence.

    input_ids (B, T) -> base_model.hidden_states -> (B, T, C) -> pool -> (B, C) -> score -> logits (B, n_classes)

Which hidden state? In a causal model token t attends to tokens <= t only, so only the *last real* token has
seen the whole sequence; GPT (section 3.3) and Hugging Face's `GPT2ForSequenceClassification` read that one.
"Last real" is not column T-1 when the batch is padded on the right, and padding on the left shifts where the
first real token sits, so both are found from `padding_mask` (True = real token), never from the column
index. `pool_hidden` also offers the mean over real tokens and the first real token, to compare.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["POOLINGS", "SequenceClassifier", "first_token_index", "last_token_index", "pool_hidden"]

POOLINGS = ("last", "mean", "first")


def _check_mask(padding_mask: torch.Tensor) -> None:
    if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool or padding_mask.dim() != 2:
        got = (f"{padding_mask.dtype} of shape {tuple(padding_mask.shape)}" if isinstance(padding_mask, torch.Tensor)
               else type(padding_mask).__name__)
        raise ValueError(f"padding_mask must be a bool tensor of shape (B, T), got {got}")
    empty = (~padding_mask.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"padding_mask has rows with no real token: {empty}")


def last_token_index(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True = real token -> (B,) long: the column of the last True in each row.

    Works for right padding (last real = length - 1), left padding (always T - 1) and any mask with holes.
    """
    _check_mask(padding_mask)
    T = padding_mask.shape[1]
    cols = torch.arange(T, device=padding_mask.device)  # (T,)
    return torch.where(padding_mask, cols, -1).amax(-1)  # the largest column holding a real token


def first_token_index(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B,) long: the column of the first True in each row (not 0 under left padding)."""
    _check_mask(padding_mask)
    T = padding_mask.shape[1]
    cols = torch.arange(T, device=padding_mask.device)
    return torch.where(padding_mask, cols, T).amin(-1)


def pool_hidden(hidden: torch.Tensor, padding_mask: torch.Tensor | None = None, pooling: str = "last") -> torch.Tensor:
    """One vector per sequence from hidden states (B, T, C) -> (B, C).

    pooling: "last" (the last real token: the only one that has seen the whole sequence in a causal model),
    "mean" (the average over real tokens) or "first" (the first real token). padding_mask (B, T), True for
    real tokens; None means every token is real.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    B, T, C = hidden.shape
    if padding_mask is None:
        padding_mask = torch.ones(B, T, dtype=torch.bool, device=hidden.device)
    elif padding_mask.shape != (B, T):
        raise ValueError(f"padding_mask must have shape {(B, T)} to match hidden, got {tuple(padding_mask.shape)}")
    rows = torch.arange(B, device=hidden.device)
    if pooling == "last":
        return hidden[rows, last_token_index(padding_mask)]
    if pooling == "first":
        return hidden[rows, first_token_index(padding_mask)]
    _check_mask(padding_mask)
    # where(), not a product: a pad row's hidden state may hold anything (even inf), and 0 * inf = nan
    summed = torch.where(padding_mask[..., None], hidden, 0).sum(1)  # (B, C)
    return summed / padding_mask.sum(1, keepdim=True).to(hidden.dtype)


def _final_norm(base_model: nn.Module) -> nn.Module | None:
    for name in ("ln_f", "norm"):  # GPT-2's name, the Llama family's
        if isinstance(getattr(base_model, name, None), nn.Module):
            return getattr(base_model, name)
    return None


class SequenceClassifier(nn.Module):
    """A decoder with its LM head replaced by `score`, a bias-free linear layer on one pooled hidden state.

    base_model: any of the package's decoders with `hidden_states(input_ids, padding_mask)` -> (B, T, C) and a
        `blocks` ModuleList (GPT2, Llama3 and its descendants). Its LM head is left in place but never called.
    n_classes: the number of labels; forward returns logits (B, n_classes) for cross-entropy.
    pooling: see `pool_hidden`; "last" is the standard choice for causal models.
    train_last_blocks: None trains everything. N >= 0 freezes the base model except its last N blocks and, if
        N >= 1, its final norm (it sits above those blocks); the head always trains. Training the top of the
        network only is cheap and protects what pretraining learned lower down (ULMFiT's gradual unfreezing,
        Howard & Ruder 2018, starts from the top the same way).
    """

    def __init__(self, base_model: nn.Module, n_classes: int, pooling: str = "last",
                 train_last_blocks: int | None = None):
        super().__init__()
        if not callable(getattr(base_model, "hidden_states", None)):
            raise TypeError(f"base_model must have a hidden_states(input_ids, padding_mask) method; "
                            f"{type(base_model).__name__} has none")
        if not isinstance(getattr(base_model, "blocks", None), nn.ModuleList):
            raise TypeError(f"base_model must have a `blocks` nn.ModuleList; {type(base_model).__name__} has none")
        if not isinstance(n_classes, int) or n_classes < 1:
            raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        n_blocks = len(base_model.blocks)
        if train_last_blocks is not None and (not isinstance(train_last_blocks, int)
                                              or not 0 <= train_last_blocks <= n_blocks):
            raise ValueError(f"train_last_blocks must be None or an int in [0, {n_blocks}] (the base model has "
                             f"{n_blocks} blocks), got {train_last_blocks!r}")
        self.base = base_model
        self.pooling = pooling
        self.train_last_blocks = train_last_blocks
        # the name and layout of Hugging Face's GPT2ForSequenceClassification.score
        self.score = nn.Linear(base_model.cfg.d_model, n_classes, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)
        if train_last_blocks is not None:
            self.base.requires_grad_(False)
            for block in self.base.blocks[n_blocks - train_last_blocks:]:
                block.requires_grad_(True)
            norm = _final_norm(self.base)
            if train_last_blocks >= 1 and norm is not None:
                norm.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), padding_mask (B, T) True for real tokens (left or right padding) -> (B, n_classes)."""
        h = self.base.hidden_states(input_ids, padding_mask)  # (B, T, C)
        return self.score(pool_hidden(h, padding_mask, self.pooling))  # (B, n_classes)

    def n_trainable(self) -> int:
        """Parameters that receive gradients (each shared tensor counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
