"""Routers: which experts each token goes to, and with what weight.

    logits = x W_gᵀ  (N, E)   one score per token and expert
    softmax top-k  (Shazeer et al. 2017; Switch k=1, Fedus et al. 2021; Mixtral k=2, Jiang et al. 2024):
        p = softmax(logits); the k largest p are kept, optionally renormalized to sum to 1
    sigmoid, group-limited  (DeepSeek-V3, arXiv:2412.19437, section 2.1.2, eqs. 12-16):
        s = sigmoid(logits); experts are split into n_group groups, each group scored by the sum of its
        two best (s + b); only the topk_group best groups are eligible; the k best (s + b) among them
        are chosen, where b is the load-balancing bias (used for the choice only); the gate values are
        the chosen s (not s + b), normalized to sum to 1, times routed_scaling_factor.

A router returns a `Routing`: the chosen experts (N, k), their gate weights (N, k), and the full
score matrix and logits for the balancing losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["GroupLimitedRouter", "Routing", "TopKRouter", "apply_capacity", "expert_load"]


@dataclass
class Routing:
    """indices (N, k) chosen experts; weights (N, k) their gates; probs (N, E) the scores the losses use
    (softmax probabilities, or sigmoid affinities); logits (N, E) before the softmax/sigmoid; keep (N, k)
    False where a capacity limit dropped the assignment (None: nothing dropped)."""

    indices: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    keep: torch.Tensor | None = None

    @property
    def n_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def drop_rate(self) -> float:
        """Share of (token, expert) assignments dropped by a capacity limit."""
        return 0.0 if self.keep is None else 1.0 - self.keep.float().mean().item()


def _check_k(k: int, n_experts: int) -> None:
    if not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
    if not isinstance(k, int) or not 1 <= k <= n_experts:
        raise ValueError(f"k (experts per token) must be an int in [1, n_experts={n_experts}], got {k!r}")


def expert_load(indices: torch.Tensor, n_experts: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) how many (kept) assignments each expert received."""
    flat = indices.flatten() if keep is None else indices[keep]
    return torch.bincount(flat, minlength=n_experts)


def apply_capacity(routing: Routing, capacity_factor: float) -> Routing:
    """Drop assignments beyond each expert's capacity C = ceil(capacity_factor · N · k / E).

    Priority goes to first choices over second choices, then to earlier tokens (GShard's order,
    Lepikhin et al. 2020, arXiv:2006.16668, Algorithm 1): a dropped token just skips the layer (its
    residual passes through). Returns a new Routing whose `keep` marks what survived.
    """
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
    N, k = routing.indices.shape
    E = routing.n_experts
    capacity = max(1, int(-(-capacity_factor * N * k // E)))
    order = routing.indices.T.reshape(-1)  # (k·N,): every token's first choice, then every second choice
    onehot = nn.functional.one_hot(order, E)  # (k·N, E)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # place in its expert's queue, 0-based
    keep = (position < capacity).view(k, N).T  # (N, k)
    if routing.keep is not None:
        keep = keep & routing.keep
    return Routing(routing.indices, routing.weights * keep, routing.probs, routing.logits, keep)


class TopKRouter(nn.Module):
    """Softmax over all experts, keep the top k. normalize: rescale the kept k to sum to 1 (Mixtral);
    Switch (k=1) keeps the raw probability, which is how its gate receives a gradient."""

    def __init__(self, d_model: int, n_experts: int, k: int = 2, normalize: bool = True):
        super().__init__()
        _check_k(k, n_experts)
        self.n_experts, self.k, self.normalize = n_experts, k, normalize
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> Routing:
        """x (N, C) -> Routing. Scores are computed in float32 (softmax over E experts is sensitive)."""
        logits = x.float() @ self.weight.float().T  # (N, E)
        probs = logits.softmax(-1)
        weights, indices = probs.topk(self.k, dim=-1)  # (N, k) each
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return Routing(indices, weights, probs, logits)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, k={self.k}, normalize={self.normalize}"


class GroupLimitedRouter(nn.Module):
    """DeepSeek-V3's router: sigmoid affinities, group-limited choice, a selection-only bias.

    bias: the auxiliary-loss-free balancing bias b (a buffer, not trained by gradients; see
        `llm_scratch.moe.balancing.update_bias`). Hugging Face calls it e_score_correction_bias.
    """

    def __init__(self, d_model: int, n_experts: int, k: int, n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0, normalize: bool = True):
        super().__init__()
        _check_k(k, n_experts)
        if not isinstance(n_group, int) or n_group < 1 or n_experts % n_group:
            raise ValueError(f"n_group must be a positive int dividing n_experts ({n_experts}), got {n_group!r}")
        if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group must be an int in [1, n_group={n_group}], got {topk_group!r}")
        per_group = n_experts // n_group
        if k > topk_group * per_group:
            raise ValueError(f"k={k} experts cannot be chosen from topk_group={topk_group} groups of {per_group}")
        if n_group > 1 and per_group < 2:
            raise ValueError("group scores sum the two best experts of a group: groups need >= 2 experts")
        self.n_experts, self.k, self.n_group, self.topk_group = n_experts, k, n_group, topk_group
        self.routed_scaling_factor, self.normalize = routed_scaling_factor, normalize
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("bias", torch.zeros(n_experts))

    def forward(self, x: torch.Tensor) -> Routing:
        """x (N, C) -> Routing (probs are the sigmoid affinities s, which the sequence-wise loss uses)."""
        N = x.shape[0]
        G, E = self.n_group, self.n_experts
        logits = x.float() @ self.weight.float().T  # (N, E)
        scores = logits.sigmoid()  # s_{i,t}, eq. 15
        choice = scores + self.bias.float()  # s + b: used to choose, never as a gate value (eq. 16)
        if G > 1:
            group_scores = choice.view(N, G, E // G).topk(2, dim=-1).values.sum(-1)  # (N, G): best two per group
            groups = group_scores.topk(self.topk_group, dim=-1).indices  # (N, topk_group)
            allowed = torch.zeros(N, G, dtype=torch.bool, device=x.device).scatter_(1, groups, True)
            choice = choice.masked_fill(~allowed.repeat_interleave(E // G, dim=1), float("-inf"))
        indices = choice.topk(self.k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, indices)  # gates from s, not s + b
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)  # eq. 13
        return Routing(indices, weights * self.routed_scaling_factor, scores, logits)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, k={self.k}, n_group={self.n_group}, topk_group={self.topk_group}, "
                f"routed_scaling_factor={self.routed_scaling_factor}")
