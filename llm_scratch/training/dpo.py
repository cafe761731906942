"""Direct preference optimization (DPO) and its relatives, from log-probabilities of completions.

    logps = completion_logps(model(ids), ids, loss_mask)           # (B,) log p(completion | prompt)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)
    trainer = DPOTrainer(sft_model, PreferenceDataset(tok, pairs), PreferenceDataset(tok, held_out), cfg)
    (PreferenceDataset: llm_scratch.training.preference)

DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7) fits the policy to preference pairs (prompt x, chosen y_w,
rejected y_l) without a reward model: the log-ratio of policy to reference, β log πθ(y|x)/π_ref(y|x), acts as an
implicit reward, and the Bradley-Terry likelihood of the preferences under that reward is maximized:

    z = [log πθ(y_w|x) − log π_ref(y_w|x)] − [log πθ(y_l|x) − log π_ref(y_l|x)]
    sigmoid (DPO):        −log σ(β z)
    cDPO (Mitchell 2023): −(1−ε) log σ(β z) − ε log σ(−β z)      a fraction ε of the labels may be flipped
    robust (Chowdhury et al. 2024, arXiv:2403.00409): (−(1−ε) log σ(β z) + ε log σ(−β z)) / (1 − 2ε)
    ipo (Azar et al. 2023, arXiv:2310.12036, Eq. 17): (z − 1/(2β))², each log-ratio per completion token
    hinge (SLiC, Zhao et al. 2023, arXiv:2305.10425): relu(1 − β z)

The sigmoid loss keeps pushing z up for ever (its minimum is at z = ∞); IPO regresses z to a finite target,
and cDPO / robust DPO temper the push when some labels are wrong.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from llm_scratch.training.engine import TrainConfig
from llm_scratch.training.preference import PreferenceDataset, PreferenceTrainer

__all__ = ["LOSS_TYPES", "DPOTrainer", "completion_logps", "dpo_loss"]

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")


def completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                     average: bool = False) -> torch.Tensor:
    """Σ_t log p(input_ids[t] | input_ids[<t]) over the positions where loss_mask is True -> (B,).

    logits (B, T, V) are the model's outputs for input_ids (B, T): logits[:, t] predict token t + 1, so token t
    is scored by logits[:, t - 1]. loss_mask (B, T) bool marks the completion's tokens; position 0 cannot be in
    it (nothing predicts the first token). average=True divides by the number of masked tokens (per-token mean).
    Computed in float32 whatever the logits' dtype.
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits must be (B, T, V) for input_ids {tuple(input_ids.shape)}, got {tuple(logits.shape)}")
    if loss_mask.shape != input_ids.shape or loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be a bool tensor of shape {tuple(input_ids.shape)}, got "
                         f"{loss_mask.dtype} {tuple(loss_mask.shape)}")
    if loss_mask[:, 0].any():
        raise ValueError("loss_mask is True at position 0, which no logit predicts: a completion must follow a prompt")
    logits = logits[:, :-1].float()  # (B, T-1, V): position t-1 predicts token t
    targets = input_ids[:, 1:]
    # log softmax at the target only: logit of the target minus logsumexp over the vocabulary
    token_logps = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (B, T-1)
    mask = loss_mask[:, 1:]
    total = torch.where(mask, token_logps, 0.0).sum(-1)
    if not average:
        return total
    counts = mask.sum(-1)
    if (counts == 0).any():
        raise ValueError("average=True needs at least one masked token per row")
    return total / counts


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards β (log πθ − log π_ref) of the chosen and rejected completions.

    All log-probabilities are (B,) sums over each completion (completion_logps). label_smoothing ε is the assumed
    fraction of flipped labels: "sigmoid" with ε > 0 is cDPO, "robust" needs it. chosen_lengths and
    rejected_lengths (B,) are the completions' token counts; "ipo" divides each log-ratio by its length when they
    are given (as TRL does). Rewards are never length-normalized and carry no gradient.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    shape = policy_chosen_logps.shape
    for name, t in (("policy_rejected_logps", policy_rejected_logps), ("ref_chosen_logps", ref_chosen_logps),
                    ("ref_rejected_logps", ref_rejected_logps)):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, policy_chosen_logps {tuple(shape)}: all must match")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    if loss_type == "ipo" and chosen_lengths is not None:  # per-token log-ratios
        z = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    else:
        z = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2  # β plays IPO's τ
    else:  # hinge
        losses = torch.relu(1 - beta * z)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# --- training -----------------------------------------------------------------------------------------------

class DPOTrainer(PreferenceTrainer):
    """Trains `policy` on preference pairs with dpo_loss; the reference is a frozen copy of the starting policy
    (or `ref_model`, which is put in eval mode and frozen in place), or, with precompute_ref=True, its
    log-probabilities computed once before training (then no second model is held in memory during training).

    cfg: the pretraining engine's TrainConfig (steps, batch size in pairs, lr schedule, clipping, seed); DPO's
    own settings are beta, loss_type and label_smoothing (see dpo_loss). Metrics: loss, reward_accuracy (share of
    pairs whose chosen reward beats the rejected one), reward_margin, chosen_reward, rejected_reward, and the
    policy's chosen_logps and rejected_logps (mean log p(answer | prompt)).
    """

    def __init__(self, policy: nn.Module, train_data: PreferenceDataset, val_data: PreferenceDataset | None,
                 cfg: TrainConfig, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 ref_model: nn.Module | None = None, precompute_ref: bool = False,
                 device: torch.device | str | None = None):
        dpo_loss(*(torch.zeros(1),) * 4, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)  # validate
        super().__init__(policy, train_data, val_data, cfg, device)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        # with precompute_ref: (N, 2) reference log-probs of the train and validation pairs, and no reference model
        self.ref_train = self.ref_val = None
        if precompute_ref:
            # before the first step the policy *is* the reference: no copy is needed to score the pairs once
            reference = (ref_model if ref_model is not None else self.model).to(self.device)
            was_training = reference.training
            reference.eval()
            self.ref_train = self._reference_logps(reference, train_data)
            self.ref_val = self._reference_logps(reference, val_data) if val_data is not None else None
            reference.train(was_training)
            self.reference = None
        else:
            self.reference = (ref_model if ref_model is not None else copy.deepcopy(policy)).to(self.device).eval()
            self.reference.requires_grad_(False)

    @property
    def policy(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def _reference_logps(self, reference: nn.Module, data: PreferenceDataset) -> torch.Tensor:
        """(N, 2) reference log-probabilities of every pair's chosen and rejected answer."""
        out = []
        for start in range(0, len(data), 64):
            batch = data.collate([data[i] for i in range(start, min(start + 64, len(data)))])
            out.append(self._logps(reference, batch).view(2, -1).T)
        return torch.cat(out).cpu()

    def _logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, pad, mask = (batch[k].to(self.device) for k in ("input_ids", "padding_mask", "loss_mask"))
        return completion_logps(model(ids, padding_mask=pad), ids, mask)  # (2B,)

    def batch_loss(self, data: PreferenceDataset, indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = data.collate([data[i] for i in indices])
        B = len(indices)
        logps = self._logps(self.model, batch)
        if self.reference is None:  # precomputed
            if data is not self.train_data and data is not self.val_data:
                raise ValueError("with precompute_ref=True only the train and validation sets have reference log-probs")
            ref = (self.ref_train if data is self.train_data else self.ref_val)[indices].to(self.device)  # (B, 2)
            ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        else:
            with torch.no_grad():
                ref_chosen, ref_rejected = self._logps(self.reference, batch).split(B)
        lengths = batch["loss_mask"].sum(-1).to(self.device)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:B], logps[B:], ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
        loss = losses.mean()
        metrics = {"loss": loss.item(), "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
                   "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
                   "chosen_reward": chosen_rewards.mean().item(), "rejected_reward": rejected_rewards.mean().item(),
                   "chosen_logps": logps[:B].mean().item(), "rejected_logps": logps[B:].mean().item()}
        return loss, metrics
