"""StaticKVCache and the compiled decode step (the gpt-fast recipe, PyTorch blog 2023).

- the cache's fixed shapes, key mask and write position, unit by unit;
- decoding with it gives the logits of the dynamic KVCache and of a full forward (GPT-2 and Llama 3 tiny random
  models, left padding, a prompt split in two chunks), float32, atol 1e-5 (the same arithmetic over a longer,
  masked key axis: differences are ~1e-7);
- generate_static's greedy tokens equal generate's, eager and compiled (aot_eager), padded or not, with eos;
- the compiled step is compiled exactly once over many decode steps and later generate calls;
- bad input: too many tokens for max_len, a wrong batch size, unsupported layers.

Compilation uses the aot_eager backend (tracing and functionalization, no code generation): seconds, not minutes.
"""

import pytest
import torch

from llm_scratch.attention import StaticKVCache
from llm_scratch.generation import StaticDecoder, generate, generate_static, init_static_caches
from llm_scratch.models import GPT2, Gemma3, Gemma3Config, GPT2Config, Llama3, Llama3Config, Qwen3, Qwen3Config

V = 97


def tiny(name: str):
    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2(GPT2Config(vocab_size=V, context_length=64, d_model=32, n_layers=2, n_heads=4)).eval()
    if name == "llama3":
        return Llama3(Llama3Config(vocab_size=V, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   ffn_hidden=48, rope_base=10000.0)).eval()
    return Qwen3(Qwen3Config(vocab_size=V, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             head_dim=8, ffn_hidden=48)).eval()


def left_padded(B: int = 3, T: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :3] = False  # row 0: 4 real tokens, row 1: 6, row 2: all 7
    mask[1, :1] = False
    return ids, mask


class CountingBackend:
    """A torch.compile backend that counts how often dynamo hands it a graph, then runs aot_eager."""

    def __init__(self):
        self.compilations = 0

    def __call__(self, gm, example_inputs):
        self.compilations += 1
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)


# --- the cache on its own ----------------------------------------------------------------------------------------

def test_update_keeps_shapes_fixed_and_masks_what_is_not_written():
    B, K, D, max_len = 2, 3, 4, 6
    cache = StaticKVCache(B, max_len, K, D)
    k, v = torch.randn(B, K, 3, D), torch.randn(B, K, 3, D)
    pad = torch.tensor([[False, True, True], [True, True, True]])
    keys, values, mask = cache.update(k, v, pad)
    # a prompt: the old buffer (nothing valid yet) then the 3 new tokens, so lower-right causal alignment holds
    assert keys.shape == (B, K, max_len + 3, D) and values.shape == keys.shape
    assert torch.equal(mask, torch.cat([torch.zeros(B, max_len, dtype=torch.bool), pad], dim=1))
    assert torch.equal(keys[:, :, max_len:], k)
    assert torch.equal(cache.k[:, :, :3], k) and torch.equal(cache.v[:, :, :3], v)
    assert cache.length == 3 and torch.equal(cache.real_lengths(), torch.tensor([2, 3]))
    k1, v1 = torch.randn(B, K, 1, D), torch.randn(B, K, 1, D)
    keys, values, mask = cache.update(k1, v1)
    # a decode step: the whole buffers, the same objects each step, the new key at slot 3
    assert keys is cache.k and values is cache.v and keys.shape == (B, K, max_len, D)
    assert torch.equal(cache.k[:, :, 3:4], k1)
    assert mask.tolist() == [[False, True, True, True, False, False], [True, True, True, True, False, False]]
    cache.truncate(2)
    assert cache.length == 2 and not cache.valid[:, 2:].any()
    cache.reset()
    assert cache.length == 0 and not cache.valid.any()


def test_update_rejects_overflow_and_bad_shapes():
    cache = StaticKVCache(1, 4, 2, 8)
    cache.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="max_len=4"):
        cache.update(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
    with pytest.raises(ValueError, match="batch_size=1"):
        cache.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
    with pytest.raises(ValueError, match="padding_mask"):
        cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="K=2"):
        cache.update(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))
    with pytest.raises(ValueError, match="length must be"):
        cache.truncate(5)
    with pytest.raises(ValueError, match="max_len"):
        StaticKVCache(1, 0, 2, 8)


# --- logits: static cache = dynamic cache = full forward ---------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "llama3"])
def test_static_cache_logits_equal_dynamic_cache_and_full_forward(name):
    model = tiny(name)
    ids, mask = left_padded()
    B, T = ids.shape
    new = torch.randint(0, V, (B, 6), generator=torch.Generator().manual_seed(2))  # teacher-forced tokens
    full_ids = torch.cat([ids, new], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(new, dtype=torch.bool)], dim=1)
    decoder = StaticDecoder(model, B, T + new.shape[1], compile=False)
    dynamic = model.init_caches(B, T + new.shape[1])
    with torch.no_grad():
        full = model(full_ids, padding_mask=full_mask)  # (B, T + 6, V)
        static_logits = [decoder.prefill(ids, mask)]
        dynamic_logits = [model(ids, padding_mask=mask, caches=dynamic)[:, -1]]
        positions = decoder.caches[0].real_lengths()[:, None]  # (B, 1)
        for i in range(new.shape[1] - 1):
            static_logits.append(decoder.step(new[:, i:i + 1], positions + i))
            dynamic_logits.append(model(new[:, i:i + 1], caches=dynamic)[:, -1])
    static_logits, dynamic_logits = torch.stack(static_logits, 1), torch.stack(dynamic_logits, 1)  # (B, 6, V)
    real = mask[:, -1]  # every prompt ends with a real token; compare the decoded positions of every row
    assert real.all()
    torch.testing.assert_close(static_logits, dynamic_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(static_logits, full[:, T - 1:-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama3"])
def test_prompt_in_two_chunks_equals_full_forward(name):
    """A second multi-token update starts at a nonzero slot: the returned (old buffer, new tokens) keys must keep
    each new query off the later new keys and on every earlier real one."""
    model = tiny(name)
    ids, mask = left_padded()
    caches = init_static_caches(model, ids.shape[0], 12)
    with torch.no_grad():
        full = model(ids, padding_mask=mask)
        first = model(ids[:, :4], padding_mask=mask[:, :4], caches=caches)
        second = model(ids[:, 4:], padding_mask=mask[:, 4:], caches=caches)
    chunked = torch.cat([first, second], dim=1)
    torch.testing.assert_close(chunked[mask], full[mask], atol=1e-5, rtol=0)  # padding positions are arbitrary
    assert isinstance(caches[0], StaticKVCache) and caches[0].length == 7


# --- generate_static ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen3"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_generate_static_greedy_equals_generate(name, padded, compiled):
    model = tiny(name)
    ids, mask = left_padded()
    mask = mask if padded else None
    expected = generate(model, ids, 12, padding_mask=mask)
    torch._dynamo.reset()
    got = generate_static(model, ids, 12, padding_mask=mask, compile=compiled, backend="aot_eager")
    assert torch.equal(got, expected)


def test_generate_static_stops_at_eos_like_generate():
    model = tiny("gpt2")
    ids, mask = left_padded()
    free = generate(model, ids, 10, padding_mask=mask)
    eos = int(free[1, ids.shape[1] + 2])  # a token row 1 produces at its third step
    expected = generate(model, ids, 10, padding_mask=mask, eos_token_id=eos)
    got = generate_static(model, ids, 10, padding_mask=mask, eos_token_id=eos, compile=False)
    assert torch.equal(got, expected)


def test_sampling_with_a_seeded_generator_equals_generate():
    model = tiny("llama3")
    ids, mask = left_padded()
    kwargs = dict(temperature=0.9, top_k=20, top_p=0.9, padding_mask=mask)
    expected = generate(model, ids, 8, generator=torch.Generator().manual_seed(3), **kwargs)
    got = generate_static(model, ids, 8, generator=torch.Generator().manual_seed(3), compile=False, **kwargs)
    assert torch.equal(got, expected)


# --- one compilation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "llama3"])
def test_compiled_step_is_compiled_once(name):
    model = tiny(name)
    ids, mask = left_padded()
    torch._dynamo.reset()  # forget steps compiled by other tests (dynamo may reuse a graph whose guards still hold)
    backend = CountingBackend()
    decoder = StaticDecoder(model, ids.shape[0], ids.shape[1] + 11, backend=backend)
    out = decoder.generate(ids, 11, padding_mask=mask)  # prefill (eager) + 10 compiled steps
    assert backend.compilations == 1
    assert torch.equal(out, generate(model, ids, 11, padding_mask=mask))
    other = torch.randint(0, V, ids.shape, generator=torch.Generator().manual_seed(5))
    out = decoder.generate(other, 8)  # a new prompt, no padding this time: the same step
    assert backend.compilations == 1
    assert torch.equal(out, generate(model, other, 8))


def test_a_python_int_position_would_recompile():
    """The counter does see recompilations: a step that reads a changing Python int is compiled again."""
    torch._dynamo.reset()
    backend = CountingBackend()
    step = torch.compile(lambda x, n: x + n, backend=backend, fullgraph=True, dynamic=False)
    for n in range(3):
        step(torch.zeros(2), n)
    assert backend.compilations == 3


# --- bad input ---------------------------------------------------------------------------------------------------

def test_bad_input_errors():
    model = tiny("gpt2")
    ids, _ = left_padded()
    decoder = StaticDecoder(model, ids.shape[0], 10, compile=False)
    with pytest.raises(ValueError, match="max_len=10"):
        decoder.generate(ids, 4)  # 7 + 4 > 10
    with pytest.raises(ValueError, match="batch_size=3"):
        decoder.generate(ids[:2], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_static(model, ids, -1)
    right_padded = torch.ones_like(ids, dtype=torch.bool)
    right_padded[0, -1] = False
    with pytest.raises(ValueError, match="left padding"):
        generate_static(model, ids, 2, padding_mask=right_padded)
    with pytest.raises(ValueError, match="context length 64"):
        init_static_caches(model, 1, 65)
    gemma = Gemma3(Gemma3Config(vocab_size=V, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                head_dim=8, ffn_hidden=48, sliding_window=4, sliding_window_pattern=2))
    with pytest.raises(ValueError, match="sliding-window"):
        init_static_caches(gemma, 1, 16)



def test_rope_inside_torch_compile_equals_eager():
    """Inside torch.compile RoPE computes its angles directly instead of sizing a table from the positions' values
    (a sync): the same numbers, and no graph break under fullgraph."""
    model = tiny("llama3")
    ids, mask = left_padded()
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(ids, padding_mask=mask)
        torch.testing.assert_close(compiled[mask], model(ids, padding_mask=mask)[mask], atol=1e-5, rtol=0)
