"""MultiHeadAttention and GroupedQueryAttention against references and properties.

References: torch.nn.MultiheadAttention (weights copied), Hugging Face LlamaAttention (GQA + RoPE,
random weights, copied across), and GQA == MHA whose k/v weights are the GQA ones repeated per
group. Properties: causality, cached decoding == full forward, padding invariance.
Tolerance: float32 throughout, atol 1e-5 (sums of a few hundred unit-scale products).
"""

import pytest
import torch
from torch import nn

from llm_scratch.attention import GroupedQueryAttention, KVCache, MultiHeadAttention
from llm_scratch.attention.mha import load_from_torch
from llm_scratch.position import RotaryEmbedding

ATOL = 1e-5
C, H = 32, 4


def make(kind, **kw):
    """The attention classes under test, by name."""
    if kind == "mha":
        return MultiHeadAttention(C, H, **kw)
    if kind == "gqa":
        return GroupedQueryAttention(C, H, n_kv_heads=2, **kw)
    if kind == "mqa":
        return GroupedQueryAttention(C, H, n_kv_heads=1, **kw)
    if kind == "gqa_rope":
        return GroupedQueryAttention(C, H, n_kv_heads=2, rope=RotaryEmbedding(C // H), **kw)
    if kind == "gqa_window":
        return GroupedQueryAttention(C, H, n_kv_heads=2, window=3, rope=RotaryEmbedding(C // H), **kw)
    raise ValueError(kind)


KINDS = ["mha", "gqa", "mqa", "gqa_rope", "gqa_window"]


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("naive", [True, False])
def test_mha_matches_torch_multihead_attention(causal, naive):
    theirs = nn.MultiheadAttention(C, H, batch_first=True).eval()
    ours = load_from_torch(MultiHeadAttention(C, H, causal=causal), theirs).eval()
    x = torch.randn(3, 7, C)
    padding = torch.ones(3, 7, dtype=torch.bool)
    padding[1, 5:] = False  # right padding
    # torch's bool masks mean the opposite of ours: True = *not* allowed to attend
    torch_causal = torch.ones(7, 7, dtype=torch.bool).triu(1) if causal else None
    want, _ = theirs(x, x, x, key_padding_mask=~padding, attn_mask=torch_causal, need_weights=False)
    got = ours(x, padding_mask=padding, naive=naive)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_equals_mha_with_repeated_kv_weights(n_kv_heads):
    """GQA's defining identity: K kv heads == H kv heads where each group's weights are shared."""
    gqa = GroupedQueryAttention(C, H, n_kv_heads=n_kv_heads, bias=True)
    mha = MultiHeadAttention(C, H, bias=True)
    D, group = C // H, H // n_kv_heads
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.o_proj.load_state_dict(gqa.o_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(gqa, name), getattr(mha, name)
            dst.weight.copy_(src.weight.view(n_kv_heads, D, C).repeat_interleave(group, 0).reshape(C, C))
            dst.bias.copy_(src.bias.view(n_kv_heads, D).repeat_interleave(group, 0).reshape(C))
    x = torch.randn(2, 6, C)
    torch.testing.assert_close(gqa(x), mha(x), atol=ATOL, rtol=0)


def test_gqa_with_rope_matches_hugging_face_llama_attention():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=64, rope_theta=500000.0, attention_bias=False)
    cfg._attn_implementation = "eager"
    theirs = LlamaAttention(cfg, layer_idx=0).eval()
    ours = GroupedQueryAttention(64, 8, n_kv_heads=2, head_dim=8, rope=RotaryEmbedding(8, base=500000.0)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # same names: q_proj k_proj v_proj o_proj

    B, T = 2, 9
    x = torch.randn(B, T, 64)
    positions = torch.arange(T)[None].expand(B, T)
    cos_sin = LlamaRotaryEmbedding(cfg)(x, positions)
    additive_causal = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(B, 1, T, T)
    want, _ = theirs(x, position_embeddings=cos_sin, attention_mask=additive_causal)
    for naive in (True, False):
        torch.testing.assert_close(ours(x, naive=naive), want, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("kind", KINDS)
def test_causality(kind):
    attn = make(kind).eval()
    x = torch.randn(2, 10, C)
    y = x.clone()
    y[:, 6:] = torch.randn(2, 4, C)  # change the future only
    torch.testing.assert_close(attn(x)[:, :6], attn(y)[:, :6], atol=ATOL, rtol=0)
    assert not torch.allclose(attn(x)[:, 6:], attn(y)[:, 6:], atol=1e-3)  # and the future did change


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunks", [(10,), (4, 1, 1, 1, 1, 1, 1), (3, 3, 3, 1), (1,) * 10])
def test_cached_decoding_equals_full_forward(kind, chunks):
    attn = make(kind).eval()
    x = torch.randn(2, 10, C)
    full = attn(x)
    cache = attn.init_cache(batch_size=2, max_len=16)
    outs, start = [], 0
    for n in chunks:
        outs.append(attn(x[:, start : start + n], cache=cache))
        start += n
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_real_tokens(kind, side):
    """Real tokens' outputs in a padded batch equal those of each sequence run alone.

    Left padding shifts RoPE positions by the pad count; RoPE depends only on relative position,
    so scores among real tokens are unchanged.
    """
    attn = make(kind).eval()
    lengths = [7, 4, 2]
    T = max(lengths)
    seqs = [torch.randn(1, n, C) for n in lengths]
    x = torch.zeros(3, T, C)
    padding = torch.zeros(3, T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        where = slice(0, lengths[b]) if side == "right" else slice(T - lengths[b], T)
        x[b, where], padding[b, where] = s[0], True
    out = attn(x, padding_mask=padding)
    for b, s in enumerate(seqs):
        torch.testing.assert_close(out[b][padding[b]], attn(s)[0], atol=ATOL, rtol=0)
    assert not out.isnan().any()


@pytest.mark.parametrize("kind", ["mha", "gqa_rope"])
def test_cached_decoding_with_left_padding(kind):
    """The cache remembers which stored tokens were padding, so decode steps keep ignoring them."""
    attn = make(kind).eval()
    x = torch.randn(2, 8, C)
    padding = torch.ones(2, 8, dtype=torch.bool)
    padding[1, :3] = False
    full = attn(x, padding_mask=padding)
    cache = attn.init_cache(2, 8)
    prefill = attn(x[:, :5], padding_mask=padding[:, :5], cache=cache)
    steps = [attn(x[:, t : t + 1], cache=cache) for t in range(5, 8)]  # new tokens are real: no mask
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), full, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- the cache itself


@pytest.mark.parametrize("K", [1, 2, 8])
def test_cache_bytes_per_token(K):
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache(batch_size=3, max_len=5, n_kv_heads=K, head_dim=16, dtype=dtype)
        assert cache.bytes_per_token() == 2 * K * 16 * dtype.itemsize
    attn = GroupedQueryAttention(64, 8, n_kv_heads=K)
    assert attn.init_cache(1, 4).bytes_per_token() == 2 * K * 8 * 4


def test_cache_overflow_and_mismatch_are_errors():
    cache = KVCache(batch_size=1, max_len=4, n_kv_heads=2, head_dim=8)
    k = torch.randn(1, 2, 3, 8)
    cache.update(k, k)
    with pytest.raises(ValueError, match="max_len"):
        cache.update(k, k)
    with pytest.raises(ValueError, match="batch_size"):
        KVCache(1, 8, 2, 8).update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
    with pytest.raises(ValueError, match="stores"):
        KVCache(1, 8, 2, 8).update(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))
    with pytest.raises(ValueError, match="stores"):  # a one-head v is not broadcast to both heads
        KVCache(1, 8, 2, 8).update(k, torch.randn(1, 1, 3, 8))
    with pytest.raises(ValueError, match="dtype"):
        KVCache(1, 8, 2, 8).update(k.double(), k.double())
    with pytest.raises(ValueError, match="dtype"):
        KVCache(1, 8, 2, 8).update(k, k.double())
    with pytest.raises(ValueError, match="padding_mask"):
        KVCache(1, 8, 2, 8).update(k, k, padding_mask=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="length"):
        cache.truncate(4)
    cache.reset()
    assert cache.length == 0


def test_truncate_rolls_back_and_decoding_resumes():
    attn = make("gqa_rope").eval()
    x, other = torch.randn(1, 6, C), torch.randn(1, 2, C)
    full = attn(x)
    cache = attn.init_cache(1, 8)
    attn(x[:, :4], cache=cache)
    attn(other, cache=cache)  # two tokens that get rejected
    cache.truncate(4)
    torch.testing.assert_close(attn(x[:, 4:], cache=cache), full[:, 4:], atol=ATOL, rtol=0)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=32, n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(d_model=30, n_heads=4), "d_model"),
        (dict(d_model=32, n_heads=4, rope=RotaryEmbedding(4)), "rope"),
        (dict(d_model=32, n_heads=4, window=2, causal=False), "window"),
        (dict(d_model=32, n_heads=4, dropout=1.5), "dropout"),
    ],
)
def test_bad_configuration_is_an_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupedQueryAttention(**kwargs)


def test_bad_forward_input_is_an_error():
    attn = make("gqa")
    with pytest.raises(ValueError, match="x must have shape"):
        attn(torch.randn(2, 5, C + 1))
    with pytest.raises(ValueError, match="padding_mask"):
        attn(torch.randn(2, 5, C), padding_mask=torch.ones(2, 4, dtype=torch.bool))


def test_torch_loader_rejects_mismatched_module():
    with pytest.raises(ValueError, match="mismatch"):
        load_from_torch(MultiHeadAttention(C, H), nn.MultiheadAttention(C, 2, batch_first=True))
