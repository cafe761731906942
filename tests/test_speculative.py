"""Speculative decoding: the acceptance rule is exact (its output is distributed as the target), greedy speculative
decoding is greedy decoding of the target, and the acceptance step agrees with transformers' on the same random
numbers."""

import pytest
import torch
from transformers.generation.utils import _speculative_sampling

from llm_scratch.generation import generate, speculative_accept, speculative_generate
from llm_scratch.models.gpt2 import GPT2, GPT2Config


def _random_probs(rows, vocab, seed, sharpness=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(rows, vocab, generator=g, dtype=torch.float64), -1)


def test_one_round_emits_the_target_distribution_analytically():
    """P(first emitted token = x) = q(x)·min(1, p(x)/q(x)) + P(reject)·residual(x) = p(x), the identity the
    algorithm rests on (Leviathan et al. 2023, Appendix A.1), checked on random p, q; and the probability that the
    draft token is accepted is Σ min(p, q)."""
    for seed in range(5):
        p, q = _random_probs(1, 7, seed)[0], _random_probs(1, 7, 100 + seed)[0]
        accept = torch.minimum(q, p)  # q(x) · min(1, p/q)
        residual = (p - q).clamp(min=0)
        out = accept + (1 - accept.sum()) * residual / residual.sum()
        torch.testing.assert_close(out, p, atol=1e-12, rtol=0)
        torch.testing.assert_close(accept.sum(), torch.minimum(p, q).sum())


def test_monte_carlo_of_the_acceptance_step():
    """γ = 2 drafts drawn from q, accepted by speculative_accept: the first emitted token is distributed as p_0, and
    the share of first drafts accepted is Σ min(p_0, q_0) (30,000 rounds, fixed seed; the total variation expected
    from sampling alone is about 0.005 here)."""
    V, gamma, N = 5, 2, 30_000
    q, p = _random_probs(gamma, V, 1).float(), _random_probs(gamma + 1, V, 2).float()
    g = torch.Generator().manual_seed(0)
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(gamma)], dim=1)
    first, accepted = torch.zeros(V), 0
    for d in drafts:
        out = speculative_accept(d, q, p, generator=g)
        first[out[0]] += 1
        accepted += int(out[0] == d[0] and len(out) > 1)
    tv = 0.5 * (first / N - p[0]).abs().sum()
    assert tv < 0.01, f"total variation {tv:.4f}"
    expected = torch.minimum(p[0], q[0]).sum().item()
    assert abs(accepted / N - expected) < 4 * (expected * (1 - expected) / N) ** 0.5


def test_acceptance_step_equals_transformers_on_the_same_random_numbers():
    """transformers' _speculative_sampling draws γ uniforms (rand_like) then one multinomial; ours draws the same
    numbers in the same order, so from the same seed both emit the same tokens."""
    V, gamma = 11, 4
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        draft_logits = 2 * torch.randn(1, gamma, V, generator=g)
        target_logits = draft_logits + torch.randn(1, gamma + 1, V, generator=g)[:, :gamma].mul(0.8)
        target_logits = torch.cat([target_logits, torch.randn(1, 1, V, generator=g)], dim=1)
        drafts = torch.multinomial(draft_logits[0].softmax(-1), 1, generator=g).T  # (1, γ)
        candidate_ids = torch.cat([torch.tensor([[3, 1]]), drafts], dim=1)  # a prompt, then the drafts
        torch.manual_seed(1000 + seed)
        theirs, n_theirs = _speculative_sampling(candidate_ids, draft_logits, gamma, target_logits)
        torch.manual_seed(1000 + seed)
        ours = speculative_accept(drafts[0], draft_logits[0].softmax(-1), target_logits[0].softmax(-1))
        assert ours.tolist() == theirs[0].tolist() and len(ours) - 1 == int(n_theirs)


def test_acceptance_step_errors():
    q, p = _random_probs(3, 5, 0), _random_probs(4, 5, 1)
    drafts = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="target_probs"):
        speculative_accept(drafts, q, p[:3])
    with pytest.raises(ValueError, match="draft_probs"):
        speculative_accept(drafts, q[:2], p)
    with pytest.raises(ValueError, match="probabilities"):
        speculative_accept(drafts, q * 2, p)
    with pytest.raises(ValueError, match="draft_tokens"):
        speculative_accept(torch.tensor([]), q, p)


class _BigramCache:
    def __init__(self):
        self.length = 0

    def truncate(self, length):
        assert 0 <= length <= self.length
        self.length = length


class _Bigram(torch.nn.Module):
    """A toy LM whose next-token distribution depends on the previous token only, with a cache that only counts."""

    def __init__(self, logits):
        super().__init__()
        self.table = torch.nn.Parameter(logits, requires_grad=False)  # (V, V): row = previous token

    def init_caches(self, batch_size, max_len):
        return [_BigramCache()]

    def forward(self, ids, caches=None, last_only=False, padding_mask=None):
        if caches is not None:
            caches[0].length += ids.shape[1]
        logits = self.table[ids]  # (B, T, V)
        return logits[:, -1:] if last_only else logits


def test_full_loop_samples_the_targets_joint_distribution():
    """Monte Carlo of speculative_generate with toy bigram target and draft: the joint distribution of the first
    two new tokens matches the target's exactly computed one (total variation < 0.01, 30,000 runs, fixed seed)."""
    V = 3
    g = torch.Generator().manual_seed(0)
    target, draft = _Bigram(torch.randn(V, V, generator=g)), _Bigram(torch.randn(V, V, generator=g))
    prompt = torch.tensor([[1, 0]])
    temperature = 0.9
    p = (target.table / temperature).softmax(-1)
    expected = p[0][:, None] * p  # P(a, b) = p(a | 0) p(b | a)
    counts = torch.zeros(V, V)
    gen = torch.Generator().manual_seed(1)
    N = 30_000
    for _ in range(N):
        out, _ = speculative_generate(target, draft, prompt, max_new_tokens=2, gamma=1, temperature=temperature,
                                      generator=gen)
        counts[out[0, 2], out[0, 3]] += 1
    tv = 0.5 * (counts / N - expected).abs().sum()
    assert tv < 0.01, f"total variation {tv:.4f}"


def _gpt(seed, d_model=32, n_layers=2):
    torch.manual_seed(seed)
    return GPT2(GPT2Config(vocab_size=13, context_length=64, d_model=d_model, n_layers=n_layers, n_heads=4)).eval()


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_speculative_is_greedy_generate_of_the_target(gamma):
    target = _gpt(0, d_model=48, n_layers=3)
    for draft in (_gpt(1), target):  # a different model (some rejections) and the target itself (no rejection)
        for prompt in ([[4]], [[4, 7, 1, 2, 9]]):
            prompt = torch.tensor(prompt)
            expected = generate(target, prompt, max_new_tokens=20)
            out, stats = speculative_generate(target, draft, prompt, max_new_tokens=20, gamma=gamma)
            assert out.tolist() == expected.tolist()
            assert stats.new_tokens == 20 and stats.accepted <= stats.proposed
            if draft is target:
                assert stats.acceptance_rate == 1.0 and stats.token_acceptance == 1.0
            else:  # α counts only tested proposals: those up to and including each round's rejection
                rejections = sum(n < gamma for n in stats.accepted_per_round)
                assert stats.token_acceptance == stats.accepted / (stats.accepted + rejections)
                assert stats.token_acceptance >= stats.acceptance_rate


def test_sampled_speculative_runs_with_top_k_and_top_p_and_counts_calls():
    target, draft = _gpt(0), _gpt(1)
    g = torch.Generator().manual_seed(0)
    out, stats = speculative_generate(target, draft, torch.tensor([[4, 7]]), max_new_tokens=15, gamma=3,
                                      temperature=0.8, top_k=5, top_p=0.9, generator=g)
    assert out.shape == (1, 17)
    rounds = len(stats.accepted_per_round)
    assert stats.target_calls == rounds + 1 and stats.draft_calls == 3 * rounds + 1  # each with one prefill
    assert stats.new_tokens == 15 and 0 <= stats.acceptance_rate <= 1
    # every emitted token is inside the target's top-k (the transform is applied before the ratio)
    ids = out[0].tolist()
    with torch.no_grad():
        logits = target(out)[0]
    for t in range(1, len(ids) - 1):  # the token at t + 1 was emitted from the logits at t
        assert ids[t + 1] in logits[t].topk(5).indices.tolist()


def test_speculative_generate_errors():
    target, draft = _gpt(0), _gpt(1)
    with pytest.raises(ValueError, match="one sequence"):
        speculative_generate(target, draft, torch.tensor([[1, 2], [3, 4]]), 5)
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(target, draft, torch.tensor([[1, 2]]), 5, gamma=0)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, draft, torch.tensor([[1, 2]]), 5, temperature=-1.0)


def test_mtp_self_drafting_is_greedy_generate_of_the_main_model():
    """DeepSeek-V3's MTP modules draft for their own main model: the output equals the main model's greedy
    decoding, with random MTP weights (drafts mostly rejected) and with drafts that are always right."""
    from llm_scratch.generation import mtp_speculative_generate
    from llm_scratch.models import DeepSeekV3, DeepSeekV3Config

    torch.manual_seed(0)
    cfg = DeepSeekV3Config(vocab_size=17, context_length=64, d_model=32, n_layers=2, n_heads=4, q_lora_rank=16,
                           kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, ffn_hidden=48,
                           moe_hidden=16, first_k_dense=1, n_routed_experts=8, n_shared_experts=1,
                           n_experts_per_tok=2, n_group=4, topk_group=2, rope_scaling=None, n_mtp=2)
    model = DeepSeekV3(cfg).eval()
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    expected = generate(model, prompt, max_new_tokens=12)
    out, stats = mtp_speculative_generate(model, prompt, max_new_tokens=12)
    assert out.tolist() == expected.tolist()
    assert stats.new_tokens == 12 and stats.proposed == 2 * len(stats.accepted_per_round)
    # an oracle draft (the main model's own greedy continuation) is always accepted: 1 + D tokens per round
    truth = expected[0, 5:].tolist() + [0] * 8

    def oracle(h, ids, next_token):
        done = ids.shape[1] - 5 + 1  # tokens emitted once next_token is appended
        return torch.tensor([truth[done:done + 2]])

    model.draft = oracle
    out, stats = mtp_speculative_generate(model, prompt, max_new_tokens=12)
    assert out.tolist() == expected.tolist()
    assert stats.acceptance_rate == 1.0 and stats.accepted_per_round == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="MTP"):
        mtp_speculative_generate(_gpt(0), prompt, 3)
