"""Training on several processes with torch.distributed, launched by torchrun (one process per device).

- `process_group`: `init_distributed()` joins the group torchrun set up (NCCL on GPUs, Gloo on CPUs), or
  is a 1-process no-op without torchrun; `is_main_process()`, `cleanup()`.
- data parallel (DDP): built into `llm_scratch.training.Trainer`, which wraps the model in
  DistributedDataParallel and shards every batch when the process group has more than one rank.
- `fsdp`: FSDP2 (`fully_shard`) per transformer block, sharded checkpoints with torch.distributed.checkpoint.
- `tensor_parallel`: Megatron's column / row parallel linears from scratch, and `apply_tensor_parallel`
  with DTensor for the Llama family.
"""

from llm_scratch.distributed.fsdp import (
    apply_fsdp,
    load_sharded,
    local_parameter_bytes,
    parameter_bytes_per_rank,
    save_sharded,
)
from llm_scratch.distributed.process_group import (
    DistributedInfo,
    backend_for,
    cleanup,
    default_mesh,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
)
from llm_scratch.distributed.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    apply_tensor_parallel,
    check_tensor_parallel,
    copy_to_parallel_region,
    gather_from_parallel_region,
    reduce_from_parallel_region,
)

__all__ = [
    "ColumnParallelLinear",
    "DistributedInfo",
    "RowParallelLinear",
    "apply_fsdp",
    "apply_tensor_parallel",
    "backend_for",
    "check_tensor_parallel",
    "cleanup",
    "copy_to_parallel_region",
    "default_mesh",
    "gather_from_parallel_region",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "load_sharded",
    "local_parameter_bytes",
    "parameter_bytes_per_rank",
    "reduce_from_parallel_region",
    "save_sharded",
]
