"""The 2-process half of tests/test_distributed.py, launched by it as

    python -m torch.distributed.run --standalone --nproc_per_node=2 run_checks.py OUT_DIR CHECK [CHECK ...]

Each check runs on every rank and returns numbers (max abs differences, losses, counts); rank 0 writes
{check: [rank 0's numbers, rank 1's numbers]} to OUT_DIR/results.json, and the tests assert on them, so a
failure shows the measured value. The DDP check also writes its trained weights and gradients for the
test to compare with a single-process run made in the test itself.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import MODELS, PER_RANK_BATCH, SMALL, VOCAB, T, tiny_model, train_config, windows  # this folder
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils._python_dispatch import TorchDispatchMode

from llm_scratch.distributed import (
    ColumnParallelLinear,
    RowParallelLinear,
    apply_fsdp,
    apply_tensor_parallel,
    cleanup,
    copy_to_parallel_region,
    default_mesh,
    gather_from_parallel_region,
    init_distributed,
    is_main_process,
    load_sharded,
    parameter_bytes_per_rank,
    reduce_from_parallel_region,
    save_sharded,
)
from llm_scratch.models import Llama3, Llama3Config
from llm_scratch.moe.layers import DeepSeekMoE
from llm_scratch.training import Trainer, cross_entropy_loss


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


# --- process group ----------------------------------------------------------------------------------------


def check_init(out: pathlib.Path) -> dict:
    info = init_distributed()  # a second call: returns the group the first one joined
    return {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
            "device": str(info.device), "backend": dist.get_backend(), "is_main": is_main_process()}


# --- DDP through the Trainer --------------------------------------------------------------------------------


def check_ddp(out: pathlib.Path) -> dict:
    rank = dist.get_rank()
    # rank 1 starts from other weights on purpose: DDP must broadcast rank 0's at construction
    model = tiny_model("llama3", seed=rank)
    trainer = Trainer(model, windows(16, 1), windows(8, 2), train_config(PER_RANK_BATCH), device="cpu")
    reduced_buckets: list[int] = []  # bucket indices all-reduced during the current step

    def counting_hook(state, bucket):
        reduced_buckets.append(bucket.index())
        return allreduce_hook(None, bucket)  # DDP's default: all-reduce, divide by world size

    trainer.ddp.register_comm_hook(None, counting_hook)
    grads, reductions = [], []

    def before_step(optimizer, args, kwargs):  # the (clipped) gradients the optimizer is about to use
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        reductions.append(list(reduced_buckets))
        reduced_buckets.clear()

    trainer.optimizer.register_step_pre_hook(before_step)
    history = trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    everyone: list[dict | None] = [None, None]
    dist.all_gather_object(everyone, params)
    across_ranks = max(max_diff(everyone[0][n], everyone[1][n]) for n in params)
    trainer.save(out / "ddp_run")
    if rank == 0:
        torch.save({"grads": grads, "params": params, "train_loss": history.train_loss,
                    "val_loss": history.val_loss, "tokens_seen": trainer.tokens_seen}, out / "ddp.pt")
    return {"params_max_diff_across_ranks": across_ranks, "reduced_buckets_per_step": reductions,
            "train_loss": history.train_loss, "val_loss": history.val_loss, "tokens_seen": trainer.tokens_seen,
            "saved": (out / "ddp_run.safetensors").exists()}


# --- FSDP2 --------------------------------------------------------------------------------------------------


def _fsdp_loss(model, batch, rank, world_size):
    """This rank's share of the global batch's mean loss, x world_size (FSDP averages gradients over ranks)."""
    x, y = batch
    x, y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
    n_local = (y != -100).sum()
    n_global = n_local.clone()
    dist.all_reduce(n_global)
    return cross_entropy_loss(model(x), y) * n_local * world_size / n_global


def _global_batches(n_batches: int, size: int, seed: int):
    data = windows(n_batches * size, seed)
    return [(torch.stack([x for x, _ in data[i:i + size]]), torch.stack([y for _, y in data[i:i + size]]))
            for i in range(0, len(data), size)]


def _train_step(model, optimizer, batch, rank, world_size) -> float:
    loss = _fsdp_loss(model, batch, rank, world_size)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    total = loss.detach() / world_size  # the global mean once summed over ranks
    dist.all_reduce(total)
    return total.item()


def check_fsdp(out: pathlib.Path) -> dict:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mesh = default_mesh()
    ref = tiny_model("llama3", seed=0)
    model = apply_fsdp(copy.deepcopy(ref), mesh)
    sharded = {n: isinstance(p, DTensor) for n, p in model.named_parameters()}

    # gradients on a global batch of 4 whose halves have different target counts
    batch = _global_batches(1, 4, seed=3)[0]
    _fsdp_loss(model, batch, rank, world_size).backward()
    cross_entropy_loss(ref(batch[0]), batch[1]).backward()  # one process, the whole batch
    ref_grads = dict(ref.named_parameters())
    grad_diff = max(max_diff(full(p.grad), ref_grads[n].grad) for n, p in model.named_parameters())
    grad_scale = max(ref_grads[n].grad.abs().max().item() for n in ref_grads)
    model.zero_grad(set_to_none=True)

    # parameter memory: each rank holds half of every sharded matrix
    per_rank = parameter_bytes_per_rank(model)
    full_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())

    # sharded checkpoint: train 2 steps, save, continue 2 steps; a new model loads and continues the same
    batches = _global_batches(4, 4, seed=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for b in range(2):
        _train_step(model, optimizer, batches[b], rank, world_size)
    save_sharded(out / "fsdp_ckpt", model, optimizer, step=2)
    uninterrupted = [_train_step(model, optimizer, batches[b], rank, world_size) for b in (2, 3)]

    resumed_model = apply_fsdp(tiny_model("llama3", seed=123), mesh)  # other weights until loaded
    resumed_opt = torch.optim.AdamW(resumed_model.parameters(), lr=1e-2)
    fresh_loss = _fsdp_loss(resumed_model, batches[2], rank, world_size).detach() / world_size
    dist.all_reduce(fresh_loss)
    step = load_sharded(out / "fsdp_ckpt", resumed_model, resumed_opt)
    resumed = [_train_step(resumed_model, resumed_opt, batches[b], rank, world_size) for b in (2, 3)]
    return {"all_params_dtensor": all(sharded.values()), "grad_max_diff": grad_diff, "grad_max_abs": grad_scale,
            "param_bytes_per_rank": per_rank, "full_param_bytes": full_bytes, "loaded_step": step,
            "uninterrupted_losses": uninterrupted, "resumed_losses": resumed,
            "unloaded_model_loss": fresh_loss.item(), "checkpoint_files": sorted(
                p.name for p in (out / "fsdp_ckpt").iterdir()), "tmp_left": (out / "fsdp_ckpt.tmp").exists()}


# --- tensor parallel ----------------------------------------------------------------------------------------


class _MLP(nn.Module):
    def __init__(self, up: nn.Linear, down: nn.Linear):
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def check_tp_linear(out: pathlib.Path) -> dict:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    r = {}
    # the three primitives, on inputs that differ per rank
    x = torch.full((3,), float(rank + 1), requires_grad=True)
    (copy_to_parallel_region(x) * (rank + 1)).sum().backward()
    r["copy_backward"] = x.grad.tolist()  # Σ_r (r + 1) = 3 on both ranks
    x = torch.full((3,), float(rank + 1), requires_grad=True)
    y = reduce_from_parallel_region(x)
    (y * (rank + 1)).sum().backward()
    r["reduce_forward"], r["reduce_backward"] = y.tolist(), x.grad.tolist()  # 3s; (rank + 1)s
    x = torch.full((2,), float(rank + 1), requires_grad=True)
    y = gather_from_parallel_region(x)
    (y * torch.arange(4.0)).sum().backward()
    r["gather_forward"], r["gather_backward"] = y.tolist(), x.grad.tolist()  # [1,1,2,2]; rank's slice of 0..3

    # Megatron MLP: ColumnParallelLinear -> GELU -> RowParallelLinear vs the unsplit layers
    torch.manual_seed(0)  # the same layers, input and upstream gradient on every rank
    up, down = nn.Linear(8, 16), nn.Linear(16, 8)
    x, upstream = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    ref = _MLP(copy.deepcopy(up), copy.deepcopy(down))
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    (y_ref * upstream).sum().backward()

    col = ColumnParallelLinear.from_linear(up, rank, world_size)
    row = RowParallelLinear.from_linear(down, rank, world_size)
    x_ours = x.clone().requires_grad_()
    y_ours = row(F.gelu(col(x_ours)))
    (y_ours * upstream).sum().backward()
    r["mlp"] = {
        "out": max_diff(y_ours, y_ref), "x_grad": max_diff(x_ours.grad, x_ref.grad),
        "col_weight_grad": max_diff(col.weight.grad, ref.up.weight.grad.chunk(world_size, 0)[rank]),
        "col_bias_grad": max_diff(col.bias.grad, ref.up.bias.grad.chunk(world_size, 0)[rank]),
        "row_weight_grad": max_diff(row.weight.grad, ref.down.weight.grad.chunk(world_size, 1)[rank]),
        "row_bias_grad": max_diff(row.bias.grad, ref.down.bias.grad),
        "out_max_abs": y_ref.abs().max().item(),
        "grad_max_abs": max(p.grad.abs().max().item() for p in ref.parameters()),
    }

    # a column-parallel layer with gather_output: the whole output on every rank
    gathered = ColumnParallelLinear.from_linear(up, rank, world_size, gather_output=True)
    up_ref, up_upstream = copy.deepcopy(up), torch.randn(2, 3, 16)
    x_up_ref, x_gathered = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_up_ref, y_gathered = up_ref(x_up_ref), gathered(x_gathered)
    (y_up_ref * up_upstream).sum().backward()
    (y_gathered * up_upstream).sum().backward()
    r["gather_output"] = {"out": max_diff(y_gathered, y_up_ref), "x_grad": max_diff(x_gathered.grad, x_up_ref.grad),
                          "weight_grad": max_diff(gathered.weight.grad, up_ref.weight.grad.chunk(world_size, 0)[rank])}

    # DTensor's ColwiseParallel / RowwiseParallel on the same MLP: same output, same local gradients as ours
    dt = parallelize_module(_MLP(copy.deepcopy(up), copy.deepcopy(down)), default_mesh(),
                            {"up": ColwiseParallel(), "down": RowwiseParallel()})
    x_dt = x.clone().requires_grad_()
    y_dt = dt(x_dt)
    (y_dt * upstream).sum().backward()
    r["vs_dtensor"] = {
        "out": max_diff(y_dt, y_ours), "x_grad": max_diff(x_dt.grad, x_ref.grad),
        "col_weight": max_diff(dt.up.weight.to_local(), col.weight),
        "col_weight_grad": max_diff(dt.up.weight.grad.to_local(), col.weight.grad),
        "col_bias_grad": max_diff(dt.up.bias.grad.to_local(), col.bias.grad),
        "row_weight_grad": max_diff(dt.down.weight.grad.to_local(), row.weight.grad),
        "row_bias_grad": max_diff(full(dt.down.bias.grad), row.bias.grad),
    }
    return r


class CountAllReduces(TorchDispatchMode):
    """Counts all-reduces as they reach the dispatcher: c10d's (dist.all_reduce, the QK-norm hooks) and the
    functional ones DTensor issues."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "allreduce" in func.__name__.replace("_", ""):
            self.count += 1
        return func(*args, **(kwargs or {}))


def check_tp_models(out: pathlib.Path) -> dict:
    rank = dist.get_rank()
    mesh = default_mesh()
    g = torch.Generator().manual_seed(5)
    ids, targets = torch.randint(0, VOCAB, (2, T), generator=g), torch.randint(0, VOCAB, (2, T), generator=g)
    r = {}
    for name in MODELS:
        ref = tiny_model(name, seed=0)
        # rank 1 builds other weights on purpose: the split must take rank 0's (scatter and broadcast from it)
        model = apply_tensor_parallel(tiny_model(name, seed=rank), mesh)
        with CountAllReduces() as forward:
            logits = model(ids)
        ref_logits = ref(ids)
        with CountAllReduces() as backward:
            cross_entropy_loss(logits, targets).backward()
        cross_entropy_loss(ref_logits, targets).backward()
        ref_params = dict(ref.named_parameters())
        attn = model.blocks[0].attn
        r[name] = {
            "logits": max_diff(logits, ref_logits), "logits_max_abs": ref_logits.abs().max().item(),
            "grad": max(max_diff(full(p.grad), ref_params[n].grad) for n, p in model.named_parameters()),
            "grad_max_abs": max(p.grad.abs().max().item() for p in ref.parameters()),
            "local_heads": [attn.n_heads, attn.n_kv_heads], "local_q_proj": list(attn.q_proj.weight.to_local().shape),
            "sharded": sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))[:7],
            "all_reduces": [forward.count, backward.count],
        }
    try:  # 1 kv head cannot be split over 2 ranks
        apply_tensor_parallel(Llama3(Llama3Config(**dict(SMALL, n_kv_heads=1))), mesh)
        r["indivisible_error"] = None
    except ValueError as e:
        r["indivisible_error"] = str(e)
    return r


def check_moe_bias(out: pathlib.Path) -> dict:
    """DeepSeekMoE's loss-free balancing step under data parallelism: each rank counted other tokens."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    layer = DeepSeekMoE(8, 16, n_routed=4, n_shared=1, k=2, bias_update_speed=0.1)
    layer.load = torch.tensor([[5, 0, 1, 2], [0, 1, 1, 6]][rank])  # summed: [5, 1, 2, 8], mean 4
    layer.update_bias()
    return {"bias": layer.router.bias.tolist(), "load_after": layer.load.tolist()}


CHECKS = {"init": check_init, "moe_bias": check_moe_bias, "ddp": check_ddp, "fsdp": check_fsdp,
          "tp_linear": check_tp_linear, "tp_models": check_tp_models}


def main() -> None:
    out, names = pathlib.Path(sys.argv[1]), sys.argv[2:]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise SystemExit(f"unknown checks {unknown}; known: {list(CHECKS)}")
    info = init_distributed()
    torch.set_num_threads(1)
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            result = CHECKS[name](out)
        except Exception:  # report it and go on; the test of this check fails with the traceback
            result = {"error": traceback.format_exc()}
            print(f"rank {info.rank}, check {name}:\n{result['error']}", file=sys.stderr, flush=True)
        result["seconds"] = time.perf_counter() - start
        everyone: list[dict | None] = [None] * info.world_size
        dist.all_gather_object(everyone, result)
        results[name] = everyone
    if info.rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    cleanup()
    # Skip the interpreter's teardown: there Gloo's worker threads are sometimes destroyed still joinable,
    # which aborts the process ("terminate called without an active exception", about 1 run in 10 here,
    # after everything was computed and written; see pytorch/pytorch PR 179291 on Gloo threads at
    # interpreter finalization). The results are on disk and the process group is destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
