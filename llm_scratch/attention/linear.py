"""Linear attention and its decayed / gated variants, each computed three ways that agree.

Softmax attention weighs key s for query t by exp(q_t·k_s); linear attention replaces that by a kernel
φ(q_t)·φ(k_s) (Katharopoulos et al. 2020, "Transformers are RNNs", arXiv:2006.16236, eqs. 4-6). The sum
over keys then factors through a matrix that does not grow with the sequence:

    o_t = Σ_{s<=t} (φ(q_t)·φ(k_s)) v_s = φ(q_t)ᵀ S_t,   S_t = Σ_{s<=t} φ(k_s) v_sᵀ   (D_k x D_v)

Decay turns S into a memory that forgets: S_t = diag(α_t) S_{t-1} + k_t v_tᵀ with α_t ∈ (0, 1]^{D_k}.
- α = 1: plain linear attention (optionally normalized by φ(q_t)·Σ φ(k_s), Katharopoulos' eq. 6);
- α a constant per head: "simple decay" (RetNet, Sun et al. 2023, arXiv:2307.08621; Lightning attention's
  per-head slopes, MiniMax 2025, arXiv:2501.08313);
- α_t computed from x_t per key channel: gated linear attention (GLA; Yang et al. 2024, arXiv:2312.06635).
All of them take log α as `log_decay` (B, H, T, D_k), or None for no decay.

The three forms:
- `parallel`: the (T, T) matrix of weights q_t · (k_s ⊙ Π_{r=s+1..t} α_r), masked to s <= t, times V:
  quadratic, for reading (and as the oracle).
- `recurrent`: the recurrence above, one token at a time; what decoding runs, with a state of
  D_k x D_v numbers per head whatever the length (the KV cache of softmax attention grows with it).
- `chunked`: the sequence cut into chunks of C tokens; inside a chunk the parallel form, between chunks
  the state carried over (the form used for training; O(T·C·D + T·D²)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_scratch.norm import RMSNorm

__all__ = [
    "GatedLinearAttention",
    "LightningAttention",
    "LinearAttention",
    "LinearAttentionState",
    "elu_feature_map",
    "linear_attention_chunked",
    "linear_attention_parallel",
    "linear_attention_recurrent",
    "lightning_slopes",
]


def refuse_attn_mask(attn_mask) -> None:
    """Recurrent mixers carry one state along the sequence: a packed row's block-diagonal mask cannot be
    honoured (the state would leak from one example into the next), so refuse it instead of ignoring it."""
    if attn_mask is not None:
        raise ValueError("attn_mask (packed sequences) is not supported by linear attention or Mamba-2 layers: "
                         "their recurrent state would carry across segments; pass one sequence per row")


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1 > 0 (Katharopoulos et al. 2020, section 3.2.1)."""
    return F.elu(x) + 1


def _check(q, k, v, log_decay):
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q and k must be (B, H, T, D_k) and v (B, H, T, D_v) with the same (B, H, T); "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if log_decay is not None:
        if log_decay.shape != q.shape:
            raise ValueError(f"log_decay must have q's shape {tuple(q.shape)}, got {tuple(log_decay.shape)}")
        if (log_decay > 0).any():
            raise ValueError("log_decay must be <= 0 (decay factors in (0, 1])")


def _normalize(out: torch.Tensor, denom: torch.Tensor, eps: float) -> torch.Tensor:
    return out / (denom[..., None] + eps)


_FACTORIZE_LIMIT = 30.0


def _weights(q, k, log_decay):
    """(B, H, T, T) weights q_t · (k_s ⊙ exp(G_t - G_s)) for s <= t, 0 above the diagonal; G = cumsum(log α)."""
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if log_decay is None:
        weights = q @ k.transpose(-2, -1)
    else:
        G = log_decay.cumsum(dim=2)  # (B, H, T, D_k): log of the decay from the start to t, decreasing in t
        if G[:, :, -1].min() > -_FACTORIZE_LIMIT:
            # exp(G_t - G_s) = exp(G_t) · exp(-G_s): two scaled operands and one matmul, as long as neither
            # factor leaves float32's comfortable range (|G| <= 30: factors within 1e±13)
            weights = (q * G.exp()) @ (k * (-G).exp()).transpose(-2, -1)
        else:
            # the exact form: exp(G_t - G_s) per key channel, masked to s <= t before exp so nothing overflows
            diff = (G[:, :, :, None] - G[:, :, None, :]).masked_fill(~causal[..., None], float("-inf"))
            weights = (q[:, :, :, None] * k[:, :, None] * diff.exp()).sum(-1)  # (B, H, T, T)
    return weights.masked_fill(~causal, 0.0)


def linear_attention_parallel(q, k, v, log_decay=None, normalize: bool = False, eps: float = 1e-6):
    """(B, H, T, D_k), (B, H, T, D_k), (B, H, T, D_v) -> (B, H, T, D_v), the quadratic form."""
    _check(q, k, v, log_decay)
    weights = _weights(q, k, log_decay)
    out = weights @ v
    return _normalize(out, weights.sum(-1), eps) if normalize else out


def linear_attention_recurrent(q, k, v, log_decay=None, normalize: bool = False, eps: float = 1e-6,
                               state: torch.Tensor | None = None, key_sum: torch.Tensor | None = None):
    """The recurrence S_t = diag(α_t) S_{t-1} + k_t v_tᵀ, o_t = q_t S_t, one token at a time.

    state (B, H, D_k, D_v) and key_sum (B, H, D_k) (for `normalize`) continue an earlier call.
    Returns (out (B, H, T, D_v), state, key_sum).
    """
    _check(q, k, v, log_decay)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    S = q.new_zeros(B, H, Dk, Dv) if state is None else state
    z = q.new_zeros(B, H, Dk) if key_sum is None else key_sum
    outs = []
    for t in range(T):
        if log_decay is not None:
            alpha = log_decay[:, :, t].exp()  # (B, H, D_k)
            S, z = alpha[..., None] * S, alpha * z
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]  # + k_t v_tᵀ
        z = z + k[:, :, t]
        o = torch.einsum("bhd,bhde->bhe", q[:, :, t], S)
        outs.append(_normalize(o, (q[:, :, t] * z).sum(-1), eps) if normalize else o)
    return torch.stack(outs, dim=2), S, z


def linear_attention_chunked(q, k, v, log_decay=None, normalize: bool = False, eps: float = 1e-6,
                             chunk_size: int = 64, state: torch.Tensor | None = None,
                             key_sum: torch.Tensor | None = None):
    """The chunked form: within each chunk of C tokens the parallel form (decays relative to the chunk's
    start, so nothing overflows), across chunks the state S (and Σ k for `normalize`) carried over.
    Returns (out, state, key_sum) like `linear_attention_recurrent`, and continues from them likewise."""
    _check(q, k, v, log_decay)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    S = q.new_zeros(B, H, Dk, Dv) if state is None else state
    z = q.new_zeros(B, H, Dk) if key_sum is None else key_sum
    outs = []
    for start in range(0, T, chunk_size):
        sl = slice(start, min(start + chunk_size, T))
        qc, kc, vc = q[:, :, sl], k[:, :, sl], v[:, :, sl]
        if log_decay is None:
            q_in = qc  # queries read the carried state undecayed
            k_out = kc  # and keys enter it undecayed
            chunk_decay = None
        else:
            G = log_decay[:, :, sl].cumsum(dim=2)  # (B, H, C, D_k) decay since the chunk's start
            q_in = qc * G.exp()  # query at t sees the state decayed by exp(G_t)
            k_out = kc * (G[:, :, -1:] - G).exp()  # key at s reaches the chunk's end decayed by exp(G_C - G_s)
            chunk_decay = G[:, :, -1].exp()  # (B, H, D_k) decay over the whole chunk
        w = _weights(qc, kc, None if log_decay is None else log_decay[:, :, sl])  # (B, H, C, C) inside the chunk
        out = w @ vc + torch.einsum("bhtd,bhde->bhte", q_in, S)  # this chunk + all earlier chunks
        if normalize:
            out = _normalize(out, w.sum(-1) + (q_in * z[:, :, None]).sum(-1), eps)
        outs.append(out)
        if chunk_decay is None:
            S = S + k_out.transpose(-2, -1) @ vc
            z = z + kc.sum(2)
        else:
            S = chunk_decay[..., None] * S + k_out.transpose(-2, -1) @ vc
            z = chunk_decay * z + k_out.sum(2)
    return torch.cat(outs, dim=2), S, z


class LinearAttentionState:
    """The decoding memory of one linear-attention layer: S (B, H, D_k, D_v) and Σ k (B, H, D_k), a fixed size
    whatever the length (a KV cache grows by 2·K·D numbers per token instead). `length` counts the tokens."""

    def __init__(self, batch_size: int, max_len: int, n_heads: int, key_dim: int, value_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        self.state = torch.zeros(batch_size, n_heads, key_dim, value_dim, dtype=dtype, device=device)
        self.key_sum = torch.zeros(batch_size, n_heads, key_dim, dtype=dtype, device=device)

    def real_lengths(self) -> None:
        return None  # no padding: linear-attention layers refuse padded batches

    @property
    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in (self.state, self.key_sum))


class _LinearMixer(nn.Module):
    """What the three layers share: the cache API of the other attention layers, and the form to run."""

    def init_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> LinearAttentionState:
        w = self.out_proj.weight if hasattr(self, "out_proj") else self.o_proj.weight
        return LinearAttentionState(batch_size, max_len, self.n_heads, self.head_dim, self.head_dim,
                                    dtype or w.dtype, device or w.device)

    def _heads(self, x):
        B, T, _ = x.shape
        return lambda proj: proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def _mix(self, q, k, v, log_decay, normalize, mode, padding_mask, cache):
        if padding_mask is not None and not bool(padding_mask.all()):
            raise ValueError(f"{type(self).__name__} does not support padding (its state would absorb the pads); "
                             "pass unpadded sequences")
        if cache is None:
            return _run(mode, q, k, v, log_decay, normalize, self.chunk_size)
        T = q.shape[2]
        if cache.length + T > cache.max_len:
            raise ValueError(f"the state takes max_len={cache.max_len} tokens; {cache.length} were appended and "
                             f"{T} more would exceed it")
        out, cache.state, cache.key_sum = linear_attention_chunked(
            q, k, v, log_decay, normalize, chunk_size=self.chunk_size, state=cache.state, key_sum=cache.key_sum)
        cache.length += T
        return out


class LinearAttention(_LinearMixer):
    """Causal linear attention (Katharopoulos et al. 2020): φ(q)ᵀ S_t / φ(q)ᵀ z_t with φ = elu + 1."""

    def __init__(self, d_model: int, n_heads: int, normalize: bool = True, chunk_size: int = 64):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.normalize, self.chunk_size = normalize, chunk_size
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, *, padding_mask=None, cache: LinearAttentionState | None = None,
                positions=None, mode: str = "chunked", attn_mask=None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); mode "parallel", "chunked" or "recurrent" (the same numbers); with a
        cache, the chunked form continues from its state and updates it. positions are unused (no RoPE)."""
        refuse_attn_mask(attn_mask)
        split = self._heads(x)
        q, k, v = elu_feature_map(split(self.q_proj)), elu_feature_map(split(self.k_proj)), split(self.v_proj)
        out = self._mix(q, k, v, None, self.normalize, mode, padding_mask, cache)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape))


class GatedLinearAttention(_LinearMixer):
    """Gated linear attention (Yang et al. 2024, section 4): a data-dependent decay per key channel,
    α_t = sigmoid(W_α2 W_α1 x_t)^{1/τ} (low-rank, τ = 16), no normalizer, an output gate SiLU(W_r x) and a
    per-head RMSNorm of the attention output."""

    def __init__(self, d_model: int, n_heads: int, gate_rank: int = 16, temperature: float = 16.0,
                 chunk_size: int = 64):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
        self.n_heads, self.head_dim, self.temperature, self.chunk_size = (n_heads, d_model // n_heads, temperature,
                                                                          chunk_size)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.r_proj = (
            nn.Linear(d_model, d_model, bias=False) for _ in range(5))
        self.alpha_down = nn.Linear(d_model, gate_rank, bias=False)
        self.alpha_up = nn.Linear(gate_rank, d_model, bias=True)
        self.norm = nn.RMSNorm(self.head_dim, eps=1e-6)

    def forward(self, x: torch.Tensor, *, padding_mask=None, cache: LinearAttentionState | None = None,
                positions=None, mode: str = "chunked", attn_mask=None) -> torch.Tensor:
        refuse_attn_mask(attn_mask)
        B, T, C = x.shape
        split = self._heads(x)
        q, k, v = split(self.q_proj) * self.head_dim ** -0.5, split(self.k_proj), split(self.v_proj)
        # log α = logsigmoid(·)/τ <= 0: the decay factor of every key channel at every step
        log_decay = F.logsigmoid(self.alpha_up(self.alpha_down(x))).view(B, T, self.n_heads, self.head_dim)
        log_decay = log_decay.transpose(1, 2) / self.temperature
        out = self.norm(self._mix(q, k, v, log_decay, False, mode, padding_mask, cache))  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, C) * F.silu(self.r_proj(x))
        return self.o_proj(out)


def lightning_slopes(n_heads: int, layer: int, n_layers: int) -> torch.Tensor:
    """Lightning attention's per-head decay rates λ_h (MiniMax-01, arXiv:2501.08313, section 2.2.1): ALiBi's
    geometric slopes 2^(-8h/H), h = 1..H (Press et al. 2022), scaled down linearly with depth so the last
    layers forget slowest: λ_h · (1 - layer / (n_layers - 1) + 1e-5). The decay per step is exp(-λ_h)."""
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in [0, n_layers={n_layers}), got {layer}")
    rates = (2 ** (-8 / n_heads)) ** (torch.arange(n_heads, device="cpu") + 1)
    return rates * (1 - layer / (n_layers - 1 + 1e-5) + 1e-5)


class LightningAttention(_LinearMixer):
    """MiniMax-01's Lightning Attention layer: linear attention with a fixed per-head decay (no softmax, no
    1/√D, no normalizer), q, k, v through SiLU, an RMSNorm over all heads' outputs, a sigmoid output gate.
    The block algorithm of the paper (intra-block masked decay, inter-block state) is `linear_attention_chunked`
    with chunk_size = block_size. Weight names follow transformers' MiniMaxLightningAttention."""

    def __init__(self, d_model: int, n_heads: int, layer: int, n_layers: int, head_dim: int | None = None,
                 block_size: int = 256, eps: float = 1e-6):
        super().__init__()
        head_dim = head_dim or d_model // n_heads
        self.n_heads, self.head_dim, self.chunk_size = n_heads, head_dim, block_size
        self.qkv_proj = nn.Linear(d_model, 3 * n_heads * head_dim, bias=False)  # per head [q | k | v]
        self.norm = RMSNorm(n_heads * head_dim, eps, cast_before_weight=True)
        self.output_gate = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.register_buffer("slopes", lightning_slopes(n_heads, layer, n_layers), persistent=False)

    def forward(self, x: torch.Tensor, *, padding_mask=None, cache: LinearAttentionState | None = None,
                positions=None, mode: str = "chunked", attn_mask=None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); see LinearAttention.forward."""
        refuse_attn_mask(attn_mask)
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        qkv = F.silu(self.qkv_proj(x)).view(B, T, H, 3 * D).transpose(1, 2)  # (B, H, T, 3D)
        q, k, v = qkv.split(D, dim=-1)
        log_decay = (-self.slopes).to(x.dtype)[None, :, None, None].expand(B, H, T, D)
        out = self._mix(q, k, v, log_decay, False, mode, padding_mask, cache)  # (B, H, T, D)
        out = self.norm(out.transpose(1, 2).reshape(B, T, H * D))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * out)


def _run(mode, q, k, v, log_decay, normalize, chunk_size):
    if mode == "parallel":
        return linear_attention_parallel(q, k, v, log_decay, normalize)
    if mode == "chunked":
        return linear_attention_chunked(q, k, v, log_decay, normalize, chunk_size=chunk_size)[0]
    if mode == "recurrent":
        return linear_attention_recurrent(q, k, v, log_decay, normalize)[0]
    raise ValueError(f"mode must be 'parallel', 'chunked' or 'recurrent', got {mode!r}")
