"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685).

A frozen weight W (out x in) is adapted by a trainable low-rank product:

    h = W x + (alpha / r) · B A x,     A: r x in,  B: out x r,  r << min(in, out)     (section 4.1, eq. 3)

B starts at zero, so the adapted model starts as the base model exactly; A starts random (Kaiming-uniform,
as PEFT does). Only r·(in + out) numbers per layer train, and only they need optimizer state. After
training, W + (alpha/r)·BA can be folded into W (`merge`), so inference costs nothing extra.
rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) scales by alpha/√r instead, which keeps the update's size
stable as r grows.

Module names follow PEFT (`lora_A`, `lora_B`, `base_layer`), so weights line up with it one to one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LoRALinear", "apply_lora", "lora_parameters", "merge_lora"]


class LoRALinear(nn.Module):
    """base(x) + lora_B(lora_A(dropout(x))) · scaling, with base frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r (the LoRA rank) must be a positive int, got {r!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init of A
        nn.init.zeros_(self.lora_B.weight)  # the update starts at exactly zero
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (as PEFT's layers expose it), so code that reads a layer's weight for its
        dtype or device (cache allocation, say) works on an adapted model too."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r)·BA, the (out, in) update this adapter adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y  # the update is already inside base_layer.weight
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (W <- W + (alpha/r)·BA)."""
        if self.merged:
            raise ValueError("this LoRALinear is already merged")
        self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (exact up to float rounding)."""
        if not self.merged:
            raise ValueError("this LoRALinear is not merged")
        self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, target_modules: list[str] | tuple[str, ...], r: int, alpha: float,
               dropout: float = 0.0, use_rslora: bool = False,
               modules_to_save: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """Wrap every nn.Linear whose qualified name is, or ends with ".", one of target_modules in a LoRALinear,
    and freeze every other parameter except those of `modules_to_save` (matched the same way; PEFT's name for
    modules trained in full, e.g. an embedding whose rows for new special tokens must learn). Returns the model
    (changed in place)."""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if not target_modules:
        raise ValueError("target_modules must name at least one module (e.g. ['q_proj', 'v_proj'])")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r (the LoRA rank) must be a positive int, got {r!r}")
    matched: dict[str, list[str]] = {t: [] for t in target_modules}
    for name, module in list(model.named_modules()):
        for target in target_modules:
            if name == target or name.endswith("." + target):
                if not isinstance(module, nn.Linear):
                    raise ValueError(f"target {target!r} matches {name!r}, a {type(module).__name__}: LoRA here "
                                     "wraps nn.Linear layers only")
                matched[target].append(name)
    unmatched = [t for t, names in matched.items() if not names]
    if unmatched:
        raise ValueError(f"target_modules {unmatched} match no module of {type(model).__name__}")
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    saved = {t: [n for n, _ in model.named_modules() if n == t or n.endswith("." + t)] for t in modules_to_save}
    unmatched = [t for t, names in saved.items() if not names]
    if unmatched:
        raise ValueError(f"modules_to_save {unmatched} match no module of {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    for names in saved.values():
        for name in names:
            model.get_submodule(name).requires_grad_(True)
    for name in sorted({n for names in matched.values() for n in names}):
        _set_submodule(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout, use_rslora))
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA matrices (A and B of every adapter)."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A.weight, m.lora_B.weight)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain nn.Linear back; returns the model (a single
    LoRALinear returns its merged base layer)."""
    if isinstance(model, LoRALinear):
        if not model.merged:
            model.merge()
        return model.base_layer
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            if not module.merged:
                module.merge()
            _set_submodule(model, name, module.base_layer)
    return model
