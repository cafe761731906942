"""Reinforcement pre-training (RPT; Dong et al. 2025, "Reinforcement Pre-Training", arXiv:2506.08007): next-token
prediction recast as a reasoning task with a verifiable reward.

At a position of ordinary text the policy writes a short reasoning and then a prediction of what comes next. The
reward checks the prediction against the text that really follows, byte for byte (section 3.2): it is 1 when the
prediction is a prefix of the continuation *and* stops exactly where one of the continuation's tokens ends, so
predicting one token, or several whole tokens, counts, and stopping in the middle of a token does not.

Not every position is worth that effort: most next tokens are easy. RPT keeps the hard ones, measured by the entropy
of a small proxy model's next-token distribution over its top-k candidates (section 3.3, k = 16): a position whose
entropy is above a threshold is kept for training.

    prefix_match_reward("Romeo", ["Rom", "eo", ","])    # 1.0: ends on the boundary after "eo"
    prefix_match_reward("Ro", ["Rom", "eo", ","])       # 0.0: inside the token "Rom"
    keep = hard_positions(proxy_logits, k=16, threshold=1.0)   # (B, T) bool
"""

from __future__ import annotations

import torch

__all__ = ["hard_positions", "prefix_match_reward", "topk_entropy"]


def prefix_match_reward(prediction: str, target_tokens: list[str] | list[bytes]) -> float:
    """1.0 when prediction's UTF-8 bytes are a prefix of the concatenated target tokens' bytes and end on a token
    boundary, else 0.0. An empty prediction scores 0 (it predicts nothing).

    Bytes, not characters: a byte-level tokenizer can split one character across tokens (an "é" is two bytes), and
    token boundaries are byte offsets. The valid lengths are the cumulative byte lengths of the target tokens.
    Pass each token's bytes (tiktoken's `decode_single_token_bytes`) where a token may hold part of a character:
    decoding such a token alone to str gives a replacement character, not its bytes. Whole-character tokens may be
    given as str.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    if not isinstance(target_tokens, list | tuple) or not all(isinstance(t, str | bytes) for t in target_tokens):
        raise TypeError("target_tokens must be a list of str or bytes (the continuation's tokens, one by one)")
    predicted = prediction.encode("utf-8")
    if not predicted:
        return 0.0
    pieces = [t.encode("utf-8") if isinstance(t, str) else t for t in target_tokens]
    target = b"".join(pieces)
    boundaries, end = set(), 0
    for piece in pieces:
        end += len(piece)
        boundaries.add(end)
    return 1.0 if target.startswith(predicted) and len(predicted) in boundaries else 0.0


def topk_entropy(logits: torch.Tensor, k: int = 16) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution restricted to its k most likely tokens and renormalized.

    logits (..., V) -> (...,). Restricting to the top k makes the measure about the real candidates, not the long
    tail of a large vocabulary (RPT section 3.3 uses k = 16 on its proxy model).
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > logits.shape[-1]:
        raise ValueError(f"k={k} is larger than the vocabulary ({logits.shape[-1]})")
    top = logits.float().topk(k, dim=-1).values
    logp = top.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def hard_positions(logits: torch.Tensor, k: int = 16, threshold: float = 1.0,
                   padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: the positions whose proxy top-k entropy exceeds `threshold` (the hard next tokens to keep).

    logits (B, T, V) from the proxy model; padding_mask (B, T), True for real positions, excludes padding.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, T, V), got {tuple(logits.shape)}")
    keep = topk_entropy(logits, k) > threshold
    if padding_mask is not None:
        if padding_mask.shape != keep.shape or padding_mask.dtype != torch.bool:
            raise ValueError(f"padding_mask must be bool of shape {tuple(keep.shape)}, got "
                             f"{padding_mask.dtype} {tuple(padding_mask.shape)}")
        keep = keep & padding_mask
    return keep
