"""Autoregressive generation: greedy decoding and sampling (temperature, top-k, top-p) over a KV cache.

    out = generate(model, input_ids, max_new_tokens=50, temperature=0.8, top_k=50, top_p=0.95)

The model is any of the package's decoders: `model(ids, padding_mask=..., caches=..., last_only=True)`
returns the last position's logits (B, 1, V) and `model.init_caches(B, max_len)` returns one KV cache per
layer. With the cache, the prompt
is processed once (prefill) and then each step feeds only the newest token; without it, every step
re-runs the whole sequence (the reference the cache must agree with).

Batches of prompts of different lengths are left-padded: pad tokens go before each prompt and
`padding_mask` marks the real ones, so every row's next token is predicted at the same (last) column.

`generate_static` / `StaticDecoder` decode the same way on fixed-shape caches (`StaticKVCache`) with a decode
step compiled once by torch.compile: the recipe of gpt-fast (PyTorch blog, "Accelerating Generative AI with
PyTorch II: GPT, Fast", 2023). Speculative decoding follows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llm_scratch.attention import GroupedQueryAttention, StaticKVCache
from llm_scratch.device import is_cuda
from llm_scratch.position.rope import RotaryEmbedding

__all__ = ["generate", "logits_to_probs", "sample_next_token", "SpeculativeStats", "speculative_accept",
           "speculative_generate", "mtp_speculative_generate", "init_static_caches", "StaticDecoder",
           "generate_static"]


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """logits (..., V) -> the sampling distribution (..., V) in float32: softmax(logits / temperature) restricted
    to the top_k most likely tokens and/or the smallest set whose probability reaches top_p (nucleus sampling,
    Holtzman et al. 2020, arXiv:1904.09751), renormalized. temperature must be > 0 (0 is greedy: no distribution).
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("temperature 0 is greedy decoding (an argmax), which has no sampling distribution")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,).

    temperature 0: argmax (greedy). Otherwise one draw from `logits_to_probs` (temperature, top-k, top-p).
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _check_generate_args(input_ids: torch.Tensor, max_new_tokens: int, padding_mask: torch.Tensor | None) -> None:
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


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
             eos_token_id: int | None = None, padding_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Append up to max_new_tokens tokens to each prompt: (B, T) -> (B, T + new).

    padding_mask (B, T): True on real prompt tokens; pad on the left. Once a row has produced
    eos_token_id, it keeps emitting eos_token_id, and generation stops when every row has.
    """
    _check_generate_args(input_ids, max_new_tokens, padding_mask)
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


# --- a static KV cache and a compiled decode step (gpt-fast) ------------------------------------------------------
#
# PyTorch blog, "Accelerating Generative AI with PyTorch II: GPT, Fast" (2023): at batch 1 a decode step of a
# small model is bound by per-operation overhead (Python, dispatcher, kernel launches), not by arithmetic.
# torch.compile removes the Python and fuses kernels, and on CUDA, CUDA graphs (mode="reduce-overhead") replay
# the whole step with one launch. Both need a step whose shapes and Python-side state never change, or the
# compiler re-traces it: hence a cache of fixed shapes whose write position is a tensor (StaticKVCache), and
# positions passed in as a tensor rather than derived from a Python length.

def init_static_caches(model, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> list[StaticKVCache]:
    """One empty StaticKVCache per layer of `model` (a decoder whose `blocks[i].attn` is a GroupedQueryAttention
    without a sliding window: GPT-2, Llama 3, Qwen 3). dtype and device default to the attention weights'."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"model must have `blocks`, each with an `attn` layer; {type(model).__name__} has no blocks")
    context = getattr(getattr(model, "cfg", None), "context_length", None)
    if context is not None and max_len > context:
        raise ValueError(f"max_len {max_len} exceeds the context length {context}")
    caches = []
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, GroupedQueryAttention) or attn.window is not None:
            raise ValueError(f"a static cache needs full (not sliding-window) MHA/GQA layers; layer {i} has "
                             f"{attn!r}")
        w = attn.k_proj.weight
        caches.append(StaticKVCache(batch_size, max_len, attn.n_kv_heads, attn.head_dim,
                                    dtype=dtype or w.dtype, device=device or w.device))
    return caches


class StaticDecoder:
    """A model, its static KV caches for `batch_size` rows of up to `max_len` tokens, and a decode step
    compiled once: the gpt-fast recipe (PyTorch blog, "Accelerating Generative AI with PyTorch II: GPT,
    Fast", 2023).

        decoder = StaticDecoder(model, batch_size=8, max_len=256)
        out = decoder.generate(input_ids, max_new_tokens=64)   # the first call compiles the step
        out = decoder.generate(other_ids, max_new_tokens=64)   # later calls reuse it

    The prompt is processed eagerly (`prefill`: one call per prompt, its length varies). Then every new
    token goes through `step(token (B, 1), positions (B, 1))`, which is `torch.compile(fullgraph=True,
    dynamic=False)`: every input has the same shape at every step and the step reads no Python number that
    changes (the cache's write position is a tensor it advances itself), so it is traced and compiled on
    the first call and never again (`fullgraph=True` makes any graph break an error instead of a silent
    slow path). The caches live as long as the decoder and `reset` only clears them in place, so later
    `generate` calls reuse the compiled step.

    compile: False runs the same step eagerly (the reference the compiled one must agree with).
    backend: torch.compile's backend, "inductor" (generated kernels) or e.g. "aot_eager" (no code
        generation: fast to compile, for tests) or any backend callable.
    mode: torch.compile's mode; None picks "reduce-overhead" on CUDA with inductor (CUDA graphs: the step
        is recorded once and replayed with one launch; the cache buffers are then marked as static
        addresses, which CUDA graphs need since a replay reads and writes the addresses it recorded) and
        the default mode elsewhere (CUDA graphs exist on CUDA only).
    """

    def __init__(self, model, batch_size: int, max_len: int, compile: bool = True,
                 backend: str | Callable = "inductor", mode: str | None = None):
        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        self.caches = init_static_caches(model, batch_size, max_len)
        device = self.caches[0].k.device
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                if module._dynamic_length is not None:
                    raise ValueError("dynamic NTK RoPE scaling needs the largest position at every step (a sync); "
                                     "the static decoder does not support it")
                module.prepare_for_compile(device)  # its frequencies on the device, not a CPU tensor in the graph
        if mode is None and backend == "inductor" and is_cuda(device):
            mode = "reduce-overhead"
        self.mode = mode
        # the two modes that record CUDA graphs (on CUDA only)
        self.cuda_graphs = compile and is_cuda(device) and mode in ("reduce-overhead", "max-autotune")
        if self.cuda_graphs:
            for cache in self.caches:
                cache.mark_static()
        if compile:
            options = {} if mode is None else {"mode": mode}
            self.step = torch.compile(self._step, fullgraph=True, dynamic=False, backend=backend, **options)
        else:
            self.step = self._step

    def _step(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """token (B, 1), positions (B, 1) -> next-token logits (B, V); appends the token to the caches."""
        return self.model(token, caches=self.caches, positions=positions, last_only=True)[:, -1]

    def reset(self) -> None:
        """Empty the caches in place (same buffers, so the compiled step and its CUDA graphs stay valid)."""
        for cache in self.caches:
            cache.reset()

    def prefill(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Empty the caches and run the prompt (B, T) through the model eagerly -> the next token's logits (B, V)."""
        self.reset()
        return self.model(input_ids, padding_mask=padding_mask, caches=self.caches, last_only=True)[:, -1]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 padding_mask: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """`generate`'s contract, (B, T) -> (B, T + new), on the static caches and the compiled step.

        B must be the decoder's batch_size and T + max_new_tokens at most its max_len (fixed shapes: a
        different batch would need another compilation, so it is an error instead). Sampling (temperature,
        top_k, top_p) runs eagerly on the step's logits, as in `generate`: greedy output is token for token
        the same.
        """
        _check_generate_args(input_ids, max_new_tokens, padding_mask)
        _check_sampling(temperature, top_k, top_p)
        B, T = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"input_ids has batch size {B}, but the decoder was built for batch_size="
                             f"{self.batch_size} (its shapes are fixed)")
        if T + max_new_tokens > self.max_len:
            # the compiled step does not check bounds (a device sync): this check is the one that counts
            raise ValueError(f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) exceed the decoder's "
                             f"max_len={self.max_len}")
        if max_new_tokens == 0:
            return input_ids
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.prefill(input_ids, padding_mask)  # (B, V)
            positions = self.caches[0].real_lengths()[:, None]  # (B, 1): positions count real tokens only
            finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
            new_tokens = []
            for i in range(max_new_tokens):
                next_token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
                if eos_token_id is not None:
                    next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                    finished |= next_token == eos_token_id
                new_tokens.append(next_token)
                if i == max_new_tokens - 1 or (eos_token_id is not None and finished.all()):
                    break
                if self.cuda_graphs:  # a new replay begins: the last one's outputs are done with
                    torch.compiler.cudagraph_mark_step_begin()
                logits = self.step(next_token[:, None], positions)
                positions = positions + 1
        finally:
            self.model.train(was_training)
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


@torch.no_grad()
def generate_static(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                    padding_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    compile: bool = True, backend: str | Callable = "inductor",
                    mode: str | None = None) -> torch.Tensor:
    """`generate` on a static KV cache with a compiled decode step (the gpt-fast recipe): (B, T) -> (B, T + new).

    A one-shot `StaticDecoder(model, B, T + max_new_tokens, compile, backend, mode).generate(...)`; greedy
    output equals `generate(model, ...)`'s. Each call builds new caches and so compiles its step again: to
    decode many prompts, build one StaticDecoder and call its `generate`.
    """
    _check_generate_args(input_ids, max_new_tokens, padding_mask)
    decoder = StaticDecoder(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, compile=compile,
                            backend=backend, mode=mode)
    return decoder.generate(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, padding_mask,
                            generator)


# --- speculative decoding -------------------------------------------------------------------------------------

def _check_probs(name: str, probs: torch.Tensor, rows: int, vocab: int | None) -> None:
    if probs.dim() != 2 or probs.shape[0] != rows or (vocab is not None and probs.shape[1] != vocab):
        want = f"({rows}, {'V' if vocab is None else vocab})"
        raise ValueError(f"{name} must have shape {want}, got {tuple(probs.shape)}")
    if (probs < 0).any() or not torch.allclose(probs.sum(-1), torch.ones_like(probs[:, 0]), atol=1e-4):
        raise ValueError(f"{name} must be probabilities: non-negative rows that sum to 1")


def speculative_accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The acceptance step of speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023).

    draft_tokens (γ,): what the draft sampled; draft_probs (γ, V): q, the draft's distribution at each of those
    positions; target_probs (γ+1, V): p, the target's distribution at the same positions plus one more. Draft token
    i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), in order, until the first rejection; at a rejected
    position one token is drawn from the residual normalize(max(0, p_i − q_i)); if all γ are accepted, a bonus
    token is drawn from p_γ. Either way the emitted tokens (1 to γ+1 of them) are distributed exactly as tokens
    sampled from the target one by one.

    Random numbers are drawn as transformers' `_speculative_sampling` draws them: γ uniforms at once, then one
    multinomial draw, so with the same seed the two agree exactly.
    """
    if draft_tokens.dim() != 1 or draft_tokens.numel() < 1:
        raise ValueError(f"draft_tokens must have shape (γ,) with γ >= 1, got {tuple(draft_tokens.shape)}")
    gamma = draft_tokens.shape[0]
    _check_probs("draft_probs", draft_probs, gamma, None)
    _check_probs("target_probs", target_probs, gamma + 1, draft_probs.shape[1])
    return _accept(draft_tokens, draft_probs, target_probs, generator)


def _accept(draft_tokens, draft_probs, target_probs, generator):  # speculative_accept without the input checks
    gamma = draft_tokens.shape[0]
    positions = torch.arange(gamma, device=draft_tokens.device)
    q_i = draft_probs[positions, draft_tokens]
    p_i = target_probs[positions, draft_tokens]
    r = torch.rand(gamma, generator=generator, dtype=q_i.dtype, device=q_i.device)
    accepted = r <= p_i / q_i  # keep x_i with probability min(1, p/q)
    n = int(((~accepted).cumsum(dim=0) < 1).sum())  # accepted before the first rejection
    if n < gamma:
        residual = (target_probs[n] - draft_probs[n]).clamp(min=0)
        residual = residual / residual.sum()
    else:
        residual = target_probs[gamma]
    last = torch.multinomial(residual[None], num_samples=1, generator=generator)[0]
    return torch.cat([draft_tokens[:n], last])


@dataclass
class SpeculativeStats:
    """What one speculative_generate call did. acceptance_rate = accepted / proposed draft tokens (every proposal
    counts, also those after a rejection, which are never tested); token_acceptance = accepted / tested proposals,
    the per-token α of Leviathan et al.'s speed-up formula (a round's proposals are tested up to the first
    rejection)."""

    gamma: int = 0
    new_tokens: int = 0
    proposed: int = 0
    accepted: int = 0
    target_calls: int = 0  # forward passes of the target (prefill included)
    draft_calls: int = 0  # forward passes of the draft (prefill included)
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def token_acceptance(self) -> float:
        rejections = sum(1 for n in self.accepted_per_round if n < self.gamma)
        tested = self.accepted + rejections
        return self.accepted / tested if tested else float("nan")

    @property
    def tokens_per_target_call(self) -> float:
        return self.new_tokens / self.target_calls if self.target_calls else float("nan")


def _truncate(caches, length: int) -> None:
    for cache in caches:
        cache.truncate(length)


@torch.no_grad()
def speculative_generate(target, draft, input_ids: torch.Tensor, max_new_tokens: int, gamma: int = 4,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Decode from `target` with `draft` proposing gamma tokens at a time: (1, T) -> ((1, T + new), stats).

    Each round the draft samples γ tokens one by one (its KV cache), the target scores all of them in one forward
    pass (its KV cache), `speculative_accept` keeps a prefix and adds one token of the target's own, and both
    caches are rolled back to the kept tokens. temperature / top_k / top_p transform both models' logits the same
    way before the ratio (`logits_to_probs`); temperature 0 is greedy: a draft token is kept when it is the
    target's argmax, so the output is token for token greedy `generate(target, ...)`.

    Invariant between rounds: both caches hold every token but the last emitted one, which is fed next round.
    The draft may also owe the last draft token of a fully accepted round (it never fed it); it is fed first.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (1, T) with T >= 1 (one sequence), got {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma must be a positive int, got {gamma!r}")
    _check_sampling(temperature, top_k, top_p)
    stats = SpeculativeStats(gamma=gamma)
    if max_new_tokens == 0:
        return input_ids, stats
    T = input_ids.shape[1]
    max_len = T + max_new_tokens + gamma + 1
    was_training = target.training, draft.training
    target.eval(), draft.eval()
    target_caches, draft_caches = target.init_caches(1, max_len), draft.init_caches(1, max_len)
    out = input_ids
    try:
        if T > 1:  # prefill everything but the last prompt token
            target(input_ids[:, :-1], caches=target_caches, last_only=True)
            draft(input_ids[:, :-1], caches=draft_caches, last_only=True)
            stats.target_calls += 1
            stats.draft_calls += 1
        draft_pending = input_ids[:, -1:]  # tokens the draft has not seen yet
        while stats.new_tokens < max_new_tokens:
            length = target_caches[0].length  # tokens before the last emitted one
            # 1. the draft proposes γ tokens
            proposed, q_rows = [], []
            step_input = draft_pending
            for _ in range(gamma):
                logits = draft(step_input, caches=draft_caches, last_only=True)[0, -1]
                stats.draft_calls += 1
                if temperature == 0:
                    token = logits.argmax(-1, keepdim=True)
                else:
                    q = logits_to_probs(logits, temperature, top_k, top_p)
                    token = torch.multinomial(q, num_samples=1, generator=generator)
                    q_rows.append(q)
                proposed.append(token)
                step_input = token[None]
            proposed = torch.cat(proposed)  # (γ,)
            # 2. the target scores the last emitted token and the γ proposals in one pass: γ + 1 distributions
            target_logits = target(torch.cat([out[:, -1:], proposed[None]], dim=1), caches=target_caches)[0]
            stats.target_calls += 1
            # 3. accept a prefix, add one token of the target's
            if temperature == 0:
                best = target_logits.argmax(-1)  # (γ + 1,)
                n = int((best[:gamma] == proposed).long().cumprod(0).sum())
                emitted = torch.cat([proposed[:n], best[n:n + 1]])
            else:
                p = logits_to_probs(target_logits, temperature, top_k, top_p)
                emitted = _accept(proposed, torch.stack(q_rows), p, generator)
                n = emitted.shape[0] - 1
            stats.proposed += gamma
            stats.accepted += n
            stats.accepted_per_round.append(n)
            emitted = emitted[:max_new_tokens - stats.new_tokens]
            out = torch.cat([out, emitted[None]], dim=1)
            stats.new_tokens += emitted.shape[0]
            # 4. roll back: keep the last emitted token's predecessors (the accepted drafts) in both caches
            kept = length + 1 + n  # the previous last token and the n accepted drafts
            _truncate(target_caches, kept)
            if n == gamma:  # the draft never fed its own last proposal
                draft_pending = torch.cat([proposed[-1:], emitted[-1:]])[None]
                _truncate(draft_caches, kept - 1)
            else:
                draft_pending = emitted[-1:][None]
                _truncate(draft_caches, kept)
    finally:
        target.train(was_training[0])
        draft.train(was_training[1])
    return out, stats


@torch.no_grad()
def mtp_speculative_generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor,
                                                                                          SpeculativeStats]:
    """Greedy self-speculative decoding with DeepSeek-V3's MTP modules as the draft (DeepSeek-V3 report, section
    5.4.3): no second model. (1, T) -> ((1, T + new), stats).

    Each round the main model's forward over the sequence so far plus [t, d_1 .. d_D] -- t its own next token
    from the round before, d_k the MTP drafts -- checks every draft at once: d_k is kept while it equals the main
    model's greedy choice at its position, and the main model's prediction after the last kept token is the next
    round's t. So the output is token for token greedy `generate(model, ...)`, and each round emits 1 + (kept
    drafts) tokens for one main forward. The sequence is recomputed each round (no cache): for reading, not speed.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (1, T) with T >= 1 (one sequence), got {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not hasattr(model, "draft") or not len(getattr(model, "mtp", ())):
        raise ValueError("model must have MTP modules (DeepSeekV3 with n_mtp >= 1)")
    stats = SpeculativeStats(gamma=len(model.mtp))
    was_training = model.training
    model.eval()
    try:
        ids = input_ids
        h = model.hidden_states(ids)
        next_token = model.lm_head(model.norm(h[:, -1])).argmax(-1)  # (1,)
        stats.target_calls += 1
        while stats.new_tokens < max_new_tokens:
            drafts = model.draft(h, ids, next_token)[0]  # (D,)
            stats.draft_calls += 1
            candidate = torch.cat([ids, next_token[:, None], drafts[None]], dim=1)
            h_all = model.hidden_states(candidate)  # one main forward checks every draft
            stats.target_calls += 1
            T = ids.shape[1]
            best = model.lm_head(model.norm(h_all[0, T:])).argmax(-1)  # (D + 1,): after t, d_1, ..., d_D
            n = int((best[:-1] == drafts).long().cumprod(0).sum())
            stats.proposed += drafts.shape[0]
            stats.accepted += n
            stats.accepted_per_round.append(n)
            emitted = torch.cat([next_token, drafts[:n]])[: max_new_tokens - stats.new_tokens]
            ids = torch.cat([ids, emitted[None]], dim=1)
            stats.new_tokens += emitted.shape[0]
            h, next_token = h_all[:, : T + 1 + n], best[n:n + 1]
    finally:
        model.train(was_training)
    return ids, stats
