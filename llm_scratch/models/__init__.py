"""Whole models assembled from the package's parts, and loaders for Hugging Face checkpoints."""

from llm_scratch.models.classifier import SequenceClassifier, last_token_index, pool_hidden
from llm_scratch.models.deepseek_v3 import DeepSeekV3, DeepSeekV3Config
from llm_scratch.models.gemma3 import Gemma3, Gemma3Config
from llm_scratch.models.gpt2 import GPT2, GPT2Config
from llm_scratch.models.hybrid import HybridConfig, HybridLM
from llm_scratch.models.llama3 import Llama3, Llama3Config
from llm_scratch.models.mamba2 import Mamba2Config, Mamba2LM
from llm_scratch.models.qwen3 import Qwen3, Qwen3Config
from llm_scratch.models.vit import ViT, ViTConfig

__all__ = ["DeepSeekV3", "DeepSeekV3Config", "GPT2", "GPT2Config", "Gemma3", "Gemma3Config", "HybridConfig", "HybridLM",
           "Llama3", "Llama3Config", "Mamba2Config", "Mamba2LM", "Qwen3", "Qwen3Config",
           "SequenceClassifier", "ViT", "ViTConfig", "last_token_index", "pool_hidden"]
