"""The two small helpers attention needs so far: RoPE and RMSNorm (their chapters extend them).

RoPE's half layout is checked against Hugging Face Llama in test_mha_gqa.py and the interleaved
one against DeepSeek-V3 in test_mla.py; here are its defining properties.
"""

import pytest
import torch
from torch import nn

from llm_scratch.norm import RMSNorm
from llm_scratch.position import RotaryEmbedding, apply_rope, rope_angles, rope_inverse_frequencies


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_scores_depend_only_on_relative_position(interleaved):
    rope = RotaryEmbedding(16, interleaved=interleaved)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum().item()

    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_is_a_rotation(interleaved):
    x = torch.randn(2, 3, 7, 8)
    y = RotaryEmbedding(8, interleaved=interleaved)(x, torch.arange(7))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # norms preserved
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is the identity


def test_rope_layouts_differ_by_a_channel_permutation():
    x = torch.randn(1, 2, 5, 8)
    cos, sin = rope_angles(torch.arange(5), rope_inverse_frequencies(8))
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # half layout channel order -> interleaved pairs
    torch.testing.assert_close(
        apply_rope(x[..., perm], cos, sin, interleaved=True), apply_rope(x, cos, sin)[..., perm]
    )


def test_rope_frequencies_follow_the_paper():
    # θ_i = 10000^(-2i/d)  (RoFormer eq. 15)
    inv = rope_inverse_frequencies(8)
    torch.testing.assert_close(inv, torch.tensor([10000 ** (-2 * i / 8) for i in range(4)]))
    with pytest.raises(ValueError, match="head_dim"):
        rope_inverse_frequencies(7)


def test_rmsnorm_matches_torch():
    ours, theirs = RMSNorm(24, eps=1e-6), nn.RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        theirs.weight.normal_()
        ours.weight.copy_(theirs.weight)
    x = torch.randn(3, 5, 24) * 3
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="last dimension"):
        ours(torch.randn(2, 23))
