"""Mixture-of-experts feed-forward layers: a router, a bank of experts, and their bookkeeping.

- `SparseMoE`: softmax top-k routing (Switch k=1, Mixtral k=2) over E experts, with an optional
  capacity factor (tokens over an expert's capacity skip it) and Switch / z auxiliary losses.
- `DeepSeekMoE` (Dai et al. 2024, arXiv:2401.06066; DeepSeek-V3, arXiv:2412.19437, section 2.1.2):
  many small ("fine-grained") routed experts plus shared experts every token always goes through,
  sigmoid group-limited routing, and auxiliary-loss-free balancing by a per-expert bias.

Every layer keeps, for plots and for balancing: `last_routing` (the Routing of the last forward),
`load` (E,) assignments per expert in training-mode forwards since `reset_load()`, and `aux_loss` (the weighted sum
of its auxiliary losses on the last training forward; 0 when none is enabled or in eval mode).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from llm_scratch.ffn import SwiGLU
from llm_scratch.moe.balancing import router_z_loss, sequence_balance_loss, switch_balance_loss, update_bias
from llm_scratch.moe.experts import Experts
from llm_scratch.moe.router import GroupLimitedRouter, Routing, TopKRouter, apply_capacity, expert_load

__all__ = ["DeepSeekMoE", "SparseMoE", "moe_layers"]


class _MoEBase(nn.Module):
    def __init__(self, n_experts: int):
        super().__init__()
        # statistics, not state: plain tensors (a buffer would be left on `meta` by a meta-built, loaded model)
        self.n_experts = n_experts
        self.load = torch.zeros(n_experts, dtype=torch.long, device="cpu")
        self.last_routing: Routing | None = None
        self.aux_loss = torch.zeros((), device="cpu")

    def reset_load(self) -> None:
        self.load = torch.zeros(self.n_experts, dtype=torch.long, device=self.load.device)

    def _record(self, routing: Routing) -> None:
        self.last_routing = routing
        if self.training:  # the balancing bias follows the training batches only, not evaluation
            load = expert_load(routing.indices, routing.n_experts, routing.keep)
            self.load = (self.load.to(load.device) + load).detach()


class SparseMoE(_MoEBase):
    """y = Σ_j w_j FFN_{e_j}(x) over each token's top-k experts.

    capacity_factor: None = no limit; else each expert takes at most ceil(cf · N·k / E) assignments.
    balance_alpha, z_loss_coef: weights of the Switch balancing loss and the router z-loss (0 = off).
    """

    def __init__(self, d_model: int, hidden: int, n_experts: int, k: int = 2, normalize: bool = True,
                 capacity_factor: float | None = None, balance_alpha: float = 0.0, z_loss_coef: float = 0.0):
        super().__init__(n_experts)
        self.router = TopKRouter(d_model, n_experts, k, normalize)
        self.experts = Experts(n_experts, d_model, hidden)
        self.capacity_factor, self.balance_alpha, self.z_loss_coef = capacity_factor, balance_alpha, z_loss_coef

    def forward(self, x: torch.Tensor, naive: bool = False) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C)."""
        flat = x.reshape(-1, x.shape[-1])  # (N, C): routing is per token
        routing = self.router(flat)
        if self.capacity_factor is not None:
            routing = apply_capacity(routing, self.capacity_factor)
        self._record(routing)
        aux = flat.new_zeros((), dtype=torch.float32)
        if self.training and self.balance_alpha:
            aux = aux + switch_balance_loss(routing, self.balance_alpha)
        if self.training and self.z_loss_coef:
            aux = aux + self.z_loss_coef * router_z_loss(routing.logits)
        self.aux_loss = aux
        return self.experts(flat, routing.indices, routing.weights, naive=naive).view_as(x)


class DeepSeekMoE(_MoEBase):
    """Shared experts + fine-grained routed experts: y = FFN_shared(x) + Σ_j g_j FFN_{e_j}(x).

    The n_shared shared experts are one SwiGLU of width n_shared · hidden (the same function as n_shared
    separate ones summed). bias_update_speed γ: the loss-free balancing step (DeepSeek-V3 uses 0.001);
    call `update_bias()` after each optimizer step. seq_balance_alpha: the sequence-wise loss (0 = off).
    """

    def __init__(self, d_model: int, hidden: int, n_routed: int, n_shared: int = 1, k: int = 2, n_group: int = 1,
                 topk_group: int = 1, routed_scaling_factor: float = 1.0, normalize: bool = True,
                 bias_update_speed: float = 0.0, seq_balance_alpha: float = 0.0, balance_alpha: float = 0.0):
        super().__init__(n_routed)
        if not isinstance(n_shared, int) or n_shared < 0:
            raise ValueError(f"n_shared must be an int >= 0, got {n_shared!r}")
        self.router = GroupLimitedRouter(d_model, n_routed, k, n_group, topk_group, routed_scaling_factor, normalize)
        self.experts = Experts(n_routed, d_model, hidden)
        self.shared_experts = SwiGLU(d_model, hidden * n_shared) if n_shared else None
        self.bias_update_speed, self.seq_balance_alpha, self.balance_alpha = (bias_update_speed, seq_balance_alpha,
                                                                             balance_alpha)

    def forward(self, x: torch.Tensor, naive: bool = False) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C)."""
        flat = x.reshape(-1, x.shape[-1])
        routing = self.router(flat)
        self._record(routing)
        aux = flat.new_zeros((), dtype=torch.float32)
        if self.training and self.seq_balance_alpha:
            aux = aux + sequence_balance_loss(routing, x.shape[0], self.seq_balance_alpha)
        if self.training and self.balance_alpha:  # Switch's loss on sigmoid scores normalized per token
            probs = routing.probs / routing.probs.sum(-1, keepdim=True)
            aux = aux + switch_balance_loss(Routing(routing.indices, routing.weights, probs, routing.logits),
                                            self.balance_alpha)
        self.aux_loss = aux
        y = self.experts(flat, routing.indices, routing.weights, naive=naive).view_as(x)
        return y if self.shared_experts is None else y + self.shared_experts(x)

    def update_bias(self) -> None:
        """One loss-free balancing step from the load since the last call, then reset the load.

        Under data parallelism each rank has counted only its own tokens: the loads are summed over the
        process group first, so every rank takes the same step, the one a single process would take on the
        global batch (DDP would otherwise overwrite the bias with rank 0's at the next forward)."""
        if self.bias_update_speed:
            load = self.load.to(self.router.bias.device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(load)
            update_bias(self.router.bias, load, self.bias_update_speed)
        self.reset_load()


def moe_layers(model: nn.Module) -> list[_MoEBase]:
    """Every MoE layer of a model, in order."""
    return [m for m in model.modules() if isinstance(m, _MoEBase)]
