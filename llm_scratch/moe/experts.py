"""A bank of E SwiGLU experts and the dispatch/combine around them.

    y_t = Σ_{j<k} w_{t,j} · FFN_{e_{t,j}}(x_t)        (a token's output: the gated sum of its experts)

The weights are stacked 3-D tensors, as in `transformers` 5's MoE models: gate_up_proj (E, 2·I, C)
holds each expert's gate and up matrices one above the other, down_proj (E, C, I).

Two paths compute the same thing:
- `naive=True`, the loop: for each expert, gather the tokens routed to it, run its FFN, scale by
  the gates and add the results back (scatter-add) into their tokens' rows.
- the batched path: sort the N·k (token, expert) assignments by expert, lay them out as an (E, M, C)
  block padded to the busiest expert's M tokens, and run all experts at once with two batched
  matmuls (`torch.bmm`), then un-sort. No Python loop over experts; the cost of the padding is
  E·M - N·k wasted rows, small when the load is balanced (one more reason to balance it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Experts"]


class Experts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        for name, value in (("n_experts", n_experts), ("d_model", d_model), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.n_experts, self.d_model, self.hidden = n_experts, d_model, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on x (M, C): down(silu(gate x) ⊙ up x)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                naive: bool = False) -> torch.Tensor:
        """x (N, C), indices and weights (N, k) -> (N, C). A zero weight (a dropped assignment) adds nothing."""
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x must have shape (N, {self.d_model}), got {tuple(x.shape)}")
        if indices.shape != weights.shape or indices.shape[0] != x.shape[0]:
            raise ValueError(f"indices and weights must both be (N, k) with N={x.shape[0]}, "
                             f"got {tuple(indices.shape)} and {tuple(weights.shape)}")
        return self._loop(x, indices, weights) if naive else self._batched(x, indices, weights)

    def _loop(self, x, indices, weights):
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            token, slot = torch.where(indices == e)  # which tokens chose e, and as their which choice
            if token.numel():
                y = self.expert(e, x[token]) * weights[token, slot, None].to(x.dtype)
                out.index_add_(0, token, y)
        return out

    def _batched(self, x, indices, weights):
        N, k = indices.shape
        E, C = self.n_experts, self.d_model
        flat_expert = indices.reshape(-1)  # (N·k,) assignment a = token a // k, choice a % k
        order = flat_expert.argsort(stable=True)  # assignments grouped by expert
        sorted_expert = flat_expert[order]
        counts = torch.bincount(flat_expert, minlength=E)  # (E,)
        M = int(counts.max())
        starts = counts.cumsum(0) - counts  # where each expert's group begins in the sorted order
        slot = torch.arange(N * k, device=x.device) - starts[sorted_expert]  # row inside its expert's block
        block = x.new_zeros(E, M, C)
        block[sorted_expert, slot] = x[order // k]  # dispatch: (E, M, C), padded with zero rows
        gate, up = torch.bmm(block, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)  # (E, M, I) each
        y = torch.bmm(F.silu(gate) * up, self.down_proj.transpose(1, 2))  # (E, M, C)
        y = y[sorted_expert, slot] * weights.reshape(-1)[order, None].to(x.dtype)  # back to assignments
        return x.new_zeros(N, C).index_add_(0, order // k, y)  # combine: sum each token's k outputs

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, d_model={self.d_model}, hidden={self.hidden}"
