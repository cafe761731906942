"""Mamba-2 and its state space duality (SSD): Dao & Gu 2024, "Transformers are SSMs: Generalized Models and
Efficient Algorithms Through Structured State Space Duality", arXiv:2405.21060.

The SSM of one head, with a scalar decay per step (Sec. 3, eq. 1 with A_t = a_t·I, the "scalar-identity"
structure of Mamba-2):

    h_t = exp(dt_t·A) · h_{t-1} + dt_t · x_t B_tᵀ          h_t (D, N): head channels x state size
    y_t = h_t C_t  (+ D_skip · x_t)                          y_t (D,)

Unrolled, y = M x with the lower-triangular (1-semiseparable) matrix (Sec. 3.2, eq. 4-6)

    M[t, s] = C_tᵀ B_s · exp(a_{s+1} + ... + a_t) · dt_s    for s <= t,  a_k = dt_k·A  (0 above the diagonal)

which is masked attention with C as queries, B as keys, dt·x as values and a decay mask L in place of softmax
(Sec. 4-5). Three ways to compute the same y, written out below and checked against each other in tests:

    ssd_quadratic   build M (T x T) and multiply: the "attention" form, O(T²)
    ssd_chunked     the SSD algorithm (Sec. 6): M's diagonal blocks in quadratic form, its off-diagonal
                    blocks through the state carried from chunk to chunk: O(T·L) for chunk length L
    ssd_sequential  the recurrence, one step at a time: O(T), what decoding uses (`ssd_step`)

Shapes, used throughout: x (B, T, H, D) with B batch, T time, H heads, D head dim; dt (B, T, H) > 0;
A (H,) < 0; B_ssm and C_ssm (B, T, G, N) with G groups of heads sharing them (H / G heads per group, like
grouped-query attention's kv heads, Sec. 7.2) and N the state size; state (B, H, D, N).

`Mamba2` is the mixer (Sec. 7, Fig. 6): one input projection produces z, x, B, C and dt in parallel, a short
causal depthwise convolution runs over x, B, C, the SSD mixes in time, and a gated RMSNorm and the output
projection follow. Its parameter names are those of Hugging Face's `Mamba2Mixer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedRMSNorm", "Mamba2", "Mamba2State", "segsum", "ssd_chunked", "ssd_quadratic", "ssd_sequential",
           "ssd_step"]


# --- SSD: three forms of one computation ------------------------------------------------------------------


def _check_ssd_inputs(x, dt, A, B_ssm, C_ssm, D_skip, initial_state) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, T, H, D), got {tuple(x.shape)}")
    Bsz, T, H, D = x.shape
    if dt.shape != (Bsz, T, H):
        raise ValueError(f"dt must have shape (B, T, H) = {(Bsz, T, H)}, got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"A must have shape (H,) = {(H,)}, got {tuple(A.shape)}")
    if B_ssm.dim() != 4 or B_ssm.shape[:2] != (Bsz, T) or B_ssm.shape != C_ssm.shape:
        raise ValueError(f"B_ssm and C_ssm must both have shape (B, T, G, N) with (B, T) = {(Bsz, T)}, "
                         f"got {tuple(B_ssm.shape)} and {tuple(C_ssm.shape)}")
    G, N = B_ssm.shape[2:]
    if H % G:
        raise ValueError(f"the number of groups G ({G}) must divide the number of heads H ({H})")
    if D_skip is not None and D_skip.shape != (H,):
        raise ValueError(f"D_skip must have shape (H,) = {(H,)}, got {tuple(D_skip.shape)}")
    if initial_state is not None and initial_state.shape != (Bsz, H, D, N):
        raise ValueError(f"initial_state must have shape (B, H, D, N) = {(Bsz, H, D, N)}, "
                         f"got {tuple(initial_state.shape)}")


def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """(B, T, G, N) -> (B, T, H, N): each group's B or C shared by its H / G consecutive heads."""
    return t.repeat_interleave(H // t.shape[2], dim=2)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., T) -> (..., T, T) with [t, s] = a_{s+1} + ... + a_t for s <= t and -inf above the diagonal.

    exp of it is the decay mask L of Sec. 3.2: L[t, s] = exp(a_{s+1} + ... + a_t), L[t, t] = 1, 0 for s > t.
    Written as a masked cumulative sum, not cumsum(a)_t - cumsum(a)_s: the difference of two large running
    sums loses the small ones in float32 on long sequences.
    """
    T = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, T)  # [t, s] = a_t
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = rows.masked_fill(~below, 0).cumsum(dim=-2)  # [t, s] = sum of a_k for s < k <= t
    on_or_below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~on_or_below, float("-inf"))


def ssd_quadratic(x, dt, A, B_ssm, C_ssm, D_skip=None, initial_state=None):
    """The SSD as one (T x T) matrix per head (Sec. 3.2, eq. 6): y = (L ∘ C Bᵀ) (dt·x). Returns (y, final state).

    x (B, T, H, D), dt (B, T, H), A (H,), B_ssm/C_ssm (B, T, G, N), D_skip (H,) or None,
    initial_state (B, H, D, N) or None (zeros) -> y (B, T, H, D), state after the last step (B, H, D, N).
    """
    _check_ssd_inputs(x, dt, A, B_ssm, C_ssm, D_skip, initial_state)
    H = x.shape[2]
    Bh, Ch = _heads(B_ssm, H), _heads(C_ssm, H)  # (B, T, H, N)
    a = (dt * A).transpose(1, 2)  # (B, H, T) log of each step's decay
    L = segsum(a).exp()  # (B, H, T, T)
    scores = torch.einsum("bthn,bshn->bhts", Ch, Bh) * L  # C_tᵀ B_s · decay from s to t
    y = torch.einsum("bhts,bshd->bthd", scores, x * dt[..., None])
    # the state after step t, as a sum over the inputs s <= t: h_T = sum_s decay(s -> T) dt_s x_s B_sᵀ
    to_end = L[:, :, -1]  # (B, H, T) decay from each step to the last
    final = torch.einsum("bhs,bshd,bshn->bhdn", to_end, x * dt[..., None], Bh)
    if initial_state is not None:  # h_0 decays into every later step: y_t += exp(a_1 + ... + a_t) C_tᵀ h_0
        from_start = a.cumsum(dim=-1).exp()  # (B, H, T)
        y = y + torch.einsum("bht,bthn,bhdn->bthd", from_start, Ch, initial_state.to(x.dtype))
        final = final + from_start[:, :, -1, None, None] * initial_state.to(x.dtype)
    if D_skip is not None:
        y = y + D_skip[:, None] * x
    return y, final


def ssd_chunked(x, dt, A, B_ssm, C_ssm, chunk_size: int, D_skip=None, initial_state=None):
    """The SSD algorithm (Sec. 6, Fig. 5): quadratic inside chunks of chunk_size steps, a recurrence between them.

    Same arguments and results as `ssd_quadratic`. T need not be a multiple of chunk_size: the tail is padded
    with dt = 0 and x = 0, steps that neither decay the state (exp(0·A) = 1) nor add to it, so the padding
    changes neither the outputs nor the final state.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_ssd_inputs(x, dt, A, B_ssm, C_ssm, D_skip, initial_state)
    Bsz, T, H, D = x.shape
    N = B_ssm.shape[-1]
    pad = -T % chunk_size
    xs = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))  # the SSM's input dt·x, (B, T', H, D)
    a = F.pad(dt * A, (0, 0, 0, pad))  # (B, T', H)
    Bh = F.pad(_heads(B_ssm, H), (0, 0, 0, 0, 0, pad))
    Ch = F.pad(_heads(C_ssm, H), (0, 0, 0, 0, 0, pad))
    n_chunks = (T + pad) // chunk_size
    # (B, c, l, ...): chunk c, position l inside it
    xs, Bh, Ch = (t.reshape(Bsz, n_chunks, chunk_size, H, -1) for t in (xs, Bh, Ch))
    a = a.reshape(Bsz, n_chunks, chunk_size, H).permute(0, 3, 1, 2)  # (B, H, c, l)
    a_cum = a.cumsum(dim=-1)  # (B, H, c, l) log decay from the chunk's start to each step

    # 1. diagonal blocks: each chunk on its own, as in ssd_quadratic (its input from inside the chunk)
    L = segsum(a).exp()  # (B, H, c, l, s)
    scores = torch.einsum("bclhn,bcshn->bhcls", Ch, Bh) * L
    y_diag = torch.einsum("bhcls,bcshd->bclhd", scores, xs)

    # 2. each chunk's own contribution to the state at its end (the "B" factor of the off-diagonal blocks)
    to_end = (a_cum[..., -1:] - a_cum).exp()  # (B, H, c, l) decay from step l to the chunk's end
    chunk_states = torch.einsum("bhcl,bclhd,bclhn->bchdn", to_end, xs, Bh)  # (B, c, H, D, N)

    # 3. state passing: h_end(c) = decay(whole chunk c)·h_end(c-1) + chunk_states[c]; a loop over T/L chunks
    h = (torch.zeros(Bsz, H, D, N, dtype=xs.dtype, device=x.device) if initial_state is None
         else initial_state.to(xs.dtype))
    chunk_decay = a_cum[..., -1].exp()  # (B, H, c)
    starts = []
    for c in range(n_chunks):
        starts.append(h)
        h = chunk_decay[:, :, c, None, None] * h + chunk_states[:, c]
    starts = torch.stack(starts, dim=1)  # (B, c, H, D, N) the state entering each chunk

    # 4. off-diagonal blocks: the state entering the chunk, decayed to step l and read out by C_l
    y_off = torch.einsum("bclhn,bchdn,bhcl->bclhd", Ch, starts, a_cum.exp())

    y = (y_diag + y_off).reshape(Bsz, n_chunks * chunk_size, H, D)[:, :T]
    if D_skip is not None:
        y = y + D_skip[:, None] * x
    return y, h


def ssd_step(x_t, dt_t, A, B_t, C_t, state, D_skip=None):
    """One step of the recurrence (Sec. 3, eq. 1); returns (y_t, new state), `state` itself is not modified.

    x_t (B, H, D), dt_t (B, H), A (H,), B_t/C_t (B, G, N), state (B, H, D, N), D_skip (H,) or None -> y_t (B, H, D).
    """
    H = x_t.shape[1]
    Bh = B_t.repeat_interleave(H // B_t.shape[1], dim=1)  # (B, H, N)
    Ch = C_t.repeat_interleave(H // C_t.shape[1], dim=1)
    decay = (dt_t * A).exp()[..., None, None]  # (B, H, 1, 1) exp(dt·A)
    state = decay * state + (dt_t[..., None] * x_t)[..., None] * Bh[:, :, None, :]  # + dt·x_t B_tᵀ
    y = torch.einsum("bhdn,bhn->bhd", state, Ch)  # y_t = h_t C_t
    if D_skip is not None:
        y = y + D_skip[:, None] * x_t
    return y, state


def ssd_sequential(x, dt, A, B_ssm, C_ssm, D_skip=None, initial_state=None):
    """The recurrence, one step at a time: the reference the two parallel forms must agree with.

    Same arguments and results as `ssd_quadratic`.
    """
    _check_ssd_inputs(x, dt, A, B_ssm, C_ssm, D_skip, initial_state)
    Bsz, T, H, D = x.shape
    N = B_ssm.shape[-1]
    h = (torch.zeros(Bsz, H, D, N, dtype=x.dtype, device=x.device) if initial_state is None
         else initial_state.to(x.dtype))
    ys = []
    for t in range(T):
        y_t, h = ssd_step(x[:, t], dt[:, t], A, B_ssm[:, t], C_ssm[:, t], h, D_skip)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(Bsz, 0, H, D)
    return y, h


# --- the Mamba-2 mixer -------------------------------------------------------------------------------------


class GatedRMSNorm(nn.Module):
    """RMSNorm(y · silu(z)) with statistics over groups of `group_size` channels (Sec. 7.1, "extra
    normalization"; the gate multiplies before the norm, as Hugging Face's `MambaRMSNormGated`).

    Normalizing per group keeps each group of heads independent, which tensor parallelism needs (Sec. 8).
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-6):
        super().__init__()
        if dim % group_size:
            raise ValueError(f"group_size ({group_size}) must divide dim ({dim})")
        self.dim, self.group_size, self.eps = dim, group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z (..., C) -> (..., C); computed in float32 (float64 stays), cast back to y's dtype before the gain."""
        work = torch.float64 if y.dtype == torch.float64 else torch.float32
        g = y.to(work) * F.silu(z.to(work))
        g = g.unflatten(-1, (self.dim // self.group_size, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.flatten(-2).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, group_size={self.group_size}, eps={self.eps}"


@dataclass
class Mamba2State:
    """What one Mamba-2 layer carries from token to token: constant size, whatever the sequence length.

    conv: (B, conv_dim, K - 1) the last K - 1 inputs of the causal convolution (x, B, C channels).
    ssm: (B, H, D, N) the SSM state h_t.
    length: tokens seen so far.
    """

    conv: torch.Tensor
    ssm: torch.Tensor
    length: int = 0

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()

    def real_lengths(self) -> None:
        return None  # no padding: the state would absorb the pads, so Mamba-2 layers refuse padded batches


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class Mamba2(nn.Module):
    """The Mamba-2 mixer (Sec. 7, Fig. 6): (B, T, C) -> (B, T, C).

        z, xBC, dt = in_proj(u)                       one projection, all in parallel (unlike Mamba-1)
        x, B, C    = silu(conv1d(xBC))                causal depthwise convolution of width conv_kernel
        A          = -exp(A_log);  dt = softplus(dt + dt_bias)
        y          = SSD(x, dt, A, B, C) + D·x
        out        = out_proj(GatedRMSNorm(y, z))

    d_inner = expand·d_model channels split into n_heads = d_inner / head_dim heads; n_groups groups of heads
    share B and C. dt_limit clamps dt after the softplus (Hugging Face's `time_step_limit`).
    """

    def __init__(self, d_model: int, d_state: int = 128, head_dim: int = 64, expand: int = 2, n_groups: int = 1,
                 conv_kernel: int = 4, chunk_size: int = 256, norm_eps: float = 1e-5, bias: bool = False,
                 conv_bias: bool = True, dt_limit: tuple[float, float] = (0.0, float("inf"))):
        super().__init__()
        for name, value in dict(d_model=d_model, d_state=d_state, head_dim=head_dim, expand=expand,
                                n_groups=n_groups, conv_kernel=conv_kernel, chunk_size=chunk_size).items():
            _check_positive_int(name, value)
        d_inner = expand * d_model
        if d_inner % head_dim:
            raise ValueError(f"head_dim ({head_dim}) must divide expand·d_model ({d_inner})")
        n_heads = d_inner // head_dim
        if n_heads % n_groups:
            raise ValueError(f"n_groups ({n_groups}) must divide the number of heads ({n_heads})")
        if len(dt_limit) != 2 or not 0 <= dt_limit[0] <= dt_limit[1]:
            raise ValueError(f"dt_limit must be (low, high) with 0 <= low <= high, got {dt_limit!r}")
        self.d_model, self.d_inner, self.d_state, self.head_dim = d_model, d_inner, d_state, head_dim
        self.n_heads, self.n_groups, self.conv_kernel, self.chunk_size = n_heads, n_groups, conv_kernel, chunk_size
        self.dt_limit = tuple(float(v) for v in dt_limit)
        self.conv_dim = d_inner + 2 * n_groups * d_state  # the channels of x, B and C
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + n_heads, bias=bias)  # [z, x, B, C, dt]
        # depthwise (groups = channels): each channel mixes only its own last conv_kernel values
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm = GatedRMSNorm(d_inner, d_inner // n_groups, norm_eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """Mamba's initialization: A_h = h (A = -1, -2, ..., -H: S4D-real-like decay rates), D = 1, and dt_bias
        set so that softplus(dt_bias) is log-uniform in [dt_min, dt_max]. Skipped on the meta device."""
        if self.A_log.is_meta:
            return
        self.A_log.copy_(torch.arange(1, self.n_heads + 1, dtype=torch.float32).log())
        self.D.fill_(1.0)
        u = torch.rand(self.n_heads)
        dt = (u * (torch.tensor(dt_max).log() - torch.tensor(dt_min).log()) + torch.tensor(dt_min).log()).exp()
        dt = dt.clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt) = dt + log(1 - exp(-dt))

    def init_state(self, batch_size: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> Mamba2State:
        """Zero conv and SSM states for batch_size sequences. The SSM state is kept in float32 at least (as the
        SSD computes), the conv state in the activations' dtype."""
        _check_positive_int("batch_size", batch_size)
        dtype = dtype or self.in_proj.weight.dtype
        device = device or self.in_proj.weight.device
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return Mamba2State(conv=torch.zeros(batch_size, self.conv_dim, self.conv_kernel - 1, dtype=dtype,
                                            device=device),
                           ssm=torch.zeros(batch_size, self.n_heads, self.head_dim, self.d_state, dtype=ssm_dtype,
                                           device=device))

    def _check_state(self, state: Mamba2State, batch_size: int) -> None:
        if not isinstance(state, Mamba2State):
            raise TypeError(f"state must be a Mamba2State (from init_state), got {type(state).__name__}")
        if state.conv.shape != (batch_size, self.conv_dim, self.conv_kernel - 1) or \
                state.ssm.shape != (batch_size, self.n_heads, self.head_dim, self.d_state):
            raise ValueError(f"state does not fit this layer and a batch of {batch_size}: conv "
                             f"{tuple(state.conv.shape)}, ssm {tuple(state.ssm.shape)}; use init_state({batch_size})")

    def _project(self, u: torch.Tensor):
        """u (B, T, C) -> z (B, T, d_inner), xBC (B, T, conv_dim), dt (B, T, H) before the softplus."""
        return self.in_proj(u).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def _split_ssm_inputs(self, xBC: torch.Tensor, dt: torch.Tensor):
        """The conv's output and the raw dt -> the SSD's x (B, T, H, D), dt, A, B, C (B, T, G, N), in float32+."""
        work = torch.float64 if xBC.dtype == torch.float64 else torch.float32
        x, B_ssm, C_ssm = xBC.to(work).split([self.d_inner, self.n_groups * self.d_state,
                                              self.n_groups * self.d_state], dim=-1)
        Bsz, T = x.shape[:2]
        x = x.reshape(Bsz, T, self.n_heads, self.head_dim)
        B_ssm = B_ssm.reshape(Bsz, T, self.n_groups, self.d_state)
        C_ssm = C_ssm.reshape(Bsz, T, self.n_groups, self.d_state)
        dt = F.softplus(dt.to(work) + self.dt_bias.to(work)).clamp(*self.dt_limit)  # Δ > 0 (Sec. 7, after eq. 19)
        A = -self.A_log.to(work).exp()  # A < 0: every head's state decays
        return x, dt, A, B_ssm, C_ssm

    def forward(self, u: torch.Tensor, state: Mamba2State | None = None, naive: bool = False) -> torch.Tensor:
        """u (B, T, C) -> (B, T, C).

        state: continue from it (init_state for a fresh one) and update it in place to the state after u.
        naive: run the SSD as the step-by-step recurrence instead of the chunked scan (same result).
        """
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"u must have shape (B, T, {self.d_model}), got {tuple(u.shape)}")
        Bsz, T, _ = u.shape
        if state is not None:
            self._check_state(state, Bsz)
        z, xBC, dt = self._project(u)
        # causal convolution: prepend the K - 1 previous inputs (zeros at the start of a sequence)
        xBC = xBC.transpose(1, 2)  # (B, conv_dim, T)
        past = state.conv.to(xBC.dtype) if state is not None else xBC.new_zeros(Bsz, self.conv_dim,
                                                                                self.conv_kernel - 1)
        window = torch.cat([past, xBC], dim=-1)  # (B, conv_dim, K - 1 + T)
        xBC = F.silu(self.conv1d(window)).transpose(1, 2)  # (B, T, conv_dim)
        x, dt, A, B_ssm, C_ssm = self._split_ssm_inputs(xBC, dt)
        h0 = state.ssm if state is not None else None
        D_skip = self.D.to(x.dtype)
        if naive:
            y, h = ssd_sequential(x, dt, A, B_ssm, C_ssm, D_skip, h0)
        else:
            y, h = ssd_chunked(x, dt, A, B_ssm, C_ssm, self.chunk_size, D_skip, h0)
        if state is not None:
            state.conv.copy_(window[..., window.shape[-1] - (self.conv_kernel - 1):])
            state.ssm.copy_(h)
            state.length += T
        y = self.norm(y.reshape(Bsz, T, self.d_inner), z)
        return self.out_proj(y.to(u.dtype))

    def step(self, u_t: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """One token, u_t (B, C) -> (B, C), by the recurrence (O(1) in the sequence length); updates state."""
        if u_t.dim() != 2 or u_t.shape[-1] != self.d_model:
            raise ValueError(f"u_t must have shape (B, {self.d_model}), got {tuple(u_t.shape)}")
        Bsz = u_t.shape[0]
        self._check_state(state, Bsz)
        z, xBC, dt = self._project(u_t[:, None])  # (B, 1, ...)
        window = torch.cat([state.conv.to(xBC.dtype), xBC.transpose(1, 2)], dim=-1)  # (B, conv_dim, K)
        # the convolution's one output: each channel's last K inputs dotted with its kernel
        conv = (window * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        x, dt, A, B_ssm, C_ssm = self._split_ssm_inputs(F.silu(conv)[:, None], dt)
        y, h = ssd_step(x[:, 0], dt[:, 0], A, B_ssm[:, 0], C_ssm[:, 0], state.ssm.to(x.dtype), self.D.to(x.dtype))
        state.conv.copy_(window[..., 1:])
        state.ssm.copy_(h)
        state.length += 1
        y = self.norm(y.reshape(Bsz, 1, self.d_inner), z)
        return self.out_proj(y.to(u_t.dtype))[:, 0]
