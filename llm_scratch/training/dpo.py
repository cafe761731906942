"""Direct preference optimization (DPO) and its relatives, from log-probabilities of completions.

    logps = completion_logps(model(ids), ids, loss_mask)           # (B,) log p(completion | prompt)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)
    trainer = DPOTrainer(sft_model, PreferenceDataset(tok, pairs), PreferenceDataset(tok, held_out), cfg)

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
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llm_scratch.device import get_device
from llm_scratch.tasks import PreferencePair
from llm_scratch.tokenizer.chat import encode_chat
from llm_scratch.training.engine import ResumableBatches, TrainConfig, lr_at, param_groups

__all__ = ["LOSS_TYPES", "DPOTrainer", "PreferenceDataset", "collate_pairs", "completion_logps", "dpo_loss",
           "encode_pair"]

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


# --- data ---------------------------------------------------------------------------------------------------

def encode_pair(tokenizer, pair: PreferencePair) -> tuple[tuple[list[int], list[bool]], tuple[list[int], list[bool]]]:
    """((chosen ids, completion mask), (rejected ids, completion mask)): the same user turn, then each answer
    as the assistant's turn; the mask marks the assistant's tokens (its answer and <|im_end|>), as in SFT."""
    from llm_scratch.training.sft import task_messages  # the same conversation layout SFT trained on

    user = task_messages(pair.example, with_answer=False)
    return tuple(encode_chat(tokenizer, user + [{"role": "assistant", "content": answer}])
                 for answer in (pair.chosen, pair.rejected))


class PreferenceDataset:
    """Preference pairs encoded with the chat template; items are ((chosen ids, mask), (rejected ids, mask))."""

    def __init__(self, tokenizer, pairs: Sequence[PreferencePair], context_length: int | None = None):
        if not pairs:
            raise ValueError("pairs is empty")
        self.pairs = list(pairs)
        self.items = [encode_pair(tokenizer, p) for p in self.pairs]
        if context_length is not None:
            for i, item in enumerate(self.items):
                longest = max(len(ids) for ids, _ in item)
                if longest > context_length:
                    raise ValueError(f"pair {i} needs {longest} tokens, more than context_length={context_length}")
        self.pad_id = self.items[0][0][0][0]  # any id: padding is masked out

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def collate(self, items) -> dict[str, torch.Tensor]:
        return collate_pairs(items, self.pad_id)


def collate_pairs(items, pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one right-padded batch of 2B rows, the B chosen rows first, then the B rejected ones.

    Returns input_ids and padding_mask (2B, T) for the model, loss_mask (2B, T) marking the completions.
    One forward pass scores both answers of every pair.
    """
    rows = [item[0] for item in items] + [item[1] for item in items]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    padding_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    loss_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for r, (ids, mask) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        padding_mask[r, :len(ids)] = True
        loss_mask[r, :len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "padding_mask": padding_mask, "loss_mask": loss_mask}


# --- training -----------------------------------------------------------------------------------------------

@dataclass
class DPOHistory:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    reward_accuracy: list[float] = field(default_factory=list)  # share of pairs with chosen reward > rejected
    reward_margin: list[float] = field(default_factory=list)  # mean chosen reward - rejected reward
    chosen_reward: list[float] = field(default_factory=list)
    rejected_reward: list[float] = field(default_factory=list)
    chosen_logps: list[float] = field(default_factory=list)  # the policy's mean log p(chosen answer | prompt)
    rejected_logps: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)  # evaluate()'s metrics at each val_step


class DPOTrainer:
    """Trains `policy` on preference pairs with dpo_loss; the reference is a frozen copy of the starting policy
    (or `ref_model`), or, with precompute_ref=True, its log-probabilities computed once before training (then
    no second model is held in memory during training).

    cfg: the pretraining engine's TrainConfig (steps, batch size in pairs, lr schedule, clipping, seed); DPO's
    own settings are beta, loss_type and label_smoothing (see dpo_loss).
    """

    def __init__(self, policy: nn.Module, train_data: PreferenceDataset, val_data: PreferenceDataset | None,
                 cfg: TrainConfig, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 ref_model: nn.Module | None = None, precompute_ref: bool = False,
                 device: torch.device | str | None = None):
        dpo_loss(*(torch.zeros(1),) * 4, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)  # validate
        self.cfg, self.beta, self.loss_type, self.label_smoothing = cfg, beta, loss_type, label_smoothing
        self.device = torch.device(device) if device is not None else get_device()
        self.policy = policy.to(self.device)
        reference = (ref_model if ref_model is not None else copy.deepcopy(policy)).to(self.device).eval()
        reference.requires_grad_(False)
        self.train_data, self.val_data = train_data, val_data
        # with precompute_ref: (N, 2) reference log-probs of the train and validation pairs, and no reference model
        self.ref_train = self.ref_val = None
        if precompute_ref:
            self.ref_train = self._reference_logps(reference, train_data)
            self.ref_val = self._reference_logps(reference, val_data) if val_data is not None else None
            self.reference = None
        else:
            self.reference = reference
        self.optimizer = torch.optim.AdamW(param_groups(self.policy, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        self.batches = ResumableBatches(range(len(train_data)), cfg.batch_size, seed=cfg.seed,  # pair indices
                                        collate=lambda items: items)
        self.step = 0
        self.history = DPOHistory()
        torch.manual_seed(cfg.seed)

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

    def _metrics(self, data: PreferenceDataset, indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = data.collate([data[i] for i in indices])
        B = len(indices)
        logps = self._logps(self.policy, batch)
        if self.reference is None:  # precomputed
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

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.policy.train()
        loss, metrics = self._metrics(self.train_data, next(self.batches))
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return metrics

    @torch.no_grad()
    def evaluate(self, data: PreferenceDataset | None = None, batch_size: int = 64) -> dict[str, float]:
        """Metrics over a whole dataset (the validation set by default), averaged over pairs."""
        data = data if data is not None else self.val_data
        if data is None:
            raise ValueError("no validation data: pass a dataset")
        if self.reference is None and data is not self.train_data and data is not self.val_data:
            raise ValueError("with precompute_ref=True only the train and validation sets have reference log-probs")
        was_training = self.policy.training
        self.policy.eval()
        totals: dict[str, float] = {}
        for start in range(0, len(data), batch_size):
            indices = list(range(start, min(start + batch_size, len(data))))
            _, metrics = self._metrics(data, indices)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v * len(indices)
        self.policy.train(was_training)
        return {k: v / len(data) for k, v in totals.items()}

    def train(self, steps: int | None = None) -> DPOHistory:
        """Run until cfg.max_steps (or `steps` more), evaluating every eval_every steps and at the end."""
        cfg = self.cfg
        end = cfg.max_steps if steps is None else min(cfg.max_steps, self.step + steps)
        for _ in tqdm(range(self.step, end), desc="DPO", disable=not cfg.progress):
            metrics = self.train_step()
            h = self.history
            h.step.append(self.step)
            for k, v in metrics.items():
                getattr(h, k).append(v)
            if self.val_data is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                              or self.step == cfg.max_steps):
                h.val_step.append(self.step)
                h.val.append(self.evaluate())
        return self.history

