"""Mixture of experts: routers, experts with dispatch/combine, balancing losses, MoE layers."""

from llm_scratch.moe.balancing import router_z_loss, sequence_balance_loss, switch_balance_loss, update_bias
from llm_scratch.moe.experts import Experts
from llm_scratch.moe.layers import DeepSeekMoE, SparseMoE, moe_layers
from llm_scratch.moe.router import GroupLimitedRouter, Routing, TopKRouter, apply_capacity, expert_load

__all__ = [
    "DeepSeekMoE",
    "Experts",
    "GroupLimitedRouter",
    "Routing",
    "SparseMoE",
    "TopKRouter",
    "apply_capacity",
    "expert_load",
    "moe_layers",
    "router_z_loss",
    "sequence_balance_loss",
    "switch_balance_loss",
    "update_bias",
]
