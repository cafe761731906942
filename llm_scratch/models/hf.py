"""Load Hugging Face checkpoints (a folder written by `save_pretrained`) into our models.

    model = load_hf_checkpoint("path/to/gpt2")      # config.json + model.safetensors (or sharded)

The folder's config.json names the architecture (`model_type`); each supported type has a config
translator and a weight-name map here. Tensors are read with safetensors (no pickle, no code runs),
renamed, reshaped where the layouts differ, and loaded with strict keys: anything missing or left
over is an error that lists it. `transformers` is never imported.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from llm_scratch.models.gpt2 import GPT2, GPT2Config

__all__ = ["SUPPORTED_MODEL_TYPES", "load_hf_checkpoint", "read_hf_state_dict"]


def read_hf_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: model.safetensors, or the shards its index lists."""
    folder = pathlib.Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return load_file(single)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")


# --- GPT-2 -------------------------------------------------------------------------------------------


def _gpt2_config(hf: dict) -> GPT2Config:
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"n_inner={hf['n_inner']} is not supported (GPT-2 uses 4·n_embd)")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function={hf['activation_function']!r} is not GPT-2's tanh GELU")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ValueError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
    return GPT2Config(vocab_size=hf["vocab_size"], context_length=hf["n_positions"], d_model=hf["n_embd"],
                      n_layers=hf["n_layer"], n_heads=hf["n_head"], layer_norm_eps=hf["layer_norm_epsilon"])


def _gpt2_weights(state: dict[str, torch.Tensor], cfg: GPT2Config) -> dict[str, torch.Tensor]:
    """HF GPT-2 names -> ours. HF's Conv1D stores weights as (in, out): transpose to nn.Linear's (out, in);
    c_attn packs W_Q, W_K, W_V along the output dimension: split it in three."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    C = cfg.d_model
    for key, value in state.items():
        if re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias", key):
            continue  # old checkpoints store the causal-mask buffer; we build masks on the fly
        if key == "lm_head.weight":
            if not torch.equal(value, state["wte.weight"]):
                raise ValueError("lm_head.weight differs from wte.weight: this GPT-2 is not tied, ours always is")
            continue
        m = re.fullmatch(r"h\.(\d+)\.(.+)", key)
        if m is None:
            out[{"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "ln_f.weight": "ln_f.weight",
                 "ln_f.bias": "ln_f.bias"}.get(key, key)] = value
            continue
        layer, rest = m.groups()
        prefix = f"blocks.{layer}."
        if rest == "attn.c_attn.weight":
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split(C, dim=1), strict=True):
                out[f"{prefix}attn.{name}.weight"] = part.T.contiguous()
        elif rest == "attn.c_attn.bias":
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split(C), strict=True):
                out[f"{prefix}attn.{name}.bias"] = part
        else:
            renamed = {"attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
            for theirs, ours in renamed.items():
                if rest.startswith(theirs + "."):
                    kind = rest[len(theirs) + 1:]
                    out[f"{prefix}{ours}.{kind}"] = value.T.contiguous() if kind == "weight" else value
                    break
            else:
                out[prefix + rest] = value  # ln_1, ln_2
    return out


# model_type -> (config translator, weight mapper, model class)
_ARCHITECTURES: dict[str, tuple[Callable, Callable, type[nn.Module]]] = {
    "gpt2": (_gpt2_config, _gpt2_weights, GPT2),
}
SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES)


def load_hf_checkpoint(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> nn.Module:
    """Our model with the weights of a Hugging Face checkpoint folder, in eval mode."""
    folder = pathlib.Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a save_pretrained folder")
    hf_config = json.loads(config_path.read_text())
    model_type = hf_config.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(_ARCHITECTURES)}")
    to_config, to_weights, model_class = _ARCHITECTURES[model_type]
    cfg = to_config(hf_config)
    with torch.device("meta"):
        model = model_class(cfg)
    weights = to_weights(read_hf_state_dict(folder), cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(expected) & set(weights) if weights[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{folder} does not fit {model_class.__name__}:"
                         + (f"\n  missing keys ({len(missing)}): {', '.join(missing)}" if missing else "")
                         + (f"\n  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}" if unexpected else "")
                         + (f"\n  shape mismatches: {'; '.join(shapes)}" if shapes else ""))
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
    return model.to(device).eval()
