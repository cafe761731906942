"""Multi-head latent attention: its two inference paths, Hugging Face's DeepseekV3Attention, the cache.

Tolerance: float32 activations of unit scale. The absorbed and expanded paths, our code and Hugging
Face's, and cached and full forwards compute the same sums in different orders (e.g. dot products
over d_c + d_R latent channels instead of d_h + d_R head channels), which moves results by ~1e-7;
we use the project default atol=1e-5.
"""

import math

import pytest
import torch

from llm_scratch.attention import KVCache, MLACache, MLAConfig, MultiHeadLatentAttention
from llm_scratch.position.rope import apply_rope, rope_angles

ATOL = 1e-5
# Every size distinct, so a reshape that mixes two of them up fails.
SIZES = dict(d_model=32, n_heads=4, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10)


def make_mla(q_lora_rank=20, **overrides) -> MultiHeadLatentAttention:
    """A small MLA layer with random weights, the RMSNorm gains included (they start at 1)."""
    mla = MultiHeadLatentAttention(MLAConfig(**{**SIZES, "q_lora_rank": q_lora_rank, **overrides})).eval()
    with torch.no_grad():
        for name, p in mla.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return mla


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# --- (a) the two inference paths, and sdpa's two paths ---------------------------------------


@pytest.mark.parametrize("q_lora_rank", [20, None])
@pytest.mark.parametrize("naive", [False, True])
@torch.no_grad()
def test_absorbed_equals_expanded(q_lora_rank, naive):
    mla = make_mla(q_lora_rank)
    x = torch.randn(2, 9, SIZES["d_model"])
    close(mla(x, absorb=True, naive=naive), mla(x, absorb=False, naive=naive))


@pytest.mark.parametrize("q_lora_rank", [20, None])
@pytest.mark.parametrize("absorb", [False, True])
@torch.no_grad()
def test_naive_equals_fused(q_lora_rank, absorb):
    mla = make_mla(q_lora_rank)
    x = torch.randn(2, 9, SIZES["d_model"])
    close(mla(x, absorb=absorb, naive=True), mla(x, absorb=absorb, naive=False))


def test_parameter_shapes():
    """The rope key is ONE head shared by all heads (eq. 15): kv_a_proj outputs d_c + d_R, not d_c + H·d_R."""
    mla = make_mla(20)
    c = mla.config
    assert mla.kv_a_proj_with_mqa.weight.shape == (c.kv_lora_rank + c.qk_rope_head_dim, c.d_model)
    assert mla.kv_b_proj.weight.shape == (c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
    assert mla.q_b_proj.weight.shape == (c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim), 20)
    assert mla.o_proj.weight.shape == (c.d_model, c.n_heads * c.v_head_dim)
    assert not hasattr(make_mla(None), "q_a_proj")


# --- (b) Hugging Face's DeepseekV3Attention, random weights ----------------------------------


def hf_config(q_lora_rank=20, rope_interleave=True, attention_bias=False, rope_parameters=None, **extra):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        hidden_size=SIZES["d_model"], num_attention_heads=SIZES["n_heads"], num_key_value_heads=SIZES["n_heads"],
        kv_lora_rank=SIZES["kv_lora_rank"], q_lora_rank=q_lora_rank,
        qk_nope_head_dim=SIZES["qk_nope_head_dim"], qk_rope_head_dim=SIZES["qk_rope_head_dim"],
        v_head_dim=SIZES["v_head_dim"], rope_interleave=rope_interleave, attention_bias=attention_bias,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager", **extra,
    )


@pytest.mark.parametrize(
    "q_lora_rank, rope_interleave, attention_bias",
    [(20, True, False), (None, True, False), (20, True, True), (20, False, False)],
)
@pytest.mark.parametrize("absorb", [False, True])
@torch.no_grad()
def test_matches_hugging_face(q_lora_rank, rope_interleave, attention_bias, absorb):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    config = hf_config(q_lora_rank, rope_interleave, attention_bias)
    theirs = DeepseekV3Attention(config, layer_idx=0).eval()
    for name, p in theirs.named_parameters():  # nn.Linear init is random already; the norms start at 1
        if "layernorm" in name:
            p.uniform_(0.5, 1.5)
    ours = MultiHeadLatentAttention(MLAConfig(
        **SIZES, q_lora_rank=q_lora_rank, rope_interleaved=rope_interleave, attention_bias=attention_bias
    )).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)

    B, T = 2, 9
    x = torch.randn(B, T, SIZES["d_model"])
    positions = torch.arange(3, 3 + T).expand(B, T)  # not starting at 0, so the positions are really used
    cos, sin = DeepseekV3RotaryEmbedding(config)(x, positions)
    # transformers 5's eager attention adds attention_mask to the scores: 0 = visible, -inf = hidden
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    expected, _ = theirs(x, position_embeddings=(cos, sin), attention_mask=causal)
    close(ours(x, positions=positions, absorb=absorb), expected)


# --- (c) the softmax scale, YaRN's mscale included -------------------------------------------


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32.0, "beta_slow": 1.0}


@pytest.mark.parametrize(
    "rope_parameters, factor, mscale_all_dim",
    [
        (None, None, 0.0),
        ({**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}, 40.0, 1.0),  # DeepSeek-V3
        ({**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}, 40.0, 0.707),  # DeepSeek-V2
    ],
)
def test_softmax_scale_matches_hugging_face(rope_parameters, factor, mscale_all_dim):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    theirs = DeepseekV3Attention(hf_config(rope_parameters=rope_parameters, max_position_embeddings=163840), 0)
    config = MLAConfig(**SIZES, q_lora_rank=20, rope_scaling_factor=factor, mscale_all_dim=mscale_all_dim)
    assert config.softmax_scale == pytest.approx(theirs.scaling, rel=1e-12)
    plain = (SIZES["qk_nope_head_dim"] + SIZES["qk_rope_head_dim"]) ** -0.5
    assert (config.softmax_scale > plain * 1.1) == (factor is not None)  # YaRN's case really differs


def test_softmax_scale_formula():
    config = MLAConfig(**SIZES, q_lora_rank=None, rope_scaling_factor=40.0, mscale_all_dim=1.0)
    mscale = 0.1 * math.log(40.0) + 1.0
    assert config.softmax_scale == pytest.approx(mscale**2 / math.sqrt(8 + 6), rel=1e-12)
    # factor 1 extends nothing: no correction
    assert MLAConfig(**SIZES, q_lora_rank=None, rope_scaling_factor=1.0, mscale_all_dim=1.0).softmax_scale == (
        pytest.approx(1 / math.sqrt(14), rel=1e-12)
    )


# --- (d) cached decoding equals the full forward ---------------------------------------------


@pytest.mark.parametrize("chunks", [[4, 1, 1, 1, 1, 1], [3, 3, 3]], ids=["prefill+1s", "chunks-of-3"])
@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("q_lora_rank", [20, None])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(chunks, absorb, q_lora_rank):
    mla = make_mla(q_lora_rank)
    x = torch.randn(2, sum(chunks), SIZES["d_model"])
    full = mla(x)  # expanded path, no cache: the reference for both paths
    cache = mla.init_cache(batch_size=2, max_len=16)
    outs, start = [], 0
    for n in chunks:
        outs.append(mla(x[:, start : start + n], cache=cache, absorb=absorb))
        start += n
        assert cache.length == start
    close(torch.cat(outs, dim=1), full)


@torch.no_grad()
def test_cache_holds_normalized_latent_and_rotated_rope_key():
    mla = make_mla(20)
    x = torch.randn(2, 5, SIZES["d_model"])
    cache = mla.init_cache(2, 8)
    mla(x, cache=cache)
    d_c, d_r = SIZES["kv_lora_rank"], SIZES["qk_rope_head_dim"]
    compressed = x @ mla.kv_a_proj_with_mqa.weight.T
    latent = compressed[..., :d_c]
    latent = latent / latent.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * mla.kv_a_layernorm.weight
    close(cache.latent[:, :5], latent)
    cos, sin = rope_angles(torch.arange(5), mla.rope.inv_freq)
    close(cache.k_rope[:, :5], apply_rope(compressed[:, None, :, d_c:], cos, sin, interleaved=True)[:, 0])
    assert cache.latent.shape[-1] == d_c and cache.k_rope.shape[-1] == d_r


# --- (e) padding does not change the real tokens' outputs ------------------------------------


def padded_batch(lengths, T, left):
    """Random tokens, padding filled with large garbage so that any leak shows."""
    x = torch.randn(len(lengths), T, SIZES["d_model"])
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if left:
            mask[b, T - n :] = True
        else:
            mask[b, :n] = True
    x = torch.where(mask[..., None], x, 100 * torch.randn_like(x))
    return x, mask


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("absorb", [False, True])
@torch.no_grad()
def test_padding_invariance(left, absorb):
    mla = make_mla(20)
    lengths, T = [8, 5], 8
    x, mask = padded_batch(lengths, T, left)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each sequence counts from its first real token
    out = mla(x, padding_mask=mask, positions=positions, absorb=absorb)
    for b, n in enumerate(lengths):
        real = mask[b]
        assert int(real.sum()) == n
        alone = mla(x[b : b + 1, real], absorb=absorb)[0]
        close(out[b, real], alone)


@pytest.mark.parametrize("absorb", [False, True])
@torch.no_grad()
def test_left_padded_cached_decoding(absorb):
    """Prefill a left-padded batch, then decode two tokens; each row equals its sequence alone."""
    mla = make_mla(None)
    lengths, T = [6, 3], 6
    x, mask = padded_batch(lengths, T, left=True)
    new = torch.randn(2, 2, SIZES["d_model"])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = mla.init_cache(2, 10)
    mla(x, padding_mask=mask, positions=positions, cache=cache, absorb=absorb)
    next_pos = positions[:, -1]
    steps = [mla(new[:, i : i + 1], positions=(next_pos + 1 + i)[:, None], cache=cache, absorb=absorb)
             for i in range(2)]
    decoded = torch.cat(steps, dim=1)
    for b in range(2):
        seq = torch.cat([x[b, mask[b]], new[b]])[None]
        close(decoded[b], mla(seq)[0, -2:])


# --- (f) causality ----------------------------------------------------------------------------


@pytest.mark.parametrize("absorb", [False, True])
@torch.no_grad()
def test_causal(absorb):
    mla = make_mla(20)
    x = torch.randn(2, 9, SIZES["d_model"])
    y = x.clone()
    y[:, 5:] = torch.randn(2, 4, SIZES["d_model"])
    a, b = mla(x, absorb=absorb), mla(y, absorb=absorb)
    close(a[:, :5], b[:, :5], atol=1e-6)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-2  # the change is visible where it may be


# --- (g) the cache's size ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_per_token(dtype):
    d_c, d_r = SIZES["kv_lora_rank"], SIZES["qk_rope_head_dim"]
    element = torch.empty((), dtype=dtype).element_size()
    for n_heads in (2, 4):  # independent of the number of heads
        cache = make_mla(20, n_heads=n_heads).init_cache(batch_size=3, max_len=7, dtype=dtype)
        assert isinstance(cache, MLACache) and cache.latent.dtype == dtype
        assert cache.bytes_per_token() == (d_c + d_r) * element
        assert cache.nbytes == 3 * 7 * (d_c + d_r) * element


# --- (h) bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, name",
    [
        ({"n_heads": 0}, "n_heads"),
        ({"d_model": -1}, "d_model"),
        ({"kv_lora_rank": 2.5}, "kv_lora_rank"),
        ({"qk_rope_head_dim": 5}, "qk_rope_head_dim"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"rope_base": 1.0}, "rope_base"),
        ({"rope_scaling_factor": 0.5}, "rope_scaling_factor"),
        ({"rope_scaling_factor": 40.0, "mscale_all_dim": -1.0}, "mscale_all_dim"),
        ({"mscale_all_dim": 1.0}, "mscale_all_dim"),  # without a scaling factor it would do nothing
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_bad_config(change, name):
    with pytest.raises(ValueError, match=name):
        MLAConfig(**{**SIZES, "q_lora_rank": 20, **change})


def test_bad_input():
    mla = make_mla(20)
    x = torch.randn(2, 5, SIZES["d_model"])
    with pytest.raises(ValueError, match="x must have shape"):
        mla(torch.randn(2, 5, SIZES["d_model"] + 1))
    with pytest.raises(ValueError, match="x must have shape"):
        mla(torch.randn(5, SIZES["d_model"]))
    with pytest.raises(ValueError, match="positions"):
        mla(x, positions=torch.arange(4))
    with pytest.raises(ValueError, match="padding_mask"):
        mla(x, padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="MLACache"):
        mla(x, cache=KVCache(2, 8, n_kv_heads=4, head_dim=8))
    with pytest.raises(ValueError, match="d_c"):  # a cache made for another layer's sizes
        mla(x, cache=MLACache(2, 8, kv_lora_rank=16, rope_head_dim=6))
    with pytest.raises(ValueError, match="max_len"):
        mla(x, cache=mla.init_cache(2, 4))
    with pytest.raises(ValueError, match="config"):
        MultiHeadLatentAttention({**SIZES, "q_lora_rank": 20})


# --- parameter count of the published DeepSeek-V3 attention, on the meta device -------------


def test_deepseek_v3_parameter_count():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    with torch.device("meta"):
        theirs = DeepseekV3Attention(DeepseekV3Config(), 0)  # its defaults are DeepSeek-V3's sizes
        ours = MultiHeadLatentAttention(MLAConfig(
            d_model=7168, n_heads=128, kv_lora_rank=512, q_lora_rank=1536,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        ))
    count = lambda m: sum(p.numel() for p in m.parameters())
    # q_a 7168·1536 + norm 1536 + q_b 1536·128·192 + kv_a 7168·576 + norm 512 + kv_b 512·128·256 + o 16384·7168
    assert count(ours) == count(theirs) == 187_107_328


@pytest.mark.parametrize("absorb", [False, True])
@torch.no_grad()
def test_packed_sequences_equal_each_alone(absorb):
    """Two sequences in one row with a block-diagonal attn_mask and restarting positions: each is computed as alone."""
    torch.manual_seed(0)
    mla = make_mla()
    a, b = torch.randn(1, 5, SIZES["d_model"]), torch.randn(1, 4, SIZES["d_model"])
    segments = torch.tensor([[1] * 5 + [2] * 4])
    attn_mask = segments[:, :, None] == segments[:, None, :]  # (1, 9, 9)
    positions = torch.cat([torch.arange(5), torch.arange(4)])[None]
    packed = mla(torch.cat([a, b], dim=1), attn_mask=attn_mask, positions=positions, absorb=absorb)
    close(packed[:, :5], mla(a, absorb=absorb))
    close(packed[:, 5:], mla(b, absorb=absorb))
    with pytest.raises(ValueError, match="attn_mask"):
        mla(a, attn_mask=torch.ones(5, 5, dtype=torch.bool))
