"""QK-Clip (Kimi K2): the recorded max logits are the attention's real maxima; after qk_clip, recomputing on the
same batch gives exactly τ for every clipped head (float64), and heads outside clipped groups keep their weights
bit for bit."""

import pytest
import torch

from llm_scratch.attention.gqa import GroupedQueryAttention
from llm_scratch.attention.mla import MLAConfig, MultiHeadLatentAttention
from llm_scratch.models import GPT2, GPT2Config, Qwen3, Qwen3Config
from llm_scratch.position.rope import RotaryEmbedding
from llm_scratch.training.optim import qk_clip, record_max_logits


class _Wrap(torch.nn.Module):  # qk_clip walks a model; one attention layer is enough
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x, **kwargs):
        return self.attn(x, **kwargs)


def _max_logits(model, x, **kwargs):
    record_max_logits(model)
    with torch.no_grad():
        model(x, **kwargs)
    return model.attn.max_logits.clone()


def _gqa(n_heads, n_kv_heads, bias):
    torch.manual_seed(0)
    attn = GroupedQueryAttention(32, n_heads, n_kv_heads, head_dim=8, bias=bias, rope=RotaryEmbedding(8))
    with torch.no_grad():  # make some heads' logits large
        attn.q_proj.weight.mul_(torch.linspace(0.5, 6.0, n_heads * 8)[:, None])
    return _Wrap(attn).double()


def test_recorded_max_equals_the_explicit_scores():
    model = _gqa(4, 2, bias=True)
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    padding = torch.ones(3, 7, dtype=torch.bool)
    padding[1, 5:] = False
    recorded = _max_logits(model, x, padding_mask=padding)
    scores = model.attn.attention_scores(x)  # (B, H, T, T), no mask
    allowed = torch.tril(torch.ones(7, 7, dtype=torch.bool))[None, None] & padding[:, None, None, :]
    expected = scores.masked_fill(~allowed, float("-inf")).amax(dim=(0, 2, 3))
    torch.testing.assert_close(recorded, expected.float(), atol=1e-5, rtol=1e-6)
    # a second forward keeps the running max until qk_clip reads it
    with torch.no_grad():
        model(0.1 * x)
    torch.testing.assert_close(model.attn.max_logits, expected.float(), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("n_heads, n_kv_heads, bias", [(4, 4, True), (4, 2, False), (6, 1, False), (4, 2, True)])
def test_gqa_clipped_heads_peak_at_tau(n_heads, n_kv_heads, bias):
    model = _gqa(n_heads, n_kv_heads, bias)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    before = _max_logits(model, x).double()
    tau = before.median().item()  # about half of the heads above it
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    clipped = qk_clip(model, tau)
    heads = clipped.get("attn", [])
    assert heads == [h for h in range(n_heads) if before[h] > tau] and heads
    assert model.attn.max_logits is None  # consumed
    after = _max_logits(model, x).double()
    for h in range(n_heads):
        if h in heads:
            assert after[h].item() == pytest.approx(tau, rel=1e-6)
        else:
            assert after[h].item() == pytest.approx(before[h].item(), rel=1e-6)
    # query heads whose kv group has no clipped head are untouched, bit for bit, and so are their keys
    G, D = n_heads // n_kv_heads, 8
    for g in range(n_kv_heads):
        if any(h in heads for h in range(g * G, (g + 1) * G)):
            continue
        rows = slice(g * G * D, (g + 1) * G * D)
        assert torch.equal(model.attn.q_proj.weight[rows], weights["attn.q_proj.weight"][rows])
        key_rows = slice(g * D, (g + 1) * D)
        assert torch.equal(model.attn.k_proj.weight[key_rows], weights["attn.k_proj.weight"][key_rows])
    assert torch.equal(model.attn.v_proj.weight, weights["attn.v_proj.weight"])


@pytest.mark.parametrize("q_lora_rank", [None, 16])
@pytest.mark.parametrize("absorb", [False, True])
def test_mla_clipped_heads_peak_at_tau(q_lora_rank, absorb):
    torch.manual_seed(0)
    cfg = MLAConfig(d_model=32, n_heads=4, kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_nope_head_dim=8,
                    qk_rope_head_dim=4, v_head_dim=8)
    attn = MultiHeadLatentAttention(cfg)
    q_linear = attn.q_proj if q_lora_rank is None else attn.q_b_proj
    with torch.no_grad():
        q_linear.weight.mul_(torch.linspace(0.5, 8.0, 4 * 12)[:, None])
    model = _Wrap(attn).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    before = _max_logits(model, x, absorb=absorb).double()
    tau = before.median().item()
    q_name = f"attn.{'q_proj' if q_lora_rank is None else 'q_b_proj'}.weight"
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    heads = qk_clip(model, tau)["attn"]
    after = _max_logits(model, x, absorb=absorb).double()
    for h in range(4):
        expected = tau if h in heads else before[h].item()
        assert after[h].item() == pytest.approx(expected, rel=1e-6)
        if h not in heads:
            assert torch.equal(q_linear.weight[h * 12:(h + 1) * 12], weights[q_name][h * 12:(h + 1) * 12])
    # the shared rotary key (the last d_R rows of kv_a_proj_with_mqa) is untouched
    assert torch.equal(model.attn.kv_a_proj_with_mqa.weight, weights["attn.kv_a_proj_with_mqa.weight"])


def test_recording_off_changes_nothing_and_costs_nothing():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=20, context_length=16, d_model=32, n_layers=2, n_heads=4))
    ids = torch.randint(0, 20, (2, 10))
    plain = model(ids)
    assert all(m.max_logits is None for m in model.modules() if hasattr(m, "record_max_logits"))
    assert record_max_logits(model) == 2
    torch.testing.assert_close(model(ids), plain, atol=0, rtol=0)  # the forward pass itself is unchanged
    clipped = qk_clip(model, tau=1e-3)  # every head is above a tiny τ
    assert sorted(clipped) == ["blocks.0.attn", "blocks.1.attn"] and all(len(h) == 4 for h in clipped.values())


def test_errors():
    qwen = Qwen3(Qwen3Config(vocab_size=20, context_length=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                             ffn_hidden=64, head_dim=8))
    with pytest.raises(ValueError, match="QK-norm"):
        record_max_logits(qwen)
    gpt = GPT2(GPT2Config(vocab_size=20, context_length=16, d_model=32, n_layers=1, n_heads=4))
    with pytest.raises(ValueError, match="record_max_logits"):
        qk_clip(gpt)
    with pytest.raises(ValueError, match="tau"):
        qk_clip(gpt, tau=0.0)


@pytest.mark.parametrize("n_heads, n_kv_heads, bias", [(4, 4, False), (4, 2, True)])
def test_magnitude_qk_clip_bounds_every_logit(n_heads, n_kv_heads, bias):
    """The norm bound is ≥ the real max logit of every head; after magnitude_qk_clip no logit of the batch
    exceeds τ, the clipped heads' bounds are exactly τ, and it clips every head QK-Clip would (and maybe more)."""
    from llm_scratch.training.optim import logit_bounds, magnitude_qk_clip, record_qk_norms

    model = _gqa(n_heads, n_kv_heads, bias)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[0, 7:] = False
    record_qk_norms(model)
    true_max = _max_logits(model, x, padding_mask=padding).double()  # records the norms in the same pass
    bounds = logit_bounds(model.attn).double()
    assert (bounds >= true_max - 1e-9).all()
    tau = true_max.median().item()
    would_clip = [h for h in range(n_heads) if true_max[h] > tau]
    clipped = magnitude_qk_clip(model, tau)["attn"]
    assert set(would_clip) <= set(clipped)
    after = _max_logits(model, x, padding_mask=padding).double()
    assert (after <= tau * (1 + 1e-9)).all()
    new_bounds = logit_bounds(model.attn).double()
    for h in range(n_heads):
        expected = tau if h in clipped else bounds[h].item()
        assert new_bounds[h].item() == pytest.approx(expected, rel=1e-6)
    record_qk_norms(model, enabled=False)
    with pytest.raises(ValueError, match="not MLA"):
        mla = MLAConfig(d_model=32, n_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=8)
        record_qk_norms(_Wrap(MultiHeadLatentAttention(mla)))


def test_reset_attention_records_clears_both_records():
    from llm_scratch.training.optim import record_qk_norms, reset_attention_records

    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=20, context_length=16, d_model=32, n_layers=2, n_heads=4))
    record_max_logits(model)
    record_qk_norms(model)
    with torch.no_grad():
        model(torch.randint(0, 20, (2, 10)))
    layers = [m for m in model.modules() if isinstance(m, GroupedQueryAttention)]
    assert all(m.max_logits is not None and m.max_q_norm is not None for m in layers)
    reset_attention_records(model)
    assert all(m.max_logits is None and m.max_q_norm is None and m.max_k_norm is None for m in layers)
    assert all(m.record_max_logits and m.record_qk_norms for m in layers)  # still recording
