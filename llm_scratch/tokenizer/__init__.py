"""Tokenization: byte-level BPE trained from scratch, the tiktoken bridge, and a chat template."""

from llm_scratch.tokenizer.bpe import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    BPETokenizer,
    read_tiktoken_ranks,
    write_tiktoken_ranks,
)
from llm_scratch.tokenizer.char import CharTokenizer
from llm_scratch.tokenizer.chat import CHAT_SPECIAL_TOKENS, encode_chat, parse_chat, render_chat
from llm_scratch.tokenizer.pretrained import TOKENIZERS, get_tokenizer, train_shakespeare_tokenizer

__all__ = [
    "CHAT_SPECIAL_TOKENS",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "TOKENIZERS",
    "BPETokenizer",
    "CharTokenizer",
    "encode_chat",
    "get_tokenizer",
    "parse_chat",
    "read_tiktoken_ranks",
    "render_chat",
    "train_shakespeare_tokenizer",
    "write_tiktoken_ranks",
]
