"""Whole models assembled from the package's parts, and loaders for Hugging Face checkpoints."""

from llm_scratch.models.gpt2 import GPT2, GPT2Config

__all__ = ["GPT2", "GPT2Config"]
