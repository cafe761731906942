"""GPT-2: published parameter counts, logits and greedy generation equal to Hugging Face's GPT2LMHeadModel
(tiny random configs saved with save_pretrained and read back by our loader), cache and padding properties.

Tolerance: our blocks and Hugging Face's do the same float32 arithmetic in different kernels (fused vs
explicit attention, our LayerNorm vs torch's); the logits differ by ~2e-7 here. atol 1e-5 leaves room
for other CPUs and still fails for any wrong weight mapping (those give O(0.1) differences).
"""

import pytest
import torch
from transformers import GPT2Config as HFConfig
from transformers import GPT2LMHeadModel

from llm_scratch.generation import generate, sample_next_token
from llm_scratch.models import GPT2, GPT2Config
from llm_scratch.models.hf import load_hf_checkpoint

TINY_CONFIGS = [
    dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=101),
    dict(n_embd=48, n_layer=3, n_head=3, n_positions=40, vocab_size=77),
    dict(n_embd=64, n_layer=1, n_head=8, n_positions=128, vocab_size=256),
]


def _hf_pair(tmp_path, seed=0, **kw):
    torch.manual_seed(seed)
    config = HFConfig(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    theirs = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # LayerNorm gains and biases away from 1 and 0, so a mix-up would show
        for name, p in theirs.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path)
    return load_hf_checkpoint(tmp_path), theirs


@pytest.mark.parametrize(("name", "count"), [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                             ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_presets_have_the_published_parameter_counts(name, count):
    with torch.device("meta"):
        model = GPT2(GPT2Config.from_preset(name))
    assert sum(p.numel() for p in model.parameters()) == count  # tied head counted once


@pytest.mark.parametrize("kw", TINY_CONFIGS)
def test_logits_equal_hugging_face(tmp_path, kw):
    ours, theirs = _hf_pair(tmp_path, **kw)
    ids = torch.randint(0, kw["vocab_size"], (3, kw["n_positions"]))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=0)



def test_inputs_embeds_equal_hugging_face_and_the_token_path(tmp_path):
    kw = TINY_CONFIGS[0]
    ours, theirs = _hf_pair(tmp_path, **kw)
    embeds = torch.randn(2, 9, kw["n_embd"])  # vectors no token has: positions are still added to them
    mask = torch.tensor([[False, False] + [True] * 7, [True] * 9])
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs_embeds=embeds), theirs(inputs_embeds=embeds).logits, atol=1e-5, rtol=0)
        ids = torch.randint(0, kw["vocab_size"], (2, 9))
        assert torch.equal(ours(inputs_embeds=ours.embed_tokens(ids), padding_mask=mask), ours(ids, padding_mask=mask))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        ours(ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        ours()
    with pytest.raises(ValueError, match=rf"inputs_embeds must have shape \(B, T, {kw['n_embd']}\)"):
        ours(inputs_embeds=torch.randn(2, 9, kw["n_embd"] - 1))

def test_sharded_checkpoint_and_bad_checkpoints(tmp_path):
    torch.manual_seed(0)
    theirs = GPT2LMHeadModel(HFConfig(**TINY_CONFIGS[0])).eval()
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = load_hf_checkpoint(tmp_path / "sharded")
    ids = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=0)

    from safetensors.torch import load_file, save_file

    theirs.save_pretrained(tmp_path / "broken")
    state = load_file(tmp_path / "broken" / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.0.extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "broken" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys \(1\): blocks.1.mlp.up_proj.bias") as err:
        load_hf_checkpoint(tmp_path / "broken")
    assert "unexpected keys (1): blocks.0.extra.weight" in str(err.value)
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="supported: gpt2"):
        load_hf_checkpoint(tmp_path / "broken")


def test_greedy_generation_equals_hugging_face(tmp_path):
    ours, theirs = _hf_pair(tmp_path, **TINY_CONFIGS[0])
    prompt = torch.randint(0, 101, (2, 7))
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                               pad_token_id=0)
    for use_cache in (True, False):
        assert torch.equal(generate(ours, prompt, 20, use_cache=use_cache), expected)


def test_left_padding_does_not_change_real_tokens(tmp_path):
    ours, _ = _hf_pair(tmp_path, **TINY_CONFIGS[0])
    short, long = torch.randint(1, 101, (1, 4)), torch.randint(1, 101, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[0, :5] = False
    together = generate(ours, batch, 12, padding_mask=mask)
    assert torch.equal(together[0, 5:], generate(ours, short, 12)[0])
    assert torch.equal(together[1], generate(ours, long, 12)[0])
    with torch.no_grad():  # logits of the real tokens too, not just the argmax
        torch.testing.assert_close(ours(batch, padding_mask=mask)[0, 5:], ours(short)[0], atol=1e-5, rtol=0)


def test_cached_decoding_equals_full_forward_and_causality():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=50, context_length=32, d_model=32, n_layers=2, n_heads=4)).eval()
    ids = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = model(ids)
        caches = model.init_caches(2, 20)
        steps = [model(ids[:, :8], caches=caches)] + [model(ids[:, t:t + 1], caches=caches) for t in range(8, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
        changed = ids.clone()
        changed[:, 12:] = (changed[:, 12:] + 1) % 50
        assert torch.equal(model(changed)[:, :12], full[:, :12])
        assert not torch.allclose(model(changed)[:, 12:], full[:, 12:])


def test_context_limit_and_bad_presets():
    model = GPT2(GPT2Config(vocab_size=10, context_length=8, d_model=16, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="exceeds the context length 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="known: gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        GPT2Config.from_preset("gpt3")
    with pytest.raises(ValueError, match="exceeds the context length"):
        model.init_caches(1, 9)


def test_sampling_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0, -2.0]]).repeat(2000, 1)
    assert torch.equal(sample_next_token(logits, 0.0), torch.zeros(2000, dtype=torch.long))
    assert torch.equal(sample_next_token(logits, 1.0, top_k=1, generator=gen), torch.zeros(2000, dtype=torch.long))
    top2 = sample_next_token(logits, 1.0, top_k=2, generator=gen)
    assert set(top2.tolist()) == {0, 1}
    # probabilities 0.59, 0.36, ...: top_p 0.5 keeps only the first; 0.9 keeps two (0.59 < 0.9 <= 0.95)
    assert set(sample_next_token(logits, 1.0, top_p=0.5, generator=gen).tolist()) == {0}
    assert set(sample_next_token(logits, 1.0, top_p=0.9, generator=gen).tolist()) == {0, 1}
    full = sample_next_token(logits, 1.0, generator=gen)
    share = (full == 0).float().mean().item()
    assert abs(share - logits[0].softmax(-1)[0].item()) < 0.05  # ~0.59, binomial sd ~0.011
    for bad in (dict(temperature=-1.0), dict(temperature=1.0, top_k=0), dict(temperature=1.0, top_p=0.0)):
        with pytest.raises(ValueError):
            sample_next_token(logits, **bad)
