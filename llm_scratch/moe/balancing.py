"""Keeping experts evenly loaded: two auxiliary losses, a z-loss, and DeepSeek-V3's loss-free bias.

A router left alone tends to collapse onto a few experts (they get more gradient, so they get better,
so they get chosen more). The remedies here:

- Switch load-balancing loss (Fedus et al. 2021, arXiv:2101.03961, eqs. 4-6):
      L = α · E · Σ_i f_i · P_i,  f_i = share of assignments that went to expert i,
                                  P_i = mean router probability of expert i.
  f is not differentiable; P is, and the product pushes probability away from overloaded experts.
  At uniform routing f_i = P_i = 1/E and L = α, its minimum over P for that f.
- Router z-loss (Zoph et al. 2022, ST-MoE, arXiv:2202.08906, eq. 5): mean over tokens of
  (log Σ_j exp(logit_j))², which keeps router logits small (round-off in the softmax grows with them).
- DeepSeek-V3's sequence-wise balance loss (arXiv:2412.19437, eqs. 17-20): Switch's loss computed
  inside each sequence, with affinities normalized over experts, and a tiny α.
- DeepSeek-V3's auxiliary-loss-free balancing (section 2.1.2; Wang et al. 2024, arXiv:2408.15664): a
  per-expert bias b is added to the scores *for choosing experts only*; after each step it moves by
  γ against the load: b_i -= γ when expert i got more than the mean load, += γ when less. No
  gradient, no loss term competing with the language-model loss.
"""

from __future__ import annotations

import torch

from llm_scratch.moe.router import Routing, expert_load

__all__ = ["router_z_loss", "sequence_balance_loss", "switch_balance_loss", "update_bias"]


def switch_balance_loss(routing: Routing, alpha: float = 0.01) -> torch.Tensor:
    """α · E · Σ_i f_i · P_i over all N tokens (f counts each of the k choices; dropped ones too)."""
    N, k = routing.indices.shape
    E = routing.n_experts
    f = expert_load(routing.indices, E).float() / (N * k)  # (E,) share of assignments
    P = routing.probs.mean(0)  # (E,) mean probability
    return alpha * E * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean_t (logsumexp_j logits_{t,j})² for logits (N, E)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def sequence_balance_loss(routing: Routing, batch_size: int, alpha: float = 1e-4) -> torch.Tensor:
    """DeepSeek-V3's L_Bal = α Σ_i f_i P_i per sequence (eqs. 17-20), averaged over the batch.

    The N = batch_size · T tokens are in (B, T) order. Per sequence: f_i = E / (k·T) · (times expert i
    was chosen), P_i = mean over t of s'_{i,t}, s' = s / Σ_j s_j the affinities normalized over experts.
    f counts the experts actually chosen (bias and group limit included), the load being balanced; eq. 18
    writes the top-k of s alone, which is the same when the bias is zero and the group limit does not bind.
    """
    N, k = routing.indices.shape
    E = routing.n_experts
    if N % batch_size:
        raise ValueError(f"batch_size {batch_size} does not divide the {N} routed tokens")
    T = N // batch_size
    chosen = torch.zeros(N, E, device=routing.indices.device).scatter_(1, routing.indices, 1.0)
    f = chosen.view(batch_size, T, E).sum(1) * E / (k * T)  # (B, E), eq. 18
    s = routing.probs / routing.probs.sum(-1, keepdim=True)  # eq. 19
    P = s.view(batch_size, T, E).mean(1)  # (B, E), eq. 20
    return alpha * (f * P).sum(-1).mean()


@torch.no_grad()
def update_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float = 1e-3) -> torch.Tensor:
    """In place: b_i += γ · sign(mean load - load_i); returns bias. load (E,) counts from the last step."""
    if load.shape != bias.shape:
        raise ValueError(f"load must have shape {tuple(bias.shape)}, got {tuple(load.shape)}")
    load = load.float()
    return bias.add_(gamma * torch.sign(load.mean() - load))
