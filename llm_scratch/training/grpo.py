"""Group Relative Policy Optimization (GRPO) and Group Sequence Policy Optimization (GSPO): the objective.

    advantages = group_advantages(rewards, group_size=8)                 # (B,) one per completion
    loss = policy_loss(logps, old_logps, advantages, completion_mask, ref_logps=ref_logps, beta=0.04)

GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, section 4.1) samples G completions per prompt and uses
the group as its own baseline: each completion's advantage is its reward standardized within its group, so no
value network is needed. The policy then maximizes PPO's clipped surrogate (Schulman et al. 2017) per token,

    ratio_t = π_θ(o_t | q, o_<t) / π_old(o_t | q, o_<t)
    J = mean_t min(ratio_t · A, clip(ratio_t, 1 − ε_low, 1 + ε_high) · A) − β · KL_t        (Eq. 3)

with the KL to a frozen reference estimated per token by Schulman's k3, exp(ref − logp) − (ref − logp) − 1
(Eq. 4), unbiased and always >= 0. Variants differ in how token terms are averaged ("grpo": per sequence, then
over sequences; "bnpo"/"dapo": over all tokens of the batch, DAPO, Yu et al. 2025, arXiv:2503.14476, which also
clips asymmetrically with ε_high > ε_low; "dr_grpo": a constant normalizer, Liu et al. 2025, arXiv:2503.20783) and
in what the ratio is: GSPO (Zheng et al. 2025, arXiv:2507.18071) uses one ratio per sequence, the geometric mean
of its token ratios exp(mean_t log ratio_t), clipped as a whole (the paper's objective is that ratio with the
"grpo" aggregation, one term per sequence; the other aggregations weight sequences by their length, as TRL does).

Checked against TRL 1.16's GRPOTrainer._compute_loss (tests/test_grpo.py). One default differs: TRL multiplies
the k3 term by the importance ratio (use_bias_correction_kl=True, from DeepSeek-V3.2); this module follows
DeepSeekMath's Eq. 3-4, which is TRL with that flag off.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from llm_scratch.device import get_device
from llm_scratch.generation import generate
from llm_scratch.training.engine import ResumableBatches

__all__ = ["LOSS_TYPES", "GRPOConfig", "GRPOTrainer", "Rollout", "group_advantages", "per_token_logps", "policy_loss",
           "process_advantages", "sample_completions"]

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards (B,), laid out group after group (G = group_size completions of one prompt each) -> advantages (B,).

    A = (r − mean of its group) / (std + eps), with the unbiased (Bessel) standard deviation of the group
    (scale="group", as TRL computes it), of the whole batch (scale="batch"), or no division (scale="none", Dr. GRPO).
    A group whose rewards are all equal gets advantage 0: it says nothing about which completion is better.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (B,), got {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (a group needs a baseline), got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"the batch of {rewards.numel()} rewards is not a multiple of group_size={group_size}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    groups = rewards.float().view(-1, group_size)  # (B/G, G)
    centered = (groups - groups.mean(dim=1, keepdim=True)).flatten()
    if scale == "none":
        return centered
    std = groups.std(dim=1).repeat_interleave(group_size) if scale == "group" else rewards.float().std()
    return centered / (std + eps)



def process_advantages(step_rewards: list[list[float]], step_ends: list[list[int]], group_size: int, length: int,
                       eps: float = 1e-4) -> torch.Tensor:
    """Per-token advantages from per-step rewards (process supervision, DeepSeekMath section 4.1.3) -> (B, length).

    Completion i of a group is split into steps; step j ends at token step_ends[i][j] and earned step_rewards[i][j]
    (from a process reward model, or a checker of each intermediate result). Every step reward of the group is
    normalized by the mean and the (Bessel) standard deviation of *all* the group's step rewards, and a token's
    advantage is the sum of the normalized rewards of the steps that end at or after it: its own step and every
    later one. Tokens after a completion's last step get 0. Pass the result to policy_loss as (B, T) advantages.
    """
    B = len(step_rewards)
    if len(step_ends) != B:
        raise ValueError(f"step_rewards has {B} completions, step_ends {len(step_ends)}")
    if not isinstance(group_size, int) or group_size < 1 or B % group_size:
        raise ValueError(f"the batch of {B} completions is not a multiple of group_size={group_size!r}")
    for i, (rewards, ends) in enumerate(zip(step_rewards, step_ends, strict=True)):
        if len(rewards) != len(ends):
            raise ValueError(f"completion {i} has {len(rewards)} step rewards but {len(ends)} step ends")
        if any(not 0 <= e < length for e in ends) or any(a >= b for a, b in zip(ends, ends[1:], strict=False)):
            raise ValueError(f"completion {i}: step ends must increase strictly within [0, {length}), got {ends}")
    advantages = torch.zeros(B, length)
    for g in range(0, B, group_size):
        pooled = torch.tensor([r for rewards in step_rewards[g:g + group_size] for r in rewards], dtype=torch.float32)
        mean = pooled.mean() if len(pooled) else torch.tensor(0.0)
        std = pooled.std() if len(pooled) > 1 else torch.tensor(0.0)
        for i in range(g, g + group_size):
            for reward, end in zip(step_rewards[i], step_ends[i], strict=True):
                normalized = (reward - mean) / (std + eps)
                advantages[i, :end + 1] += normalized  # every token up to this step's end sees this step's reward
    return advantages

def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor,
                ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
                epsilon_high: float | None = None, loss_type: str = "grpo", importance_sampling_level: str = "token",
                max_completion_length: int | None = None) -> torch.Tensor:
    """The clipped policy-gradient loss (to minimize) of a batch of completions -> scalar.

    logps, old_logps, ref_logps: (B, T) per-token log-probabilities of the completion tokens under the policy being
        trained, the policy that sampled them, and the frozen reference. loss_mask (B, T) bool marks real
        completion tokens. advantages: (B,) one per completion, or (B, T) one per token (process supervision).
    epsilon_high defaults to epsilon_low (symmetric clipping); loss_type picks the aggregation (module docstring);
    "dr_grpo" divides the summed token terms by B · max_completion_length. importance_sampling_level "sequence"
    is GSPO: one ratio per sequence, exp(mean over its tokens of the log-ratio), clipped as a whole.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if logps.dim() != 2 or old_logps.shape != logps.shape or loss_mask.shape != logps.shape:
        raise ValueError(f"logps, old_logps and loss_mask must share one (B, T) shape, got {tuple(logps.shape)}, "
                         f"{tuple(old_logps.shape)}, {tuple(loss_mask.shape)}")
    if loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be bool, got {loss_mask.dtype}")
    if advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(f"advantages must have shape (B,) or (B, T) = {tuple(logps.shape)}, got "
                         f"{tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and (ref_logps is None or ref_logps.shape != logps.shape):
        raise ValueError("beta > 0 needs ref_logps of the same shape as logps")
    if epsilon_low < 0 or (epsilon_high is not None and epsilon_high < 0):
        raise ValueError(f"epsilon_low and epsilon_high must be >= 0, got {epsilon_low}, {epsilon_high}")
    if loss_type == "dr_grpo" and (not isinstance(max_completion_length, int) or max_completion_length < 1):
        raise ValueError(f"loss_type 'dr_grpo' needs max_completion_length (a positive int), "
                         f"got {max_completion_length!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = loss_mask.to(logps.dtype)
    A = advantages if advantages.dim() == 2 else advantages[:, None]  # (B, T) or (B, 1)

    log_ratio = logps - old_logps  # (B, T)
    if importance_sampling_level == "sequence":  # GSPO: the length-normalized sequence ratio, (B, 1)
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * A, clipped * A)  # PPO's pessimistic bound, negated to a loss; (B, T) or (B, 1)
    if beta > 0:
        delta = ref_logps - logps
        per_token = per_token + beta * (delta.exp() - delta - 1)  # k3 estimate of KL(π_θ ‖ π_ref), >= 0
    per_token = per_token.expand_as(mask)

    if loss_type == "grpo":  # each sequence's mean over its tokens, then the mean over sequences
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):  # one mean over every completion token of the batch
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token * mask).sum() / (logps.shape[0] * max_completion_length)  # dr_grpo


# --- rollouts -------------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """G sampled completions per prompt, group after group (rows g·G ... g·G + G − 1 answer prompt g).

    prompt_ids, prompt_mask: (B, P) left-padded prompts, True on real tokens. completion_ids (B, T): the sampled
    tokens; completion_mask (B, T) bool: True up to and including the first end-of-turn token (what the policy
    actually wrote), False after it. logps (B, T): the sampling policy's log-probabilities of those tokens
    (`old_logps` of the policy loss); ref_logps likewise for the reference model, when one was given.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logps: torch.Tensor
    group_size: int
    ref_logps: torch.Tensor | None = field(default=None)


def per_token_logps(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """log π(completion token t | prompt, completion <t) for every completion position -> (B, T).

    One forward pass over [left-padded prompt | completion]; the logits at position P − 1 + t score completion
    token t (for models with hidden_states() and logits(), the LM head runs at those T positions only). Logits are
    divided by the sampling temperature first (as TRL does), so that on-policy ratios are 1. Positions after a
    completion's end are computed too (they see only earlier tokens); the mask drops them.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities, got {temperature}")
    P, T = prompt_ids.shape[1], completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    padding_mask = torch.cat([prompt_mask, torch.ones_like(completion_ids, dtype=torch.bool)], dim=1)
    if hasattr(model, "hidden_states") and hasattr(model, "logits"):  # the head at the T scoring positions only
        h = model.hidden_states(input_ids, padding_mask=padding_mask)[:, P - 1:P - 1 + T]
        logits = model.logits(h)
    else:
        logits = model(input_ids, padding_mask=padding_mask)[:, P - 1:P - 1 + T]
    logits = logits.float() / temperature  # (B, T, V)
    return logits.gather(-1, completion_ids[..., None]).squeeze(-1) - logits.logsumexp(-1)


@torch.no_grad()
def sample_completions(model, prompts: list[list[int]], group_size: int, max_new_tokens: int, eos_token_id: int,
                       temperature: float = 1.0, top_p: float | None = None, ref_model=None,
                       generator: torch.Generator | None = None) -> Rollout:
    """Sample group_size completions of every prompt in one batch with the KV-cache generator.

    prompts: token ids of each prompt (e.g. the chat template with an open assistant turn). Each prompt is
    repeated group_size times, the batch is left-padded and decoded together (`generate`), and each completion
    is cut after its first eos_token_id. The log-probabilities are then computed by a forward pass of the
    sampling policy (and of ref_model, if given) over prompt + completion, exactly as the policy loss will.
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    device = next(model.parameters()).device
    repeated = [p for p in prompts for _ in range(group_size)]  # group after group
    P = max(len(p) for p in repeated)
    prompt_ids = torch.full((len(repeated), P), eos_token_id, dtype=torch.long, device=device)
    prompt_mask = torch.zeros(len(repeated), P, dtype=torch.bool, device=device)
    for b, p in enumerate(repeated):
        prompt_ids[b, P - len(p):] = torch.tensor(p, device=device)
        prompt_mask[b, P - len(p):] = True
    out = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_p=top_p,
                   eos_token_id=eos_token_id, padding_mask=prompt_mask, generator=generator)
    completion_ids = out[:, P:]
    is_eos = completion_ids == eos_token_id
    # True through the first eos: the number of eos strictly before position t must be 0
    completion_mask = (is_eos.cumsum(dim=1) - is_eos.long()) == 0
    was_training = model.training
    model.eval()
    logps = per_token_logps(model, prompt_ids, prompt_mask, completion_ids, temperature if temperature > 0 else 1.0)
    model.train(was_training)
    ref_logps = None
    if ref_model is not None:
        ref_logps = per_token_logps(ref_model.eval(), prompt_ids, prompt_mask, completion_ids,
                                    temperature if temperature > 0 else 1.0)
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, logps, group_size, ref_logps)


# --- the training loop ---------------------------------------------------------------------------------------

@dataclass
class GRPOConfig:
    """Settings of a GRPO run. Defaults follow DeepSeekMath (section 4.1) and TRL where they fit a small model."""

    steps: int
    prompts_per_step: int = 8
    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    beta: float = 0.04  # weight of the KL to the reference (0: no reference model is needed)
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "grpo"
    importance_sampling_level: str = "token"  # "sequence": GSPO
    scale_rewards: str = "group"
    updates_per_rollout: int = 1  # μ in DeepSeekMath's Algorithm 1: > 1 makes later updates off-policy
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "updates_per_rollout"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (the group is the baseline), got {self.group_size}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")


@dataclass
class GRPOHistory:
    step: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)  # name -> one value per step


class GRPOTrainer:
    """GRPO on prompts with a programmatic reward (DeepSeekMath, Algorithm 1, with one policy model).

    Each step: draw prompts_per_step prompts, sample group_size completions of each with the current policy
    (which is π_old for this step), score them with `reward_fn`, turn the rewards into group advantages, then
    take updates_per_rollout optimizer steps on the clipped objective. The reference for the KL term is a frozen
    copy of the starting policy (or `ref_model`).

    prompts: token ids of each prompt. reward_fn(completions, indices) -> rewards: the decoded completions (text up
    to the end-of-turn token) and the indices of the prompts they answer, one float per completion.
    process_reward_fn (optional; process supervision, DeepSeekMath section 4.1.3): process_reward_fn(token_ids,
    completions, indices) -> (step_rewards, step_ends), where token_ids are each completion's tokens up to and
    including its end-of-turn token, and step_ends index into them (see `process_advantages`). When given, the
    advantages are per token from the step rewards; reward_fn's outcome reward is still computed and logged.
    Metrics per step: reward (mean), reward_std (mean within groups), completion_length (tokens, end of turn
    included), clip_fraction (share of tokens whose term the clip held constant, at the loss's importance level,
    averaged over the step's updates; 0 on the first, on-policy one), kl (mean k3 per token against the reference,
    when β > 0, after the last update's forward), loss (of the last update).
    """

    def __init__(self, policy: nn.Module, tokenizer, prompts: list[list[int]], reward_fn, cfg: GRPOConfig,
                 eos_token_id: int, ref_model: nn.Module | None = None, device: torch.device | str | None = None,
                 process_reward_fn=None):
        self.process_reward_fn = process_reward_fn
        if len(prompts) < cfg.prompts_per_step:
            raise ValueError(f"{len(prompts)} prompts, fewer than prompts_per_step={cfg.prompts_per_step}")
        self.cfg, self.tokenizer, self.prompts, self.reward_fn, self.eos = cfg, tokenizer, prompts, reward_fn, \
            eos_token_id
        self.device = torch.device(device) if device is not None else get_device()
        self.policy = policy.to(self.device)
        self.reference = None
        if cfg.beta > 0:
            self.reference = (ref_model if ref_model is not None else copy.deepcopy(policy)).to(self.device).eval()
            self.reference.requires_grad_(False)
        self.optimizer = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.batches = ResumableBatches(range(len(prompts)), cfg.prompts_per_step, seed=cfg.seed,
                                        collate=lambda items: items)  # prompt indices
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.step = 0
        self.history = GRPOHistory()
        self.last_rollout = self.last_rewards = self.last_advantages = None  # of the latest step

    def reset_reference(self) -> None:
        """Make the reference a frozen copy of the current policy (iterative RL, DeepSeekMath section 4.1.4: each
        iteration's KL term anchors to the policy the iteration started from, not to the SFT model)."""
        if self.cfg.beta == 0:
            raise ValueError("beta is 0: this run has no reference model to reset")
        self.reference = copy.deepcopy(self.policy).eval()
        self.reference.requires_grad_(False)

    def decode(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
        """The text of each completion, without its end-of-turn token."""
        texts = []
        for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist(), strict=True):
            kept = [t for t, m in zip(ids, mask, strict=True) if m and t != self.eos]
            texts.append(self.tokenizer.decode(kept))
        return texts

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        indices = next(self.batches)
        rollout = sample_completions(self.policy, [self.prompts[i] for i in indices], cfg.group_size,
                                     cfg.max_new_tokens, self.eos, temperature=cfg.temperature, top_p=cfg.top_p,
                                     ref_model=self.reference, generator=self.generator)
        group_of = [i for i in indices for _ in range(cfg.group_size)]
        texts = self.decode(rollout.completion_ids, rollout.completion_mask)
        rewards = torch.tensor(self.reward_fn(texts, group_of),
                               dtype=torch.float32, device=self.device)
        if self.process_reward_fn is None:  # outcome supervision: one advantage per completion
            advantages = group_advantages(rewards, cfg.group_size, scale=cfg.scale_rewards)
        else:  # process supervision: per-token advantages from the step rewards
            rows = zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist(), strict=True)
            kept = [[t for t, m in zip(ids, mask, strict=True) if m] for ids, mask in rows]
            step_rewards, step_ends = self.process_reward_fn(kept, texts, group_of)
            advantages = process_advantages(step_rewards, step_ends, cfg.group_size,
                                            rollout.completion_ids.shape[1]).to(self.device)
        self.last_rollout, self.last_rewards, self.last_advantages = rollout, rewards, advantages  # to inspect
        temperature = cfg.temperature if cfg.temperature > 0 else 1.0
        mask = rollout.completion_mask
        self.policy.train()
        clip_fractions = []
        for _ in range(cfg.updates_per_rollout):
            logps = per_token_logps(self.policy, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                    temperature)
            clip_fractions.append(self._clip_fraction(logps.detach(), rollout.logps, advantages, mask))
            loss = policy_loss(logps, rollout.logps, advantages, mask, ref_logps=rollout.ref_logps, beta=cfg.beta,
                               epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                               importance_sampling_level=cfg.importance_sampling_level,
                               max_completion_length=cfg.max_new_tokens)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        with torch.no_grad():
            m = mask.float()
            metrics = {"reward": rewards.mean().item(),
                       "reward_std": rewards.view(-1, cfg.group_size).std(dim=1).mean().item(),
                       "completion_length": m.sum(1).mean().item(),
                       "clip_fraction": sum(clip_fractions) / len(clip_fractions), "loss": loss.item()}
            if rollout.ref_logps is not None:
                delta = rollout.ref_logps - logps.detach()
                metrics["kl"] = (((delta.exp() - delta - 1) * m).sum() / m.sum()).item()
        return metrics

    @torch.no_grad()
    def _clip_fraction(self, logps, old_logps, advantages, mask) -> float:
        """Share of completion tokens whose objective term the clip holds constant (no gradient) in this update:
        ratio > 1 + ε_high with a positive advantage, or < 1 − ε_low with a negative one (TRL's clip_ratio). The
        ratio is the loss's own: per token, or with importance_sampling_level="sequence" the sequence's."""
        cfg, m = self.cfg, mask.float()
        log_ratio = logps - old_logps
        if cfg.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)).expand_as(m)
        ratio = log_ratio.exp()
        adv = advantages if advantages.dim() == 2 else advantages[:, None]
        eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon_low
        clipped = ((ratio > 1 + eps_high) & (adv > 0)) | ((ratio < 1 - cfg.epsilon_low) & (adv < 0))
        return ((clipped.float() * m).sum() / m.sum().clamp(min=1.0)).item()

    def train(self, steps: int | None = None) -> GRPOHistory:
        end = self.cfg.steps if steps is None else min(self.cfg.steps, self.step + steps)
        while self.step < end:
            metrics = self.train_step()
            self.history.step.append(self.step)
            for k, v in metrics.items():
                self.history.metrics.setdefault(k, []).append(v)
        return self.history
