"""Losses for language-model training: next-token cross entropy, and the Number Token Loss.

Cross entropy treats the digit tokens as unrelated classes: predicting "3" when the answer is "4" costs as much
as predicting "9". The Number Token Loss (NTL; Zausinger et al. 2025, "Regress, Don't Guess", arXiv:2411.02083)
adds a regression-like term at the positions whose target is a number token: with p the model's distribution
restricted to the number tokens (a softmax over their logits only) and y the target's value,

    NTL-WAS = Σ_j p_j |v_j − y|        (the Wasserstein-1 distance between p and a point mass at y)
    NTL-MSE = (Σ_j p_j v_j − y)²       (the squared error of the expected value)

so mass near the right digit costs less than mass far from it. Training uses CE + λ·NTL (λ = 0.3).

    ntl = NumberTokenLoss(number_token_values(tokenizer, logits.shape[-1]))
    loss = cross_entropy_loss(logits, targets) + 0.3 * ntl(logits, targets)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IGNORE_INDEX", "NTL_KINDS", "NumberTokenLoss", "count_targets", "cross_entropy_loss",
           "number_token_values"]

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


# --- Number Token Loss -------------------------------------------------------------------------------------------

NTL_KINDS = ("wasserstein", "mse")


def number_token_values(tokenizer, vocab_size: int | None = None, digits_only: bool = True) -> torch.Tensor:
    """(V,) float tensor: the numeric value of each number token, NaN for every other token.

    digits_only (the paper's digit-level setting, and the ntloss package's default): only the tokens that are one
    ASCII digit 0-9 count. Otherwise any token whose text is a finite number ("12", "3.5") counts; tokens with
    spaces around the number do not. Works with any tokenizer with `decode(ids)`; ids that cannot be decoded on
    their own (special tokens) are not numbers. vocab_size defaults to the tokenizer's `n_vocab` (pass the
    model's, which may be padded larger).
    """
    V = vocab_size if vocab_size is not None else tokenizer.n_vocab
    if not isinstance(V, int) or V < 1:
        raise ValueError(f"vocab_size must be a positive int, got {V!r}")
    values = torch.full((V,), float("nan"))
    for i in range(min(V, getattr(tokenizer, "n_vocab", V))):
        try:
            text = tokenizer.decode([i])
        except Exception:  # special tokens some tokenizers refuse to decode alone
            continue
        if digits_only:
            if len(text) == 1 and text in "0123456789":
                values[i] = float(text)
        elif text.isascii() and text.strip() == text and text:
            try:
                number = float(text)
            except ValueError:
                continue
            if math.isfinite(number):
                values[i] = number
    if torch.isnan(values).all():
        raise ValueError("the tokenizer has no number tokens")
    return values


class NumberTokenLoss(nn.Module):
    """The Number Token Loss at the positions whose label is a number token (module docstring; Eq. 2 / 3 of the
    paper without its optional reweighting by the mass on number tokens).

    number_values (V,): the value of each number token, NaN elsewhere (`number_token_values`). forward(logits
    (B, T, V), labels (B, T), ignore_index) -> the mean over number-token positions; exactly 0 (with a gradient of
    0) when no label is a number token.
    """

    def __init__(self, number_values: torch.Tensor, kind: str = "wasserstein"):
        super().__init__()
        if kind not in NTL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(NTL_KINDS)}, got {kind!r}")
        if number_values.dim() != 1 or not number_values.is_floating_point():
            raise ValueError(f"number_values must be a 1-D float tensor (V,), got {number_values.dtype} "
                             f"{tuple(number_values.shape)}")
        is_number = ~torch.isnan(number_values)
        if not is_number.any():
            raise ValueError("number_values marks no number token (all NaN)")
        self.kind = kind
        self.register_buffer("number_ids", is_number.nonzero().squeeze(-1), persistent=False)  # (N,)
        self.register_buffer("values", number_values[is_number].float(), persistent=False)  # (N,)
        self.register_buffer("value_of", torch.nan_to_num(number_values.float(), nan=0.0), persistent=False)
        self.register_buffer("is_number", is_number, persistent=False)
        self.vocab_size = number_values.shape[0]

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        if logits.dim() != 3 or logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits must have shape (B, T, V={self.vocab_size}), got {tuple(logits.shape)}")
        if labels.shape != logits.shape[:-1]:
            raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
        valid = labels != ignore_index
        safe = labels.masked_fill(~valid, 0)
        if (safe < 0).any() or (safe >= self.vocab_size).any():
            raise ValueError(f"labels must be token ids in [0, {self.vocab_size}) or ignore_index={ignore_index}")
        at_number = valid & self.is_number[safe]  # (B, T) positions whose target is a number token
        if not at_number.any():
            return logits.sum() * 0.0  # 0, connected to the graph
        y = self.value_of[safe[at_number]]  # (P,) target values
        p = logits[at_number][:, self.number_ids].float().softmax(dim=-1)  # (P, N) softmax over number tokens
        if self.kind == "wasserstein":
            per_position = (p * (self.values[None] - y[:, None]).abs()).sum(-1)  # Σ_j p_j |v_j − y|
        else:
            per_position = ((p * self.values[None]).sum(-1) - y) ** 2  # (Σ_j p_j v_j − y)²
        return per_position.mean()
