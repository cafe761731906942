"""scaled_dot_product_attention vs PyTorch's, for every mask kind, both paths.

Tolerance: float32 inputs of unit scale; both implementations do the same O(T·D) sums in a
different order, so they agree to ~1e-6. We use atol=1e-5 (the project default).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from llm_scratch.attention import (
    build_attn_mask,
    causal_mask,
    scaled_dot_product_attention,
    sliding_window_mask,
)

ATOL = 1e-5


def qkv(B=2, H=4, K=4, Tq=7, Tk=7, D=8, Dv=None):
    Dv = D if Dv is None else Dv
    return torch.randn(B, H, Tq, D), torch.randn(B, K, Tk, D), torch.randn(B, K, Tk, Dv)


def torch_ref(q, k, v, mask=None, scale=None, enable_gqa=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


def explicit(q, k, v, mask=None, scale=None):
    """The equation written out once more in the test, independent of the module."""
    s = (q @ k.transpose(-2, -1)) * (scale or 1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("naive", [True, False])
def test_no_mask_matches_torch_and_the_equation(naive):
    q, k, v = qkv(Dv=5)
    ours = scaled_dot_product_attention(q, k, v, naive=naive)
    torch.testing.assert_close(ours, torch_ref(q, k, v), atol=ATOL, rtol=0)
    torch.testing.assert_close(ours, explicit(q, k, v), atol=ATOL, rtol=0)


@pytest.mark.parametrize("naive", [True, False])
def test_causal_square_matches_torch_is_causal(naive):
    q, k, v = qkv()
    ours = scaled_dot_product_attention(q, k, v, is_causal=True, naive=naive)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=ATOL, rtol=0)


def test_causal_mask_is_lower_right_aligned():
    m = causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    # torch's is_causal is upper-left: differs exactly when Tq != Tk
    upper_left = torch.ones(2, 5, dtype=torch.bool).tril()
    assert not torch.equal(m, upper_left)
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("naive", [True, False])
def test_causal_rectangular_matches_torch_with_explicit_mask(naive):
    q, k, v = qkv(Tq=3, Tk=9)
    ours = scaled_dot_product_attention(q, k, v, is_causal=True, naive=naive)
    expected = torch_ref(q, k, v, mask=torch.ones(3, 9, dtype=torch.bool).tril(diagonal=6))
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    # decoding one query after the cache sees every key
    q1 = q[:, :, -1:]
    torch.testing.assert_close(
        scaled_dot_product_attention(q1, k, v, is_causal=True, naive=naive), torch_ref(q1, k, v), atol=ATOL, rtol=0
    )


def test_sliding_window_mask_counts_keys():
    m = sliding_window_mask(6, 6, window=3)
    # every query sees min(i + 1, 3) keys, the newest ones, itself included
    assert m.sum(-1).tolist() == [1, 2, 3, 3, 3, 3]
    assert m[5].tolist() == [False, False, False, True, True, True]
    assert torch.equal(sliding_window_mask(5, 5, window=5), causal_mask(5, 5))
    assert torch.equal(sliding_window_mask(2, 6, window=2)[1], torch.tensor([False] * 4 + [True] * 2))


@pytest.mark.parametrize("naive", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(8, 8), (3, 8)])
def test_sliding_window_matches_torch_with_explicit_mask(naive, Tq, Tk):
    q, k, v = qkv(Tq=Tq, Tk=Tk)
    w = 3
    i = torch.arange(Tk - Tq, Tk)[:, None]
    j = torch.arange(Tk)[None]
    expected = torch_ref(q, k, v, mask=(j <= i) & (j > i - w))
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, window=w, naive=naive), expected, atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("naive", [True, False])
def test_padding_and_causal_combined(naive):
    q, k, v = qkv(B=3, Tq=6, Tk=6)
    padding = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    ours = scaled_dot_product_attention(q, k, v, is_causal=True, padding_mask=padding, naive=naive)
    mask = torch.ones(6, 6, dtype=torch.bool).tril() & padding[:, None, None, :]
    torch.testing.assert_close(ours, torch_ref(q, k, v, mask=mask), atol=ATOL, rtol=0)
    # Left-padded queries 0 and 1 of row 2 see no real key: their output is 0, not NaN.
    assert torch.equal(ours[2, :, :2], torch.zeros_like(ours[2, :, :2]))
    assert not ours.isnan().any()


@pytest.mark.parametrize("naive", [True, False])
def test_user_bool_and_float_masks(naive):
    q, k, v = qkv(Tq=5, Tk=5)
    bool_mask = torch.rand(2, 1, 5, 5) > 0.3
    bool_mask[..., 0] = True  # every query keeps one key
    got = scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, is_causal=True, naive=naive)
    want = torch_ref(q, k, v, mask=bool_mask & torch.ones(5, 5, dtype=torch.bool).tril())
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    bias = torch.randn(4, 5, 5)  # an additive bias per head (ALiBi-like)
    got = scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True, naive=naive)
    want = torch_ref(q, k, v, mask=bias.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf")))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("naive", [True, False])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_grouped_query_matches_torch_enable_gqa(naive, K):
    q, k, v = qkv(H=8, K=K, Tq=6, Tk=6)
    got = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, naive=naive)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_custom_scale():
    q, k, v = qkv()
    for naive in (True, False):
        got = scaled_dot_product_attention(q, k, v, scale=0.05, naive=naive)
        torch.testing.assert_close(got, torch_ref(q, k, v, scale=0.05), atol=ATOL, rtol=0)


def test_dropout_zeroes_weights_in_naive_path():
    torch.manual_seed(1)
    q, k = torch.zeros(1, 1, 256, 4), torch.zeros(1, 1, 256, 4)
    v = torch.ones(1, 1, 256, 1)
    # uniform weights 1/256 each; with dropout p the output is (kept fraction)/(1-p), mean 1
    out = scaled_dot_product_attention(q, k, v, dropout_p=0.5, naive=True)
    assert abs(out.mean().item() - 1.0) < 0.05
    assert out.std() > 0.01  # it really dropped something
    without = scaled_dot_product_attention(q, k, v, naive=True)
    torch.testing.assert_close(without, torch.ones_like(without))


def test_build_attn_mask_none_when_nothing_masked():
    assert build_attn_mask(4, 4) is None


def test_build_attn_mask_follows_the_padding_mask_device():
    padding = torch.ones(2, 4, dtype=torch.bool, device="meta")
    assert build_attn_mask(4, 4, is_causal=True, padding_mask=padding).device.type == "meta"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=torch.randn(2, 4, 7, 6)), "head_dim"),
        (dict(v=torch.randn(2, 4, 5, 8)), "k and v"),
        (dict(k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 8)), "enable_gqa"),
        (dict(k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 8), enable_gqa=True), "divide"),
        (dict(attn_mask=torch.ones(7, 6, dtype=torch.bool)), "attn_mask"),
        (dict(attn_mask=torch.ones(3, 4, 7, 7, dtype=torch.bool)), "attn_mask"),
        (dict(attn_mask=torch.ones(7, 7, dtype=torch.int64)), "attn_mask"),
        (dict(padding_mask=torch.ones(2, 6, dtype=torch.bool)), "padding_mask"),
        (dict(padding_mask=torch.ones(2, 7)), "padding_mask"),
        (dict(window=0), "window"),
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(q=torch.randn(4, 7, 8)), "shape"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v) | kwargs
    with pytest.raises(ValueError, match=match):
        scaled_dot_product_attention(**args)


def test_more_queries_than_keys_is_an_error():
    with pytest.raises(ValueError, match="q_len"):
        causal_mask(5, 3)
