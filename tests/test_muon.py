"""Muon equals torch.optim.Muon step for step; the Newton-Schulz iteration orthogonalizes; the parameter split."""

import pytest
import torch

from llm_scratch.models import GPT2, GPT2Config, Llama3, Llama3Config
from llm_scratch.training.optim import Muon, muon_and_adamw, newton_schulz


def _matrices(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in [(16, 8), (8, 24), (12, 12)]]


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_muon_equals_torch_muon_step_by_step(nesterov, adjust_lr):
    ours_params = [torch.nn.Parameter(w.clone()) for w in _matrices(0)]
    theirs_params = [torch.nn.Parameter(w.clone()) for w in _matrices(0)]
    ours = Muon(ours_params, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1, adjust_lr=adjust_lr)
    theirs = torch.optim.Muon(theirs_params, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1,
                              adjust_lr_fn=adjust_lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in ours_params]
        for p, q, grad in zip(ours_params, theirs_params, grads, strict=True):
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
        for p, q in zip(ours_params, theirs_params, strict=True):
            # the same operations in the same order and dtypes (bf16 Newton-Schulz, float32 elsewhere): equal
            torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_newton_schulz_orthogonalizes():
    """G = U diag(s) Vᵀ with singular values spread over two decades: five steps map them all into [0.5, 1.5]
    (Jordan's coefficients trade exact convergence for speed) and keep G's singular vectors."""
    g = torch.Generator().manual_seed(0)
    for A, B in [(32, 16), (16, 48)]:
        k = min(A, B)
        U, _ = torch.linalg.qr(torch.randn(A, k, generator=g))
        V, _ = torch.linalg.qr(torch.randn(B, k, generator=g))
        G = U @ torch.diag(torch.logspace(-2, 0, k)) @ V.T
        for dtype in (torch.float32, torch.bfloat16):
            ortho = newton_schulz(G, dtype=dtype).float()
            inner = U.T @ ortho @ V  # diagonal if ortho = U S' Vᵀ
            s = torch.diagonal(inner)
            assert 0.5 < s.min() and s.max() < 1.5, s
            off = inner - torch.diag(s)
            assert off.abs().max() < (1e-4 if dtype == torch.float32 else 5e-2)  # bf16 has 8 bits of mantissa
            assert (ortho - U @ U.T @ ortho @ V @ V.T).abs().max() < (1e-4 if dtype == torch.float32 else 5e-2)


def test_muon_refuses_non_matrices():
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))])
    with pytest.raises(ValueError, match="adjust_lr"):
        Muon([torch.nn.Parameter(torch.randn(4, 4))], adjust_lr="spectral")


@pytest.mark.parametrize("tied", [True, False])
def test_muon_and_adamw_split(tied):
    model = Llama3(Llama3Config(vocab_size=50, context_length=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_hidden=64, tie_embeddings=tied))
    muon, adamw = muon_and_adamw(model)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for p in muon.param_groups[0]["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert not in_muon & in_adamw and in_muon | in_adamw == set(names.values())  # each parameter once
    assert all(n.startswith("blocks.") and n.endswith("_proj.weight") for n in in_muon)
    assert len(in_muon) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert any("embed" in n or "wte" in n or "tok" in n for n in in_adamw)
    gpt = GPT2(GPT2Config(vocab_size=50, context_length=16, d_model=32, n_layers=1, n_heads=4))
    muon, adamw = muon_and_adamw(gpt)
    assert len(muon.param_groups[0]["params"]) == 6  # q, k, v, o, up, down; the tied head stays with AdamW


def test_muon_float32_newton_schulz_is_the_same_algorithm():
    """ns_dtype=float32 runs the same iteration at higher precision: one step lands within bf16's rounding of the
    default bf16 step, and equals a float32 newton_schulz by hand."""
    w = _matrices(0)[0]
    grad = _matrices(1)[0]
    steps = {}
    for dtype in (torch.bfloat16, torch.float32):
        p = torch.nn.Parameter(w.clone())
        p.grad = grad.clone()
        Muon([p], lr=0.1, momentum=0.0, nesterov=False, ns_dtype=dtype).step()
        steps[dtype] = p.detach()
    by_hand = w - 0.1 * Muon.lr_scale(w.shape, "original") * newton_schulz(grad, dtype=torch.float32)
    torch.testing.assert_close(steps[torch.float32], by_hand, atol=1e-6, rtol=0)
    assert (steps[torch.float32] - steps[torch.bfloat16]).abs().max() < 0.1 * 1.5 * 2 ** -7 * 2  # a few bf16 ulps
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([torch.nn.Parameter(torch.randn(4, 4))], ns_dtype=torch.int32)
