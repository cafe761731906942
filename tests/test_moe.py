"""Mixture of experts: batched dispatch equals the per-expert loop, routers and capacity on hand-made inputs,
balancing losses equal hand computations, loss-free balancing evens out a skewed router, DeepSeek-V3's router
equal to Hugging Face's, bad input."""

import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from llm_scratch.moe import (
    DeepSeekMoE,
    Experts,
    GroupLimitedRouter,
    Routing,
    SparseMoE,
    TopKRouter,
    apply_capacity,
    expert_load,
    router_z_loss,
    sequence_balance_loss,
    switch_balance_loss,
    update_bias,
)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_batched_dispatch_equals_the_loop_values_and_gradients(k):
    torch.manual_seed(k)
    experts = Experts(n_experts=5, d_model=12, hidden=7)
    x = torch.randn(30, 12, requires_grad=True)
    routing = TopKRouter(12, 5, k)(x)
    if k == 2:
        routing = apply_capacity(routing, 0.8)  # some weights zeroed: dropped assignments add nothing
        assert routing.drop_rate > 0
    outs, grads = [], []
    for naive in (True, False):
        y = experts(x, routing.indices, routing.weights.detach(), naive=naive)
        (gx,) = torch.autograd.grad((y * torch.linspace(-1, 1, 12)).sum(), x)
        outs.append(y)
        grads.append(gx)
    # the same products summed in a different order: float32 round-off only
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=0)
    manual = torch.stack([sum(routing.weights[t, j] * experts.expert(int(routing.indices[t, j]), x[t:t + 1])[0]
                              for j in range(k)) for t in range(30)])
    torch.testing.assert_close(outs[0], manual, atol=1e-6, rtol=0)


def test_topk_router_normalization():
    router = TopKRouter(4, n_experts=6, k=2)
    x = torch.randn(10, 4)
    r = router(x)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(10))
    switch = TopKRouter(4, n_experts=6, k=1, normalize=False)
    switch.weight.data = router.weight.data
    s = switch(x)
    torch.testing.assert_close(s.weights[:, 0], r.probs.max(-1).values)  # Switch's gate is the raw probability
    assert torch.equal(s.indices[:, 0], r.indices[:, 0])


def test_capacity_drops_in_gshard_order():
    # 6 tokens, 2 experts, k=2; capacity ceil(1.0 · 6 · 2 / 2) = 6 per expert
    first = torch.tensor([0, 0, 0, 0, 1, 1])
    indices = torch.stack([first, 1 - first], dim=1)
    r = Routing(indices, torch.full((6, 2), 0.5), torch.full((6, 2), 0.5), torch.zeros(6, 2))
    assert apply_capacity(r, 1.0).drop_rate == 0
    # capacity ceil(0.5 · 12 / 2) = 3: expert 0 takes the first choices of tokens 0, 1, 2 and drops token 3's
    # first choice and tokens 4, 5's second; expert 1 takes tokens 4, 5 (first) and token 0 (second), then is full
    kept = apply_capacity(r, 0.5)
    expected = torch.tensor([[1, 1], [1, 0], [1, 0], [0, 0], [1, 0], [1, 0]], dtype=torch.bool)
    assert torch.equal(kept.keep, expected)
    assert kept.drop_rate == pytest.approx(6 / 12)
    assert torch.equal(expert_load(kept.indices, 2, kept.keep), torch.tensor([3, 3]))
    assert torch.equal(kept.weights, 0.5 * expected)


def test_switch_loss_is_alpha_at_uniform_routing_and_matches_a_hand_computation():
    E, N = 4, 8
    uniform = Routing(torch.arange(N)[:, None] % E, torch.ones(N, 1), torch.full((N, E), 1 / E), torch.zeros(N, E))
    assert switch_balance_loss(uniform, alpha=0.01).item() == pytest.approx(0.01)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.1, 0.5, 0.2, 0.2], [0.4, 0.4, 0.1, 0.1]])
    skewed = Routing(torch.tensor([[0], [0], [1], [0]]), torch.ones(4, 1), probs, torch.zeros(4, 4))
    f = [3 / 4, 1 / 4, 0, 0]
    P = probs.mean(0).tolist()
    by_hand = 0.01 * 4 * sum(a * b for a, b in zip(f, P, strict=True))
    assert switch_balance_loss(skewed, alpha=0.01).item() == pytest.approx(by_hand)
    assert switch_balance_loss(skewed).item() > 0.01  # worse than uniform


def test_z_loss_and_sequence_loss_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    assert router_z_loss(logits).item() == pytest.approx((math.log(4) ** 2 + math.log(2) ** 2) / 2)
    # one sequence of T=2 tokens, E=2 experts, k=1: token 0 -> expert 0, token 1 -> expert 0
    s = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    r = Routing(torch.tensor([[0], [0]]), torch.ones(2, 1), s, torch.zeros(2, 2))
    f = [2 / (1 * 2) * 2, 0.0]  # E / (k T) · count
    P = [(0.8 + 0.5) / 2, (0.2 + 0.5) / 2]
    assert sequence_balance_loss(r, batch_size=1, alpha=0.1).item() == pytest.approx(0.1 * (f[0] * P[0] + f[1] * P[1]))
    two = Routing(r.indices.repeat(2, 1), r.weights.repeat(2, 1), s.repeat(2, 1), torch.zeros(4, 2))
    assert sequence_balance_loss(two, batch_size=2, alpha=0.1).item() == pytest.approx(
        sequence_balance_loss(r, batch_size=1, alpha=0.1).item())


def test_loss_free_bias_update_evens_out_a_skewed_router():
    torch.manual_seed(0)
    router = GroupLimitedRouter(16, n_experts=8, k=2, n_group=4, topk_group=2)
    x = torch.randn(512, 16)
    x[:, 0] += 2.0  # a feature every token shares ...
    with torch.no_grad():
        router.weight[0, 0] += 1.0  # ... that experts 0 and 1 respond to: they win most tokens
        router.weight[1, 0] += 0.8
    imbalance = []
    for _ in range(300):
        load = expert_load(router(x).indices, 8).float()
        imbalance.append((load.max() / load.mean()).item())
        update_bias(router.bias, load, gamma=0.003)
    assert imbalance[0] > 3.0 and max(imbalance[-20:]) < 1.5, (imbalance[0], imbalance[-20:])
    # the bias changes the choice but never the gate values, which stay the chosen sigmoid scores
    r = router(x)
    torch.testing.assert_close(r.weights, r.probs.gather(1, r.indices) / r.probs.gather(1, r.indices).sum(-1, True))


def test_group_limited_router_equals_hugging_face():
    torch.manual_seed(0)
    cfg = DeepseekV3Config(hidden_size=16, n_routed_experts=12, num_experts_per_tok=3, n_group=4, topk_group=2,
                           routed_scaling_factor=2.5, norm_topk_prob=True)
    theirs = DeepseekV3TopkRouter(cfg)
    ours = GroupLimitedRouter(16, 12, k=3, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    with torch.no_grad():
        theirs.weight.normal_(0, 0.5)
        theirs.e_score_correction_bias.normal_(0, 0.1)
        ours.weight.copy_(theirs.weight)
        ours.bias.copy_(theirs.e_score_correction_bias)
    x = torch.randn(64, 16)
    logits, weights, indices = theirs(x)
    r = ours(x)
    assert torch.equal(r.indices.sort(-1).values, indices.sort(-1).values)  # the same experts, as sets
    order_ours, order_theirs = r.indices.argsort(-1), indices.argsort(-1)
    torch.testing.assert_close(r.weights.gather(1, order_ours), weights.gather(1, order_theirs), atol=1e-6, rtol=0)
    torch.testing.assert_close(r.logits, logits, atol=1e-6, rtol=0)


def test_moe_layers_record_load_and_aux_losses():
    torch.manual_seed(0)
    layer = SparseMoE(8, 16, n_experts=4, k=2, balance_alpha=0.01, z_loss_coef=1e-3).train()
    x = torch.randn(2, 5, 8)
    layer(x)
    assert int(layer.load.sum()) == 2 * 5 * 2
    r = layer.last_routing
    torch.testing.assert_close(layer.aux_loss, switch_balance_loss(r, 0.01) + 1e-3 * router_z_loss(r.logits))
    ds = DeepSeekMoE(8, 4, n_routed=8, n_shared=2, k=2, n_group=2, topk_group=1, bias_update_speed=0.1).train()
    y = ds(x)
    expected = ds.experts(x.reshape(10, 8), ds.last_routing.indices, ds.last_routing.weights).view_as(x)
    torch.testing.assert_close(y, expected + ds.shared_experts(x))
    load = ds.load.clone()
    ds.update_bias()
    torch.testing.assert_close(ds.router.bias, 0.1 * torch.sign(load.float().mean() - load.float()))
    assert int(ds.load.sum()) == 0


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match=r"k \(experts per token\) must be an int in \[1, n_experts=4\], got 5"):
        TopKRouter(8, 4, k=5)
    with pytest.raises(ValueError, match=r"n_group must be a positive int dividing n_experts \(10\), got 4"):
        GroupLimitedRouter(8, 10, k=2, n_group=4)
    with pytest.raises(ValueError, match=r"topk_group must be an int in \[1, n_group=4\], got 5"):
        GroupLimitedRouter(8, 16, k=2, n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        apply_capacity(TopKRouter(8, 4, 1)(torch.randn(3, 8)), 0.0)
    with pytest.raises(ValueError, match="load must have shape"):
        update_bias(torch.zeros(4), torch.zeros(3))
