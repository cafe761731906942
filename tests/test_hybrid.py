"""The hybrid decoder: cached decoding (KV caches in softmax layers, fixed states in linear ones) equals the full
forward pass, generation runs through it, causality, decode memory grows only in the softmax layers."""

import pytest
import torch

from llm_scratch.attention import KVCache
from llm_scratch.attention.linear import GatedLinearAttention, LightningAttention, LinearAttentionState
from llm_scratch.generation import generate
from llm_scratch.models.hybrid import HybridConfig, HybridLM, Mamba2Mixer
from llm_scratch.ssm.mamba2 import Mamba2State

V = 101


def _model(pattern="LGMA", **kw):
    torch.manual_seed(0)
    cfg = HybridConfig(vocab_size=V, context_length=64, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2,
                       ffn_hidden=64, pattern=pattern, chunk_size=8, **kw)
    return HybridLM(cfg).eval()


def test_layers_follow_the_pattern():
    model = _model("LLLA")
    kinds = [type(b.attn).__name__ for b in model.blocks]
    assert kinds == ["LightningAttention"] * 3 + ["GroupedQueryAttention"] + ["LightningAttention"] * 2
    assert isinstance(_model("G").blocks[0].attn, GatedLinearAttention)
    assert isinstance(_model("M").blocks[0].attn, Mamba2Mixer)


@pytest.mark.parametrize("chunk", [1, 7, 30])
def test_cached_decoding_equals_full_forward(chunk):
    model = _model()
    ids = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        full = model(ids)
        caches = model.init_caches(2, 30)
        pieces = [model(ids[:, i:i + chunk], caches=caches) for i in range(0, 30, chunk)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)
    assert [type(c) for c in caches[:4]] == [LinearAttentionState, LinearAttentionState, Mamba2State, KVCache]


def test_generation_with_and_without_caches_and_causality():
    model = _model()
    prompt = torch.randint(0, V, (2, 5))
    torch.testing.assert_close(generate(model, prompt, 12), generate(model, prompt, 12, use_cache=False))
    ids = torch.randint(0, V, (1, 20))
    changed = ids.clone()
    changed[0, 15:] = (changed[0, 15:] + 1) % V
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :15], model(changed)[:, :15], atol=0, rtol=0)


def test_decode_memory_grows_only_in_softmax_layers():
    cfg = HybridConfig(n_layers=8, pattern="LMLA", context_length=32768)
    with torch.device("meta"):
        model = HybridLM(cfg)
    short = model.init_caches(1, 1024)
    long = model.init_caches(1, 32768)
    for s, lg, kind in zip(short, long, cfg.layer_types, strict=True):
        if kind == "A":
            assert lg.nbytes == 32 * s.nbytes  # the KV cache scales with the length
        else:
            assert lg.nbytes == s.nbytes  # the state does not
    assert isinstance(model.blocks[0].attn, LightningAttention)


def test_bad_pattern():
    with pytest.raises(ValueError, match="pattern must be a non-empty string of A, L, G"):
        HybridConfig(pattern="LXA")
    model = _model()
    with pytest.raises(ValueError, match="does not support padding"):
        model(torch.ones(1, 4, dtype=torch.long), padding_mask=torch.tensor([[False, True, True, True]]))
