"""GRPO / GSPO (llm_scratch.training.grpo) against TRL 1.16's GRPOTrainer, and the objective's properties.

TRL itself runs here, offline: a tiny random GPT2LMHeadModel saved with save_pretrained (GRPOTrainer with beta > 0
builds its reference model from the policy's path, so the policy must have one), a character-level tokenizer built
in the test, a reward function in Python. No generation is needed for the loss: we call
`GRPOTrainer._compute_loss(model, inputs)` on a batch we build (random completions, ragged right-padded completion
masks, random advantages, old and reference log-probabilities = the model's own plus noise), and feed the same
model's log-probabilities to our `policy_loss`. The advantages are checked against TRL's own
`_generate_and_score_completions`, which generates a few tokens with the tiny model and scores them with rewards we
choose.

What TRL 1.16.0 does, and so what these tests rely on (read from trl/trainer/grpo_trainer.py and utils.py):
- `_compute_loss` (line ~3020) scores the completion tokens with a fused LM head patched onto the model
  (`add_fused_lm_head`, utils.py ~1548): hidden state t scores token t + 1, logits divided by `args.temperature`
  (1.0 here), padded labels give log-prob 0. Our side takes `logits[:, P - 1:-1]` of an unpatched copy of the same
  weights, log_softmax, gathers the completion ids: the same numbers from a different kernel.
- The KL term: TRL 1.16 defaults to `use_bias_correction_kl=True`, which multiplies the k3 estimate by the
  (differentiable) importance ratio (DeepSeek-V3.2). Our loss is DeepSeekMath's Eq. 3 / Eq. 4, plain k3, which is
  TRL with `use_bias_correction_kl=False`; `test_trl_default_kl_is_importance_weighted` shows the flag matters.
- Normalizers: "grpo", "bnpo" and "dr_grpo" divide by `current_gradient_accumulation_steps` in train mode (the
  HF training loop sets it to the number of micro-batches of the step; a trainer outside that loop has none, so we
  set it to 1 as the loop would with gradient_accumulation_steps=1). "dapo" divides by
  `num_items_in_batch / num_processes * current_gradient_accumulation_steps / steps_per_generation`; with one
  process, gradient_accumulation_steps=1 and steps_per_generation=1 (its default = gradient_accumulation_steps)
  and num_items_in_batch = completion_mask.sum() (what `_generate_and_score_completions` returns for one
  micro-batch, checked below), that is the token count of this batch: "dapo" equals "bnpo" here, as in our module,
  which has no gradient accumulation to rescale.
- "dr_grpo" divides by B * `args.max_completion_length`; we set max_completion_length = 9 > the batch's width 7, so
  a loss that used the width instead would fail.
- Advantages (line ~2763): `(r - group mean) / (nanstd + 1e-4)`; trl's nanstd is Bessel-corrected (checked below).

Tolerance: rtol 1e-5 (atol 1e-6) on the loss, both sides float32 through different kernels (TRL's tiled fused
head vs full logits). A wrong clip bound, a wrong normalizer, a missing KL, an off-by-one in the masks or a
per-token instead of per-sequence ratio changes the loss in its first or second digit
(`test_the_trl_comparison_is_not_vacuous`).
"""

import copy
import functools
import statistics

import pytest
import torch
import trl
from datasets import Dataset
from hf_tiny import char_tokenizer, tiny_gpt2
from transformers import GPT2LMHeadModel
from trl.trainer.utils import nanstd

from llm_scratch.training.grpo import LOSS_TYPES, group_advantages, policy_loss

CHARS = "abcdefghij"
VOCAB = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
G = 4  # group size (TRL's num_generations)
LENGTHS = [7, 3, 5, 1, 6, 7, 2, 4]  # completion lengths of the batch: B = 8 = two groups, ragged, width T = 7
B, T, P = len(LENGTHS), max(LENGTHS), 3  # P: prompt length
MAX_COMPLETION_LENGTH = 9  # dr_grpo's constant, deliberately larger than the width T
BETAS = (0.0, 0.04)
EPSILONS = ((0.2, None), (0.2, 0.28))  # symmetric, and DAPO's asymmetric clip-higher
LEVELS = ("token", "sequence")
CONFIGS = [(lt, lv, b, e) for lt in LOSS_TYPES for lv in LEVELS for b in BETAS for e in EPSILONS]


def _tokenizer():
    return char_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_trl")
    model = tiny_gpt2(0, len(VOCAB), n_embd=16, n_positions=32)
    model.save_pretrained(root / "policy")
    return root


@functools.cache
def _loaded(path):
    return GPT2LMHeadModel.from_pretrained(path)


def _policy(folder):
    """A fresh copy of the saved policy (its config keeps the path, from which TRL builds the reference model)."""
    return copy.deepcopy(_loaded(folder / "policy"))


def _trainer(folder, out, reward_func=None, batch_size=B, **config):
    args = trl.GRPOConfig(output_dir=str(folder / out), num_generations=G, per_device_train_batch_size=batch_size,
                          gradient_accumulation_steps=1, max_completion_length=MAX_COMPLETION_LENGTH,
                          temperature=1.0, report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0, **config)
    prompts = Dataset.from_list([{"prompt": "abc"}] * B)
    reward_func = reward_func or (lambda completions, **kwargs: [0.0] * len(completions))
    trainer = trl.GRPOTrainer(model=_policy(folder), reward_funcs=reward_func,
                              args=args, train_dataset=prompts, processing_class=_tokenizer())
    trainer.model.train()  # train mode, the normalizers of a training step
    trainer.current_gradient_accumulation_steps = 1  # what HF's training loop sets with gradient_accumulation_steps=1
    return trainer


def _completion_logps(model, batch):
    """(B, T) log-probabilities of the completion tokens: logits at position t score token t + 1."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, P - 1:-1] / 1.0  # temperature 1.0
    return logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)


def _mask(lengths=LENGTHS, width=T):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # (B, T) bool, right padding


@pytest.fixture(scope="module")
def batch(folder):
    """Our batch in TRL's format, old / reference log-probs = the model's + noise so that ratios clip both ways."""
    g = torch.Generator().manual_seed(1)
    mask = _mask()
    completion_ids = torch.randint(2, len(VOCAB), (B, T), generator=g).masked_fill(~mask, VOCAB["<pad>"])
    batch = dict(prompt_ids=torch.randint(2, len(VOCAB), (B, P), generator=g),
                 prompt_mask=torch.ones(B, P, dtype=torch.long), completion_ids=completion_ids,
                 completion_mask=mask.long())
    with torch.no_grad():
        logps = _completion_logps(_policy(folder), batch)
    # a per-sequence offset spreads the sequence-level (GSPO) ratios across and beyond [1 - 0.2, 1 + 0.28]
    offsets = torch.tensor([0.35, -0.3, 0.22, -0.1, 0.25, 0.4, -0.4, 0.05])[:, None]
    batch["old_per_token_logps"] = logps - offsets + 0.2 * torch.randn(B, T, generator=g)
    batch["ref_per_token_logps"] = logps + 0.5 * torch.randn(B, T, generator=g)
    batch["advantages"] = torch.tensor([1.2, -0.7, 0.9, 1.5, -1.1, 0.8, 0.6, -0.4])
    batch["num_items_in_batch"] = mask.sum()
    return batch


def _trl_run(folder, batch, loss_type, level, beta, eps, **extra):
    """TRL's loss on the batch and the gradients of all the policy's parameters."""
    epsilon, epsilon_high = eps
    trainer = _trainer(folder, "out", loss_type=loss_type, importance_sampling_level=level, beta=beta,
                       epsilon=epsilon, epsilon_high=epsilon_high, **{"use_bias_correction_kl": False, **extra})
    inputs = {k: v for k, v in batch.items() if beta != 0 or k != "ref_per_token_logps"}
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def _our_run(folder, batch, loss_type, level, beta, eps, advantages=None):
    model = _policy(folder)
    logps = _completion_logps(model, batch)
    loss = policy_loss(logps, batch["old_per_token_logps"], batch["advantages"] if advantages is None else advantages,
                       batch["completion_mask"].bool(), ref_logps=batch["ref_per_token_logps"], beta=beta,
                       epsilon_low=eps[0], epsilon_high=eps[1], loss_type=loss_type, importance_sampling_level=level,
                       max_completion_length=MAX_COMPLETION_LENGTH)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def results(folder, batch):
    out = {}
    for config in CONFIGS:
        trl_loss, trl_grads = _trl_run(folder, batch, *config)
        loss, grads = _our_run(folder, batch, *config)
        out[config] = dict(trl_loss=trl_loss, trl_grads=trl_grads, loss=loss, grads=grads)
    return out


def _assert_grads_close(grads, trl_grads):
    # Backpropagation through different kernels: the difference is a few 1e-7 of the largest entry.
    assert grads.keys() == trl_grads.keys()
    scale = max(g.abs().max().item() for g in trl_grads.values())
    assert scale > 1e-3
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-beta{c[2]}-eps{c[3][0]}-{c[3][1]}")
def test_policy_loss_and_gradient_equal_trl(results, config):
    r = results[config]
    torch.testing.assert_close(r["loss"], r["trl_loss"], rtol=1e-5, atol=1e-6)
    _assert_grads_close(r["grads"], r["trl_grads"])


def test_the_trl_comparison_is_not_vacuous(results, batch):
    """Every knob changes TRL's loss (but dapo = bnpo, see top)."""
    losses = {c: r["trl_loss"].item() for c, r in results.items()}

    def differs(a, b):
        return abs(losses[a] - losses[b]) > 1e-3 * max(abs(losses[a]), abs(losses[b]), 1e-3)

    for lt, lv, beta, eps in CONFIGS:
        c = (lt, lv, beta, eps)
        assert differs(c, (lt, lv, 0.04 if beta == 0 else 0.0, eps)), c  # the KL term counts
        assert differs(c, (lt, lv, beta, EPSILONS[1] if eps == EPSILONS[0] else EPSILONS[0])), c  # ε_high counts
        assert differs(c, (lt, "sequence" if lv == "token" else "token", beta, eps)), c  # GSPO is not GRPO
        for other in LOSS_TYPES:
            if other != lt and {lt, other} != {"bnpo", "dapo"}:
                assert differs(c, (other, lv, beta, eps)), (c, other)  # each aggregation is its own
            elif other != lt:
                assert losses[c] == pytest.approx(losses[(other, lv, beta, eps)], rel=1e-6)
    assert batch["completion_mask"].sum() < B * T  # ragged: padding present


def test_batch_clips_both_ways(folder, batch):
    """The fixture's ratios straddle both clip bounds at token and at sequence level, with advantages of both signs."""
    with torch.no_grad():
        logps = _completion_logps(_policy(folder), batch)
    mask = batch["completion_mask"].bool()
    log_ratio = logps - batch["old_per_token_logps"]
    token_ratio = log_ratio[mask].exp()
    seq_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1)).exp()
    for ratio in (token_ratio, seq_ratio):
        assert (ratio < 0.8).any() and ((ratio > 0.8) & (ratio < 1.2)).any() and (ratio > 1.28).any()
    assert ((seq_ratio > 1.2) & (seq_ratio < 1.28)).any() or ((token_ratio > 1.2) & (token_ratio < 1.28)).any()
    A = batch["advantages"]
    assert (A > 0).any() and (A < 0).any()


def test_per_token_advantages_equal_trl(folder, batch):
    """advantages (B, T), one per token (process supervision): TRL uses them as they are."""
    advantages = torch.randn(B, T, generator=torch.Generator().manual_seed(2))
    config = ("grpo", "token", 0.04, EPSILONS[1])
    trl_loss, trl_grads = _trl_run(folder, {**batch, "advantages": advantages}, *config)
    loss, grads = _our_run(folder, batch, *config, advantages=advantages)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads, trl_grads)


def test_trl_default_kl_is_importance_weighted(folder, batch):
    """TRL 1.16's default use_bias_correction_kl=True multiplies k3 by the importance ratio (DeepSeek-V3.2); we
    follow DeepSeekMath (plain k3), so off-policy with β > 0 the two differ, and equal with the flag off."""
    config = ("grpo", "token", 0.04, EPSILONS[0])
    batch = {**batch, "advantages": torch.zeros(B)}  # the KL term alone
    weighted, _ = _trl_run(folder, batch, *config, use_bias_correction_kl=True)
    plain, _ = _trl_run(folder, batch, *config)
    ours, _ = _our_run(folder, batch, *config)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    assert abs(weighted - plain) > 0.05 * plain


# --- properties, on small random tensors (no model) ---------------------------------------------------------------


def _random_inputs(seed, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    mask = _mask(lengths, max(lengths))
    shape = mask.shape
    logps = (-torch.rand(shape, generator=g) * 3).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(shape, generator=g)
    ref = logps.detach() + 0.5 * torch.randn(shape, generator=g)
    rewards = torch.randn(shape[0], generator=g)
    return logps, old, ref, rewards, mask


def _hand_advantages(rewards, group_size, scale="group", eps=1e-4):
    r = rewards.double().tolist()
    out = []
    for start in range(0, len(r), group_size):
        group = r[start:start + group_size]
        mean = statistics.mean(group)
        std = {"group": statistics.stdev(group), "batch": statistics.stdev(r), "none": None}[scale]
        out += [(x - mean) if std is None else (x - mean) / (std + eps) for x in group]
    return torch.tensor(out)


def _reinforce(logps, advantages, mask, loss_type, max_completion_length):
    """REINFORCE with the group-mean baseline, −A_i · Σ_t log π(o_i,t), aggregated as loss_type aggregates tokens:
    "grpo" length-normalizes each sequence's log-likelihood, −(1/B) Σ_i A_i · (1/|o_i|) Σ_t log π(o_i,t)."""
    seq_logp = (logps * mask).sum(-1)  # (B,)
    if loss_type == "grpo":
        return -(advantages * seq_logp / mask.sum(-1)).mean()
    if loss_type in ("bnpo", "dapo"):
        return -(advantages * seq_logp).sum() / mask.sum()
    return -(advantages * seq_logp).sum() / (logps.shape[0] * max_completion_length)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_gradient_is_reinforce_with_group_baseline(loss_type, level):
    """old = logps.detach(), β = 0: every ratio is 1 with gradient ∇log π (GSPO: ∇ of the sequence's mean log π),
    inside the clip range, so the gradient is REINFORCE's with A = group-standardized reward, for both levels."""
    logps, _, _, rewards, mask = _random_inputs(3)
    advantages = group_advantages(rewards, G)
    loss = policy_loss(logps, logps.detach(), advantages, mask, loss_type=loss_type, importance_sampling_level=level,
                       max_completion_length=MAX_COMPLETION_LENGTH)
    (grad,) = torch.autograd.grad(loss, logps)
    hand = _hand_advantages(rewards, G).float()
    (expected,) = torch.autograd.grad(_reinforce(logps, hand, mask, loss_type, MAX_COMPLETION_LENGTH), logps)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    assert (expected[mask] != 0).all() and (expected[~mask] == 0).all()
    # on-policy, the value is −(aggregated A): for "grpo" −mean(A), 0 up to rounding since A is centered per group
    if loss_type == "grpo":
        torch.testing.assert_close(loss, -advantages.mean(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kl_term_is_nonnegative_and_zero_when_policies_agree(loss_type, level):
    kwargs = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=MAX_COMPLETION_LENGTH)
    for seed in range(5):
        logps, old, ref, rewards, mask = _random_inputs(10 + seed)
        ref = logps.detach() + (seed + 1) * (ref - logps.detach())  # from close to far from the policy
        zero = torch.zeros(B)
        kl = policy_loss(logps, old, zero, mask, ref_logps=ref, beta=0.04, **kwargs)  # A = 0: the KL term alone
        assert kl > 0
        advantages = group_advantages(rewards, G)
        with_kl = policy_loss(logps, old, advantages, mask, ref_logps=ref, beta=0.04, **kwargs)
        without = policy_loss(logps, old, advantages, mask, **kwargs)
        torch.testing.assert_close(with_kl - without, kl, rtol=1e-5, atol=1e-7)  # added, with a + sign
    same = policy_loss(logps, old, zero, mask, ref_logps=logps.detach(), beta=0.04, **kwargs)
    assert same == 0
    (grad,) = torch.autograd.grad(same, logps)  # the KL's minimum: no pull at all
    assert (grad == 0).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_group_with_equal_rewards_contributes_nothing(loss_type, level, scale):
    logps, old, _, rewards, mask = _random_inputs(4)
    rewards[G:2 * G] = 1.0  # the second group: every completion equally good (e.g. all correct)
    advantages = group_advantages(rewards, G, scale=scale)
    assert (advantages[G:2 * G] == 0).all() and (advantages[:G] != 0).all()
    kwargs = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=MAX_COMPLETION_LENGTH)
    loss = policy_loss(logps, old, advantages, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, logps)
    assert (grad[G:2 * G] == 0).all() and (grad[:G][mask[:G]] != 0).any()
    moved = logps.detach().clone()
    moved[G:2 * G] -= 1.0  # whatever the policy does on that prompt, the loss is the same
    assert policy_loss(moved, old, advantages, mask, **kwargs) == loss


def _permute_within_rows(x, perm):
    return torch.gather(x, 1, perm)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gspo_invariant_to_token_order(loss_type, beta):
    """GSPO's ratio is the geometric mean of the token ratios over the real tokens: reordering a sequence's tokens
    (with their mask) changes neither the loss nor, up to the same reordering, its gradient."""
    logps, old, ref, rewards, mask = _random_inputs(5)
    advantages = group_advantages(rewards, G)
    g = torch.Generator().manual_seed(6)
    perm = torch.stack([torch.randperm(T, generator=g) for _ in range(B)])  # (B, T), one permutation per row
    assert not torch.equal(_permute_within_rows(mask, perm), mask)  # real tokens move among the padding
    kwargs = dict(beta=beta, loss_type=loss_type, importance_sampling_level="sequence",
                  max_completion_length=MAX_COMPLETION_LENGTH)
    loss = policy_loss(logps, old, advantages, mask, ref_logps=ref, **kwargs)
    (grad,) = torch.autograd.grad(loss, logps)
    permuted = logps.detach()[torch.arange(B)[:, None], perm].requires_grad_()
    loss_p = policy_loss(permuted, _permute_within_rows(old, perm), advantages, _permute_within_rows(mask, perm),
                         ref_logps=_permute_within_rows(ref, perm), **kwargs)
    (grad_p,) = torch.autograd.grad(loss_p, permuted)
    torch.testing.assert_close(loss_p, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_p, _permute_within_rows(grad, perm), rtol=1e-6, atol=1e-8)


def test_gspo_one_ratio_per_sequence_clipped_as_a_whole():
    """At β = 0, a GSPO sequence's tokens all get the same gradient (one ratio), and a sequence whose ratio is
    clipped (beyond the bound its advantage pushes toward) gets none; token-level ratios do neither."""
    logps, old, _, rewards, mask = _random_inputs(7)
    advantages = group_advantages(rewards, G)
    kwargs = dict(loss_type="bnpo", epsilon_low=0.1, epsilon_high=0.1)
    (grad,) = torch.autograd.grad(policy_loss(logps, old, advantages, mask, importance_sampling_level="sequence",
                                              **kwargs), logps)
    (grad_token,) = torch.autograd.grad(policy_loss(logps, old, advantages, mask, **kwargs), logps)
    seq_ratio = (((logps - old) * mask).sum(-1) / mask.sum(-1)).exp().detach()
    clipped = ((advantages > 0) & (seq_ratio > 1.1)) | ((advantages < 0) & (seq_ratio < 0.9))
    assert clipped.any() and (~clipped).any()
    for i in range(B):
        g = grad[i][mask[i]]
        if clipped[i]:
            assert (grad[i] == 0).all()
            assert (grad_token[i] != 0).any()  # some of its tokens' own ratios are inside the range
        else:
            torch.testing.assert_close(g, g[:1].expand_as(g), rtol=1e-6, atol=0)
            assert g.abs().min() > 0
    multi = [i for i in range(B) if mask[i].sum() > 1 and not clipped[i]]
    assert any(grad_token[i][mask[i]].unique().numel() > 1 for i in multi)  # token level: not one value per row


# --- group advantages ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_hand_computation(scale):
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.2, -3.0, 0.7, 0.1])
    torch.testing.assert_close(group_advantages(rewards, G, scale=scale), _hand_advantages(rewards, G, scale).float(),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(group_advantages(rewards, 3, scale=scale, eps=0.5),
                               _hand_advantages(rewards, 3, scale, eps=0.5).float(), rtol=1e-6, atol=1e-7)


def test_trl_nanstd_is_bessel_corrected():
    x = torch.randn(7, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(nanstd(x), x.std(correction=1))
    assert not torch.isclose(nanstd(x), x.std(correction=0))
    assert nanstd(x).item() == pytest.approx(statistics.stdev(x.double().tolist()), rel=1e-6)


REWARDS = [0.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.2, -3.0, 0.7, 0.1]  # three groups of G, one all equal


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trl(folder, scale):
    """TRL's own advantages: `_generate_and_score_completions` samples completions from the tiny model for three
    prompts (each repeated G times, as TRL's sampler lays them out) and scores them with our rewards."""
    def reward_func(completions, **kwargs):
        assert len(completions) == len(REWARDS)
        return list(REWARDS)

    trainer = _trainer(folder, "out_adv", reward_func=reward_func, scale_rewards=scale,
                       batch_size=len(REWARDS))
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([{"prompt": p} for p in ("abc", "de", "fgh") for _ in range(G)])
    rewards = torch.tensor(REWARDS)
    torch.testing.assert_close(group_advantages(rewards, G, scale=scale), out["advantages"], rtol=1e-6, atol=1e-7)
    assert out["num_items_in_batch"] == out["completion_mask"].sum()  # what the dapo comparison above assumes


def test_errors():
    logps, old, ref, rewards, mask = _random_inputs(9)
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        group_advantages(rewards, 3)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, G, scale="global")
    A = group_advantages(rewards, G)
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logps, old, A, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_loss(logps, old, A, mask, importance_sampling_level="batch")
    with pytest.raises(ValueError, match="loss_mask must be bool"):
        policy_loss(logps, old, A, mask.long())
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logps, old, A, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, old, A, mask, beta=0.04)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logps, old, A[:-1], mask)
