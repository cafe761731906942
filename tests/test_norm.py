"""LayerNorm, RMSNorm and DyT against PyTorch's layers, Hugging Face's Llama and Gemma 3 norms, the
paper's formula, and autograd's numerical gradients.

Tolerances: in float32 ours and PyTorch's kernels do the same arithmetic in different orders, so
outputs of size O(1) differ by a few float32 ulps (~1e-7 each); atol 1e-5 leaves two orders of
magnitude of room and still catches any wrong formula (a wrong eps or a missing mean subtraction
changes outputs by 1e-3 or more). Against Hugging Face, which runs the very same operations in the
same order, the results are bitwise equal, in float32 and in bfloat16.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from llm_scratch.norm import DyT, LayerNorm, RMSNorm

C = 48


def _randomize(*modules):
    """Give every listed module the same random parameters (gains away from 1, biases away from 0)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in modules[0].named_parameters():
            value = torch.randn(p.shape, generator=gen) * 0.5 + (1 if name == "weight" and p.dim() else 0)
            for m in modules:
                dict(m.named_parameters())[name].copy_(value)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(bias):
    ours, theirs = LayerNorm(C, eps=1e-5, bias=bias), nn.LayerNorm(C, eps=1e-5, bias=bias)
    _randomize(ours, theirs)
    x = torch.randn(4, 7, C) * 3 + 2  # a non-zero mean, so forgetting to subtract it would show
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
    # the paper's formula written out (biased variance, ε inside the root), in float64
    x64, w, b = x.double(), ours.weight.double(), (ours.bias.double() if bias else 0.0)
    mean, var = x64.mean(-1, keepdim=True), x64.var(-1, unbiased=False, keepdim=True)
    explicit = (x64 - mean) / torch.sqrt(var + 1e-5) * w + b
    torch.testing.assert_close(ours.double()(x64), explicit, atol=1e-12, rtol=0)
    ours.float()
    assert (ours.bias is None) == (not bias) and sum(p.numel() for p in ours.parameters()) == C * (1 + bias)
    # bf16 in, bf16 out, statistics in float32: equal to the float32 result rounded once
    xb = x.bfloat16()
    expected = F.layer_norm(xb.float(), (C,), theirs.weight, theirs.bias, 1e-5).bfloat16()
    assert ours(xb).dtype == torch.bfloat16
    torch.testing.assert_close(ours(xb), expected, atol=0, rtol=2**-7)  # within one bf16 rounding


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rmsnorm_matches_torch_with_explicit_eps(eps):
    ours, theirs = RMSNorm(C, eps=eps), nn.RMSNorm(C, eps=eps)
    _randomize(ours, theirs)
    x = torch.randn(3, 5, C) * 0.1  # small activations, so eps = 1e-2 changes the result visibly
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours(x), F.rms_norm(x, (C,), theirs.weight, eps=eps), atol=1e-5, rtol=0)
    other_eps = RMSNorm(C, eps=1e-4 if eps == 1e-2 else 1e-2)
    _randomize(other_eps)
    assert (other_eps(x) - ours(x)).abs().max() > 1e-3  # eps is really used


def test_rmsnorm_gemma_offset_equals_hf_bitwise():
    ours, theirs = RMSNorm(C, eps=1e-6, offset=True), Gemma3RMSNorm(C, eps=1e-6)
    assert torch.equal(ours.weight, torch.zeros(C))  # gain 1 + 0 at initialisation
    with torch.no_grad():
        theirs.weight.normal_(0, 0.3)
        ours.weight.copy_(theirs.weight)
    x = torch.randn(2, 9, C) * 4
    assert torch.equal(ours(x), theirs(x))
    # the offset is a reparametrization: gain w' = 1 + w computes the same function
    plain = RMSNorm(C, eps=1e-6)
    with torch.no_grad():
        plain.weight.copy_(1 + theirs.weight)
    torch.testing.assert_close(plain(x), ours(x), atol=1e-6, rtol=0)
    ours, theirs = ours.bfloat16(), theirs.bfloat16()  # .bfloat16() converts the module in place
    assert torch.equal(ours(x.bfloat16()), theirs(x.bfloat16()))


def test_rmsnorm_llama_rounding_equals_hf_bitwise():
    ours, theirs = RMSNorm(C, eps=1e-5, cast_before_weight=True), LlamaRMSNorm(C, eps=1e-5)
    _randomize(ours, theirs)
    x = torch.randn(4, 16, C) * 4
    assert torch.equal(ours(x), theirs(x))
    ours, theirs = ours.bfloat16(), theirs.bfloat16()
    xb = x.bfloat16()
    assert torch.equal(ours(xb), theirs(xb))
    # the Gemma-style rounding (multiply in float32, round once) differs from Llama's in bf16 ...
    gemma_style = RMSNorm(C, eps=1e-5).bfloat16()
    with torch.no_grad():
        gemma_style.weight.copy_(ours.weight)
    differs = gemma_style(xb) != ours(xb)
    assert differs.any()
    # ... by at most one bf16 rounding step
    torch.testing.assert_close(gemma_style(xb).float(), ours(xb).float(), atol=0, rtol=2**-7)


def test_dyt_is_the_papers_formula():
    dyt = DyT(C)
    assert dyt.alpha.shape == () and dyt.alpha.item() == 0.5  # the paper's default α0
    assert DyT(C, alpha_init=0.2).alpha.item() == pytest.approx(0.2)
    _randomize(dyt)
    x = torch.randn(3, 4, C) * 5
    expected = dyt.weight * torch.tanh(dyt.alpha * x) + dyt.bias
    torch.testing.assert_close(dyt(x), expected, atol=1e-6, rtol=0)
    assert dyt(x).abs().max() <= (dyt.weight.abs() + dyt.bias.abs()).max() + 1e-6  # bounded, unlike x
    no_bias = DyT(C, bias=False)
    assert no_bias.bias is None and sum(p.numel() for p in no_bias.parameters()) == C + 1


def test_gradients_match_finite_differences_in_float64():
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    for layer in (RMSNorm(8, eps=1e-6), RMSNorm(8, offset=True), DyT(8, alpha_init=0.7), LayerNorm(8)):
        layer = layer.double()
        _randomize(layer)
        params = tuple(layer.parameters())
        assert torch.autograd.gradcheck(lambda inp, *ps, m=layer: m(inp), (x, *params)), layer
        assert layer(x).dtype == torch.float64  # float64 is not silently computed in float32


def test_bad_input_names_the_layer_and_the_shape():
    for layer, name in ((LayerNorm(C), "LayerNorm"), (RMSNorm(C), "RMSNorm"), (DyT(C), "DyT")):
        with pytest.raises(ValueError, match=rf"{name} normalizes a last dimension of {C}, got x of shape \(2, 47\)"):
            layer(torch.randn(2, C - 1))
        with pytest.raises(ValueError, match=name):
            layer(torch.tensor(1.0))
    with pytest.raises(ValueError, match="dim must be a positive int"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        LayerNorm(8, eps=-1e-5)
    with pytest.raises(ValueError, match="alpha_init must be > 0"):
        DyT(8, alpha_init=0.0)
