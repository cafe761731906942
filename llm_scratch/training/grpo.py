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

import torch

__all__ = ["LOSS_TYPES", "group_advantages", "policy_loss"]

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
