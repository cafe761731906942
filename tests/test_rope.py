"""RoPE and its context-extension variants (position/rope.py).

Frequencies and attention factors are checked against Hugging Face's `ROPE_INIT_FUNCTIONS`
(built from tiny Llama / DeepSeek-V3 configs), static NTK against its formula, the rotation against
HF's `apply_rotary_pos_emb` (half layout) and an independent complex-number reference (interleaved).
Properties: relative position, the layout permutation, the cos/sin cache.
"""

import math

import pytest
import torch
from transformers import DeepseekV3Config, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from llm_scratch.position import (
    ROPE_TYPES,
    RopeScaling,
    RotaryEmbedding,
    apply_rope,
    half_to_interleaved_permutation,
    interleaved_to_half_permutation,
    rope_angles,
    rope_frequencies,
    rope_inverse_frequencies,
)

# float32 frequencies: HF computes YaRN's θ/s as 1/(s·base^(2i/D)), we as (1/base^(2i/D))/s, which
# differ by one rounding (2^-24 relative); 1e-6 leaves room for that and nothing more.
FREQ_RTOL = 1e-6

DEEPSEEK_V3 = {  # config.json of deepseek-ai/DeepSeek-V3, "rope_scaling" (old "type" key)
    "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096, "type": "yarn",
}
LLAMA_3_2 = {  # config.json of meta-llama/Llama-3.2-1B, "rope_scaling"
    "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3",
}


def hf_config(rope_parameters, head_dim, max_position_embeddings, deepseek=False):
    params = dict(rope_parameters)  # HF standardizes the dict in place
    if deepseek:  # DeepSeek-V3's rotary dims are qk_rope_head_dim; its config sets head_dim from it
        return DeepseekV3Config(hidden_size=64, num_attention_heads=2, qk_rope_head_dim=head_dim,
                                max_position_embeddings=max_position_embeddings, rope_parameters=params)
    return LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_position_embeddings, rope_parameters=params)


# (HF rope_parameters, head_dim, config.max_position_embeddings, seq_len passed to the init function, DeepSeek?)
HF_CASES = {
    "linear": ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, 64, 8192, None, False),
    # HF's dynamic NTK takes the trained length from config.max_position_embeddings
    "dynamic-below": ({"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}, 64, 4096, 3000, False),
    "dynamic-above": ({"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}, 64, 4096, 10000, False),
    "yarn": ({"rope_type": "yarn", "factor": 8.0, "rope_theta": 10000.0,
              "original_max_position_embeddings": 2048}, 64, 16384, None, False),
    "yarn-untruncated": ({"rope_type": "yarn", "factor": 16.0, "rope_theta": 1e6, "truncate": False,
                          "original_max_position_embeddings": 4096}, 128, 65536, None, False),
    "yarn-explicit-attention-factor": ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                        "attention_factor": 0.8, "beta_fast": 16, "beta_slow": 2,
                                        "original_max_position_embeddings": 1024}, 32, 4096, None, False),
    # ramp end past D/2 - 1: exercises the reference code's clamp to D - 1
    "yarn-wide-ramp": ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 250.0,
                        "original_max_position_embeddings": 6000}, 16, 24000, None, False),
    "deepseek-v3": (DEEPSEEK_V3 | {"rope_theta": 10000.0}, 64, 163840, None, True),
    "deepseek-mscale-differs": (DEEPSEEK_V3 | {"rope_theta": 10000.0, "mscale": 1.0, "mscale_all_dim": 0.707},
                                64, 163840, None, True),
    "llama-3.2": (LLAMA_3_2 | {"rope_theta": 500000.0}, 64, 131072, None, False),
    "llama-3.1": (LLAMA_3_2 | {"rope_theta": 500000.0, "factor": 8.0}, 128, 131072, None, False),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_frequencies_and_attention_factor_match_hugging_face(case):
    params, head_dim, max_pos, seq_len, deepseek = HF_CASES[case]
    config = hf_config(params, head_dim, max_pos, deepseek)
    kind = params.get("rope_type", params.get("type"))
    kwargs = {} if seq_len is None else {"seq_len": seq_len}
    want_freq, want_factor = ROPE_INIT_FUNCTIONS[kind](config, None, **kwargs)

    scaling = RopeScaling.from_dict(params, max_position_embeddings=max_pos)
    freq, factor = rope_frequencies(head_dim, params["rope_theta"], scaling, seq_len=seq_len)

    assert freq.dtype == torch.float32 and freq.shape == (head_dim // 2,)
    torch.testing.assert_close(freq, want_freq, rtol=FREQ_RTOL, atol=0)
    assert factor == pytest.approx(want_factor, rel=1e-12)  # the same few float64 operations
    plain = rope_inverse_frequencies(head_dim, params["rope_theta"])
    if case == "dynamic-below":  # no change up to the trained length, as in HF
        assert torch.equal(freq, plain)
    else:  # the scaling must have done something, or the comparison proves little
        assert not torch.allclose(freq, plain, rtol=1e-3)


def test_default_matches_hugging_face_and_the_paper():
    config = hf_config({"rope_type": "default", "rope_theta": 10000.0}, 64, 2048)
    want, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    freq, ours_factor = rope_frequencies(64)
    torch.testing.assert_close(freq, want, rtol=0, atol=0)
    assert factor == ours_factor == 1.0
    # θ_i = 10000^(-2i/d) (RoFormer eq. 15)
    torch.testing.assert_close(freq, torch.tensor([10000 ** (-2 * i / 64) for i in range(32)]), rtol=FREQ_RTOL, atol=0)


def test_deepseek_v3_yarn_attention_factor_is_one():
    """mscale = mscale_all_dim: the cos/sin factor cancels; V3 puts mscale² into its softmax scale."""
    _, factor = rope_frequencies(64, 10000.0, RopeScaling.from_dict(DEEPSEEK_V3))
    assert factor == 1.0
    _, generic = rope_frequencies(64, 10000.0, RopeScaling("yarn", 40.0, 4096))
    assert generic == pytest.approx(0.1 * math.log(40) + 1, rel=1e-12)  # YaRN §3.4: sqrt(1/t)


@pytest.mark.parametrize("head_dim, base, factor", [(64, 10000.0, 4.0), (128, 500000.0, 8.0), (16, 10000.0, 2.5)])
def test_ntk_matches_its_formula(head_dim, base, factor):
    freq, attention_factor = rope_frequencies(head_dim, base, RopeScaling("ntk", factor))
    new_base = base * factor ** (head_dim / (head_dim - 2))  # bloc97's NTK-aware base change
    want = torch.tensor([new_base ** (-2 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float64)
    torch.testing.assert_close(freq.double(), want, rtol=FREQ_RTOL, atol=0)
    assert attention_factor == 1.0
    # what the exponent is chosen for: the fastest pair is kept, the slowest divided by exactly s
    plain = rope_inverse_frequencies(head_dim, base)
    assert freq[0] == plain[0] == 1.0
    assert (plain[-1] / freq[-1]).item() == pytest.approx(factor, rel=FREQ_RTOL)


def test_dynamic_ntk_is_ntk_with_a_length_dependent_factor():
    scaling = RopeScaling("dynamic", 4.0, 1000)
    for t in (1, 999, 1000):
        assert torch.equal(rope_frequencies(32, 10000.0, scaling, seq_len=t)[0], rope_inverse_frequencies(32))
    t = 3000
    effective = 4.0 * t / 1000 - 3.0
    torch.testing.assert_close(rope_frequencies(32, 10000.0, scaling, seq_len=t)[0],
                               rope_frequencies(32, 10000.0, RopeScaling("ntk", effective))[0], rtol=FREQ_RTOL, atol=0)


# ---------------------------------------------------------------- the rotation itself

APPLY_CASES = {  # (HF rope_parameters, max_position_embeddings, largest position)
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, 4096, 4000),
    # llama3 frequencies equal HF's bit for bit, so large positions can be compared tightly
    "llama3": (LLAMA_3_2 | {"rope_theta": 500000.0}, 131072, 20000),
    # YaRN's frequencies may differ from HF's by 1 ulp, which grows into position·ulp radians: keep
    # positions small; its attention factor (≈1.21) must multiply cos and sin
    "yarn": ({"rope_type": "yarn", "factor": 8.0, "rope_theta": 10000.0,
              "original_max_position_embeddings": 2048}, 16384, 40),
}


@pytest.mark.parametrize("case", list(APPLY_CASES))
def test_half_layout_matches_hugging_face_apply_rotary_pos_emb(case):
    params, max_pos, largest = APPLY_CASES[case]
    B, H, T, D = 2, 3, 7, 16
    config = hf_config(params, D, max_pos)
    positions = torch.randint(0, largest, (B, T))
    q, k = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)

    rope = RotaryEmbedding(D, params["rope_theta"], scaling=RopeScaling.from_dict(params, max_pos))
    # 1e-5: both sides compute the same float32 angles; cos/sin of angles up to 2·10^4 rad agree to ~1e-6
    torch.testing.assert_close(rope(q, positions), want_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(rope(k, positions), want_k, atol=1e-5, rtol=0)


def complex_rope(x, positions, inv_freq, attention_factor=1.0):
    """Independent interleaved reference: pair (2i, 2i+1) is the complex number x_2i + j·x_2i+1,
    multiplied by attention_factor·e^{j·m·θ_i} (RoFormer eq. 12 / Meta's `apply_rotary_emb`)."""
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())  # (..., T, D/2)
    angles = positions.double()[..., None] * inv_freq.double()
    rotation = torch.polar(torch.full_like(angles, attention_factor), angles)
    if rotation.dim() == 3:  # (B, T, D/2): broadcast over heads
        rotation = rotation[:, None]
    return torch.view_as_real(z * rotation).flatten(-2)


@pytest.mark.parametrize("scaling", [None, RopeScaling("yarn", 8.0, 2048), RopeScaling("llama3", 32.0, 8192)])
def test_interleaved_layout_matches_complex_multiplication(scaling):
    B, H, T, D = 2, 3, 9, 16
    x = torch.randn(B, H, T, D)
    positions = torch.randint(0, 500, (B, T))
    rope = RotaryEmbedding(D, scaling=scaling, interleaved=True)
    want = complex_rope(x, positions, rope.inv_freq, rope.attention_factor)
    # 1e-4: ours rounds the angle m·θ (m < 500, θ ≤ 1) to float32, ≤ 500·2^-24 ≈ 3e-5 rad, which moves
    # a pair of norm ≤ ~4 by ≤ ~1e-4 at worst (1e-5 seen); the reference works in float64
    torch.testing.assert_close(rope(x, positions).double(), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(rope(x, positions[0]).double(), complex_rope(x, positions[0], rope.inv_freq,
                                                                            rope.attention_factor), atol=1e-4, rtol=0)


def test_layout_permutation():
    perm = half_to_interleaved_permutation(8)
    assert perm.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert interleaved_to_half_permutation(8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    inverse = interleaved_to_half_permutation(64)
    assert torch.equal(half_to_interleaved_permutation(64)[inverse], torch.arange(64))

    D = 16
    perm = half_to_interleaved_permutation(D)
    x = torch.randn(2, 3, 5, D)
    cos, sin = rope_angles(torch.arange(5), rope_inverse_frequencies(D))
    # rotating permuted channels interleaved == permuting the half-layout rotation (bitwise: same products)
    assert torch.equal(apply_rope(x[..., perm], cos, sin, interleaved=True), apply_rope(x, cos, sin)[..., perm])
    # without the permutation the layouts disagree, so the check above has teeth
    assert not torch.allclose(apply_rope(x, cos, sin, interleaved=True), apply_rope(x, cos, sin), atol=1e-3)


def test_permuting_projection_weights_converts_a_checkpoint_between_layouts():
    """W.view(H, D, C)[:, perm]: a half-layout q/k projection becomes an interleaved one, same scores."""
    C, H, D, T = 24, 3, 8, 6
    wq, wk = torch.randn(H * D, C), torch.randn(H * D, C)
    x = torch.randn(1, T, C)
    positions = torch.arange(T)

    def scores(wq, wk, interleaved):
        rope = RotaryEmbedding(D, interleaved=interleaved)
        q = rope((x @ wq.T).view(1, T, H, D).transpose(1, 2), positions)
        k = rope((x @ wk.T).view(1, T, H, D).transpose(1, 2), positions)
        return q @ k.transpose(-2, -1)

    perm = half_to_interleaved_permutation(D)
    convert = lambda w: w.view(H, D, C)[:, perm].reshape(H * D, C)
    # 1e-4 on scores of size ~|q||k| ~ 50: the same products summed in a different order
    torch.testing.assert_close(scores(convert(wq), convert(wk), True), scores(wq, wk, False), atol=1e-4, rtol=0)
    assert not torch.allclose(scores(wq, wk, True), scores(wq, wk, False), atol=1e-2)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("scaling", [None, RopeScaling("linear", 4.0), RopeScaling("yarn", 8.0, 2048),
                                     RopeScaling("llama3", 32.0, 8192)])
def test_scores_depend_only_on_relative_position(interleaved, scaling):
    """Random q, k, positions m, n and offsets o: q_m·k_n == q_{m+o}·k_{n+o} (RoFormer eq. 16)."""
    D = 32
    rope = RotaryEmbedding(D, interleaved=interleaved, scaling=scaling)
    g = torch.Generator().manual_seed(1)
    n_trials = 200
    q, k = torch.randn(n_trials, 1, 1, D, generator=g), torch.randn(n_trials, 1, 1, D, generator=g)
    m, n, o = (torch.randint(0, 256, (n_trials,), generator=g) for _ in range(3))

    def score(pos_q, pos_k):  # one (q, k) pair per trial, each at its own positions: (B=n_trials, T=1)
        return (rope(q, pos_q[:, None]) * rope(k, pos_k[:, None])).sum(-1).flatten()

    bound = q.norm(dim=-1).flatten() * k.norm(dim=-1).flatten() * rope.attention_factor**2
    # each float32 angle m·θ (m < 512, θ ≤ 1) is rounded by ≤ 512·2^-24 ≈ 3e-5 rad, and a pair's term
    # moves by at most |q_i||k_i| times that: 1e-4·|q||k| bounds the four roundings (3e-6 seen)
    assert ((score(m, n) - score(m + o, n + o)).abs() <= 1e-4 * bound).all()
    # and the score does depend on m - n: shifting only the key (by 8..255) moves it by far more
    moved = (score(m, n) - score(m, n + o.clamp(min=8))).abs() > 1e-2 * bound
    assert moved.float().mean() > 0.8


@pytest.mark.parametrize("interleaved", [False, True])
def test_default_rope_is_a_rotation(interleaved):
    x = torch.randn(2, 3, 7, 8)
    y = RotaryEmbedding(8, interleaved=interleaved)(x, torch.arange(7))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # norms preserved
    assert torch.equal(y[:, :, 0], x[:, :, 0])  # position 0 is the identity


def test_attention_factor_scales_cos_and_sin():
    scaling = RopeScaling("yarn", 16.0, 1024)
    rope = RotaryEmbedding(16, scaling=scaling)
    assert rope.attention_factor == pytest.approx(0.1 * math.log(16) + 1, rel=1e-12)
    x = torch.randn(1, 2, 5, 16)
    # still a rotation, times the factor: the norm grows by exactly that much
    torch.testing.assert_close(rope(x, torch.arange(5)).norm(dim=-1), rope.attention_factor * x.norm(dim=-1))


# ---------------------------------------------------------------- the cos/sin cache


@pytest.mark.parametrize("scaling", [None, RopeScaling("yarn", 8.0, 2048)])
def test_cache_returns_what_recomputing_gives(scaling):
    D = 16
    rope = RotaryEmbedding(D, scaling=scaling)
    inv_freq, factor = rope_frequencies(D, scaling=scaling)
    for length in (5, 100, 7, 300):  # grows, is reused for a shorter length, grows again
        cos, sin = rope.cos_sin(length)
        want_cos, want_sin = rope_angles(torch.arange(length), inv_freq)
        assert cos.shape == (length, D // 2)
        # bitwise: the table is the same float32 products m·θ_i, cos/sin, times the same factor
        assert torch.equal(cos, want_cos * factor if factor != 1 else want_cos)
        assert torch.equal(sin, want_sin * factor if factor != 1 else want_sin)
    big, _ = rope.cos_sin(300)
    assert rope.cos_sin(7)[0].data_ptr() == big.data_ptr()  # a view of the stored table, not a new one

    x = torch.randn(2, 3, 6, D)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [250, 7, 299, 3, 1000, 2]])  # 1000: past the table
    cos, sin = rope_angles(positions, inv_freq)
    assert torch.equal(rope(x, positions), apply_rope(x, cos * factor, sin * factor))

    half = rope.cos_sin(50, dtype=torch.bfloat16)
    assert half[0].dtype == torch.bfloat16 and torch.equal(half[0], rope.cos_sin(50)[0].to(torch.bfloat16))


def test_casting_the_module_keeps_float32_angles():
    x = torch.randn(1, 1, 3, 64)
    positions = torch.tensor([5, 4000, 30000])
    want = RotaryEmbedding(64, base=500000.0)(x, positions)
    rope = RotaryEmbedding(64, base=500000.0).to(torch.bfloat16)  # casts the inv_freq buffer...
    assert rope.inv_freq.dtype == torch.bfloat16
    assert torch.equal(rope(x, positions), want)  # ...but the tables are built from float32 frequencies
    # what that protects against: bf16 frequencies put radians of error into the angle at 30000
    cos, sin = rope_angles(positions, rope.inv_freq)
    assert not torch.allclose(apply_rope(x, cos, sin), want, atol=1e-2)


def test_dynamic_ntk_module_matches_hugging_face_past_the_trained_length():
    params, L, D = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, 64, 16
    rope = RotaryEmbedding(D, scaling=RopeScaling.from_dict(params, max_position_embeddings=L))
    x = torch.randn(1, 2, 1, D)
    hf = LlamaRotaryEmbedding(hf_config(params, D, L))  # stateful: keeps the largest length seen
    for t in (10, 64, 100, 300):  # lengths only grow, as in decoding, so HF's state and our rule agree
        positions = torch.arange(t)[None]
        cos, sin = hf(x, positions)
        q = torch.randn(1, 2, t, D)
        want, _ = apply_rotary_pos_emb(q, q, cos, sin)
        # 1e-5: identical float32 frequencies and angles (< 300 rad); only the rotation formula differs
        torch.testing.assert_close(rope(q, positions), want, atol=1e-5, rtol=0)
        plain = RotaryEmbedding(D)(q, positions)
        assert torch.equal(rope(q, positions), plain) == (t <= L)
        if t > L:  # the last position's query alone gets the frequencies of the same length
            torch.testing.assert_close(rope(q[:, :, -1:], positions[:, -1:]), want[:, :, -1:], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- configs and bad input


def test_from_dict_reads_real_configs():
    assert RopeScaling.from_dict(DEEPSEEK_V3) == RopeScaling(
        rope_type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
        mscale=1.0, mscale_all_dim=1.0,
    )
    assert RopeScaling.from_dict(LLAMA_3_2 | {"rope_theta": 500000.0}) == RopeScaling(
        "llama3", 32.0, 8192, low_freq_factor=1.0, high_freq_factor=4.0
    )
    # the dict as HF standardizes it inside a config (rope_theta moved in, "type" kept) reads the same
    standardized = hf_config(DEEPSEEK_V3 | {"rope_theta": 10000.0}, 64, 163840, deepseek=True).rope_parameters
    assert "rope_theta" in standardized
    assert RopeScaling.from_dict(standardized) == RopeScaling.from_dict(DEEPSEEK_V3)
    # None values take the defaults; no scaling at all is the default type
    assert RopeScaling.from_dict({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 10,
                                  "beta_fast": None, "attention_factor": None}).beta_fast == 32.0
    assert RopeScaling.from_dict({"rope_theta": 10000.0}) == RopeScaling()
    # what HF reads from config.max_position_embeddings: dynamic NTK's trained length, YaRN's missing factor
    dynamic = RopeScaling.from_dict({"type": "dynamic", "factor": 2.0}, max_position_embeddings=4096)
    assert dynamic.original_max_position_embeddings == 4096
    yarn = RopeScaling.from_dict({"rope_type": "yarn", "original_max_position_embeddings": 4096}, 163840)
    assert yarn.factor == 40.0
    with pytest.raises(ValueError, match="long_factor"):
        RopeScaling.from_dict({"rope_type": "yarn", "factor": 2.0, "long_factor": [1.0]})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RotaryEmbedding(7), "head_dim"),
        (lambda: rope_frequencies(7), "head_dim"),
        (lambda: half_to_interleaved_permutation(7), "head_dim"),
        (lambda: rope_frequencies(8, base=1.0), "base"),
        (lambda: RopeScaling("linear", 0.0), "factor"),
        (lambda: RopeScaling("yarn", -2.0, 4096), "factor"),
        (lambda: RopeScaling("ntk", float("inf")), "factor"),
        (lambda: RopeScaling("yarn", 4.0), "original_max_position_embeddings"),
        (lambda: RopeScaling("llama3", 8.0), "original_max_position_embeddings"),
        (lambda: RopeScaling("dynamic", 2.0), "original_max_position_embeddings"),
        (lambda: RopeScaling("dynamic", 2.0, 0), "original_max_position_embeddings"),
        (lambda: RopeScaling("yarn", 4.0, 4096, beta_fast=1.0, beta_slow=32.0), "beta_fast"),
        (lambda: RopeScaling("yarn", 4.0, 4096, attention_factor=0.0), "attention_factor"),
        (lambda: RopeScaling("llama3", 8.0, 8192, low_freq_factor=4.0, high_freq_factor=4.0), "high_freq_factor"),
        (lambda: RopeScaling.from_dict({"rope_type": "linear", "factor": 2.0, "factr": 1}), "factr"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_rope_type_lists_the_known_ones():
    for bad in (lambda: RopeScaling("longrope", 4.0), lambda: RopeScaling.from_dict({"type": "longrope"})):
        with pytest.raises(ValueError, match="longrope") as err:
            bad()
        assert all(name in str(err.value) for name in ROPE_TYPES)


def test_factor_below_one_warns_as_hugging_face_does():
    with pytest.warns(UserWarning, match="factor"):
        RopeScaling("linear", 0.5)
