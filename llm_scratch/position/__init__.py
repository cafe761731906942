"""Positional encodings: absolute (sinusoidal, learned), relative (Shaw, T5 buckets, ALiBi) and rotary (RoPE)."""

from llm_scratch.position.absolute import (
    LearnedPositionEmbedding,
    SinusoidalPositionEmbedding,
    sinusoidal_position_encoding,
)
from llm_scratch.position.relative import (
    ShawRelativePosition,
    T5RelativeBias,
    alibi_bias,
    alibi_slopes,
    relative_positions,
    shaw_attention,
    t5_relative_position_bucket,
)
from llm_scratch.position.rope import (
    ROPE_TYPES,
    RopeScaling,
    RotaryEmbedding,
    apply_rope,
    half_to_interleaved_permutation,
    interleaved_to_half_permutation,
    rope_angles,
    rope_frequencies,
    rope_inverse_frequencies,
)

__all__ = [
    "ROPE_TYPES",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "half_to_interleaved_permutation",
    "interleaved_to_half_permutation",
    "LearnedPositionEmbedding",
    "relative_positions",
    "rope_angles",
    "rope_frequencies",
    "rope_inverse_frequencies",
    "RopeScaling",
    "RotaryEmbedding",
    "shaw_attention",
    "ShawRelativePosition",
    "sinusoidal_position_encoding",
    "SinusoidalPositionEmbedding",
    "t5_relative_position_bucket",
    "T5RelativeBias",
]
