"""Ready-made tokenizers: GPT-2's ranks, and the project's own BPE trained on Tiny Shakespeare.

    enc = get_tokenizer("gpt2")          # tiktoken.Encoding, 50,257 ids
    enc = get_tokenizer("shakespeare")   # ours: 4,096 ranks + <|endoftext|>, <|im_start|>, <|im_end|>
    tok = get_tokenizer("shakespeare", backend="ours")   # the same ids from our pure-Python BPETokenizer

The Shakespeare tokenizer is committed under data/tokenizers/ (the project made it: `make artifacts`
retrains it, in about two seconds, and a test checks that training still produces the committed ranks).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Literal

from llm_scratch.data import data_path, load_corpus
from llm_scratch.tokenizer.bpe import GPT2_PATTERN, GPT4_PATTERN, BPETokenizer, read_tiktoken_ranks
from llm_scratch.tokenizer.chat import CHAT_SPECIAL_TOKENS

__all__ = ["SHAKESPEARE_TOKENIZER", "TOKENIZERS", "get_tokenizer", "train_shakespeare_tokenizer"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHAKESPEARE_TOKENIZER = REPO_ROOT / "data" / "tokenizers" / "shakespeare"  # .tiktoken + .json
# 4096 ranks (notebook 06/02 measures it): each doubling of the vocabulary still shortens held-out text
# by 11-15 % up to 8192, but on a 1 MB corpus the extra tokens are rare -- at 8192 two thirds of the
# merged tokens occur fewer than 10 times in training, at 4096 under a fifth -- so their embeddings
# would barely be trained, and a small vocabulary keeps the tiny models of later chapters small.
# GPT-4's pattern compresses this corpus better than GPT-2's.
SHAKESPEARE_SETTINGS = {"corpus": "tinyshakespeare", "vocab_size": 4096, "pattern": GPT4_PATTERN,
                        "special_tokens": list(CHAT_SPECIAL_TOKENS)}
GPT2_SPECIAL_TOKENS = {"<|endoftext|>": 50256}
TOKENIZERS = ("gpt2", "shakespeare")


def train_shakespeare_tokenizer() -> BPETokenizer:
    """Train the project's tokenizer from scratch (deterministic; about two seconds)."""
    s = SHAKESPEARE_SETTINGS
    return BPETokenizer.train(load_corpus(s["corpus"]), s["vocab_size"], s["pattern"], s["special_tokens"],
                              name="shakespeare")


def save_shakespeare_tokenizer(stem: str | os.PathLike = SHAKESPEARE_TOKENIZER) -> BPETokenizer:
    """Train and write `<stem>.tiktoken` (the ranks) and `<stem>.json` (pattern, special tokens, provenance)."""
    stem = pathlib.Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = train_shakespeare_tokenizer()
    tokenizer.save(stem.with_name(stem.name + ".tiktoken"))
    corpus_sha = hashlib.sha256(load_corpus(SHAKESPEARE_SETTINGS["corpus"]).encode("utf-8")).hexdigest()
    info = {**SHAKESPEARE_SETTINGS, "special_token_ids": tokenizer.special_tokens, "corpus_sha256": corpus_sha,
            "trainer": "llm_scratch.tokenizer.BPETokenizer.train(method='incremental')"}
    tmp = stem.with_name(f".{stem.name}.json.tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, stem.with_name(stem.name + ".json"))
    return tokenizer


def _shakespeare() -> BPETokenizer:
    stem = SHAKESPEARE_TOKENIZER
    info = json.loads(stem.with_name(stem.name + ".json").read_text())
    return BPETokenizer(read_tiktoken_ranks(stem.with_name(stem.name + ".tiktoken")), info["pattern"],
                        info["special_token_ids"], name="shakespeare")


def _gpt2(backend: str):
    try:
        path = data_path("gpt2.tiktoken", download=False)  # offline copy or earlier download: no network
    except FileNotFoundError:
        path = None
    if path is None and backend == "tiktoken":
        try:  # tiktoken's own cache (it may download into it)
            import tiktoken

            return tiktoken.get_encoding("gpt2")
        except Exception:  # noqa: BLE001 -- any failure here falls back to our own download below
            pass
    path = path or data_path("gpt2.tiktoken")
    return BPETokenizer.from_tiktoken_file(path, GPT2_PATTERN, GPT2_SPECIAL_TOKENS, name="gpt2")


def get_tokenizer(name: str, backend: Literal["tiktoken", "ours"] = "tiktoken"):
    """A tokenizer by name. backend "tiktoken" returns a tiktoken.Encoding (fast), "ours" our BPETokenizer;
    both have encode(text, allowed_special=..., disallowed_special=...) and decode(ids) with the same ids."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZERS)}")
    if backend not in ("tiktoken", "ours"):
        raise ValueError(f"backend must be 'tiktoken' or 'ours', got {backend!r}")
    tokenizer = _gpt2(backend) if name == "gpt2" else _shakespeare()
    if backend == "tiktoken" and isinstance(tokenizer, BPETokenizer):
        return tokenizer.to_tiktoken()
    return tokenizer
