"""Attention: scaled dot-product attention and its masks, MHA, GQA/MQA, MLA, and KV caches."""

from llm_scratch.attention.gqa import GroupedQueryAttention
from llm_scratch.attention.kv_cache import KVCache, MLACache, SlidingWindowKVCache, StaticKVCache, next_positions
from llm_scratch.attention.linear import (
    GatedLinearAttention,
    LightningAttention,
    LinearAttention,
    LinearAttentionState,
    linear_attention_chunked,
    linear_attention_parallel,
    linear_attention_recurrent,
)
from llm_scratch.attention.mha import MultiHeadAttention, load_from_torch
from llm_scratch.attention.mla import MLAConfig, MultiHeadLatentAttention
from llm_scratch.attention.sdpa import (
    build_attn_mask,
    causal_mask,
    padding_to_attn_mask,
    scaled_dot_product_attention,
    sliding_window_mask,
)
from llm_scratch.attention.sparse import (
    Indexer,
    TopKSparseAttention,
    selection_to_mask,
    sliding_window_attention,
    sliding_window_pattern,
    topk_select,
    topk_sparse_attention,
)

__all__ = [
    "GatedLinearAttention",
    "GroupedQueryAttention",
    "Indexer",
    "LightningAttention",
    "LinearAttention",
    "LinearAttentionState",
    "TopKSparseAttention",
    "selection_to_mask",
    "linear_attention_chunked",
    "linear_attention_parallel",
    "linear_attention_recurrent",
    "sliding_window_attention",
    "sliding_window_pattern",
    "topk_select",
    "topk_sparse_attention",
    "KVCache",
    "MLACache",
    "MLAConfig",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "build_attn_mask",
    "causal_mask",
    "load_from_torch",
    "padding_to_attn_mask",
    "scaled_dot_product_attention",
    "sliding_window_mask",
    "SlidingWindowKVCache",
    "StaticKVCache",
    "next_positions",
]
