"""Rotary position embedding (RoPE; Su et al. 2021, "RoFormer", arXiv:2104.09864, eq. 34) and its
context-extension variants.

RoPE rotates each pair of channels of a query or key by an angle proportional to the token's
position, θ_i = base^(-2i/D) per pair i. A rotation preserves the dot product's form, so
q_m · k_n depends on the positions only through m - n: relative position for free.

Two channel layouts are in use, and a checkpoint fixes which:
- "half" (GPT-NeoX, Hugging Face Llama): channel i pairs with channel i + D/2.
- "interleaved" (RoFormer, Meta's original Llama code, DeepSeek): channel 2i pairs with 2i + 1.
They differ by a fixed permutation of channels (`half_to_interleaved_permutation`), so either gives
the same attention scores once the projection weights are permuted to match.

Context extension changes only the frequencies θ_i (and, for YaRN, scales cos/sin). A model
trained on L positions sees angles m·θ_i with m < L; to run it on s·L positions:
- "linear": position interpolation (Chen et al. 2023, arXiv:2306.15595): θ_i / s, i.e. m -> m/s.
- "ntk": NTK-aware base change (bloc97, reddit 2023): base' = base · s^(D/(D-2)); the highest
  frequency is untouched and the lowest one is divided by exactly s.
- "dynamic": dynamic NTK (emozilla, reddit 2023): the same base change, with s chosen from the
  current length T, no change while T <= L.
- "yarn": YaRN (Peng et al. 2023, arXiv:2309.00071): NTK-by-parts frequencies plus an attention
  temperature.
- "llama3": Llama 3.1's fixed-band variant of NTK-by-parts (Meta's reference code; Grattafiori et
  al. 2024, arXiv:2407.21783).
The parameter names follow Hugging Face's `rope_parameters`, so a real config can be read with
`RopeScaling.from_dict`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import torch
from torch import nn

__all__ = [
    "ROPE_TYPES",
    "RopeScaling",
    "RotaryEmbedding",
    "apply_rope",
    "half_to_interleaved_permutation",
    "interleaved_to_half_permutation",
    "rope_angles",
    "rope_frequencies",
    "rope_inverse_frequencies",
]

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3")
_NEEDS_ORIGINAL_LENGTH = ("dynamic", "yarn", "llama3")
# keys of a Hugging Face rope_parameters dict that describe RoPE itself rather than its scaling:
# the caller passes the base and the rotary head dim to `rope_frequencies` / `RotaryEmbedding`
_IGNORED_HF_KEYS = ("rope_theta", "partial_rotary_factor")


@dataclass(frozen=True)
class RopeScaling:
    """How to stretch RoPE beyond the length it was trained on; field names follow Hugging Face's
    `rope_parameters`.

    rope_type: one of ROPE_TYPES; "default" is plain RoPE.
    factor: the context extension factor s (new length / trained length).
    original_max_position_embeddings: the trained length L (needed by dynamic, yarn, llama3).
    beta_fast, beta_slow: YaRN's ramp boundaries, in rotations over L (α = beta_slow, β = beta_fast).
    mscale, mscale_all_dim: DeepSeek's weights of YaRN's temperature term (see `rope_frequencies`).
    attention_factor: YaRN's cos/sin multiplier; None means "derive it from factor".
    truncate: YaRN rounds the ramp's ends outwards to whole dimensions (floor/ceil) when True.
    low_freq_factor, high_freq_factor: Llama 3's band edges: wavelengths above L / low_freq_factor
        are interpolated, below L / high_freq_factor kept, in between blended.
    """

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {', '.join(ROPE_TYPES)}; got {self.rope_type!r}")
        if not (isinstance(self.factor, int | float) and math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"factor must be a finite number > 0, got {self.factor!r}")
        if self.rope_type != "default" and self.factor < 1:
            # Hugging Face only warns here too: s < 1 *shortens* the usable context, legal but unusual
            warnings.warn(
                f"rope_type {self.rope_type!r} with factor {self.factor} < 1 shrinks the context", stacklevel=3
            )
        length = self.original_max_position_embeddings
        if self.rope_type in _NEEDS_ORIGINAL_LENGTH and length is None:
            raise ValueError(
                f"rope_type {self.rope_type!r} needs original_max_position_embeddings (the trained length)"
            )
        if length is not None and not (isinstance(length, int) and length > 0):
            raise ValueError(f"original_max_position_embeddings must be a positive int, got {length!r}")
        if self.rope_type == "yarn" and self.beta_fast < self.beta_slow:
            raise ValueError(
                f"beta_fast must be >= beta_slow (rotations: fast edge above slow edge), "
                f"got beta_fast={self.beta_fast}, beta_slow={self.beta_slow}"
            )
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"attention_factor must be None or > 0, got {self.attention_factor!r}")
        if self.rope_type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "llama3 scaling needs 0 < low_freq_factor < high_freq_factor, "
                f"got low_freq_factor={self.low_freq_factor}, high_freq_factor={self.high_freq_factor}"
            )

    @classmethod
    def from_dict(cls, rope_parameters: dict, max_position_embeddings: int | None = None) -> RopeScaling:
        """Read a Hugging Face `rope_parameters` (or older `rope_scaling`) dict as found in config.json.

        "type" is accepted as an alias of "rope_type" and keys with value None take the defaults, as in
        Hugging Face; rope_theta and partial_rotary_factor are ignored (pass the base and the rotary dim
        separately). `max_position_embeddings`, the config's top-level length, fills in what Hugging Face
        fills in from it: the trained length of dynamic NTK (which HF reads from max_position_embeddings)
        and of yarn/llama3 when the dict lacks it, and YaRN's factor when it is missing.
        """
        params = {k: v for k, v in rope_parameters.items() if v is not None and k not in _IGNORED_HF_KEYS}
        alias = params.pop("type", None)
        params.setdefault("rope_type", alias or "default")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unexpected rope_parameters keys {unknown}; known: {sorted(known)}")
        rope_type = params["rope_type"]
        if rope_type in _NEEDS_ORIGINAL_LENGTH and max_position_embeddings is not None:
            if rope_type == "dynamic":
                params["original_max_position_embeddings"] = max_position_embeddings
            params.setdefault("original_max_position_embeddings", max_position_embeddings)
            if rope_type == "yarn" and "factor" not in params:
                params["factor"] = max_position_embeddings / params["original_max_position_embeddings"]
        return cls(**params)


def rope_inverse_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """θ_i = base^(-2i/D) for i = 0 .. D/2 - 1, shape (D/2,), float32."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number for RoPE, got {head_dim}")
    if base <= 1:
        raise ValueError(f"base must be > 1, got {base}")
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def _ntk_base(base: float, scale: float, head_dim: int) -> float:
    """base' = base · s^(D/(D-2)): chosen so the lowest frequency θ_{D/2-1} = base^(-(D-2)/D) is divided
    by exactly s (interpolated like PI), while θ_0 = 1 stays (extrapolated)."""
    return base * scale ** (head_dim / (head_dim - 2))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's recommended temperature, sqrt(1/t) = 0.1·ln(s) + 1 (arXiv:2309.00071 §3.4), weighted by
    DeepSeek's `mscale`; 1 when nothing is extended."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(rotations: float, head_dim: int, base: float, length: int) -> float:
    """The pair index d whose wavelength λ_d = 2π·base^(2d/D) fits `rotations` times into `length`:
    r(d) = L / λ_d (YaRN §3.2), solved for d."""
    return head_dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(
    head_dim: int,
    base: float = 10000.0,
    scaling: RopeScaling | None = None,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies (D/2,) float32, and the factor that multiplies cos and sin.

    `seq_len` is the length being processed; only dynamic NTK reads it. The attention factor
    multiplies both q and k, so q·k is scaled by its square (YaRN's 1/t).
    """
    inv_freq = rope_inverse_frequencies(head_dim, base)
    s = scaling if scaling is not None else RopeScaling()
    factor, kind = s.factor, s.rope_type

    if kind == "default":
        return inv_freq, 1.0

    if kind == "linear":
        # position interpolation (Chen et al. 2023, §2.2): f'(x, m) = f(x, m·L/L'), i.e. rotate by (m/s)·θ_i
        return inv_freq / factor, 1.0

    if kind == "ntk":
        return rope_inverse_frequencies(head_dim, _ntk_base(base, factor, head_dim)), 1.0

    if kind == "dynamic":
        # dynamic NTK: the NTK base change with the scale chosen from the current length T,
        # s_T = s·T/L - (s - 1), which is 1 at T = L (no change up to the trained length) and grows
        # linearly with T. Like Hugging Face, T is clamped below at L.
        length = s.original_max_position_embeddings
        t = max(seq_len if seq_len is not None else length, length)
        scale_t = factor * t / length - (factor - 1)
        if scale_t == 1:
            return inv_freq, 1.0
        return rope_inverse_frequencies(head_dim, _ntk_base(base, scale_t, head_dim)), 1.0

    if kind == "yarn":
        # NTK-by-parts (YaRN §3.2): pair d makes r(d) = L/λ_d rotations over the trained length L.
        # Pairs with r > β (beta_fast) rotate many times: keep θ_d (extrapolate). Pairs with
        # r < α (beta_slow) barely turn within L: interpolate, θ_d/s. In between, blend linearly:
        #   h(θ_d) = (1 - γ(d))·θ_d/s + γ(d)·θ_d,   γ = 1 at d <= low, 0 at d >= high.
        # The reference code expresses the ramp in dimension index d rather than in r.
        length = s.original_max_position_embeddings
        low = _yarn_correction_dim(s.beta_fast, head_dim, base, length)
        high = _yarn_correction_dim(s.beta_slow, head_dim, base, length)
        if s.truncate:  # round outwards to whole dims, as the YaRN reference code does
            low, high = math.floor(low), math.ceil(high)
        # clamped to [0, D-1] (not D/2-1) as in the reference code; matters only when high > D/2 - 1
        low, high = max(low, 0), min(high, head_dim - 1)
        if high == low:
            high += 1e-3  # a step instead of a ramp, without dividing by zero
        d = torch.arange(head_dim // 2, dtype=torch.float32)
        interpolate = ((d - low) / (high - low)).clamp(0, 1)  # 1 - γ(d)
        inv_freq = inv_freq / factor * interpolate + inv_freq * (1 - interpolate)
        if s.attention_factor is not None:
            attention_factor = s.attention_factor
        elif s.mscale and s.mscale_all_dim:
            # DeepSeek-V2/V3: mscale(s, mscale) / mscale(s, mscale_all_dim). With both equal (V3: 1, 1)
            # this is 1: V3 applies the temperature in its softmax scale instead (see attention/mla.py).
            attention_factor = _yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
        return inv_freq, float(attention_factor)

    # kind == "llama3": NTK-by-parts with band edges fixed by wavelength rather than by a ramp in d.
    # λ_i = 2π/θ_i. λ < L/high_freq_factor: keep; λ > L/low_freq_factor: θ_i/s; in between blend with
    # γ = (L/λ - low_freq_factor) / (high_freq_factor - low_freq_factor) (Meta's apply_scaling).
    length = s.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    gamma = ((length / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).clamp(0, 1)
    blended = (1 - gamma) * inv_freq / factor + gamma * inv_freq
    keep = wavelength < length / s.high_freq_factor
    interpolate = wavelength > length / s.low_freq_factor
    inv_freq = torch.where(keep, inv_freq, torch.where(interpolate, inv_freq / factor, blended))
    return inv_freq, 1.0


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of m·θ_i for positions m of shape (T,) or (B, T): each (..., T, D/2), float32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles behind cos/sin ((T, D/2) or (B, T, D/2)).

    Computed in float32 and cast back, so bf16 inputs do not lose the rotation's precision.
    """
    if x.shape[-1] != 2 * cos.shape[-1]:
        raise ValueError(f"x has head_dim {x.shape[-1]} but the angles cover {2 * cos.shape[-1]} channels")
    if cos.dim() == 3:  # per-sequence positions: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    cos, sin = cos.float(), sin.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf.chunk(2, dim=-1)
    # (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos): a 2-D rotation of each pair
    r1, r2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    out = torch.stack((r1, r2), dim=-1).flatten(-2) if interleaved else torch.cat((r1, r2), dim=-1)
    return out.to(x.dtype)


def half_to_interleaved_permutation(head_dim: int) -> torch.Tensor:
    """perm with x_half[..., perm] in interleaved order: [0, D/2, 1, D/2+1, ...].

    If q, k use the half layout, then apply_rope(q[..., perm], interleaved=True) equals
    apply_rope(q)[..., perm], and permuting q and k alike leaves q·k unchanged. To convert a checkpoint,
    permute each head's rows of the q and k projections: W.view(H, D, C)[:, perm].reshape(H·D, C)
    turns a half-layout weight into an interleaved one (Hugging Face's Llama conversion script does
    the inverse, `interleaved_to_half_permutation`, to Meta's weights).
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number for RoPE, got {head_dim}")
    half = head_dim // 2
    return torch.stack((torch.arange(half), torch.arange(half, head_dim)), dim=-1).flatten()


def interleaved_to_half_permutation(head_dim: int) -> torch.Tensor:
    """The inverse of `half_to_interleaved_permutation`: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return torch.argsort(half_to_interleaved_permutation(head_dim))


class RotaryEmbedding(nn.Module):
    """Applies RoPE to a (B, H, T, D) tensor at the given positions ((T,) or (B, T) integers).

    cos and sin (times the scaling's attention factor) are tabulated for positions 0 .. N-1 once per
    device and dtype and indexed by position; the table grows when a larger position arrives.
    With dynamic NTK, positions beyond the trained length L are rotated with frequencies computed for
    the current length T = max(position) + 1 on every call. Hugging Face keeps the largest T seen so far
    instead; the two agree whenever lengths only grow, as in cached decoding.
    """

    def __init__(
        self, head_dim: int, base: float = 10000.0, interleaved: bool = False, scaling: RopeScaling | None = None
    ):
        super().__init__()
        self.head_dim, self.base, self.interleaved, self.scaling = head_dim, base, interleaved, scaling
        # computed on the CPU even inside `with torch.device("meta")`: a model built on meta and then filled
        # with load_state_dict(assign=True) never gets values for non-persistent buffers like this one
        with torch.device("cpu"):
            inv_freq, self.attention_factor = rope_frequencies(head_dim, base, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # the tables are built from this float32 copy: `module.to(torch.bfloat16)` casts buffers, and
        # bf16 frequencies would put errors of ~m·2^-8 radians into the angles of large positions m
        self._inv_freq32 = inv_freq.clone()
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._inv_freq32_on: dict[torch.device, torch.Tensor] = {}  # _inv_freq32 per device, for compiled code

    @property
    def _dynamic_length(self) -> int | None:
        """The trained length L past which dynamic NTK changes the frequencies, else None."""
        s = self.scaling
        return s.original_max_position_embeddings if s is not None and s.rope_type == "dynamic" else None

    def _compute(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        cos, sin = rope_angles(positions, inv_freq)
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def cos_sin(
        self, seq_len: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (times the attention factor) for positions 0 .. seq_len-1: each (seq_len, D/2)."""
        device = torch.device(device) if device is not None else self.inv_freq.device
        limit = self._dynamic_length
        if limit is not None and seq_len > limit:
            # dynamic NTK past L: frequencies depend on seq_len itself, so nothing to reuse
            inv_freq, _ = rope_frequencies(self.head_dim, self.base, self.scaling, seq_len=seq_len)
            return self._compute(torch.arange(seq_len, device=device), inv_freq, dtype)
        key = (device, dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < seq_len:
            # grow geometrically so decoding one token at a time rebuilds the table O(log T) times
            size = max(seq_len, 2 * table[0].shape[0] if table is not None else 0)
            if limit is not None:
                size = min(size, limit)
            table = self._compute(torch.arange(size, device=device), self._inv_freq32, dtype)
            self._tables[key] = table
        return table[0][:seq_len], table[1][:seq_len]

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        positions = positions.to(x.device)
        if torch.compiler.is_compiling() and self._dynamic_length is None:
            return self._rotate_compiled(x, positions)
        low, high = (int(v) for v in torch.aminmax(positions)) if positions.numel() else (0, -1)
        if positions.is_floating_point() or low < 0:
            # fractional or negative positions (e.g. unclamped left padding) are legal for RoPE but
            # cannot index a table: rotate directly, with the frequencies of the trained length
            cos, sin = self._compute(positions, self._inv_freq32, torch.float32)
            return apply_rope(x, cos, sin, interleaved=self.interleaved)
        seq_len = high + 1
        limit = self._dynamic_length
        if limit is not None and seq_len > limit:
            # dynamic NTK past L: frequencies for the current length, angles only where needed
            inv_freq, _ = rope_frequencies(self.head_dim, self.base, self.scaling, seq_len=seq_len)
            cos, sin = self._compute(positions, inv_freq, torch.float32)
        else:
            cos, sin = self.cos_sin(seq_len, x.device, torch.float32)
            cos, sin = cos[positions], sin[positions]  # (T, D/2) or (B, T, D/2)
        return apply_rope(x, cos, sin, interleaved=self.interleaved)

    def prepare_for_compile(self, device: torch.device | str) -> None:
        """Keep a copy of the float32 frequencies on `device` for compiled code to read (call it eagerly)."""
        device = torch.device(device)
        self._inv_freq32_on[device] = self._inv_freq32.to(device)

    def _rotate_compiled(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """forward inside torch.compile, e.g. generation.StaticDecoder's decode step, compiled once. The table
        lookup of `forward` reads the positions' values to size the table: a device sync and a graph break (an
        error under fullgraph=True). Here the angles of these positions are computed directly, the numbers the
        table holds, from float32 frequencies kept on x's device (a CPU tensor inside a CUDA graph would make
        torch.compile skip CUDA graphs)."""
        inv_freq = self._inv_freq32_on.get(x.device, self._inv_freq32)  # see prepare_for_compile
        cos, sin = self._compute(positions, inv_freq, torch.float32)
        return apply_rope(x, cos, sin, interleaved=self.interleaved)

    def extra_repr(self) -> str:
        text = f"head_dim={self.head_dim}, base={self.base}, interleaved={self.interleaved}"
        return text + (f", scaling={self.scaling}" if self.scaling is not None else "")
