"""Llama 3, Qwen3 and Gemma 3: published parameter counts, logits and greedy generation equal to Hugging Face's
LlamaForCausalLM / Qwen3ForCausalLM / Gemma3ForCausalLM (tiny random configs written with save_pretrained and
read back by our loader), KV-cache decoding (sliding-window layers included), padding, bad input.

Tolerance: float32 on both sides, the same arithmetic in different kernels; the logits differ by ~2-5e-7 here.
atol 1e-5 leaves room for other CPUs and still fails for any wrong weight mapping, norm variant, RoPE band or
window (each of those gives differences of 1e-2 or more).
"""

import math

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen3ForCausalLM
from transformers import Qwen3Config as HFQwen3Config
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_attention

from llm_scratch.attention import SlidingWindowKVCache, scaled_dot_product_attention
from llm_scratch.generation import generate
from llm_scratch.models import Gemma3, Gemma3Config, Llama3, Llama3Config, Qwen3, Qwen3Config
from llm_scratch.models.hf import load_hf_checkpoint

V = 103
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4)
# Llama 3 scaling with all three bands non-empty: head_dim 16, base 10^4 gives wavelengths 2π·10^(i/2)
# = 6.3, 20, 63 (< 256/4: kept), 199 (between: blended), 628 ... 19869 (> 256: interpolated)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=256)

CASES = {
    "llama-gqa-llama3-rope": (LlamaForCausalLM, LlamaConfig, dict(
        **SMALL, num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=2048,
        rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama-mqa-tied": (LlamaForCausalLM, LlamaConfig, dict(
        **SMALL, num_hidden_layers=3, num_key_value_heads=1, max_position_embeddings=128,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0), tie_word_embeddings=True)),
    "qwen3-head-dim-32": (Qwen3ForCausalLM, HFQwen3Config, dict(
        **SMALL, num_hidden_layers=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        tie_word_embeddings=True)),
    "qwen3-untied": (Qwen3ForCausalLM, HFQwen3Config, dict(
        **SMALL, num_hidden_layers=2, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=False)),
    # window 8 < 40 tokens; 7 layers with pattern 3 = L L G L L G L: two local/global periods and a tail
    "gemma3-two-periods": (Gemma3ForCausalLM, Gemma3TextConfig, dict(
        **SMALL, num_hidden_layers=7, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        sliding_window=8, sliding_window_pattern=3, query_pre_attn_scalar=24)),
    # Gemma 2's final-logit soft-capping and a linearly scaled RoPE on the global layers only
    "gemma3-softcap-scaled-rope": (Gemma3ForCausalLM, Gemma3TextConfig, dict(
        **SMALL, num_hidden_layers=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        sliding_window=5, sliding_window_pattern=2, query_pre_attn_scalar=16, final_logit_softcapping=5.0,
        rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e6),
                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
}
OUR_CLASS = {LlamaForCausalLM: Llama3, Qwen3ForCausalLM: Qwen3, Gemma3ForCausalLM: Gemma3}


def _hf_pair(tmp_path, case, seed=0):
    hf_class, config_class, kw = CASES[case]
    torch.manual_seed(seed)
    theirs = hf_class(config_class(**kw)).eval()
    with torch.no_grad():  # norm gains away from their init, so a swapped or missing norm would show
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    theirs.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(tmp_path)
    assert type(ours) is OUR_CLASS[hf_class]
    return ours, theirs


@pytest.mark.parametrize(("cls", "preset", "count"), [
    (Llama3, "llama-3.2-1b", 1_235_814_400), (Llama3, "llama-3.2-3b", 3_212_749_824),
    (Llama3, "llama-3-8b", 8_030_261_248), (Qwen3, "qwen3-0.6b", 596_049_920),
    (Gemma3, "gemma-3-270m", 268_098_176), (Gemma3, "gemma-3-1b", 999_885_952),
])
def test_presets_have_the_published_parameter_counts(cls, preset, count):
    with torch.device("meta"):
        model = cls(cls.config_class.from_preset(preset))
    assert sum(p.numel() for p in model.parameters()) == count  # a tied head counted once


def test_llama3_rope_case_has_all_three_bands():
    wavelengths = 2 * math.pi * 10000.0 ** (torch.arange(0, 16, 2) / 16)
    low, high = 256 / LLAMA3_ROPE["low_freq_factor"], 256 / LLAMA3_ROPE["high_freq_factor"]
    kept, interpolated = wavelengths < high, wavelengths > low
    assert kept.any() and interpolated.any() and (~kept & ~interpolated).any()


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_hugging_face(tmp_path, case):
    ours, theirs = _hf_pair(tmp_path, case)
    ids = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["llama-gqa-llama3-rope", "qwen3-head-dim-32", "gemma3-softcap-scaled-rope"])
def test_inputs_embeds_equal_hugging_face_and_the_token_path(tmp_path, case):
    ours, theirs = _hf_pair(tmp_path, case)
    embeds = torch.randn(2, 12, SMALL["hidden_size"])  # used as given: Gemma's sqrt(d) scale is embed_tokens' job
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs_embeds=embeds), theirs(inputs_embeds=embeds).logits, atol=1e-5, rtol=0)
        assert torch.equal(ours(inputs_embeds=ours.embed_tokens(ids)), ours(ids))
        # a cached prefill from embeddings, then token decoding, as a vision-language model generates
        caches = ours.init_caches(2, 13)
        ours(inputs_embeds=ours.embed_tokens(ids[:, :8]), caches=caches)
        torch.testing.assert_close(ours(ids[:, 8:], caches=caches), ours(ids)[:, 8:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["llama-gqa-llama3-rope", "qwen3-head-dim-32", "gemma3-two-periods"])
def test_greedy_generation_equals_hugging_face(tmp_path, case):
    ours, theirs = _hf_pair(tmp_path, case)
    prompt = torch.randint(0, V, (2, 6))
    new = 14  # 20 tokens in all: past Gemma's window of 8
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                               pad_token_id=0)
    torch.testing.assert_close(generate(ours, prompt, new), expected, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["llama-mqa-tied", "qwen3-head-dim-32", "gemma3-two-periods"])
def test_left_padding_does_not_change_real_tokens(tmp_path, case):
    ours, theirs = _hf_pair(tmp_path, case)
    long, short = torch.randint(1, V, (1, 12)), torch.randint(1, V, (1, 7))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    mask = batch != 0
    mask[0] = True
    with torch.no_grad():
        logits = ours(batch, padding_mask=mask)
        torch.testing.assert_close(logits[0], ours(long)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1, 5:], ours(short)[0], atol=1e-5, rtol=0)
    out = generate(ours, batch, 10, padding_mask=mask)
    expected = theirs.generate(batch, attention_mask=mask.long(), max_new_tokens=10, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("chunk", [1, 5, 40])
def test_cached_decoding_equals_full_forward_sliding_layers_included(chunk):
    torch.manual_seed(0)
    model = Gemma3(Gemma3Config(vocab_size=V, context_length=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2,
                                head_dim=8, ffn_hidden=48, sliding_window=6, sliding_window_pattern=2)).eval()
    ids = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        full = model(ids)
        caches = model.init_caches(2, 40)
        pieces = [model(ids[:, i:i + chunk], caches=caches) for i in range(0, 40, chunk)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)
    local = [c for c in caches if isinstance(c, SlidingWindowKVCache)]
    assert len(local) == 2 and all(c.k.shape[2] == 5 and c.length == 40 for c in local)  # window - 1 kept


def test_causality():
    torch.manual_seed(0)
    model = Qwen3(Qwen3Config(vocab_size=V, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              head_dim=8, ffn_hidden=48)).eval()
    ids = torch.randint(0, V, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % V
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :12], model(changed)[:, :12], atol=0, rtol=0)
        assert not torch.allclose(model(ids)[:, 12:], model(changed)[:, 12:])


def test_sliding_window_cache_memory_is_the_window():
    cfg = Gemma3Config.from_preset("gemma-3-1b")
    with torch.device("meta"):
        model = Gemma3(cfg)
        caches = model.init_caches(1, 32768, dtype=torch.bfloat16)
    local = sum(c.nbytes for c, t in zip(caches, cfg.layer_types, strict=True) if t == "sliding_attention")
    full = sum(c.nbytes for c, t in zip(caches, cfg.layer_types, strict=True) if t == "full_attention")
    per_token = 2 * cfg.n_kv_heads * cfg.head_dim * 2  # k and v, bf16
    assert cfg.layer_types.count("full_attention") == 4
    assert local == 22 * (cfg.sliding_window - 1) * per_token and full == 4 * 32768 * per_token


def test_softcapped_attention_equals_gemma2_reference():
    # Hugging Face's Gemma 3 stores attn_logit_softcapping but never applies it, so the reference for our
    # soft-capped attention is Gemma 2's attention function, called directly
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8) * 3, torch.randn(2, 2, 9, 8) * 3, torch.randn(2, 2, 9, 8)
    module = torch.nn.Module()
    module.head_dim, module.num_key_value_groups, module.training = 8, 2, False
    causal = torch.full((9, 9), float("-inf")).triu(1)
    expected, _ = gemma2_attention(module, q, k, v, causal, scaling=0.3, softcap=2.0)
    ours = scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, softcap=2.0, enable_gqa=True)
    torch.testing.assert_close(ours.transpose(1, 2), expected, atol=1e-6, rtol=0)
    plain = scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    assert (plain - ours).abs().max() > 0.1  # the cap matters at these score sizes


def test_bad_input_gets_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"n_kv_heads \(3\) must divide n_heads \(4\)"):
        Llama3Config(d_model=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match=r"n_heads \(3\) must divide d_model \(64\)"):
        Llama3Config(d_model=64, n_heads=3, n_kv_heads=1)
    for window in (0, -4):
        with pytest.raises(ValueError, match="sliding_window must be a positive int"):
            Gemma3Config(sliding_window=window)
    with pytest.raises(ValueError, match="layer_types must list one of"):
        Gemma3Config(n_layers=3, layer_types=["sliding_attention", "global"])
    with pytest.raises(ValueError, match="unknown Qwen3Config preset 'qwen3-8b'; known: qwen3-0.6b"):
        Qwen3Config.from_preset("qwen3-8b")
    with pytest.raises(TypeError, match="Qwen3 needs a Qwen3Config, got Llama3Config"):
        Qwen3(Llama3Config(d_model=64, n_heads=4, n_kv_heads=2, n_layers=1, vocab_size=V, ffn_hidden=8))
    model = Llama3(Llama3Config(vocab_size=V, context_length=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                ffn_hidden=48, rope_scaling=None))
    with pytest.raises(ValueError, match="sequence of 17 tokens exceeds the context length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    _hf_pair(tmp_path, "qwen3-head-dim-32")
    with pytest.raises(ValueError, match="holds a 'qwen3' checkpoint, which loads as Qwen3, not Llama3"):
        load_hf_checkpoint(tmp_path, model_class=Llama3)
    cache = SlidingWindowKVCache(1, 10, 1, 4, window=3)
    cache.update(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="cannot roll back from 4 to 2 tokens"):
        cache.truncate(2)


def test_attention_scores_are_what_the_forward_pass_softmaxes():
    torch.manual_seed(0)
    model = Gemma3(Gemma3Config(vocab_size=V, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                head_dim=8, ffn_hidden=48, sliding_window=4, sliding_window_pattern=2)).eval()
    for attn in (model.blocks[0].attn, model.blocks[1].attn):  # local (window 4), then global
        x = torch.randn(2, 10, 32)
        scores = attn.attention_scores(x)  # (B, H, T, T)
        i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
        visible = (j <= i) & ((j > i - attn.window) if attn.window else True)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        v = attn.project(x)[2].repeat_interleave(2, dim=1)  # (B, H, T, D)
        out = attn.o_proj((weights @ v).transpose(1, 2).reshape(2, 10, 32))
        with torch.no_grad():
            torch.testing.assert_close(out, attn(x), atol=1e-5, rtol=0)


def test_last_only_logits_are_the_last_row_of_the_full_logits():
    from llm_scratch.models import GPT2, GPT2Config

    torch.manual_seed(0)
    models = [GPT2(GPT2Config(vocab_size=V, context_length=32, d_model=32, n_layers=2, n_heads=4)),
              Gemma3(Gemma3Config(vocab_size=V, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1,
                                  head_dim=8, ffn_hidden=48, sliding_window=4, sliding_window_pattern=2,
                                  final_logit_softcap=5.0))]
    ids = torch.randint(0, V, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :3] = False
    for model in models:
        with torch.no_grad():
            last = model.eval()(ids, padding_mask=mask, last_only=True)
            assert last.shape == (2, 1, V)
            torch.testing.assert_close(last, model(ids, padding_mask=mask)[:, -1:], atol=1e-6, rtol=0)
