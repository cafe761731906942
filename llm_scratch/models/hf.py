"""Load Hugging Face checkpoints (a folder written by `save_pretrained`) into our models.

    model = load_hf_checkpoint("path/to/gpt2")      # config.json + model.safetensors (or sharded)

The folder's config.json names the architecture (`model_type`); each supported type has a config
translator and a weight-name map here. Tensors are read with safetensors (no pickle, no code runs),
renamed, reshaped where the layouts differ, and loaded with strict keys: anything missing or left
over is an error that lists it. `transformers` is never imported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from llm_scratch.models.deepseek_v3 import DeepSeekV3, DeepSeekV3Config
from llm_scratch.models.gemma3 import Gemma3, Gemma3Config
from llm_scratch.models.gpt2 import GPT2, GPT2Config
from llm_scratch.models.llama3 import Llama3, Llama3Config
from llm_scratch.models.mamba2 import Mamba2Config, Mamba2LM
from llm_scratch.models.qwen3 import Qwen3, Qwen3Config
from llm_scratch.models.vit import ViT, ViTConfig
from llm_scratch.position.rope import RopeScaling

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


# --- Llama 3, Qwen3, Gemma 3: one naming scheme ---------------------------------------------------


def _rope(hf: dict, params: dict | None, default_theta: float) -> tuple[float, dict | None]:
    """(base, scaling dict or None) from a `rope_parameters` dict (transformers 5) or the older top-level
    rope_theta + rope_scaling; missing lengths are filled in from max_position_embeddings as HF does."""
    if params is None:
        params = {"rope_theta": hf.get("rope_theta", default_theta), **(hf.get("rope_scaling") or {})}
    theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return float(theta), None
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    full = dataclasses.asdict(RopeScaling.from_dict(scaling, hf.get("max_position_embeddings")))
    return float(theta), full


def _check_unsupported(hf: dict, **expected) -> None:
    """Raise if the config sets an option our model does not implement (key: value we require)."""
    for key, allowed in expected.items():
        value = hf.get(key, allowed[0])
        if value not in allowed:
            raise ValueError(f"{hf.get('model_type')} config has {key}={value!r}; only {allowed} is supported")


def _llama_family_sizes(hf: dict) -> dict:
    return dict(vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"], d_model=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim"),
                ffn_hidden=hf["intermediate_size"], norm_eps=hf["rms_norm_eps"])


def _llama_config(hf: dict) -> Llama3Config:
    _check_unsupported(hf, attention_bias=(False,), mlp_bias=(False,), hidden_act=("silu",))
    base, scaling = _rope(hf, hf.get("rope_parameters"), 10000.0)
    return Llama3Config(**_llama_family_sizes(hf), rope_base=base, rope_scaling=scaling,
                        tie_embeddings=hf.get("tie_word_embeddings", False))


def _qwen3_config(hf: dict) -> Qwen3Config:
    _check_unsupported(hf, attention_bias=(False,), hidden_act=("silu",), use_sliding_window=(False,))
    base, scaling = _rope(hf, hf.get("rope_parameters"), 10000.0)
    return Qwen3Config(**_llama_family_sizes(hf), rope_base=base, rope_scaling=scaling,
                       tie_embeddings=hf.get("tie_word_embeddings", True))


def _gemma3_config(hf: dict) -> Gemma3Config:
    _check_unsupported(hf, attention_bias=(False,), hidden_activation=("gelu_pytorch_tanh",),
                       use_bidirectional_attention=(False, None), tie_word_embeddings=(True,))
    if hf.get("attn_logit_softcapping") is not None:
        # transformers' Gemma 3 stores this field but never applies it (Gemma 2's attention does); ours would
        raise ValueError("attn_logit_softcapping is set, but Hugging Face's Gemma 3 ignores it: the checkpoint's "
                         "intended behaviour is ambiguous (released Gemma 3 configs have it null)")
    params = hf.get("rope_parameters")
    if params is not None and "full_attention" in params:  # transformers 5: one dict per layer type
        base, scaling = _rope(hf, params["full_attention"], 1_000_000.0)
        local_base, local_scaling = _rope(hf, params["sliding_attention"], 10_000.0)
        if local_scaling is not None:
            raise ValueError("scaled RoPE on the sliding-window layers is not supported")
    else:
        base, scaling = _rope(hf, params, 1_000_000.0)
        local_base = hf.get("rope_local_base_freq", 10_000.0)
    return Gemma3Config(**_llama_family_sizes(hf), rope_base=base, rope_scaling=scaling, rope_local_base=local_base,
                        sliding_window=hf["sliding_window"], layer_types=hf.get("layer_types"),
                        sliding_window_pattern=hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)),
                        query_pre_attn_scalar=hf["query_pre_attn_scalar"],
                        final_logit_softcap=hf.get("final_logit_softcapping"))


# HF's per-layer module names -> ours; Llama and Qwen3 have one norm before each sublayer, Gemma 3 four
_LLAMA_LAYER_NAMES = {"self_attn.": "attn.", "mlp.": "mlp.", "input_layernorm.": "attn_norm.",
                      "post_attention_layernorm.": "mlp_norm."}
_GEMMA_LAYER_NAMES = {"self_attn.": "attn.", "mlp.": "mlp.", "input_layernorm.": "attn_norm.",
                      "post_attention_layernorm.": "post_attn_norm.", "pre_feedforward_layernorm.": "mlp_norm.",
                      "post_feedforward_layernorm.": "post_mlp_norm."}


def _llama_family_weights(layer_names: dict[str, str]) -> Callable:
    def convert(state: dict[str, torch.Tensor], cfg: Llama3Config) -> dict[str, torch.Tensor]:
        """model.embed_tokens / model.layers.i.* / model.norm / lm_head -> embed / blocks.i.* / norm / lm_head.
        The layouts agree (nn.Linear on both sides, RoPE in the "half" layout): only names change."""
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key == "lm_head.weight" and cfg.tie_embeddings:
                if not torch.equal(value, state["model.embed_tokens.weight"]):
                    raise ValueError("lm_head.weight differs from the embedding but the config ties them")
                continue
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
            if m is None:
                out[{"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}.get(key, key)] \
                    = value
                continue
            layer, rest = m.groups()
            for theirs, ours in layer_names.items():
                if rest.startswith(theirs):
                    rest = ours + rest[len(theirs):]
                    break
            out[f"blocks.{layer}.{rest}"] = value
        return out
    return convert


# --- DeepSeek-V3 -------------------------------------------------------------------------------------


def _deepseek_v3_config(hf: dict) -> DeepSeekV3Config:
    _check_unsupported(hf, attention_bias=(False,), hidden_act=("silu",), topk_method=("noaux_tc",),
                       scoring_func=("sigmoid",))
    base, scaling = _rope(hf, hf.get("rope_parameters"), 10000.0)
    n_routed = hf.get("n_routed_experts", hf.get("num_local_experts"))
    return DeepSeekV3Config(
        vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"], d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"], q_lora_rank=hf["q_lora_rank"],
        kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"], ffn_hidden=hf["intermediate_size"],
        moe_hidden=hf["moe_intermediate_size"], first_k_dense=hf["first_k_dense_replace"], n_routed_experts=n_routed,
        n_shared_experts=hf["n_shared_experts"] or 0, n_experts_per_tok=hf["num_experts_per_tok"],
        n_group=hf["n_group"], topk_group=hf["topk_group"], routed_scaling_factor=hf["routed_scaling_factor"],
        norm_topk_prob=hf["norm_topk_prob"], rope_base=base, rope_scaling=scaling,
        rope_interleaved=hf.get("rope_interleave", True), norm_eps=hf["rms_norm_eps"],
        n_mtp=hf.get("num_nextn_predict_layers", 0) or 0)


_DEEPSEEK_LAYER_NAMES = {"self_attn.": "attn.", "input_layernorm.": "attn_norm.",
                         "post_attention_layernorm.": "mlp_norm.", "mlp.gate.weight": "mlp.router.weight",
                         "mlp.gate.e_score_correction_bias": "mlp.router.bias", "mlp.": "mlp."}
_MTP_NAMES = {"enorm.": "enorm.", "hnorm.": "hnorm.", "eh_proj.": "eh_proj.", "shared_head.norm.": "norm."}


def _deepseek_v3_weights(state: dict[str, torch.Tensor], cfg: DeepSeekV3Config) -> dict[str, torch.Tensor]:
    """Names as for Llama, plus: the router (gate -> router, e_score_correction_bias -> router.bias); experts
    stacked into (E, 2I, C) gate_up / (E, C, I) down tensors, from per-expert matrices (as saved on disk) or
    already packed (transformers 5 in memory); layers n_layers.. are the MTP modules, whose copies of the
    shared embedding and head (embed_tokens, shared_head.head) must equal the main model's and are dropped."""
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if m is None:
            out[{"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}.get(key, key)] = value
            continue
        layer, rest = int(m.group(1)), m.group(2)
        if layer < cfg.n_layers:
            prefix = f"blocks.{layer}."
        else:  # an MTP module: its own norms and projection, then one ordinary block
            prefix = f"mtp.{layer - cfg.n_layers}."
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                main = state["model.embed_tokens.weight" if rest.startswith("embed") else "lm_head.weight"]
                if not torch.equal(value, main):
                    raise ValueError(f"{key} differs from the main model's, but MTP shares it")
                continue
            own = next((name for name in _MTP_NAMES if rest.startswith(name)), None)
            if own is not None:  # enorm, hnorm, eh_proj, shared_head.norm
                out[prefix + _MTP_NAMES[own] + rest[len(own):]] = value
                continue
            prefix += "block."  # the rest is an ordinary decoder layer
        e = re.fullmatch(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", rest)
        if e is not None:
            per_expert.setdefault((prefix, e.group(2)), {})[int(e.group(1))] = value
            continue
        for theirs, ours in _DEEPSEEK_LAYER_NAMES.items():
            if rest.startswith(theirs):
                rest = ours + rest[len(theirs):]
                break
        out[prefix + rest] = value
    for prefix in sorted({p for p, _ in per_expert}):
        stacks = {}
        for kind in ("gate", "up", "down"):
            experts = per_expert.get((prefix, kind), {})
            if sorted(experts) != list(range(cfg.n_routed_experts)):
                raise ValueError(f"{prefix}mlp.experts: {kind}_proj found for experts {sorted(experts)}, "
                                 f"expected 0..{cfg.n_routed_experts - 1}")
            stacks[kind] = torch.stack([experts[i] for i in range(cfg.n_routed_experts)])
        out[prefix + "mlp.experts.gate_up_proj"] = torch.cat([stacks["gate"], stacks["up"]], dim=1)  # (E, 2I, C)
        out[prefix + "mlp.experts.down_proj"] = stacks["down"]  # (E, C, I)
    return out


def _drop_missing_mtp(hf: dict, state_keys) -> dict:
    """Hugging Face's model has no MTP and does not save it: build ours without it when the weights are absent."""
    first_mtp = f"model.layers.{hf['num_hidden_layers']}."
    if hf.get("num_nextn_predict_layers") and not any(k.startswith(first_mtp) for k in state_keys):
        hf = {**hf, "num_nextn_predict_layers": 0}
    return hf


# --- Mamba-2 -----------------------------------------------------------------------------------------


def _json_float(value) -> float:
    """A float from config.json: transformers 5 writes infinity as {"__float__": "Infinity"} (JSON has no inf)."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return float(value["__float__"])
    return float(value)


def _mamba2_config(hf: dict) -> Mamba2Config:
    _check_unsupported(hf, hidden_act=("silu",))
    if hf["hidden_size"] * hf.get("expand", 2) != hf["num_heads"] * hf["head_dim"]:
        raise ValueError(f"mamba2 config: hidden_size·expand ({hf['hidden_size'] * hf.get('expand', 2)}) must equal "
                         f"num_heads·head_dim ({hf['num_heads'] * hf['head_dim']})")
    return Mamba2Config(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                        d_state=hf["state_size"], head_dim=hf["head_dim"], expand=hf.get("expand", 2),
                        n_groups=hf.get("n_groups", 8), conv_kernel=hf.get("conv_kernel", 4),
                        chunk_size=hf.get("chunk_size", 256), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                        bias=hf.get("use_bias", False), conv_bias=hf.get("use_conv_bias", True),
                        dt_limit=tuple(_json_float(v) for v in hf.get("time_step_limit", (0.0, float("inf")))),
                        tie_embeddings=hf.get("tie_word_embeddings", False))


def _mamba2_weights(state: dict[str, torch.Tensor], cfg: Mamba2Config) -> dict[str, torch.Tensor]:
    """backbone.embeddings / backbone.layers.i.{norm, mixer.*} / backbone.norm_f / lm_head -> embed / blocks.i.* /
    norm / lm_head. The mixer's names and layouts are the same on both sides (ours follow `Mamba2Mixer`)."""
    out: dict[str, torch.Tensor] = {}
    embed_key = "backbone.embeddings.weight" if "backbone.embeddings.weight" in state else "backbone.embedding.weight"
    for key, value in state.items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            if not torch.equal(value, state[embed_key]):
                raise ValueError("lm_head.weight differs from the embedding but the config ties them")
            continue
        m = re.fullmatch(r"backbone\.layers\.(\d+)\.(.+)", key)
        if m is not None:
            out[f"blocks.{m.group(1)}.{m.group(2)}"] = value
            continue
        out[{embed_key: "embed.weight", "backbone.norm_f.weight": "norm.weight"}.get(key, key)] = value
    return out


def _vit_config(hf: dict) -> ViTConfig:
    _check_unsupported(hf, hidden_act=("gelu",), qkv_bias=(True,))
    n_classes = len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 2)
    return ViTConfig(image_size=hf["image_size"], patch_size=hf["patch_size"], n_channels=hf.get("num_channels", 3),
                     d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                     ffn_hidden=hf["intermediate_size"], n_classes=n_classes,
                     layer_norm_eps=_json_float(hf.get("layer_norm_eps", 1e-12)))


_VIT_LAYER_NAMES = {"attention.attention.query": "attn.q_proj", "attention.attention.key": "attn.k_proj",
                    "attention.attention.value": "attn.v_proj", "attention.output.dense": "attn.o_proj",
                    "intermediate.dense": "mlp.up_proj", "output.dense": "mlp.down_proj",
                    "layernorm_before": "ln_1", "layernorm_after": "ln_2"}


def _vit_weights(state: dict[str, torch.Tensor], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """ViTForImageClassification's names -> ours (the layouts are the same; only names change)."""
    top = {"vit.embeddings.cls_token": "cls_token", "vit.embeddings.position_embeddings": "pos_embed",
           "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "vit.layernorm.weight": "norm.weight", "vit.layernorm.bias": "norm.bias",
           "classifier.weight": "head.weight", "classifier.bias": "head.bias"}
    layer = re.compile(r"vit\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif (m := layer.fullmatch(key)) and m.group(2) in _VIT_LAYER_NAMES:
            out[f"blocks.{m.group(1)}.{_VIT_LAYER_NAMES[m.group(2)]}.{m.group(3)}"] = value
        else:
            out[key] = value  # reported as unexpected by the strict load
    return out


# model_type -> (config translator, weight mapper, model class)
_ARCHITECTURES: dict[str, tuple[Callable, Callable, type[nn.Module]]] = {
    "gpt2": (_gpt2_config, _gpt2_weights, GPT2),
    "llama": (_llama_config, _llama_family_weights(_LLAMA_LAYER_NAMES), Llama3),
    "qwen3": (_qwen3_config, _llama_family_weights(_LLAMA_LAYER_NAMES), Qwen3),
    "gemma3_text": (_gemma3_config, _llama_family_weights(_GEMMA_LAYER_NAMES), Gemma3),
    "deepseek_v3": (_deepseek_v3_config, _deepseek_v3_weights, DeepSeekV3),
    "mamba2": (_mamba2_config, _mamba2_weights, Mamba2LM),
    "vit": (_vit_config, _vit_weights, ViT),
}
SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES)


def load_hf_checkpoint(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", model_class: type[nn.Module] | None = None) -> nn.Module:
    """Our model with the weights of a Hugging Face checkpoint folder, in eval mode.

    model_class: if given, the checkpoint must be of exactly that architecture (loading a Qwen3 folder
        with model_class=Llama3 is an error, not a Llama without QK-norm).
    """
    folder = pathlib.Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a save_pretrained folder")
    hf_config = json.loads(config_path.read_text())
    model_type = hf_config.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(_ARCHITECTURES)}")
    to_config, to_weights, found_class = _ARCHITECTURES[model_type]
    if model_class is not None and model_class is not found_class:
        raise ValueError(f"{folder} holds a {model_type!r} checkpoint, which loads as {found_class.__name__}, "
                         f"not {model_class.__name__}")
    state = read_hf_state_dict(folder)
    if model_type == "deepseek_v3":
        hf_config = _drop_missing_mtp(hf_config, state)
    cfg = to_config(hf_config)
    with torch.device("meta"):
        model = found_class(cfg)
    weights = to_weights(state, cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(expected) & set(weights) if weights[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{folder} does not fit {found_class.__name__}:"
                         + (f"\n  missing keys ({len(missing)}): {', '.join(missing)}" if missing else "")
                         + (f"\n  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}" if unexpected else "")
                         + (f"\n  shape mismatches: {'; '.join(shapes)}" if shapes else ""))
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
    return model.to(device).eval()
