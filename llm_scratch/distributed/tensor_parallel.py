"""Tensor parallelism (Shoeybi et al. 2019, "Megatron-LM", arXiv:1909.08053, section 3): each layer's
matrices split across ranks, every rank computing part of every layer.

A linear layer y = x Wᵀ + b (W of shape (out, in)) can be split two ways over N ranks:

- column parallel: W split by rows (output features). Rank r holds W_r (out/N, in) and computes
  y_r = x W_rᵀ + b_r, its slice of y's last dim, from the full x. Nothing to communicate forward; in
  backward each rank has only its part of dL/dx = Σ_r dL/dy_r · W_r, so the input gradient is all-reduced.
- row parallel: W split by columns (input features). Rank r holds W_r (out, in/N) and the matching
  slice x_r of the input; x_r W_rᵀ is a partial sum of y, so the outputs are all-reduced (bias added once).

Megatron's MLP is column then row: the column layer's output slice is exactly the row layer's input
slice, so the activation between them (element-wise) needs no communication; one all-reduce in forward
and one in backward per MLP. Attention is the same with heads: q, k, v column parallel (whole heads per
rank), o_proj row parallel (Megatron-LM, Fig. 3).

Two versions:
- from scratch, picotron-style: three autograd functions that say which collective runs in forward and
  which in backward, and `ColumnParallelLinear` / `RowParallelLinear` built on them;
- `apply_tensor_parallel`, the library way: DTensor's `parallelize_module` with `ColwiseParallel` and
  `RowwiseParallel`, which insert the same collectives (tests show both agree with an unsplit layer).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module

from llm_scratch.attention.gqa import GroupedQueryAttention
from llm_scratch.distributed.process_group import default_mesh, get_world_size

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "apply_tensor_parallel", "check_tensor_parallel",
           "copy_to_parallel_region", "gather_from_parallel_region", "reduce_from_parallel_region"]


# --- from scratch: the three communication patterns as autograd functions ------------------------------


class _CopyToParallelRegion(torch.autograd.Function):
    """Forward: identity (every rank already has the full input). Backward: all-reduce, since each rank's
    input gradient is only the part that flowed through its shard (Megatron's `f` operator)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce works in place; never overwrite autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _ReduceFromParallelRegion(torch.autograd.Function):
    """Forward: all-reduce the partial sums. Backward: identity, as the sum passes each rank's gradient
    unchanged to its summand (Megatron's `g` operator)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromParallelRegion(torch.autograd.Function):
    """Forward: all-gather the slices along the last dim. Backward: keep this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world_size = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        world_size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(world_size, dim=-1)[rank].contiguous(), None


def copy_to_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Identity forward, all-reduce (sum) backward."""
    return _CopyToParallelRegion.apply(x, group)


def reduce_from_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-reduce (sum) forward, identity backward."""
    return _ReduceFromParallelRegion.apply(x, group)


def gather_from_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather along the last dim forward (rank order), keep this rank's slice backward."""
    return _GatherFromParallelRegion.apply(x, group)


def _check_split(name: str, size: int, world_size: int) -> None:
    if size % world_size:
        raise ValueError(f"{name} ({size}) must be divisible by the tensor-parallel world_size ({world_size})")


def _check_rank(rank: int, world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's rows (output features) split: this rank holds out_features / world_size of them.

    x (..., in) full on every rank -> y (..., out / world_size), this rank's slice, or (..., out) with
    gather_output (all-gathered). Feed the slice to a RowParallelLinear to avoid the gather.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, world_size: int, bias: bool = True,
                 gather_output: bool = False, group: dist.ProcessGroup | None = None):
        super().__init__()
        _check_rank(rank, world_size)
        _check_split("out_features", out_features, world_size)
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.world_size, self.gather_output, self.group = rank, world_size, gather_output, group
        self.weight = nn.Parameter(torch.empty(out_features // world_size, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features // world_size)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, world_size: int, gather_output: bool = False,
                    group: dist.ProcessGroup | None = None) -> ColumnParallelLinear:
        """This rank's part of a full nn.Linear: rows rank·out/N .. (rank+1)·out/N of weight and bias."""
        layer = cls(linear.in_features, linear.out_features, rank, world_size, bias=linear.bias is not None,
                    gather_output=gather_output, group=group).to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight.chunk(world_size, dim=0)[rank])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.chunk(world_size, dim=0)[rank])
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_parallel_region(x, self.group)  # backward: sum the ranks' parts of dL/dx
        y = F.linear(x, self.weight, self.bias)  # (..., out / N)
        return gather_from_parallel_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (local "
                f"{self.out_features // self.world_size}), rank={self.rank}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's columns (input features) split: this rank holds in_features / world_size of them.

    x (..., in / world_size), this rank's slice (e.g. a ColumnParallelLinear's output) -> y (..., out),
    the all-reduced sum of the ranks' partial products, plus the bias (added once, after the sum).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, world_size: int, bias: bool = True,
                 group: dist.ProcessGroup | None = None):
        super().__init__()
        _check_rank(rank, world_size)
        _check_split("in_features", in_features, world_size)
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.world_size, self.group = rank, world_size, group
        self.weight = nn.Parameter(torch.empty(out_features, in_features // world_size))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None  # full, on every rank

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, world_size: int,
                    group: dist.ProcessGroup | None = None) -> RowParallelLinear:
        """This rank's part of a full nn.Linear: columns rank·in/N .. (rank+1)·in/N of weight, all of bias."""
        layer = cls(linear.in_features, linear.out_features, rank, world_size, bias=linear.bias is not None,
                    group=group).to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight.chunk(world_size, dim=1)[rank])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features // self.world_size:
            raise ValueError(f"x must be this rank's slice of the input, (..., {self.in_features // self.world_size}),"
                             f" got {tuple(x.shape)}")
        y = reduce_from_parallel_region(F.linear(x, self.weight), self.group)  # Σ_r x_r W_rᵀ
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.in_features // self.world_size}), "
                f"out_features={self.out_features}, rank={self.rank}")


# --- the library way: DTensor on the Llama family -------------------------------------------------------


def _sum_over_ranks(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
    return grad


def check_tensor_parallel(model: nn.Module, tp_size: int) -> None:
    """Raise ValueError unless `model` (Llama 3, Qwen3, Gemma 3: `blocks` of attn + gated mlp) can be split
    tp_size ways: whole query heads and whole kv heads per rank, and an even split of the FFN width.
    Needs no process group, so a wrong degree fails before any communication."""
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive int, got {tp_size!r}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"model must have a non-empty nn.ModuleList `blocks`; {type(model).__name__} has none")
    for i, block in enumerate(blocks):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if not isinstance(attn, GroupedQueryAttention):
            raise ValueError(f"blocks[{i}].attn must be a GroupedQueryAttention, got {type(attn).__name__}")
        if not all(isinstance(getattr(mlp, name, None), nn.Linear) for name in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"blocks[{i}].mlp must be a gated MLP (gate_proj, up_proj, down_proj), "
                             f"got {type(mlp).__name__}")
        for name, value in (("n_heads", attn.n_heads), ("n_kv_heads", attn.n_kv_heads),
                            ("ffn hidden size", mlp.up_proj.out_features)):
            if value % tp_size:
                raise ValueError(f"{name} ({value}) of blocks[{i}] is not divisible by the tensor-parallel "
                                 f"degree {tp_size}: each rank must hold whole heads / an equal FFN slice")


def _megatron_plan() -> dict:
    """The per-block plan. Each sub-layer's input first becomes one replicated DTensor (PrepareModuleInput with
    use_local_output=False) that q, k, v (gate, up) all read: their partial input gradients then add up on it as
    a Partial sum and are all-reduced once, Megatron's single f per sub-layer. Without it every ColwiseParallel
    all-reduces its own input gradient: 5 backward all-reduces per block instead of 2."""
    def shared_input():
        return PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),),
                                  use_local_output=False)

    return {
        "attn": shared_input(), "mlp": shared_input(),
        "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(),
    }


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh | None = None) -> nn.Module:
    """Split a Llama-family model (Llama 3, Qwen3, Gemma 3) over a 1-D mesh, Megatron's layout; returns it.

    Per block: q_proj, k_proj, v_proj, gate_proj, up_proj `ColwiseParallel` (weight Shard(0): this rank's
    heads / FFN slice), o_proj and down_proj `RowwiseParallel` (weight Shard(1), output all-reduced), and the
    attention's and MLP's input one shared replicated DTensor (see _megatron_plan): 2 all-reduces forward and
    2 backward per block, as Megatron (plus the QK-norm gains' gradient all-reduces of Qwen3 / Gemma 3). Each
    rank then runs attention on n_heads / tp query heads and n_kv_heads / tp kv heads; as rank r's query
    heads are r·H/tp.. and its kv heads r·K/tp.., query head h still reads kv head h // (H/K).

    The embedding, the norms and the LM head stay replicated: the simplest correct choice, at the cost of
    a full copy of the V x C matrices on every rank (Megatron also splits those, over the vocabulary, with
    a parallel cross entropy). Replicated parameters and buffers are broadcast from the mesh's first rank
    so every rank has the same. Qwen3's and Gemma 3's QK-norm gain is shared by all heads, but a rank
    only sees its own heads: its gradient there is a partial sum, so a hook all-reduces it over the mesh.
    mesh: a 1-D DeviceMesh of the tensor-parallel ranks; None = every process (`default_mesh()`).
    """
    if mesh is not None and mesh.ndim != 1:
        raise ValueError(f"mesh must be 1-D (the tensor-parallel ranks), got {mesh.ndim}-D of shape "
                         f"{tuple(mesh.shape)}")
    tp_size = mesh.size() if mesh is not None else get_world_size()
    check_tensor_parallel(model, tp_size)  # before any collective: a wrong degree fails on every rank alike
    mesh = default_mesh() if mesh is None else mesh
    # the replicated weights must be equal everywhere, or ranks would compute different things
    group, src = mesh.get_group(), mesh.mesh.flatten()[0].item()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=src, group=group)
    for block in model.blocks:
        parallelize_module(block, mesh, _megatron_plan())
        # what is left in attention unsplit (QK-norm gains) saw this rank's heads only: sum its gradient
        for p in block.attn.parameters():
            if not isinstance(p, DTensor):
                p.register_hook(functools.partial(_sum_over_ranks, group=group))
        # attention reshapes with these counts (view(B, T, H, D)): make them this rank's
        block.attn.n_heads //= tp_size
        block.attn.n_kv_heads //= tp_size
    return model
