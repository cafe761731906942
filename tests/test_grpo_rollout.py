"""GRPO rollouts: G completions per prompt in one cached batch, their mask, and their log-probabilities."""

import copy
import math

import pytest
import torch

from llm_scratch.generation import generate
from llm_scratch.models.gpt2 import GPT2, GPT2Config
from llm_scratch.training.grpo import per_token_logps, policy_loss, sample_completions

EOS = 3


def _model():
    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=11, context_length=40, d_model=32, n_layers=2, n_heads=4)).eval()


PROMPTS = [[5, 6, 7], [8], [9, 10, 4, 5, 6]]


def test_per_token_logps_equal_each_sequence_alone():
    model = _model()
    g = torch.Generator().manual_seed(1)
    completions = torch.randint(0, 11, (len(PROMPTS), 6), generator=g)
    P = max(len(p) for p in PROMPTS)
    ids = torch.zeros(len(PROMPTS), P, dtype=torch.long)
    mask = torch.zeros(len(PROMPTS), P, dtype=torch.bool)
    for b, p in enumerate(PROMPTS):  # left padding
        ids[b, P - len(p):], mask[b, P - len(p):] = torch.tensor(p), True
    with torch.no_grad():
        batched = per_token_logps(model, ids, mask, completions, temperature=0.7)
        for b, p in enumerate(PROMPTS):
            seq = torch.tensor(p + completions[b].tolist())[None]
            logits = model(seq)[0, len(p) - 1:-1] / 0.7  # position t scores token t + 1
            alone = torch.log_softmax(logits, -1).gather(-1, completions[b][:, None]).squeeze(-1)
            torch.testing.assert_close(batched[b], alone, atol=1e-5, rtol=0)


def test_greedy_rollouts_repeat_generate_and_cut_at_the_end_of_turn():
    model = _model()
    G = 3
    rollout = sample_completions(model, PROMPTS, group_size=G, max_new_tokens=8, eos_token_id=EOS, temperature=0.0)
    assert rollout.completion_ids.shape == (len(PROMPTS) * G, 8) and rollout.group_size == G
    for i, p in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([p]), 8, eos_token_id=EOS)[0, len(p):]
        for r in range(i * G, (i + 1) * G):  # group after group; greedy: every member the same
            n = rollout.completion_mask[r].sum()
            assert torch.equal(rollout.completion_ids[r, :len(alone)], alone)
            ended = (alone == EOS).nonzero()
            expected_n = int(ended[0]) + 1 if len(ended) else 8  # through the first end-of-turn token
            assert n == expected_n and rollout.completion_mask[r, :n].all()


def test_sampled_rollouts_mask_and_on_policy_ratio():
    model = _model()
    rollout = sample_completions(model, PROMPTS, group_size=4, max_new_tokens=10, eos_token_id=EOS, temperature=1.0,
                                 ref_model=copy.deepcopy(model), generator=torch.Generator().manual_seed(0))
    ids, mask = rollout.completion_ids, rollout.completion_mask
    for r in range(ids.shape[0]):
        row, m = ids[r].tolist(), mask[r].tolist()
        first = row.index(EOS) if EOS in row else len(row)
        assert m == [t <= first for t in range(len(row))]  # through the first eos, nothing after
        assert all(t == EOS for t in row[first:])  # finished rows keep emitting eos
    assert len({tuple(r) for r in ids.tolist()}) > 1  # sampling differs across the group
    torch.testing.assert_close(rollout.ref_logps, rollout.logps)  # the reference is the same model here
    # on-policy: recomputed log-probs equal the rollout's, every ratio is 1, so the loss is -mean(A)
    model.train()
    logps = per_token_logps(model, rollout.prompt_ids, rollout.prompt_mask, ids)
    torch.testing.assert_close(logps.detach(), rollout.logps, atol=1e-5, rtol=0)
    advantages = torch.randn(ids.shape[0])
    loss = policy_loss(logps, rollout.logps, advantages, mask)
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-4)


def test_rollout_errors():
    model = _model()
    with pytest.raises(ValueError, match="group_size"):
        sample_completions(model, PROMPTS, group_size=0, max_new_tokens=2, eos_token_id=EOS)
    with pytest.raises(ValueError, match="prompts"):
        sample_completions(model, [[1], []], group_size=2, max_new_tokens=2, eos_token_id=EOS)
    with pytest.raises(ValueError, match="temperature"):
        per_token_logps(model, torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool),
                        torch.ones(1, 2, dtype=torch.long), temperature=0.0)


class _DigitTokenizer:
    def decode(self, ids):
        return " ".join(str(t) for t in ids)


def test_grpo_trainer_raises_a_rewarded_behaviour():
    """Reward 1 when the completion starts with token 7 (about 1 in 11 at random): GRPO makes it the habit."""
    from llm_scratch.training.grpo import GRPOConfig, GRPOTrainer

    model = _model().train()
    prompts = [[4 + i % 5, 5, 6 + i % 3] for i in range(16)]

    def reward_fn(completions, indices):
        assert len(completions) == len(indices) == 4 * 6
        return [1.0 if c.split()[:1] == ["7"] else 0.0 for c in completions]

    cfg = GRPOConfig(steps=25, prompts_per_step=4, group_size=6, max_new_tokens=3, lr=1e-2, beta=0.04)
    trainer = GRPOTrainer(model, _DigitTokenizer(), prompts, reward_fn, cfg, eos_token_id=EOS, device="cpu")
    history = trainer.train()
    rewards = history.metrics["reward"]
    assert len(rewards) == 25 and set(history.metrics) >= {"reward", "kl", "clip_fraction", "completion_length"}
    assert sum(rewards[:5]) / 5 < 0.3 and sum(rewards[-5:]) / 5 > 0.8
    assert all(k >= 0 for k in history.metrics["kl"])


def test_grpo_config_errors():
    from llm_scratch.training.grpo import GRPOConfig

    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(steps=1, group_size=1)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(steps=1, loss_type="ppo")
    with pytest.raises(ValueError, match="steps"):
        GRPOConfig(steps=0)


def test_process_advantages_hand_worked_example():
    """A group of two: A has steps ending at tokens 1 and 3 with rewards 1 and 0, B one step ending at 2 with
    reward 1. Pooled step rewards [1, 0, 1]: mean 2/3, Bessel std sqrt(1/3); normalized, A's steps get
    (1 - 2/3)/sqrt(1/3) = 0.57735 and (0 - 2/3)/sqrt(1/3) = -1.15470, B's step 0.57735."""
    from llm_scratch.training.grpo import process_advantages

    adv = process_advantages([[1.0, 0.0], [1.0]], [[1, 3], [2]], group_size=2, length=5, eps=0.0)
    up, down = 1 / 3 / math.sqrt(1 / 3), -2 / 3 / math.sqrt(1 / 3)
    expected = torch.tensor([[up + down, up + down, down, down, 0.0],   # tokens 0-1: both steps; 2-3: the second
                             [up, up, up, 0.0, 0.0]])                  # after its last step: nothing
    torch.testing.assert_close(adv, expected)
    # a group whose steps all earn the same reward learns nothing
    flat = process_advantages([[1.0, 1.0], [1.0]], [[0, 2], [1]], group_size=2, length=3)
    assert torch.equal(flat, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="increase"):
        process_advantages([[1.0, 0.0]], [[2, 1]], group_size=1, length=4)
    with pytest.raises(ValueError, match="group_size"):
        process_advantages([[1.0]] * 3, [[0]] * 3, group_size=2, length=2)
    with pytest.raises(ValueError, match="step ends"):
        process_advantages([[1.0, 0.0]], [[1]], group_size=1, length=4)


def test_grpo_trainer_process_rewards_give_per_token_advantages():
    """With process_reward_fn the trainer's advantages are process_advantages of the step rewards it was given,
    and the outcome reward is still what is logged."""
    from llm_scratch.training.grpo import GRPOConfig, GRPOTrainer, process_advantages

    model = _model().train()
    prompts = [[4 + i % 5, 5, 6 + i % 3] for i in range(8)]
    seen = []

    def reward_fn(completions, indices):
        return [float(len(c) % 2) for c in completions]

    def process_reward_fn(token_ids, completions, indices):
        # one step per token: reward 1 for an even token id; ends at every position
        step_rewards = [[float(t % 2 == 0) for t in ids] for ids in token_ids]
        step_ends = [list(range(len(ids))) for ids in token_ids]
        seen.append((step_rewards, step_ends, token_ids, completions))
        return step_rewards, step_ends

    cfg = GRPOConfig(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=5, lr=1e-3, beta=0.04)
    trainer = GRPOTrainer(model, _DigitTokenizer(), prompts, reward_fn, cfg, eos_token_id=EOS, device="cpu",
                          process_reward_fn=process_reward_fn)
    trainer.train_step()
    step_rewards, step_ends, token_ids, completions = seen[-1]
    rollout = trainer.last_rollout
    # the token lists are the completions up to and including the end of turn
    assert [len(ids) for ids in token_ids] == rollout.completion_mask.sum(1).tolist()
    assert completions == trainer.decode(rollout.completion_ids, rollout.completion_mask)
    expected = process_advantages(step_rewards, step_ends, 4, rollout.completion_ids.shape[1])
    torch.testing.assert_close(trainer.last_advantages, expected, atol=0, rtol=0)
    assert trainer.last_advantages.shape == rollout.completion_ids.shape
    assert trainer.last_rewards.tolist() == [float(len(c) % 2) for c in completions]  # outcome, logged
    assert trainer.history.metrics == {}  # train_step alone does not append to the history


def test_grpo_trainer_reset_reference_copies_the_current_policy():
    from llm_scratch.training.grpo import GRPOConfig, GRPOTrainer

    model = _model().train()
    prompts = [[4, 5, 6], [7, 8, 9]]
    cfg = GRPOConfig(steps=3, prompts_per_step=2, group_size=3, max_new_tokens=3, lr=1e-2, beta=0.04)
    trainer = GRPOTrainer(model, _DigitTokenizer(), prompts, lambda c, i: [float(len(x)) for x in c], cfg,
                          eos_token_id=EOS, device="cpu")
    start = copy.deepcopy(trainer.reference.state_dict())
    trainer.train(2)
    ref, policy = trainer.reference.state_dict(), trainer.policy.state_dict()
    assert all(torch.equal(ref[k], start[k]) for k in ref)  # the reference stays frozen while training
    assert any(not torch.equal(policy[k], start[k]) for k in policy)
    trainer.reset_reference()
    ref = trainer.reference.state_dict()
    assert all(torch.equal(ref[k], policy[k]) for k in ref)
    assert trainer.reference is not trainer.policy and not any(p.requires_grad for p in trainer.reference.parameters())
    no_ref = GRPOTrainer(_model(), _DigitTokenizer(), prompts, lambda c, i: [0.0] * len(c),
                         GRPOConfig(steps=1, prompts_per_step=2, group_size=3, beta=0.0), eos_token_id=EOS,
                         device="cpu")
    with pytest.raises(ValueError, match="beta"):
        no_ref.reset_reference()


def test_clip_fraction_counts_the_terms_the_clip_holds_at_the_losss_level():
    from llm_scratch.training.grpo import GRPOConfig, GRPOTrainer

    old = torch.zeros(2, 3)
    new = torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]])  # token ratios e^0.5, 1, 1 and e^-0.5, 1, 1
    mask = torch.tensor([[True, True, True], [True, True, False]])
    trainer = GRPOTrainer(_model(), _DigitTokenizer(), [[4], [5]], lambda c, i: [0.0] * len(c),
                          GRPOConfig(steps=1, prompts_per_step=2, group_size=2, beta=0.0), eos_token_id=EOS,
                          device="cpu")
    # token level, ε = 0.2: the ratio e^0.5 with a positive advantage is clipped; e^-0.5 with a positive one is not
    assert trainer._clip_fraction(new, old, torch.tensor([1.0, 1.0]), mask) == pytest.approx(1 / 5)
    assert trainer._clip_fraction(new, old, torch.tensor([1.0, -1.0]), mask) == pytest.approx(2 / 5)
    assert trainer._clip_fraction(new, old, torch.tensor([-1.0, 1.0]), mask) == 0.0
    # sequence level (GSPO): ratios exp(mean) = e^(0.5/3) and e^(-0.5/2), each clipped as a whole
    trainer.cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, beta=0.0, importance_sampling_level="sequence",
                             epsilon_low=3e-4, epsilon_high=4e-4)
    assert trainer._clip_fraction(new, old, torch.tensor([1.0, -1.0]), mask) == pytest.approx(1.0)
    assert trainer._clip_fraction(new, old, torch.tensor([1.0, 1.0]), mask) == pytest.approx(3 / 5)
