"""Making a training step cheaper, and measuring what it costs.

- Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost", arXiv:1604.06174):
  `checkpoint_blocks(model)` makes each Transformer block keep only its input for backward and recompute its
  inside during backward: activation memory falls from every block's intermediates to one tensor per block, for
  about one extra forward pass of compute.
- `SavedTensorBytes`: counts the bytes autograd keeps for backward during a forward pass (the activation
  memory), on any device: on a CPU there is no `max_memory_allocated`, and this is the part checkpointing and
  mixed precision change.
- Model FLOPs utilization (MFU; Chowdhery et al. 2022, PaLM, appendix B, as nanoGPT computes it): a decoder's
  training step costs 6N FLOPs per token for the weight matmuls (2N forward, 4N backward) plus 12·L·H·Q·T for
  attention's QKᵀ and AV (L layers, H heads of width Q, T the sequence length); MFU = achieved FLOPs/s divided
  by the device's dense peak.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm_scratch.device import is_cuda

__all__ = ["PEAK_BF16_FLOPS", "SavedTensorBytes", "checkpoint_blocks", "device_peak_flops", "mfu",
           "transformer_flops_per_token"]

# dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOPs/s
PEAK_BF16_FLOPS = {
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
}


def checkpoint_blocks(model: nn.Module, enabled: bool = True) -> int:
    """Recompute each block of `model.blocks` in backward instead of storing its activations (when grad is on and
    no KV cache is passed). The block's `forward` is wrapped in place, so parameter names and checkpoints are
    unchanged; `enabled=False` restores the plain forward. Returns the number of blocks changed."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"model must have a `blocks` list of Transformer blocks; {type(model).__name__} has none")
    for block in blocks:
        block.__dict__.pop("forward", None)  # an earlier wrapper, if any: back to the class's forward
        if enabled:
            block.forward = _checkpointed(type(block).forward.__get__(block))
    return len(blocks)


def _checkpointed(forward):
    def run(*args, **kwargs):
        if torch.is_grad_enabled() and kwargs.get("cache") is None:
            # non-reentrant: works with keyword arguments and inputs that do not require grad; the RNG state is
            # saved and restored, so dropout draws the same masks in the recomputation
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


class SavedTensorBytes:
    """`with SavedTensorBytes() as saved: loss = model(x)...` -> saved.bytes: the bytes of the distinct tensors
    autograd saved for backward inside the block (a tensor saved twice counts once; parameters count too, since
    a matmul saves its weight, so compare runs of the same model). `saved.parameter_bytes` is that share."""

    def __init__(self, model: nn.Module | None = None):
        self._params = {p.data_ptr() for p in model.parameters()} if model is not None else set()
        self._seen: dict[tuple[int, int], int] = {}
        self.bytes = 0
        self.parameter_bytes = 0

    def _pack(self, t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in self._seen:
            size = t.untyped_storage().nbytes()
            self._seen[key] = size
            self.bytes += size
            if t.data_ptr() in self._params:
                self.parameter_bytes += size
        return t

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def transformer_flops_per_token(n_params: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> int:
    """Training FLOPs per token: 6·N + 12·L·H·Q·T (PaLM appendix B; nanoGPT's estimate_mfu). N should exclude
    the position-embedding table (a lookup, no matmul), as nanoGPT's non-embedding count does; the tied
    token embedding stays in N because it is also the output head's matmul."""
    for name, value in (("n_params", n_params), ("n_layers", n_layers), ("n_heads", n_heads),
                        ("head_dim", head_dim), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return 6 * n_params + 12 * n_layers * n_heads * head_dim * seq_len


def device_peak_flops(device: torch.device | str) -> tuple[str, float] | None:
    """(name, dense bf16 peak FLOPs/s) of a CUDA device in PEAK_BF16_FLOPS, else None (a CPU has no entry: its
    peak depends on the core count, clock and vector units, so MFU is not reported there)."""
    device = torch.device(device)
    if not is_cuda(device):
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        words = key.split()
        if all(w.lower() in name.lower() for w in words) and ("PCIe" in key) == ("PCIe" in name):
            return key, peak
    return None


def mfu(tokens_per_s: float, flops_per_token: int, peak_flops: float) -> float:
    """Model FLOPs utilization: tokens/s x FLOPs per token / peak FLOPs/s (a fraction, 0..1 in practice)."""
    if tokens_per_s < 0 or peak_flops <= 0:
        raise ValueError(f"need tokens_per_s >= 0 and peak_flops > 0, got {tokens_per_s} and {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops
