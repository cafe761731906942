"""Absolute and relative position methods: sinusoidal, learned, Shaw, T5 buckets, ALiBi.

References we did not write: the papers' formulas (re-typed here, independently of the package),
Hugging Face DistilBERT's sinusoidal table, T5Attention (buckets, bias and the whole attention
with copied weights), Bloom's, Falcon's and MPT's ALiBi slopes and Bloom's ALiBi tensor.

Tolerances (float32):
- tables of sines, cosines and slopes: values in [-1, 1] rounded once to float32 (ulp <= 6e-8);
  ours are computed in float64, the references in float64 or float32, so they agree to ~1e-7 and
  we use atol=1e-6.
- attention outputs: unit-scale inputs, the same sums of D = 8..16 products taken in a different
  order by two implementations, then a softmax: ~1e-6 apart; atol=1e-5 (the project default).
- causality: the visible rows are computed from identical numbers; 1e-6 allows only for a kernel
  that blocks its matmul differently when other columns change.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from llm_scratch.attention import scaled_dot_product_attention
from llm_scratch.position import (
    LearnedPositionEmbedding,
    ShawRelativePosition,
    SinusoidalPositionEmbedding,
    T5RelativeBias,
    alibi_bias,
    alibi_slopes,
    relative_positions,
    shaw_attention,
    sinusoidal_position_encoding,
    t5_relative_position_bucket,
)

ATOL = 1e-5
TABLE_ATOL = 1e-6


def qkv(B=2, H=4, Tq=6, Tk=6, D=8):
    return torch.randn(B, H, Tq, D), torch.randn(B, H, Tk, D), torch.randn(B, H, Tk, D)


# ----------------------------------------------------------------------------------------------
# sinusoidal
# ----------------------------------------------------------------------------------------------


def test_sinusoidal_matches_the_papers_formula():
    # Vaswani et al. 2017, section 3.5, typed out with the math module, one entry at a time
    T, d = 50, 16
    expected = torch.empty(T, d, dtype=torch.float64)
    for pos in range(T):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            expected[pos, 2 * i] = math.sin(angle)
            expected[pos, 2 * i + 1] = math.cos(angle)
    ours = sinusoidal_position_encoding(T, d)
    assert ours.shape == (T, d) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected.float(), atol=TABLE_ATOL, rtol=0)
    # another base changes the table (the argument is used)
    assert not torch.allclose(sinusoidal_position_encoding(T, d, base=100.0), ours, atol=1e-3)


def test_sinusoidal_known_values():
    pe = sinusoidal_position_encoding(3, 4, dtype=torch.float64)
    # position 0: sin 0 = 0, cos 0 = 1 in every pair
    assert pe[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    # position 1: angles 1 and 1/10000^(2/4) = 0.01
    torch.testing.assert_close(
        pe[1], torch.tensor([0.8414709848078965, 0.5403023058681398, 0.009999833334166664, 0.9999500004166653],
                            dtype=torch.float64), atol=1e-15, rtol=0
    )


def test_sinusoidal_matches_distilbert():
    from transformers.models.distilbert.modeling_distilbert import create_sinusoidal_embeddings

    T, d = 64, 32
    theirs = create_sinusoidal_embeddings(T, d, torch.empty(T, d))
    torch.testing.assert_close(sinusoidal_position_encoding(T, d), theirs, atol=TABLE_ATOL, rtol=0)


def test_sinusoidal_offset_is_a_rotation_and_dot_products_depend_on_distance():
    T, d, k = 40, 16, 7
    pe = sinusoidal_position_encoding(T + k, d, dtype=torch.float64)
    omega = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    # PE(m + k) = R(k) PE(m), R block-diagonal with [[cos ωk, sin ωk], [-sin ωk, cos ωk]] on each (sin, cos) pair
    R = torch.zeros(d, d, dtype=torch.float64)
    for i, w in enumerate(omega.tolist()):
        c, s = math.cos(w * k), math.sin(w * k)
        R[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
    torch.testing.assert_close(pe[k:], pe[:T] @ R.T, atol=1e-12, rtol=0)
    # PE(m)·PE(n) = Σ_i cos(ω_i (m - n))
    gram = pe @ pe.T
    dist = torch.arange(T + k)[:, None] - torch.arange(T + k)[None, :]
    torch.testing.assert_close(gram, torch.cos(dist[..., None] * omega).sum(-1), atol=1e-12, rtol=0)


def test_sinusoidal_module_lookup_and_extrapolation():
    emb = SinusoidalPositionEmbedding(16, 8)
    assert list(emb.state_dict()) == []  # a function of the position: nothing to save
    pos = torch.tensor([[0, 3, 15], [2, 2, 1]])
    torch.testing.assert_close(emb(pos), sinusoidal_position_encoding(16, 8)[pos], atol=0, rtol=0)
    # past the buffer the formula still holds
    far = torch.tensor([15, 16, 100])
    torch.testing.assert_close(emb(far), sinusoidal_position_encoding(101, 8)[far], atol=TABLE_ATOL, rtol=0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sinusoidal_position_encoding(8, 7), "d_model"),
        (lambda: sinusoidal_position_encoding(8, 0), "d_model"),
        (lambda: sinusoidal_position_encoding(-1, 8), "n_positions"),
        (lambda: sinusoidal_position_encoding(8, 8, base=1.0), "base"),
        (lambda: SinusoidalPositionEmbedding(8, 8)(torch.tensor([-1])), "positions"),
        (lambda: SinusoidalPositionEmbedding(8, 8)(torch.tensor([1.0])), "positions"),
    ],
)
def test_sinusoidal_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# learned
# ----------------------------------------------------------------------------------------------


def test_learned_embedding_looks_up_rows_and_has_gpt2_naming_and_init():
    torch.manual_seed(0)
    wpe = LearnedPositionEmbedding(1024, 64)
    assert list(wpe.state_dict()) == ["weight"] and wpe.weight.shape == (1024, 64)
    assert 0.0095 < wpe.weight.std().item() < 0.0105  # N(0, 0.01²) as OpenAI's GPT-2, not nn.Embedding's N(0, 1)
    assert 0.019 < LearnedPositionEmbedding(1024, 64, init_std=0.02).weight.std().item() < 0.021
    pos = torch.arange(10).expand(3, 10)
    out = wpe(pos)
    assert out.shape == (3, 10, 64)
    torch.testing.assert_close(out[1], wpe.weight[:10], atol=0, rtol=0)
    out.sum().backward()
    assert wpe.weight.grad[:10].abs().sum() > 0 and wpe.weight.grad[10:].abs().sum() == 0


def test_learned_embedding_refuses_positions_past_the_context():
    wpe = LearnedPositionEmbedding(8, 4)
    wpe(torch.tensor([7]))  # the last row is fine
    with pytest.raises(ValueError, match=r"position 8 .*context length.*n_positions=8"):
        wpe(torch.arange(9))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        wpe(torch.tensor([-1]))
    with pytest.raises(ValueError, match="integer"):
        wpe(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="n_positions"):
        LearnedPositionEmbedding(0, 4)
    with pytest.raises(ValueError, match="d_model"):
        LearnedPositionEmbedding(8, -4)
    with pytest.raises(ValueError, match="init_std"):
        LearnedPositionEmbedding(8, 4, init_std=0.0)


# ----------------------------------------------------------------------------------------------
# relative positions and Shaw et al.
# ----------------------------------------------------------------------------------------------


def test_relative_positions_are_lower_right_aligned():
    assert relative_positions(3).tolist() == [[0, 1, 2], [-1, 0, 1], [-2, -1, 0]]
    # 2 new queries after 3 cached keys sit at positions 3 and 4
    assert relative_positions(2, 5).tolist() == [[-3, -2, -1, 0, 1], [-4, -3, -2, -1, 0]]
    assert torch.equal(relative_positions(1, 7), relative_positions(7)[-1:])
    with pytest.raises(ValueError, match=r"q_len \(5\) > k_len \(3\)"):
        relative_positions(5, 3)
    with pytest.raises(ValueError, match="q_len"):
        relative_positions(-1)


def shaw_double_loop(q, k, v, rel_k, rel_v, causal=False):
    """Eqs. 2-4 of Shaw et al., one (b, h, i) at a time, in float64."""
    q, k, v, rel_k, rel_v = (t.double() for t in (q, k, v, rel_k, rel_v))
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = torch.zeros(B, H, Tq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                visible = [j for j in range(Tk) if not causal or j <= i + Tk - Tq]
                e = torch.stack([q[b, h, i] @ (k[b, h, j] + rel_k[i, j]) / math.sqrt(D) for j in visible])
                alpha = torch.softmax(e, 0)
                for a, j in zip(alpha, visible, strict=True):
                    out[b, h, i] += a * (v[b, h, j] + rel_v[i, j])
    return out.float()


@pytest.mark.parametrize("Tq, Tk, causal", [(6, 6, False), (6, 6, True), (3, 7, True)])
def test_shaw_efficient_equals_naive_equals_double_loop(Tq, Tk, causal):
    q, k, v = qkv(Tq=Tq, Tk=Tk)
    rel_k, rel_v = torch.randn(Tq, Tk, 8), torch.randn(Tq, Tk, 8)
    fast = shaw_attention(q, k, v, rel_k, rel_v, is_causal=causal)
    naive = shaw_attention(q, k, v, rel_k, rel_v, is_causal=causal, naive=True)
    loop = shaw_double_loop(q, k, v, rel_k, rel_v, causal=causal)
    torch.testing.assert_close(fast, naive, atol=ATOL, rtol=0)
    torch.testing.assert_close(fast, loop, atol=ATOL, rtol=0)
    # and the relative terms matter: without them the result is plain attention, far away
    plain = scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert (fast - plain).abs().max() > 0.1


@pytest.mark.parametrize("naive", [True, False])
def test_shaw_key_term_is_an_additive_bias_and_zero_tables_give_plain_attention(naive):
    q, k, v = qkv()
    rel_k = torch.randn(6, 6, 8)
    scale = 1 / math.sqrt(8)
    # q_i · a^K_ij · scale is a (B, H, Tq, Tk) bias on the scores
    bias = torch.einsum("bhqd,qkd->bhqk", q, rel_k) * scale
    torch.testing.assert_close(
        shaw_attention(q, k, v, rel_k, None, naive=naive),
        scaled_dot_product_attention(q, k, v, attn_mask=bias), atol=ATOL, rtol=0,
    )
    zeros = torch.zeros(6, 6, 8)
    torch.testing.assert_close(
        shaw_attention(q, k, v, zeros, zeros, is_causal=True, naive=naive),
        F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=ATOL, rtol=0,
    )
    # the masks are those of our sdpa: padding too
    padding = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    torch.testing.assert_close(
        shaw_attention(q, k, v, zeros, zeros, padding_mask=padding, naive=naive),
        scaled_dot_product_attention(q, k, v, padding_mask=padding), atol=ATOL, rtol=0,
    )


def test_shaw_module_clips_distances_and_uses_its_tables():
    shaw = ShawRelativePosition(max_distance=2, head_dim=8)
    assert shaw.w_k.weight.shape == (5, 8) and shaw.w_v.weight.shape == (5, 8)
    # clip(j - i, 2) + 2 for T = 5
    assert shaw.index(5).tolist() == [
        [2, 3, 4, 4, 4],
        [1, 2, 3, 4, 4],
        [0, 1, 2, 3, 4],
        [0, 0, 1, 2, 3],
        [0, 0, 0, 1, 2],
    ]
    with torch.no_grad():
        shaw.w_k.weight.normal_()
        shaw.w_v.weight.normal_()
    rel_k, rel_v = shaw.tables(5)
    assert torch.equal(rel_k[0, 4], shaw.w_k.weight[4]) and torch.equal(rel_v[4, 0], shaw.w_v.weight[0])
    q, k, v = qkv(Tq=5, Tk=5)
    torch.testing.assert_close(
        shaw(q, k, v, is_causal=True), shaw_double_loop(q, k, v, rel_k, rel_v, causal=True), atol=ATOL, rtol=0
    )


def test_shaw_decoding_a_suffix_equals_the_last_rows():
    shaw = ShawRelativePosition(3, 8)
    with torch.no_grad():
        shaw.w_k.weight.normal_()
        shaw.w_v.weight.normal_()
    q, k, v = qkv(Tq=9, Tk=9)
    full = shaw(q, k, v, is_causal=True)
    torch.testing.assert_close(shaw(q[:, :, -2:], k, v, is_causal=True), full[:, :, -2:], atol=ATOL, rtol=0)


def test_shaw_errors_name_the_argument():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="rel_k"):
        shaw_attention(q, k, v, torch.randn(6, 5, 8), None)
    with pytest.raises(ValueError, match="rel_v"):
        shaw_attention(q, k, v, None, torch.randn(6, 6, 4))
    with pytest.raises(ValueError, match="q "):
        shaw_attention(q, k[:, :2], v, None, None)
    with pytest.raises(ValueError, match="max_distance"):
        ShawRelativePosition(0, 8)
    with pytest.raises(ValueError, match="head_dim"):
        ShawRelativePosition(2, 8.0)


# ----------------------------------------------------------------------------------------------
# T5
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 64), (8, 20), (64, 256)])
def test_t5_buckets_match_hugging_face(bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-400, 401)
    ours = t5_relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)
    assert ours.min() == 0 and ours.max() == num_buckets - 1  # every bucket in range, the last one used


def test_t5_buckets_by_hand():
    # bidirectional, 32 buckets: 16 per direction, exact below 8, then log-spaced up to 128
    b = t5_relative_position_bucket(torch.tensor([0, -1, -7, -8, -12, -16, -127, -128, -1000, 1, 7, 1000]))
    assert b.tolist() == [0, 1, 7, 8, 9, 10, 15, 15, 15, 17, 23, 31]
    # causal: the future is bucket 0, as the present
    c = t5_relative_position_bucket(torch.tensor([5, 0, -1, -15, -16, -1000]), bidirectional=False)
    assert c.tolist() == [0, 0, 1, 15, 16, 31]


@pytest.mark.parametrize("is_decoder", [False, True])
def test_t5_bias_and_attention_match_hugging_face(is_decoder):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    cfg = T5Config(d_model=32, d_kv=8, num_heads=4, relative_attention_num_buckets=16,
                   relative_attention_max_distance=40, is_decoder=is_decoder)
    cfg._attn_implementation = "eager"
    hf = T5Attention(cfg, has_relative_attention_bias=True).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_()
    ours = T5RelativeBias(4, num_buckets=16, max_distance=40, bidirectional=not is_decoder)
    ours.load_state_dict({"relative_attention_bias.weight": hf.relative_attention_bias.weight.detach()})

    with torch.no_grad():
        torch.testing.assert_close(ours(50)[None], hf.compute_bias(50, 50), atol=0, rtol=0)
        # 3 new queries after 7 cached keys
        torch.testing.assert_close(ours(3, 10)[None], hf.compute_bias(3, 10, past_seen_tokens=7), atol=0, rtol=0)

        # the whole attention: T5 adds the bias and does not scale by 1/√D
        x = torch.randn(2, 50, 32)
        mask = None
        if is_decoder:  # T5's causal mask comes from outside, as an additive (B, 1, Tq, Tk) tensor
            mask = torch.zeros(50, 50).masked_fill(~torch.ones(50, 50, dtype=torch.bool).tril(), float("-inf"))
        expected = hf(x, mask=mask)[0]

        def heads(t):
            return t.view(2, 50, 4, 8).transpose(1, 2)  # (B, T, C) -> (B, H, T, D)

        q, k, v = heads(hf.q(x)), heads(hf.k(x)), heads(hf.v(x))
        for naive in (True, False):
            out = scaled_dot_product_attention(q, k, v, attn_mask=ours(50), is_causal=is_decoder, scale=1.0,
                                               naive=naive)
            out = hf.o(out.transpose(1, 2).reshape(2, 50, 32))
            # scores here are sums of 8 products of N(0,1)·N(0,1)-projected inputs, |s| ~ 30: allow 1e-4 abs
            torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)


def test_t5_errors_name_the_argument():
    with pytest.raises(ValueError, match="relative_position"):
        t5_relative_position_bucket(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="num_buckets"):
        t5_relative_position_bucket(torch.tensor([1]), num_buckets=31)
    with pytest.raises(ValueError, match="num_buckets"):
        t5_relative_position_bucket(torch.tensor([1]), bidirectional=False, num_buckets=1)
    with pytest.raises(ValueError, match="max_distance"):
        t5_relative_position_bucket(torch.tensor([1]), num_buckets=32, max_distance=8)
    with pytest.raises(ValueError, match="n_heads"):
        T5RelativeBias(0)
    with pytest.raises(ValueError, match="max_distance"):
        T5RelativeBias(4, num_buckets=32, max_distance=4)


# ----------------------------------------------------------------------------------------------
# ALiBi
# ----------------------------------------------------------------------------------------------

# Press et al. 2022, section 3, re-typed: for 8 heads 1/2, 1/4, ..., 1/256; for 16 heads the
# geometric sequence from 2^-0.5 with ratio 2^-0.5; for 12 heads (not a power of two) the 8-head
# slopes followed by every other slope of the 16-head sequence: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
EXPECTED_SLOPES = {
    8: [2.0 ** -e for e in (1, 2, 3, 4, 5, 6, 7, 8)],
    16: [2.0 ** -e for e in (0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5, 8)],
    12: [2.0 ** -e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)],
}


@pytest.mark.parametrize("n_heads", [8, 12, 16])
def test_alibi_slopes_follow_the_paper(n_heads):
    ours = alibi_slopes(n_heads)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, torch.tensor(EXPECTED_SLOPES[n_heads]), atol=0, rtol=0)


@pytest.mark.parametrize("n_heads", range(1, 33))
def test_alibi_slopes_match_bloom_falcon_and_mpt(n_heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor as falcon_alibi
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    ours = alibi_slopes(n_heads)
    # Bloom and Falcon raise a float32 base to integer powers: 1 ulp from our exact powers of two
    torch.testing.assert_close(ours, _get_alibi_slopes(n_heads, torch.device("cpu")), atol=0, rtol=1e-6)
    falcon = falcon_alibi(torch.ones(1, 2), n_heads, torch.float32)  # (H, 1, 2): slope · position
    # Falcon rounds its slopes to bfloat16 (as its original code did): equal to ours rounded so
    torch.testing.assert_close(ours.bfloat16().float(), falcon[:, 0, 1], atol=0, rtol=0)
    mpt = build_mpt_alibi_tensor(n_heads, 2)  # (H, 1, 2): slope · (j - (T - 1))
    torch.testing.assert_close(ours, -mpt[:, 0, 0], atol=0, rtol=1e-6)


def test_alibi_bias_values():
    b = alibi_bias(2, 3, 5)  # 2 heads: slopes 1/16, 1/256; queries at positions 2, 3, 4
    assert b.shape == (2, 3, 5)
    m = 1 / 16
    expected_h0 = [[-2 * m, -m, 0, -m, -2 * m], [-3 * m, -2 * m, -m, 0, -m], [-4 * m, -3 * m, -2 * m, -m, 0]]
    torch.testing.assert_close(b[0], torch.tensor(expected_h0), atol=0, rtol=0)
    torch.testing.assert_close(b[1], b[0] * (16 / 256), atol=0, rtol=0)
    assert torch.equal(alibi_bias(8, 1, 20), alibi_bias(8, 20)[:, -1:])  # decoding reads the last row
    assert alibi_bias(4, 3, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("naive", [True, False])
def test_alibi_through_our_sdpa_equals_a_hand_computed_softmax(naive):
    H, T, D = 4, 10, 16
    q, k, v = qkv(H=H, Tq=T, Tk=T, D=D)
    out = scaled_dot_product_attention(q, k, v, attn_mask=alibi_bias(H, T), is_causal=True, naive=naive)
    slopes = torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8])  # 2^(-8h/4)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    scores = q @ k.transpose(-2, -1) / math.sqrt(D) - slopes[:, None, None] * (i - j)
    scores = scores.masked_fill(j > i, float("-inf"))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, atol=ATOL, rtol=0)
    assert (out - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max() > 0.01  # the bias matters


def test_alibi_equals_blooms_shift_invariant_form():
    # Bloom adds +m·j instead of -m·(i - j): per row they differ by the constant m·i, which the
    # softmax ignores. Bloom's tensor through our sdpa must give the same attention.
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    H, T = 12, 9
    q, k, v = qkv(B=1, H=H, Tq=T, Tk=T)
    bloom = build_alibi_tensor(torch.ones(1, T), H, torch.float32)[None]  # (1, H, 1, T)
    theirs = scaled_dot_product_attention(q, k, v, attn_mask=bloom.expand(1, H, T, T), is_causal=True)
    ours = scaled_dot_product_attention(q, k, v, attn_mask=alibi_bias(H, T), is_causal=True)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_alibi_errors_name_the_argument():
    with pytest.raises(ValueError, match="n_heads"):
        alibi_slopes(0)
    with pytest.raises(ValueError, match="n_heads"):
        alibi_bias(2.5, 4)
    with pytest.raises(ValueError, match="q_len"):
        alibi_bias(4, 6, 3)


# ----------------------------------------------------------------------------------------------
# causality with each bias
# ----------------------------------------------------------------------------------------------


def _t5_causal_bias(H, T):
    t5 = T5RelativeBias(H, num_buckets=16, max_distance=32, bidirectional=False)
    return t5(T).detach()


@pytest.mark.parametrize("method", ["alibi", "t5", "shaw"])
@pytest.mark.parametrize("naive", [True, False])
def test_future_tokens_do_not_change_past_outputs(method, naive):
    H, T, t = 4, 12, 5
    q, k, v = qkv(H=H, Tq=T, Tk=T)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1 :] = torch.randn_like(k2[:, :, t + 1 :])
    v2[:, :, t + 1 :] = torch.randn_like(v2[:, :, t + 1 :])
    if method == "shaw":
        shaw = ShawRelativePosition(3, 8)
        with torch.no_grad():
            shaw.w_k.weight.normal_()
            shaw.w_v.weight.normal_()

        def attend(k_, v_, causal):
            return shaw(q, k_, v_, is_causal=causal, naive=naive).detach()
    else:
        bias = alibi_bias(H, T) if method == "alibi" else _t5_causal_bias(H, T)

        def attend(k_, v_, causal):
            return scaled_dot_product_attention(q, k_, v_, attn_mask=bias, is_causal=causal, naive=naive)

    before, after = attend(k, v, True), attend(k2, v2, True)
    torch.testing.assert_close(after[:, :, : t + 1], before[:, :, : t + 1], atol=1e-6, rtol=0)
    assert (after[:, :, t + 1 :] - before[:, :, t + 1 :]).abs().max() > 1e-3  # the future itself did change
    # without the causal mask the bias alone does not hide the future: the test can tell
    leaky_before, leaky_after = attend(k, v, False), attend(k2, v2, False)
    assert (leaky_after[:, :, : t + 1] - leaky_before[:, :, : t + 1]).abs().max() > 1e-3
