"""Autoregressive generation: greedy decoding and sampling (temperature, top-k, top-p) over a KV cache.

    out = generate(model, input_ids, max_new_tokens=50, temperature=0.8, top_k=50, top_p=0.95)

The model is any of the package's decoders: `model(ids, padding_mask=..., caches=..., last_only=True)`
returns the last position's logits (B, 1, V) and `model.init_caches(B, max_len)` returns one KV cache per
layer. With the cache, the prompt
is processed once (prefill) and then each step feeds only the newest token; without it, every step
re-runs the whole sequence (the reference the cache must agree with).

Batches of prompts of different lengths are left-padded: pad tokens go before each prompt and
`padding_mask` marks the real ones, so every row's next token is predicted at the same (last) column.
"""

from __future__ import annotations

import torch

__all__ = ["generate", "sample_next_token"]


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,).

    temperature 0: argmax (greedy). Otherwise softmax(logits / temperature), restricted to the top_k
    most likely tokens and/or the smallest set whose probability reaches top_p (nucleus sampling,
    Holtzman et al. 2020, arXiv:1904.09751), renormalized, then one draw.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
             eos_token_id: int | None = None, padding_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Append up to max_new_tokens tokens to each prompt: (B, T) -> (B, T + new).

    padding_mask (B, T): True on real prompt tokens; pad on the left. Once a row has produced
    eos_token_id, it keeps emitting eos_token_id, and generation stops when every row has.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (B, T) with T >= 1, got {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if padding_mask is not None:
        if padding_mask.shape != input_ids.shape or padding_mask.dtype != torch.bool:
            raise ValueError(f"padding_mask must be bool of shape {tuple(input_ids.shape)}, "
                             f"got {padding_mask.dtype} {tuple(padding_mask.shape)}")
        if not padding_mask[:, -1].all():
            raise ValueError("padding_mask must be left padding: every row's last prompt token must be real")
    was_training = model.training
    model.eval()
    B, T = input_ids.shape
    ids, mask = input_ids, padding_mask
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    caches = model.init_caches(B, T + max_new_tokens) if use_cache and max_new_tokens else None
    step_input, step_mask = ids, mask
    try:
        for _ in range(max_new_tokens):
            if use_cache:
                logits = model(step_input, padding_mask=step_mask, caches=caches, last_only=True)[:, -1]
            else:
                logits = model(ids, padding_mask=mask, last_only=True)[:, -1]
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token == eos_token_id
            ids = torch.cat([ids, next_token[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=mask.device)], dim=1)
            step_input, step_mask = next_token[:, None], (None if mask is None else mask[:, -1:])
            if eos_token_id is not None and finished.all():
                break
    finally:
        model.train(was_training)
    return ids
