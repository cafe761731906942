"""llm_scratch.distributed on 2 CPU processes (Gloo): DDP in the Trainer, FSDP2 and its sharded checkpoints,
tensor parallelism from scratch and with DTensor, each compared with one process doing the same work.

The 2-process work runs once per session in tests/distributed_workers/run_checks.py, launched with torchrun
(`--standalone` picks a free port); it returns its measurements, and each test below asserts on one part.
Tolerances: two ranks add the same float32 numbers in another order (an all-reduce sums two partial sums;
a row-parallel layer sums two half dot products), so results differ from one process's by a few float32
ulps of the values involved (values here are at most a few units: 1e-8 to 1e-6), never more; a wrong weighting, a
missing all-reduce or a wrong shard gives differences of 1e-3 and up.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from distributed_workers.common import PER_RANK_BATCH, SMALL, STEPS, WORLD_SIZE, tiny_model, train_config, windows
from filelock import FileLock  # a dependency of torch itself

from llm_scratch.checkpoint import load_tensors
from llm_scratch.device import get_device
from llm_scratch.distributed import (
    ColumnParallelLinear,
    DistributedInfo,
    RowParallelLinear,
    apply_fsdp,
    apply_tensor_parallel,
    backend_for,
    check_tensor_parallel,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from llm_scratch.models import Llama3, Llama3Config
from llm_scratch.training import ResumableBatches, Trainer, count_targets

pytestmark = pytest.mark.distributed

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "distributed_workers" / "run_checks.py"
CHECKS = ("init", "moe_bias", "ddp", "fsdp", "tp_linear", "tp_models")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _run_two_ranks(out: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}  # in case pytest itself runs under torchrun
    env.update(OMP_NUM_THREADS="1", LLM_SCRATCH_DEVICE="cpu",  # Gloo on the CPU, also on a GPU machine
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(out), *CHECKS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


@pytest.fixture(scope="module")
def two_ranks(request, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """Run every 2-process check once; (output folder, {check: [rank 0's results, rank 1's]})."""
    if getattr(request.config, "workerinput", None) is None:  # a plain pytest run
        out = tmp_path_factory.mktemp("two_ranks")
        _run_two_ranks(out)
    else:  # pytest-xdist: the first worker to get here launches torchrun, the others wait and read its results
        out = tmp_path_factory.getbasetemp().parent / "two_ranks"  # shared by this session's workers only
        with FileLock(f"{out}.lock"):
            if not (out / "results.json").exists():
                out.mkdir(exist_ok=True)
                _run_two_ranks(out)
    return out, json.loads((out / "results.json").read_text())


def _ranks(two_ranks, check: str) -> list[dict]:
    results = two_ranks[1][check]
    assert len(results) == 2
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank} failed in {check}:\n{result['error']}"
    return results


# --- process group --------------------------------------------------------------------------------------------


def test_init_distributed_without_torchrun_is_a_one_process_no_op(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert init_distributed(device="cpu") == DistributedInfo(0, 1, 0, torch.device("cpu"))
    assert init_distributed().device == get_device()
    assert not dist.is_initialized()  # no process group was made
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)
    cleanup()  # nothing to leave: must not raise
    assert (backend_for("cpu"), backend_for("cuda"), backend_for(torch.device("cuda", 1))) == ("gloo", "nccl", "nccl")
    with pytest.raises(ValueError, match="mps"):
        backend_for("mps")
    monkeypatch.setenv("RANK", "0")  # a half-set torchrun environment is an error, not a 1-process run
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "two")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an int"):
        init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match=r"RANK \(1\) must be < WORLD_SIZE \(1\)"):
        init_distributed()
    assert not dist.is_initialized()


def test_init_distributed_under_torchrun(two_ranks):
    ranks = _ranks(two_ranks, "init")
    assert [(r["rank"], r["world_size"], r["local_rank"], r["is_main"]) for r in ranks] == [(0, 2, 0, True),
                                                                                              (1, 2, 1, False)]
    assert {(r["device"], r["backend"]) for r in ranks} == {("cpu", "gloo")}


# --- DDP ------------------------------------------------------------------------------------------------------


def test_moe_balancing_bias_steps_on_the_load_of_all_ranks(two_ranks):
    # loads [5, 0, 1, 2] and [0, 1, 1, 6] sum to [5, 1, 2, 8], mean 4: b_i += 0.1 * sign(4 - load_i); rank 0's
    # load alone (mean 2) would give [-0.1, 0.1, 0.1, 0.0] and rank 1's [0.1, 0.1, 0.1, -0.1]
    for r in _ranks(two_ranks, "moe_bias"):
        assert r["bias"] == pytest.approx([-0.1, 0.1, 0.1, -0.1]) and r["load_after"] == [0, 0, 0, 0]


def test_resumable_batches_give_each_rank_its_part_of_the_global_batch():
    data = windows(20, seed=1)  # 20 windows, global batch 4: 5 per epoch, so 7 steps cross an epoch
    whole = ResumableBatches(data, 4, seed=3)
    parts = [ResumableBatches(data, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):
        x, y = next(whole)
        (x0, y0), (x1, y1) = (next(p) for p in parts)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert parts[0].state_dict() == parts[1].state_dict() == whole.state_dict() == {"epoch": 1, "index": 2}
    with pytest.raises(ValueError, match="rank"):
        ResumableBatches(data, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size=2"):
        ResumableBatches(data, 11, world_size=2)


def _one_process_reference():
    """The run DDP must reproduce: one process, batch PER_RANK_BATCH x WORLD_SIZE, the same data and steps."""
    trainer = Trainer(tiny_model("llama3", seed=0), windows(16, 1), windows(8, 2),
                      train_config(PER_RANK_BATCH * WORLD_SIZE), device="cpu")
    grads = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    history = trainer.train()
    return trainer, grads, history


def test_ddp_trainer_equals_one_process_on_the_global_batch(two_ranks):
    out, _ = two_ranks
    ranks = _ranks(two_ranks, "ddp")
    # the test means something only if the ranks' shares of a step have different target counts
    shards = [ResumableBatches(windows(16, 1), PER_RANK_BATCH, seed=0, rank=r, world_size=WORLD_SIZE)
              for r in range(WORLD_SIZE)]
    assert len({count_targets(next(s)[1]) for s in shards}) == WORLD_SIZE

    ddp = torch.load(out / "ddp.pt")
    trainer, grads, history = _one_process_reference()
    assert len(ddp["grads"]) == len(grads) == STEPS
    # gradients of every step (after clipping, as the optimizer uses them) and the weights after 3 AdamW steps:
    # reduction order only (gradients are below 1, weights about 0.02 to 1)
    grad_diff = max((ddp["grads"][s][n] - grads[s][n]).abs().max().item() for s in range(STEPS) for n in grads[s])
    assert grad_diff < 1e-6, grad_diff
    params = dict(trainer.model.named_parameters())
    param_diff = max((ddp["params"][n] - p.detach()).abs().max().item() for n, p in params.items())
    assert param_diff < 1e-6, param_diff
    assert ddp["train_loss"] == pytest.approx(history.train_loss, abs=1e-6)
    assert ddp["val_loss"] == pytest.approx(history.val_loss, abs=1e-6)  # evaluated on both ranks, averaged
    assert ddp["tokens_seen"] == trainer.tokens_seen  # targets of the global batches
    # both ranks hold the very same weights: rank 1 started from others (DDP broadcast rank 0's), and every
    # step applied the same all-reduced gradient
    assert [r["params_max_diff_across_ranks"] for r in ranks] == [0.0, 0.0]
    assert ranks[0]["train_loss"] == ranks[1]["train_loss"] and ranks[0]["val_loss"] == ranks[1]["val_loss"]
    # no_sync: each step all-reduced each gradient bucket once (the last micro-batch), not once per micro-batch
    for r in ranks:
        assert all(len(step) >= 1 and len(step) == len(set(step)) for step in r["reduced_buckets_per_step"]), r


def test_ddp_checkpoint_is_written_once_and_resumes_in_one_process(two_ranks):
    out, _ = two_ranks
    ranks = _ranks(two_ranks, "ddp")
    assert all(r["saved"] for r in ranks)  # save returned on both ranks after rank 0 wrote the files
    tensors, record = load_tensors(out / "ddp_run")
    assert {"rng.rank0.cpu", "rng.rank1.cpu"} <= set(tensors)  # each rank's dropout RNG, for an exact resume
    assert not any(k.startswith("model.module.") for k in tensors)  # the unwrapped model's names, not DDP's
    ddp = torch.load(out / "ddp.pt")
    resumed = Trainer.resume(out / "ddp_run", tiny_model("llama3", seed=7), windows(16, 1), windows(8, 2),
                             device="cpu")
    # 3 steps x 2 micro-batches = 6 global batches of 4 from 16 windows (4 per epoch): the global position
    assert resumed.step == STEPS and record["data"] == {"epoch": 1, "index": 2}
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p.detach(), ddp["params"][name]), name


# --- FSDP2 ----------------------------------------------------------------------------------------------------


def test_fsdp2_gradients_equal_one_process(two_ranks):
    for r in _ranks(two_ranks, "fsdp"):
        assert r["all_params_dtensor"]
        # full_tensor() of the reduce-scattered gradients vs one process on the whole batch (gradients < 0.3)
        assert r["grad_max_diff"] < 1e-6, r["grad_max_diff"]
        assert r["grad_max_abs"] > 1e-2  # and the gradients are not all ~0, which would make that trivial
        # each rank keeps half of every parameter: the shards add up to the whole model exactly
        assert sum(r["param_bytes_per_rank"]) == r["full_param_bytes"]
        assert r["param_bytes_per_rank"] == [r["full_param_bytes"] // 2] * 2


def test_fsdp2_sharded_checkpoint_resumes_to_the_same_losses(two_ranks):
    for r in _ranks(two_ranks, "fsdp"):
        assert r["loaded_step"] == 2
        assert r["checkpoint_files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"] and not r["tmp_left"]
        # the next loss depends on the loaded weights, the one after also on AdamW's loaded moments; the same
        # operations on the same shards, so equal to float32 rounding (in practice bit for bit)
        assert r["resumed_losses"] == pytest.approx(r["uninterrupted_losses"], abs=1e-6)
        # the model before loading had other weights: a load that did nothing would fail the line above
        assert abs(r["unloaded_model_loss"] - r["uninterrupted_losses"][0]) > 1e-3


def test_apply_fsdp_needs_blocks():
    with pytest.raises(ValueError, match="blocks"):
        apply_fsdp(torch.nn.Linear(2, 2))


# --- tensor parallel ------------------------------------------------------------------------------------------


def test_parallel_region_primitives(two_ranks):
    for rank, r in enumerate(_ranks(two_ranks, "tp_linear")):
        # rank r feeds (r + 1)s and weights its output by (r + 1)
        assert r["copy_backward"] == [3.0] * 3  # all-reduced gradient: 1 + 2
        assert r["reduce_forward"] == [3.0] * 3 and r["reduce_backward"] == [rank + 1.0] * 3
        assert r["gather_forward"] == [1.0, 1.0, 2.0, 2.0]
        assert r["gather_backward"] == [2.0 * rank, 2.0 * rank + 1]  # this rank's slice of 0, 1, 2, 3


def test_column_and_row_parallel_linears_equal_nn_linear_and_dtensor(two_ranks):
    for r in _ranks(two_ranks, "tp_linear"):
        # column -> GELU -> row (the Megatron MLP) and a column layer with gather_output, vs unsplit nn.Linear:
        # outputs, input gradients and each rank's slice of the weight and bias gradients. Outputs are below 1,
        # weight gradients (sums over 6 positions) up to grad_max_abs (about 3): a few float32 ulps of that
        assert r["mlp"]["out_max_abs"] < 1 and r["mlp"]["grad_max_abs"] < 4, r["mlp"]
        for part in ("mlp", "gather_output"):
            worst = max(v for k, v in r[part].items() if not k.endswith("max_abs"))
            assert worst < 2e-6, (part, r[part])
        # DTensor's ColwiseParallel / RowwiseParallel on the same MLP: same output and local gradients
        assert max(r["vs_dtensor"].values()) < 1e-6, r["vs_dtensor"]


def test_parallel_linear_arguments_are_checked():
    with pytest.raises(ValueError, match="out_features"):
        ColumnParallelLinear(8, 15, rank=0, world_size=2)
    with pytest.raises(ValueError, match="in_features"):
        RowParallelLinear(15, 8, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ColumnParallelLinear.from_linear(torch.nn.Linear(4, 4), rank=2, world_size=2)


@pytest.mark.parametrize("name", ["llama3", "qwen3", "gemma3"])
def test_apply_tensor_parallel_equals_the_unsharded_model(two_ranks, name):
    for r in _ranks(two_ranks, "tp_models"):
        m = r[name]
        # logits (below 0.5) and every parameter's gradient (full_tensor() of the shards; the replicated
        # embedding, norms and QK-norm gains as they are) vs the unsplit model; reduction order only
        assert m["logits"] < 1e-6, m
        assert m["grad"] < 1e-6, m
        assert m["logits_max_abs"] > 0.1 and m["grad_max_abs"] > 1e-2  # not trivially small
        assert m["local_heads"] == [2, 1]  # n_heads 4 and n_kv_heads 2 over 2 ranks
        head_dim = SMALL["d_model"] // SMALL["n_heads"] if name == "llama3" else 8
        assert m["local_q_proj"] == [2 * head_dim, SMALL["d_model"]]
        assert m["sharded"] == [f"blocks.0.{p}.weight" for p in ("attn.k_proj", "attn.o_proj", "attn.q_proj",
                                                                 "attn.v_proj", "mlp.down_proj", "mlp.gate_proj",
                                                                 "mlp.up_proj")]
        # Megatron's count per block: 2 all-reduces forward (after o_proj, after down_proj) and 2 backward (one
        # per sub-layer's input gradient), plus the QK-norm gains' 2 gradient hooks of Qwen3 and Gemma 3
        n_layers = SMALL["n_layers"]
        assert m["all_reduces"] == [2 * n_layers, (2 if name == "llama3" else 4) * n_layers], m


def test_apply_tensor_parallel_rejects_a_degree_that_splits_a_head(two_ranks):
    for r in _ranks(two_ranks, "tp_models"):
        assert r["indivisible_error"] is not None and "n_kv_heads (1)" in r["indivisible_error"]


def test_check_tensor_parallel_fails_before_any_communication():
    model = Llama3(Llama3Config(**SMALL))  # 4 query heads, 2 kv heads, FFN 32
    check_tensor_parallel(model, 2)
    with pytest.raises(ValueError, match=r"n_heads \(4\).*degree 3"):
        check_tensor_parallel(model, 3)
    with pytest.raises(ValueError, match=r"n_kv_heads \(2\).*degree 4"):
        check_tensor_parallel(model, 4)
    with pytest.raises(ValueError, match="tp_size"):
        check_tensor_parallel(model, 0)
    with pytest.raises(ValueError, match="blocks"):
        check_tensor_parallel(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="process group"):  # degree 1 passes the check; then no group to split over
        apply_tensor_parallel(model)
