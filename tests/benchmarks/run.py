"""`make bench`: speed figures of the package, measured on the machine that runs it.

Not part of `make test` (timings are not assertions). Each benchmark prints one table; run with
`--quick` for a smoke run. Add a chapter's benchmarks as a function and list it in BENCHMARKS.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial

import torch

from llm_scratch import get_device, seed_everything
from llm_scratch.attention import GroupedQueryAttention, scaled_dot_product_attention


def timeit(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of fn() in milliseconds, after one warm-up call."""
    return timeit_interleaved({"fn": fn}, device, repeats)["fn"]


def timeit_interleaved(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median wall time (ms) of each fn, timed in turn within every round, so that a machine that slows
    down or speeds up during the run (other jobs, frequency scaling) affects all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type != "cpu":
                torch.accelerator.synchronize()
            start = time.perf_counter()
            fn()
            if device.type != "cpu":
                torch.accelerator.synchronize()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def bench_sdpa_paths(device: torch.device, quick: bool) -> None:
    """Naive softmax(QKᵀ/√D)V vs the fused kernel, causal, B=4, H=8, D=64."""
    print("\nscaled dot-product attention, causal, B=4 H=8 D=64 (ms, median)")
    print(f"{'T':>6} {'naive':>10} {'fused':>10} {'speed-up':>9}")
    for T in (128, 512) if quick else (128, 512, 1024, 2048):
        q, k, v = (torch.randn(4, 8, T, 64, device=device) for _ in range(3))
        naive, fused = (
            timeit(partial(scaled_dot_product_attention, q, k, v, is_causal=True, naive=flag), device, 5)
            for flag in (True, False)
        )
        print(f"{T:>6} {naive:>10.2f} {fused:>10.2f} {naive / fused:>8.1f}x")


def _decode_step_ms(layers: list[GroupedQueryAttention], context: int, device: torch.device) -> tuple[float, float]:
    """(without cache, with cache) ms to get token `context`'s output from the stack of layers."""
    x = torch.randn(1, context + 1, layers[0].d_model, device=device)

    def without_cache():
        h = x
        for layer in layers:
            h = layer(h)  # recompute every position, keep the last
        return h[:, -1:]

    caches = [layer.init_cache(1, context + 1) for layer in layers]
    h = x[:, :context]
    for layer, cache in zip(layers, caches, strict=True):  # prefill once
        h = layer(h, cache=cache)

    def with_cache():
        h = x[:, context:]
        for layer, cache in zip(layers, caches, strict=True):
            h = layer(h, cache=cache)
        for cache in caches:
            cache.truncate(context)  # roll back so the next repeat decodes the same position
        return h

    return timeit(without_cache, device, 5), timeit(with_cache, device, 20)


@torch.no_grad()
def bench_kv_cache_decode(device: torch.device, quick: bool) -> None:
    """Time to produce the next token's attention output, 4 GQA layers, with and without a cache."""
    layers = [GroupedQueryAttention(256, 8, n_kv_heads=2).to(device).eval() for _ in range(4)]
    print("\ndecode one token through 4 GQA layers (C=256, H=8, K=2), batch 1 (ms, median)")
    print(f"{'context':>8} {'no cache':>10} {'cache':>10} {'speed-up':>9}")
    for T in (64, 256) if quick else (64, 256, 1024, 2048):
        no_cache_ms, cache_ms = _decode_step_ms(layers, T, device)
        print(f"{T:>8} {no_cache_ms:>10.3f} {cache_ms:>10.3f} {no_cache_ms / cache_ms:>8.1f}x")


def bench_bpe(device: torch.device, quick: bool) -> None:
    """BPE training (naive vs incremental) and encoding throughput (ours vs tiktoken) on Tiny Shakespeare."""
    from llm_scratch.data import load_corpus
    from llm_scratch.tokenizer import BPETokenizer, get_tokenizer
    from llm_scratch.tokenizer.pretrained import SHAKESPEARE_SETTINGS

    text = load_corpus("tinyshakespeare")
    pattern, vocab = SHAKESPEARE_SETTINGS["pattern"], SHAKESPEARE_SETTINGS["vocab_size"]
    print(f"\nBPE training on Tiny Shakespeare ({len(text):,} bytes), pattern GPT-4, CPU, one thread of Python (s)")
    print(f"{'merges':>8} {'naive':>10} {'incremental':>12} {'speed-up':>9}")
    for merges in (64, 256) if quick else (64, 256, 1024):
        times = []
        for method in ("naive", "incremental"):
            start = time.perf_counter()
            BPETokenizer.train(text, 256 + merges, pattern, method=method)
            times.append(time.perf_counter() - start)
        print(f"{merges:>8} {times[0]:>10.2f} {times[1]:>12.2f} {times[0] / times[1]:>8.1f}x")
    start = time.perf_counter()
    BPETokenizer.train(text, vocab, pattern)
    print(f"{vocab - 256:>8} {'':>10} {time.perf_counter() - start:>12.2f}   (the committed vocabulary)")

    print("\nencode Tiny Shakespeare, ordinary text (MB/s, best of 3; ours starts with an empty piece cache)")
    print(f"{'tokenizer':>12} {'ours':>8} {'tiktoken':>9} {'ratio':>7}")
    for name in ("shakespeare", "gpt2"):
        speeds = []
        for backend in ("ours", "tiktoken"):
            best = float("inf")
            for _ in range(1 if quick else 3):
                tokenizer = get_tokenizer(name, backend=backend)  # fresh: no warm cache
                start = time.perf_counter()
                tokenizer.encode_ordinary(text)
                best = min(best, time.perf_counter() - start)
            speeds.append(len(text.encode()) / best / 1e6)
        print(f"{name:>12} {speeds[0]:>8.2f} {speeds[1]:>9.2f} {speeds[1] / speeds[0]:>6.1f}x")


def bench_gpt2(device: torch.device, quick: bool) -> None:
    """Training tokens/s of our GPT-2 vs transformers' GPT2LMHeadModel on the same config and batch, and
    greedy decode tokens/s with our KV cache vs transformers' generate."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from llm_scratch.generation import generate
    from llm_scratch.models import GPT2, GPT2Config
    from llm_scratch.training import cross_entropy_loss

    hf_logging.set_verbosity_error()
    d, layers, heads, vocab, ctx = (128, 2, 4, 4099, 128) if quick else (256, 4, 4, 4099, 256)
    hf_cfg = HFConfig(n_embd=d, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=ctx, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    ours = GPT2(GPT2Config(vocab_size=vocab, context_length=ctx, d_model=d, n_layers=layers, n_heads=heads)).to(device)
    theirs = GPT2LMHeadModel(hf_cfg).to(device)
    B = 8
    x = torch.randint(0, vocab, (B, ctx), device=device)
    y = torch.randint(0, vocab, (B, ctx), device=device)

    def step(model, hf: bool):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run():
            logits = model(x).logits if hf else model(x)
            cross_entropy_loss(logits, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    print(f"\nGPT-2 training step, d={d} L={layers} H={heads} V={vocab}, batch {B}x{ctx} fp32 "
          "(tokens/s, median of rounds timing each in turn)")
    ours.train()
    theirs.train()
    ms = timeit_interleaved({"ours": step(ours, False), "transformers": step(theirs, True)}, device,
                            3 if quick else 10)
    rates = {name: B * ctx / t * 1e3 for name, t in ms.items()}
    for name, rate in rates.items():
        print(f"{name:>14} {rate:>12,.0f}")
    print(f"{'ours / theirs':>14} {rates['ours'] / rates['transformers']:>12.2f}")

    ours.eval()
    theirs.eval()
    prompt = torch.randint(0, vocab, (1, 16), device=device)
    new = 32 if quick else 200
    print(f"\ngreedy decoding, batch 1, prompt 16, {new} new tokens (tokens/s, median)")
    decode = [
        ("ours, KV cache", lambda: generate(ours, prompt, new)),
        ("ours, no cache", lambda: generate(ours, prompt, new, use_cache=False)),
        ("transformers", lambda: theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                                 min_new_tokens=new, do_sample=False, pad_token_id=0)),
    ]
    with torch.no_grad():
        ms = timeit_interleaved(dict(decode), device, 2 if quick else 5)
    for name, t in ms.items():
        print(f"{name:>16} {new / t * 1e3:>10,.0f}")


def bench_decode(device: torch.device, quick: bool) -> None:
    """Greedy decoding tokens/s of the same GPT-2 weights: our `generate` (dynamic KV cache), a static KV cache run
    eagerly and compiled (the gpt-fast recipe: `StaticDecoder`, inductor; CUDA graphs on CUDA), and transformers'
    GPT2LMHeadModel.generate, at batch 1 and 8 (issue 16). The weights are random, made by transformers and loaded
    into ours through `load_hf_checkpoint`, so both run exactly the same numbers."""
    import tempfile

    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from llm_scratch.generation import StaticDecoder, generate
    from llm_scratch.models.hf import load_hf_checkpoint

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # full: GPT-2 124M's shape (d=768, 12 layers, 12 heads, V=50257); quick: a small one
    d, layers, heads, vocab = (128, 2, 4, 4099) if quick else (768, 12, 12, 50257)
    prompt_len, new = (16, 16) if quick else (64, 64)
    hf_cfg = HFConfig(n_embd=d, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=1024, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    theirs = GPT2LMHeadModel(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = load_hf_checkpoint(folder, device=device)
    theirs = theirs.to(device)
    print(f"\ngreedy decoding, same GPT-2 weights (d={d} L={layers} H={heads} V={vocab}, fp32), prompt {prompt_len}, "
          f"{new} new tokens, on {device} ({_device_name(device)}), torch {torch.__version__}\n"
          "tokens/s = batch x new tokens / time of the whole call (prefill included), median of rounds timing "
          "each in turn; compile time (first call minus a steady call) is not in it, and is shorter when inductor's\n"
          "on-disk cache (TORCHINDUCTOR_CACHE_DIR) already holds the kernels from an earlier run")
    print(f"{'batch':>5} {'ours, dynamic cache':>20} {'static, eager':>14} {'static, compiled':>17} "
          f"{'transformers':>13} {'compiled / dyn':>15} {'compile (s)':>12} {'same tokens':>12}")
    for B in (1, 8):
        prompt = torch.randint(0, vocab, (B, prompt_len), device=device)
        eager = StaticDecoder(ours, B, prompt_len + new, compile=False)
        compiled = StaticDecoder(ours, B, prompt_len + new)  # inductor; mode reduce-overhead on CUDA
        with torch.no_grad():
            start = time.perf_counter()
            compiled.generate(prompt, new)  # the first call compiles the step
            if device.type != "cpu":
                torch.accelerator.synchronize()
            first = time.perf_counter() - start
            runs = {
                "dynamic": partial(generate, ours, prompt, new),
                "static eager": partial(eager.generate, prompt, new),
                "static compiled": partial(compiled.generate, prompt, new),
                "transformers": partial(theirs.generate, prompt, attention_mask=torch.ones_like(prompt),
                                        max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0),
            }
            outputs = {name: fn() for name, fn in runs.items()}
            ms = timeit_interleaved(runs, device, 2 if quick else 3)
        rate = {name: B * new / t * 1e3 for name, t in ms.items()}
        same = all(torch.equal(out, outputs["dynamic"]) for out in outputs.values())
        print(f"{B:>5} {rate['dynamic']:>20,.1f} {rate['static eager']:>14,.1f} {rate['static compiled']:>17,.1f} "
              f"{rate['transformers']:>13,.1f} {rate['static compiled'] / rate['dynamic']:>14.2f}x "
              f"{first - ms['static compiled'] / 1e3:>12.1f} {'yes' if same else 'NO':>12}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


MIXERS = ("softmax (fused SDPA)", "linear, chunked", "SSD, chunked", "SSD, sequential")
_MIXER_H, _MIXER_D, _MIXER_N, _MIXER_CHUNK = 8, 64, 64, 64  # heads, head dim, SSD state size, chunk length


def _mixer_call(name: str, T: int, device: torch.device):
    """Inputs of one sequence mixer for a batch of one T-token sequence, and a closure that runs it (no grad)."""
    import torch.nn.functional as F

    from llm_scratch.attention.linear import linear_attention_chunked
    from llm_scratch.ssm.mamba2 import ssd_chunked, ssd_sequential

    H, D, N = _MIXER_H, _MIXER_D, _MIXER_N
    g = torch.Generator(device="cpu").manual_seed(0)
    if name in MIXERS[:2]:
        q, k, v = (torch.randn(1, H, T, D, generator=g).to(device) for _ in range(3))
        if name == MIXERS[0]:
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        log_decay = torch.full((1, H, T, D), -0.01, device=device)
        return lambda: linear_attention_chunked(q, k, v, log_decay, chunk_size=_MIXER_CHUNK)
    x = torch.randn(1, T, H, D, generator=g).to(device)
    dt = torch.rand(1, T, H, generator=g).to(device) * 0.1
    A = -torch.rand(H, generator=g).to(device)
    B, C = (torch.randn(1, T, 1, N, generator=g).to(device) for _ in range(2))
    if name == MIXERS[2]:
        return lambda: ssd_chunked(x, dt, A, B, C, chunk_size=_MIXER_CHUNK)
    return lambda: ssd_sequential(x, dt, A, B, C)


class _PeakTensorBytes:
    """Peak bytes of the tensors an operation creates and keeps alive, measured by intercepting every aten call
    (a TorchDispatchMode): each new output storage is counted when made and uncounted when its tensor dies.
    What CUDA's allocator peak reports, without caching slack, and available on the CPU too. (A view that
    outlives its base is uncounted early; the mixers here do not keep such views.)"""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._add(t)
                return out

        self.mode, self.live, self.peak, self._owned = Mode(), 0, 0, set()

    def _add(self, t: torch.Tensor) -> None:
        import weakref

        storage = t.untyped_storage()
        key, n = storage.data_ptr(), storage.nbytes()
        if key in self._owned or n == 0:
            return  # an in-place result or a view of something already counted
        self._owned.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._owned.discard(key)
        self.live -= n

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _peak_memory_mib(name: str, T: int, device: torch.device) -> float:
    """Extra peak memory of one call beyond its inputs (CUDA: the allocator's peak; CPU: _PeakTensorBytes)."""
    fn = _mixer_call(name, T, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.no_grad(), _PeakTensorBytes() as tracker:
        fn()
    return tracker.peak / 2**20


@torch.no_grad()
def bench_mixers(device: torch.device, quick: bool) -> None:
    """Run time and peak memory vs sequence length for softmax attention (fused SDPA), chunked linear attention,
    and Mamba-2's SSD, chunked and sequential; batch 1, 8 heads of 64, SSD state 64, chunks of 64."""
    lengths = (1024, 2048) if quick else (1024, 2048, 4096, 8192, 16384)
    print(f"\nsequence mixers, batch 1, H={_MIXER_H} D={_MIXER_D}, SSD N={_MIXER_N}, chunk {_MIXER_CHUNK}: "
          "ms (median) / extra peak MiB")
    print(f"{'T':>6} " + " ".join(f"{name:>24}" for name in MIXERS))
    times: dict[str, list[float]] = {name: [] for name in MIXERS}
    for T in lengths:
        row = []
        for name in MIXERS:
            repeats = 1 if name == MIXERS[3] else (2 if quick else 3)
            ms = timeit(_mixer_call(name, T, device), device, repeats)
            times[name].append(ms)
            row.append(f"{ms:>10.1f} / {_peak_memory_mib(name, T, device):>9.1f}")
        print(f"{T:>6} " + " ".join(f"{cell:>24}" for cell in row))
    for name in MIXERS[1:3]:
        faster = [T for T, a, b in zip(lengths, times[name], times[MIXERS[0]], strict=True) if a < b]
        print(f"first length where {name} beats softmax: {faster[0] if faster else f'none up to {lengths[-1]}'}")
    print(f"chunked / sequential SSD speed-up at T={lengths[-1]}: {times[MIXERS[3]][-1] / times[MIXERS[2]][-1]:.1f}x")


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t))


def bench_sft(device: torch.device, quick: bool) -> None:
    """One SFT training step on packed task rows: full fine-tuning vs LoRA (r=8 on every attention and MLP
    projection), AdamW. Tokens/s counts the rows' real (non-pad) tokens; memory is parameters + AdamW state +
    the step's peak of activations and gradients (CUDA: the allocator's peak over the whole step)."""
    from llm_scratch.models.gpt2 import GPT2, GPT2Config
    from llm_scratch.tasks import make_tasks
    from llm_scratch.tokenizer import get_tokenizer
    from llm_scratch.training.lora import apply_lora
    from llm_scratch.training.losses import cross_entropy_loss
    from llm_scratch.training.sft import SFTDataset

    tokenizer = get_tokenizer("shakespeare")
    B, T = (8, 128) if quick else (16, 128)
    data = SFTDataset(tokenizer, make_tasks(100, "train"), context_length=T, pack=True)
    rows = [data[i] for i in range(B)]
    real_tokens = sum(len(x) for row in rows for x, _ in row)
    inputs, targets = data.collate(rows)
    inputs, targets = {k: v.to(device) for k, v in inputs.items()}, targets.to(device)
    d, layers, heads = (256, 4, 4) if quick else (512, 8, 8)
    cfg = GPT2Config(vocab_size=tokenizer.n_vocab, context_length=T, d_model=d, n_layers=layers, n_heads=heads)
    targets_lora = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    runs = {}
    for name in ("full", "LoRA r=8"):
        torch.manual_seed(0)
        model = GPT2(cfg).to(device).train()
        if name != "full":
            apply_lora(model, targets_lora, r=8, alpha=16)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)

        def step(model=model, optimizer=optimizer):
            cross_entropy_loss(model(**inputs), targets).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # creates AdamW's state
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            with _PeakTensorBytes() as tracker:
                step()
            peak = param_bytes + _state_bytes(optimizer) + tracker.peak
        runs[name] = {"step": step, "trainable": sum(p.numel() for p in trainable),
                      "state": _state_bytes(optimizer), "peak": peak}
    ms = timeit_interleaved({name: run["step"] for name, run in runs.items()}, device, 3 if quick else 5)
    total = sum(p.numel() for p in GPT2(cfg).parameters())
    print(f"\nSFT step, GPT-2 d={d} L={layers} ({total / 1e6:.1f}M parameters), {B} packed rows x {T} "
          f"({real_tokens} real tokens), AdamW fp32")
    print(f"{'':>10} {'trainable':>11} {'AdamW state MiB':>16} {'peak MiB':>9} {'ms/step':>8} {'tokens/s':>9}")
    for name, run in runs.items():
        print(f"{name:>10} {run['trainable']:>11,} {run['state'] / 2**20:>16.2f} {run['peak'] / 2**20:>9.1f} "
              f"{ms[name]:>8.0f} {real_tokens / ms[name] * 1e3:>9.0f}")
    print(f"LoRA / full: speed {ms['full'] / ms['LoRA r=8']:.2f}x, peak memory "
          f"{runs['LoRA r=8']['peak'] / runs['full']['peak']:.2f}x")


def bench_rollouts(device: torch.device, quick: bool) -> None:
    """GRPO rollouts with the committed SFT model: G completions of each prompt sampled in one left-padded batch
    with the KV cache (sample_completions) vs one completion at a time without a cache. Tokens/s counts the
    completion tokens up to each end of turn (both sample until the end of turn or max_new_tokens)."""
    from llm_scratch.generation import generate
    from llm_scratch.tasks import make_tasks
    from llm_scratch.tokenizer import get_tokenizer
    from llm_scratch.training.grpo import sample_completions
    from llm_scratch.training.pretrained import load_or_finetune
    from llm_scratch.training.sft import encode_prompt

    model, _ = load_or_finetune(device=device, progress=False)
    tokenizer = get_tokenizer("shakespeare")
    eos = tokenizer.encode("<|im_end|>", allowed_special={"<|im_end|>"})[0]
    n_prompts, G, new = (2, 4, 16) if quick else (8, 8, 32)
    prompts = [encode_prompt(tokenizer, ex) for ex in make_tasks(n_prompts, "test", families=["word_problem"])]
    generator = torch.Generator(device=device).manual_seed(0)
    sample_completions(model, prompts[:1], 2, 4, eos, temperature=1.0, generator=generator)  # warm-up
    generate(model, torch.tensor([prompts[0]], device=device), 4, temperature=1.0, use_cache=False,
             generator=generator)

    start = time.perf_counter()
    rollout = sample_completions(model, prompts, G, new, eos, temperature=1.0, generator=generator)
    if device.type != "cpu":
        torch.accelerator.synchronize()
    batched_s, batched_tokens = time.perf_counter() - start, int(rollout.completion_mask.sum())

    start, loop_tokens = time.perf_counter(), 0
    for p in prompts:
        for _ in range(G):
            out = generate(model, torch.tensor([p], device=device), new, temperature=1.0, use_cache=False,
                           eos_token_id=eos, generator=generator)[0, len(p):].tolist()
            loop_tokens += out.index(eos) + 1 if eos in out else len(out)
    if device.type != "cpu":
        torch.accelerator.synchronize()
    loop_s = time.perf_counter() - start
    print(f"\nGRPO rollouts, SFT model (1.3M parameters), {n_prompts} prompts x G={G}, up to {new} new tokens, "
          "temperature 1 (completion tokens/s)")
    for name, tokens, seconds in (("one batch, KV cache", batched_tokens, batched_s),
                                  ("one at a time, no cache", loop_tokens, loop_s)):
        print(f"{name:>28} {tokens / seconds:>10.0f}   ({tokens} tokens in {seconds:.2f} s)")
    print(f"speed-up: {(batched_tokens / batched_s) / (loop_tokens / loop_s):.1f}x")


def bench_speculative(device: torch.device, quick: bool) -> None:
    """Greedy decoding of the committed Shakespeare GPT (4 blocks): plain `generate` vs `speculative_generate` with a
    draft that is the same model cut to its first block (layer-skip self-drafting: no second model to train).
    Both emit exactly the same tokens (tests check it); the table gives tokens/s and the draft's acceptance."""
    import copy

    from llm_scratch.generation import generate, speculative_generate
    from llm_scratch.tokenizer import get_tokenizer
    from llm_scratch.training.pretrained import load_or_pretrain

    target, _ = load_or_pretrain(device=device, progress=False)
    draft = copy.deepcopy(target)
    draft.blocks = draft.blocks[:1]
    prompt = torch.tensor([get_tokenizer("shakespeare").encode("ROMEO:\nBut soft, what light")], device=device)
    new = 48 if quick else 96
    plain_ms = timeit(lambda: generate(target, prompt, new), device, 3 if quick else 5)
    print(f"\nSpeculative decoding, greedy, {new} new tokens; target: the 4-block Shakespeare GPT, draft: its first "
          "block only")
    print(f"{'':>22}{'tokens/s':>10}{'speed-up':>10}{'acceptance':>12}{'tokens/target call':>20}")
    print(f"{'plain generate':>22}{new / plain_ms * 1e3:>10.0f}{1.0:>10.2f}")
    for gamma in (1, 2, 4) if quick else (1, 2, 3, 4, 6):
        ms = timeit(lambda g=gamma: speculative_generate(target, draft, prompt, new, gamma=g), device,
                    3 if quick else 5)
        _, stats = speculative_generate(target, draft, prompt, new, gamma=gamma)
        print(f"{'speculative, γ=' + str(gamma):>22}{new / ms * 1e3:>10.0f}{plain_ms / ms:>10.2f}"
              f"{stats.acceptance_rate:>12.2f}{stats.tokens_per_target_call:>20.2f}")


@torch.no_grad()
def bench_vit(device: torch.device, quick: bool) -> None:
    """ViT forward (inference) images/s: ours vs transformers' ViTForImageClassification with the same weights
    (loaded through load_hf_checkpoint), float32, SDPA in both, interleaved timing."""
    import tempfile

    from transformers import ViTConfig as HFViTConfig
    from transformers import ViTForImageClassification

    from llm_scratch.models.hf import load_hf_checkpoint

    configs = {"ViT-Ti/16-ish, 64 px": (dict(image_size=64, patch_size=16, hidden_size=192, num_hidden_layers=12,
                                              num_attention_heads=3, intermediate_size=768), 32),
               "ViT-B/16, 224 px": (dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                                         num_attention_heads=12, intermediate_size=3072), 4 if quick else 8)}
    print("\nViT forward, float32 (images/s)")
    print(f"{'config':>22}{'batch':>7}{'ours':>10}{'transformers':>14}{'ratio':>8}")
    for name, (sizes, batch) in configs.items():
        if quick and name.startswith("ViT-B"):
            sizes = {**sizes, "num_hidden_layers": 2}
            name += " (2 layers)"
        torch.manual_seed(0)
        theirs = ViTForImageClassification(HFViTConfig(**sizes, num_labels=1000, attn_implementation="sdpa")).eval()
        with tempfile.TemporaryDirectory() as folder:
            theirs.save_pretrained(folder)
            ours = load_hf_checkpoint(folder, device=device)
        theirs = theirs.to(device)
        x = torch.randn(batch, 3, sizes["image_size"], sizes["image_size"], device=device)
        ms = timeit_interleaved({"ours": partial(ours, x), "theirs": partial(theirs, pixel_values=x)}, device,
                                3 if quick else 10)
        print(f"{name:>22}{batch:>7}{batch / ms['ours'] * 1e3:>10.1f}{batch / ms['theirs'] * 1e3:>14.1f}"
              f"{ms['theirs'] / ms['ours']:>8.2f}")


def bench_train_step(device: torch.device, quick: bool) -> None:
    """One GPT-2 training step (forward, backward, AdamW) at the 124M size: the fp32 eager baseline vs the fast
    recipe (bf16 autocast + torch.compile + fused AdamW; SDPA's fused kernel, flash attention on CUDA) — tokens/s
    and, on a GPU whose dense bf16 peak is known, MFU as nanoGPT computes it (6N + 12·L·H·Q·T FLOPs per token)."""
    from llm_scratch.data import TokenWindows
    from llm_scratch.models import GPT2, GPT2Config
    from llm_scratch.training import TrainConfig, Trainer
    from llm_scratch.training.efficiency import device_peak_flops, mfu, transformer_flops_per_token

    cuda = device.type == "cuda"
    if quick:
        cfg, seq, batch, steps = GPT2Config(d_model=256, n_layers=4, n_heads=4, context_length=256), 128, 4, 3
    else:
        cfg = GPT2Config.from_preset("gpt2")  # 124M
        seq, batch, steps = (1024, 16, 10) if cuda else (256, 2, 3)
    n = sum(p.numel() for p in GPT2(cfg).parameters()) - cfg.context_length * cfg.d_model  # without wpe
    flops = transformer_flops_per_token(n, cfg.n_layers, cfg.n_heads, cfg.d_model // cfg.n_heads, seq)
    peak = device_peak_flops(device)
    ids = torch.randint(0, cfg.vocab_size, (seq * batch * (steps + 3) + 1,), generator=torch.Generator().manual_seed(0))
    data = TokenWindows(ids.numpy(), seq)
    print(f"\nGPT-2 training step on {_device_name(device)}, {n / 1e6:.1f}M parameters (without wpe), batch {batch} x "
          f"{seq} tokens, {flops / 1e6:.0f} MFLOPs per token")
    print(f"{'':>38}{'tokens/s':>10}{'speed-up':>10}{'achieved TFLOP/s':>18}{'MFU':>8}{'first step s':>14}")
    recipes = {"fp32, eager, AdamW (foreach)": dict(),
               "bf16 + compile + fused AdamW": dict(precision="bf16", compile=True, fused_adamw=True)}
    base = None
    for name, options in recipes.items():
        torch.manual_seed(0)
        model = GPT2(cfg)
        trainer = Trainer(model, data, data, TrainConfig(max_steps=steps + 1, batch_size=batch, lr=1e-4,
                                                         progress=False, **options), device=device)
        start = time.perf_counter()
        trainer.train_step()  # compiles (when compile=True) and warms up
        if device.type != "cpu":
            torch.accelerator.synchronize()
        first = time.perf_counter() - start
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer.train_step()
            if device.type != "cpu":
                torch.accelerator.synchronize()
            times.append(time.perf_counter() - start)
        tokens_per_s = batch * seq / statistics.median(times)
        base = base or tokens_per_s
        util = f"{mfu(tokens_per_s, flops, peak[1]):.1%}" if peak else "n/a"
        print(f"{name:>38}{tokens_per_s:>10.0f}{tokens_per_s / base:>9.2f}x{tokens_per_s * flops / 1e12:>18.2f}"
              f"{util:>8}{first:>14.1f}")
    print("MFU: " + (f"against the {peak[0]}'s {peak[1] / 1e12:.0f} TFLOP/s dense bf16 peak" if peak else
                     "n/a on this device (no known peak); nanoGPT and llm.c report about 40 % on an A100/H100"))


BENCHMARKS = [bench_sdpa_paths, bench_kv_cache_decode, bench_bpe, bench_gpt2, bench_train_step, bench_decode,
              bench_mixers, bench_sft, bench_rollouts, bench_speculative, bench_vit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, for a smoke run")
    parser.add_argument("--only", nargs="*", help="run only these benchmarks (function names)")
    args = parser.parse_args()
    seed_everything(0)
    device = get_device()
    print(f"llm_scratch benchmarks on {device} | torch {torch.__version__} | {torch.get_num_threads()} threads "
          f"| {platform.machine()} {platform.processor() or ''}".rstrip())
    for bench in BENCHMARKS:
        if not args.only or bench.__name__ in args.only:
            bench(device, args.quick)


if __name__ == "__main__":
    main()
