"""Muon: momentum whose update is orthogonalized by a Newton-Schulz iteration (Jordan et al. 2024).

For a weight matrix W (out × in) with gradient G, SGD-momentum steps along the momentum M, whose singular values
are very uneven: a few directions dominate every update. Muon replaces M by the nearest semi-orthogonal matrix,
U Vᵀ for M = U S Vᵀ, so that every direction the momentum spans moves by the same amount. The SVD is too slow; a
few steps of the odd polynomial X ← a X + b (X Xᵀ) X + c (X Xᵀ)² X, after scaling X so its spectral norm is at most
1, push every singular value towards 1 (the coefficients (3.4445, −4.7750, 2.0315) make small singular values
grow as fast as possible; the result is U S' Vᵀ with S' roughly in [0.7, 1.2], which works as well).

Muon is for the hidden matrices only: embeddings, the output head, norms and biases use AdamW (`muon_and_adamw`).

    muon, adamw = muon_and_adamw(model, lr=0.02, adamw_lr=3e-3)
    loss.backward(); muon.step(); adamw.step()

References: K. Jordan et al., "Muon: an optimizer for hidden layers in neural networks" (2024,
kellerjordan.github.io/posts/muon); J. Liu et al., "Muon is Scalable for LLM Training" (Moonshot AI 2025,
arXiv:2502.16982: weight decay and the update scaled to AdamW's RMS, 0.2·√max(A, B)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llm_scratch.attention.gqa import GroupedQueryAttention
from llm_scratch.attention.mla import MultiHeadLatentAttention

__all__ = ["NS_COEFFICIENTS", "Muon", "logit_bounds", "magnitude_qk_clip", "muon_and_adamw", "newton_schulz", "qk_clip",
           "record_max_logits", "record_qk_norms", "reset_attention_records"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR = ("original", "match_rms_adamw")


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalize G (A, B): the quintic Newton-Schulz iteration, in `dtype` (bf16 as in the
    reference implementations: the iteration tolerates it and it is the fast path on GPUs). Returns `dtype`."""
    if G.dim() != 2:
        raise ValueError(f"G must be a matrix (A, B), got shape {tuple(G.shape)}")
    a, b, c = coefficients
    X = G.to(dtype)
    tall = G.shape[0] > G.shape[1]
    if tall:  # iterate on the wide orientation: X Xᵀ is then the smaller Gram matrix
        X = X.T
    X = X / X.norm().clamp(min=eps)  # Frobenius norm ≥ spectral norm, so every singular value is ≤ 1
    for _ in range(steps):
        gram = X @ X.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·(XXᵀ) + c·(XXᵀ)², one fused op
        X = torch.addmm(X, poly, X, beta=a)  # a·X + poly·X
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (any other shape is refused when the optimizer is built).

    Per parameter W with gradient G: M ← μ·M + (1 − μ)·G (momentum as an exponential average); the direction is
    (1 − μ)·G + μ·M with Nesterov, M without; O = newton_schulz(direction); W ← W − lr·wd·W (decoupled weight
    decay); W ← W − lr'·O with lr' = lr·√max(1, A/B) ("original", Jordan) or lr·0.2·√max(A, B)
    ("match_rms_adamw", Moonshot: the update's RMS matches AdamW's, so AdamW's lr and weight decay carry over).
    Step for step this is torch.optim.Muon (a test checks it). ns_dtype: the Newton-Schulz iteration's dtype, bf16
    as in the reference implementations (fast on GPUs); float32 is several times faster on CPUs without bf16 matmul
    units, and the iteration converges the same.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, adjust_lr: str = "original",
                 ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, eps: float = 1e-7,
                 ns_dtype: torch.dtype = torch.bfloat16):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not isinstance(ns_steps, int) or ns_steps < 1:
            raise ValueError(f"ns_steps must be a positive int, got {ns_steps!r}")
        if adjust_lr not in ADJUST_LR:
            raise ValueError(f"adjust_lr must be one of {', '.join(ADJUST_LR)}, got {adjust_lr!r}")
        if ns_dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            raise ValueError(f"ns_dtype must be a floating dtype, got {ns_dtype}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        adjust_lr=adjust_lr, ns_coefficients=ns_coefficients, eps=eps, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.dim() != 2:
                    raise ValueError(f"Muon optimizes matrices only; parameter {i} of a group has shape "
                                     f"{tuple(p.shape)} (use AdamW for embeddings, norms, biases: muon_and_adamw)")

    @staticmethod
    def lr_scale(shape: torch.Size, adjust_lr: str) -> float:
        A, B = shape
        return math.sqrt(max(1.0, A / B)) if adjust_lr == "original" else 0.2 * math.sqrt(max(A, B))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)  # M ← μM + (1 − μ)G
                direction = p.grad.lerp(buf, mu) if group["nesterov"] else buf  # (1 − μ)G + μM
                update = newton_schulz(direction, group["ns_steps"], group["ns_coefficients"], group["eps"],
                                       group["ns_dtype"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * self.lr_scale(p.shape, group["adjust_lr"]))
        return loss


def muon_and_adamw(model: nn.Module, lr: float = 0.02, adamw_lr: float = 3e-3, weight_decay: float = 0.0,
                   adamw_betas: tuple[float, float] = (0.9, 0.95), adjust_lr: str = "original",
                   head_names: tuple[str, ...] = ("lm_head", "head", "score"),
                   ns_dtype: torch.dtype = torch.bfloat16) -> tuple[Muon, torch.optim.AdamW]:
    """The usual split: Muon for the hidden matrices (the weights of nn.Linear layers inside the blocks), AdamW for
    everything else -- embeddings (input and position), the output head (a Linear whose name is in head_names, or a
    weight tied to an embedding), norms and biases. Every trainable parameter lands in exactly one optimizer."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden, other, seen = [], [], set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_head = module_name.split(".")[-1] in head_names
            if (isinstance(module, nn.Linear) and name == "weight" and not is_head and id(p) not in embedding_params):
                hidden.append(p)
            else:
                other.append(p)
    if not hidden:
        raise ValueError("the model has no hidden nn.Linear weights for Muon")
    muon = Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr=adjust_lr, ns_dtype=ns_dtype)
    adamw = torch.optim.AdamW(other, lr=adamw_lr, betas=adamw_betas, weight_decay=weight_decay)
    return muon, adamw


# --- QK-Clip --------------------------------------------------------------------------------------------------
# Kimi K2 (Moonshot AI 2025, arXiv:2507.20534, section 2.1): with Muon, attention logits can grow without bound
# and training diverges. QK-Clip watches each head's largest pre-softmax logit S_max^h on the step's batches and,
# after the optimizer step, rescales that head's query and key weights by γ_h = min(1, τ / S_max^h) in all (√γ_h
# each), so the same batch would now peak at exactly τ. Heads below τ are left alone; the forward pass is never
# changed, only the weights after the step.

def _attention_modules(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, GroupedQueryAttention | MultiHeadLatentAttention)]


def record_max_logits(model: nn.Module, enabled: bool = True) -> int:
    """Switch max-logit recording on (or off) in every attention layer; returns how many layers there are.
    The recorded logit is q·k·scale before any soft-cap (the quantity QK-Clip bounds through the weights).
    Layers with QK-norm (Qwen3, Gemma 3) are refused: their logits are bounded by the norm, and scaling the
    projection weights would not change them (QK-Clip is the alternative to QK-norm, not an addition)."""
    modules = _attention_modules(model)
    if not modules:
        raise ValueError("the model has no GroupedQueryAttention or MultiHeadLatentAttention layers")
    for m in modules:
        if hasattr(m, "q_norm"):
            raise ValueError(f"{type(m).__name__} normalizes q and k (QK-norm): QK-Clip cannot rescale its logits")
        m.record_max_logits, m.max_logits = enabled, None
    return len(modules)


def reset_attention_records(model: nn.Module) -> None:
    """Forget every recorded max logit and q/k norm (the recording switches stay as they are), e.g. at the start of
    a step when the clip of the previous one did not run or cleared only its own records."""
    for m in _attention_modules(model):
        m.max_logits = None
        if isinstance(m, GroupedQueryAttention):
            m.max_q_norm = m.max_k_norm = None


def _scale_rows(linear: nn.Linear, rows: slice, factor: torch.Tensor | float) -> None:
    linear.weight[rows] *= factor
    if linear.bias is not None:
        linear.bias[rows] *= factor


@torch.no_grad()
def _rescale_heads(m: nn.Module, gamma: torch.Tensor) -> None:
    """Multiply every query head h's logits by gamma[h] (float64, ≤ 1) through the q and k projections."""
    if isinstance(m, GroupedQueryAttention):
        H, K, D = m.n_heads, m.n_kv_heads, m.head_dim
        G = H // K
        for g in range(K):
            gamma_kv = gamma[g * G:(g + 1) * G].min()
            if gamma_kv == 1:
                continue
            _scale_rows(m.k_proj, slice(g * D, (g + 1) * D), gamma_kv.sqrt().item())
            for h in range(g * G, (g + 1) * G):
                _scale_rows(m.q_proj, slice(h * D, (h + 1) * D), (gamma[h] / gamma_kv.sqrt()).item())
        return
    c = m.config
    q_linear = m.q_proj if c.q_lora_rank is None else m.q_b_proj
    Dn, Dr, Dv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    for h in (gamma < 1).nonzero().flatten().tolist():
        root = gamma[h].sqrt().item()
        start = h * c.qk_head_dim
        _scale_rows(q_linear, slice(start, start + Dn), root)  # q^C_h
        _scale_rows(q_linear, slice(start + Dn, start + Dn + Dr), gamma[h].item())  # q^R_h
        _scale_rows(m.kv_b_proj, slice(h * (Dn + Dv), h * (Dn + Dv) + Dn), root)  # k^C_h (W_UK rows)


@torch.no_grad()
def qk_clip(model: nn.Module, tau: float = 100.0) -> dict[str, list[int]]:
    """Rescale the heads whose recorded max logit exceeds tau; returns {layer name: clipped query heads}.

    Multi-head / grouped-query attention (W_q and W_k, biases included): a query head h with S_max^h > τ gets
    γ_h = τ / S_max^h. With G query heads sharing a kv head, the key is shared, so the *largest* S_max in the group
    sets the kv head's factor, √γ_kv with γ_kv = min_h γ_h, and each query head of the group is scaled by
    γ_h / √γ_kv, so that every head's logits are multiplied by exactly γ_h (1 for the heads below τ). MHA is the
    case G = 1: √γ_h on both. RoPE rotates q and k linearly, so scaling the projections scales the logits.
    Multi-head latent attention: the head's own q^C and k^C rows (q_proj or q_b_proj, kv_b_proj) by √γ_h each, its
    rotary query q^R by γ_h; the rotary key k^R is shared by all heads and left alone. Recorded maxima are cleared.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    clipped: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, GroupedQueryAttention | MultiHeadLatentAttention):
            continue
        if m.max_logits is None:
            if m.record_max_logits:
                continue  # no forward since the last clip
            raise ValueError(f"layer {name!r} recorded no max logits: call record_max_logits(model) before the "
                             "forward passes")
        gamma = (tau / m.max_logits.clamp(min=tau)).to(torch.float64)  # (H,): 1 where the head is below τ
        m.max_logits = None
        heads = (gamma < 1).nonzero().flatten().tolist()
        if not heads:
            continue
        clipped[name] = heads
        _rescale_heads(m, gamma)
    return clipped


# --- Magnitude-QK-Clip (this project's variant) ------------------------------------------------------------------
# QK-Clip needs each head's largest logit, i.e. the T×T score matrix that a fused attention kernel never
# materializes. By Cauchy-Schwarz every logit of head h is at most scale·‖q‖·‖k‖, so the bound
#     B_h = scale · max_t ‖q_{h,t}‖ · max_s ‖k_{g(h),s}‖
# needs only the norms, O(T·H·D) work beside the forward. Clipping on B_h instead of S_max^h (γ_h = τ / B_h, the
# same rescaling) guarantees every logit of the batch ≤ τ afterwards, and stays a guarantee for any pairing of
# those queries and keys, not only the pairs seen. The price: B_h ≥ S_max^h, with equality only when the longest
# query and the longest key point the same way, so it clips earlier and harder than QK-Clip -- most when q and k
# are long but not aligned (e.g. at initialization, when logits are near 0 but norms are not). It is the right
# tool when the logits are not observable or when a hard worst-case bound is wanted, not a drop-in replacement.

def record_qk_norms(model: nn.Module, enabled: bool = True) -> int:
    """Switch per-head q/k norm recording on (or off) in every GQA/MHA layer (MLA and QK-norm layers are refused:
    MLA's per-head keys exist only in its expanded path, and QK-norm already bounds the logits)."""
    modules = _attention_modules(model)
    if not modules:
        raise ValueError("the model has no attention layers")
    for m in modules:
        if isinstance(m, MultiHeadLatentAttention):
            raise ValueError("magnitude_qk_clip supports GroupedQueryAttention / MultiHeadAttention, not MLA")
        if hasattr(m, "q_norm"):
            raise ValueError(f"{type(m).__name__} normalizes q and k (QK-norm): its logits are already bounded")
        m.record_qk_norms, m.max_q_norm, m.max_k_norm = enabled, None, None
    return len(modules)


def logit_bounds(m: GroupedQueryAttention) -> torch.Tensor:
    """B_h = scale · max‖q_h‖ · max‖k_g(h)‖ (H,) from the recorded norms: no logit of the batch exceeds it."""
    if m.max_q_norm is None:
        raise ValueError("no q/k norms recorded: call record_qk_norms(model) before the forward passes")
    scale = m.head_dim ** -0.5 if m.scale is None else m.scale
    G = m.n_heads // m.n_kv_heads
    return scale * m.max_q_norm * m.max_k_norm.repeat_interleave(G)


@torch.no_grad()
def magnitude_qk_clip(model: nn.Module, tau: float = 100.0) -> dict[str, list[int]]:
    """Rescale the heads whose logit bound B_h exceeds tau, by γ_h = τ / B_h (QK-Clip's rescaling); returns
    {layer name: clipped query heads}. Recorded norms are cleared."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    clipped: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, GroupedQueryAttention) or (m.max_q_norm is None and m.record_qk_norms):
            continue
        bounds = logit_bounds(m)
        m.max_q_norm = m.max_k_norm = None
        gamma = (tau / bounds.clamp(min=tau)).to(torch.float64)
        heads = (gamma < 1).nonzero().flatten().tolist()
        if heads:
            clipped[name] = heads
            _rescale_heads(m, gamma)
    return clipped
