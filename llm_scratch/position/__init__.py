"""Positional encodings. So far: rotary position embedding (RoPE), which attention needs."""

from llm_scratch.position.rope import RotaryEmbedding, apply_rope, rope_angles, rope_inverse_frequencies

__all__ = ["RotaryEmbedding", "apply_rope", "rope_angles", "rope_inverse_frequencies"]
