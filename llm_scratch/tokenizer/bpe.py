"""Byte-level byte-pair encoding (BPE), trained from scratch, with tiktoken's file format and encode rule.

Byte-level BPE (Sennrich et al. 2016, arXiv:1508.07909, applied to UTF-8 bytes by GPT-2, Radford et
al. 2019) starts from the 256 byte values, so any text can be encoded and nothing is ever unknown.
Training repeatedly merges the most frequent adjacent pair of tokens into a new token; the order of
the merges is the tokenizer. Three steps turn text into ids:

1. pre-tokenization: a regex splits the text into pieces (words with their leading space, numbers,
   punctuation runs, whitespace); merges never cross a piece boundary, so " dog" and " dog." share
   the token " dog". GPT-2's and GPT-4's (cl100k) patterns are below.
2. each piece's UTF-8 bytes are merged, rank by rank: repeatedly join the adjacent pair whose joined
   bytes have the lowest rank (the earliest merge), leftmost first, until no adjacent pair is a token.
   This is tiktoken's rule, which needs only the ranks {token bytes: id}, not a separate merge list.
3. special tokens (`<|endoftext|>`, chat markers) are matched before step 1 and map to their own ids;
   text that contains one by accident is an error unless the caller allows it (tiktoken's policy).

Ranks are stored in tiktoken's `.tiktoken` format, one token per line: base64(bytes) and its rank.
"""

from __future__ import annotations

import base64
import heapq
import os
import pathlib
from collections import Counter
from collections.abc import Collection, Iterable
from typing import Literal

import regex

__all__ = ["GPT2_PATTERN", "GPT4_PATTERN", "BPETokenizer", "read_tiktoken_ranks", "write_tiktoken_ranks"]

# GPT-2 (tiktoken's r50k_base): contractions, letters, numbers and other symbols each with an optional
# leading space, then whitespace (a run of spaces leaves its last space to the next word).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4 (tiktoken's cl100k_base): case-insensitive contractions, numbers in groups of at most three
# digits, newlines kept apart from other whitespace.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)

_CACHE_LIMIT = 200_000  # pieces remembered by encode; cleared when full


# ---------------------------------------------------------------------------------------------------
# the .tiktoken file format


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write ranks as `base64(token) rank` lines in rank order, atomically (temporary file, then rename)."""
    path = pathlib.Path(path)
    lines = b"".join(base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
                     for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(lines)
    os.replace(tmp, path)


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a `.tiktoken` file: {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(pathlib.Path(path).read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise ValueError(f"{path}: line {number} is not 'base64-token rank': {line[:60]!r}") from err
    return ranks


# ---------------------------------------------------------------------------------------------------
# training


def _pair_counts(words: list[list[int]], counts: list[int]) -> Counter:
    pairs: Counter = Counter()
    for word, count in zip(words, counts, strict=True):
        for pair in zip(word, word[1:], strict=False):
            pairs[pair] += count
    return pairs


def _merge_word(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair`, left to right, by new_id."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _train_naive(words: list[list[int]], counts: list[int], n_merges: int) -> list[tuple[int, int]]:
    """Recount every pair of every word after each merge: O(merges x corpus), the textbook loop."""
    merges = []
    for step in range(n_merges):
        pairs = _pair_counts(words, counts)
        if not pairs:
            break
        # the most frequent pair; ties go to the smallest (left id, right id), so training is deterministic
        best = min(pairs, key=lambda p: (-pairs[p], p))
        new_id = 256 + step
        words = [_merge_word(w, best, new_id) if len(w) > 1 else w for w in words]
        merges.append(best)
    return merges


def _train_incremental(words: list[list[int]], counts: list[int], n_merges: int) -> list[tuple[int, int]]:
    """The same merges, updating the counts of only the words that contain the merged pair.

    `where[pair]` lists the words that contain (or once contained) the pair, and a heap of
    (-count, pair) finds the most frequent pair in O(log n); a heap entry whose count is no longer
    current is skipped when popped ("lazy deletion"). Each merge then costs time proportional to the
    words it touches rather than to the whole corpus.
    """
    pairs = _pair_counts(words, counts)
    where: dict[tuple[int, int], set[int]] = {}
    for index, word in enumerate(words):
        for pair in zip(word, word[1:], strict=False):
            where.setdefault(pair, set()).add(index)
    heap = [(-count, pair) for pair, count in pairs.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        negative, best = heapq.heappop(heap)
        if pairs.get(best, 0) != -negative or negative == 0:
            continue  # stale entry: the pair's count changed after it was pushed
        new_id = 256 + len(merges)
        changed: set[tuple[int, int]] = set()
        for index in where.pop(best, ()):
            word = words[index]
            if len(word) < 2:
                continue
            merged = _merge_word(word, best, new_id)
            if len(merged) == len(word):
                continue  # a stale index: the pair left this word in an earlier merge
            count = counts[index]
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] -= count
                changed.add(pair)
            for pair in zip(merged, merged[1:], strict=False):
                pairs[pair] += count
                changed.add(pair)
                where.setdefault(pair, set()).add(index)
            words[index] = merged
        for pair in changed:
            if pairs[pair] > 0:
                heapq.heappush(heap, (-pairs[pair], pair))
            else:
                del pairs[pair]
        merges.append(best)
    return merges


# ---------------------------------------------------------------------------------------------------
# the tokenizer


class BPETokenizer:
    """A byte-level BPE tokenizer: `ranks` {token bytes: id} plus a pre-tokenization regex and special tokens.

    Every single byte must have a rank, so any text can be encoded. Special token ids must not collide
    with the ranks.
    """

    def __init__(self, ranks: dict[bytes, int], pattern: str = GPT2_PATTERN,
                 special_tokens: dict[str, int] | None = None, name: str = "bpe"):
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"ranks must contain all 256 single bytes (byte-level BPE); missing {len(missing)}, "
                             f"e.g. {bytes(missing[:5])!r}")
        if len(set(ranks.values())) != len(ranks):
            raise ValueError("ranks must be unique: two tokens share an id")
        special_tokens = dict(special_tokens or {})
        clash = sorted(set(special_tokens.values()) & set(ranks.values()))
        if clash:
            raise ValueError(f"special token ids {clash[:5]} collide with ranks of ordinary tokens")
        self.name, self.pattern = name, pattern
        self.ranks = dict(ranks)
        self.special_tokens = special_tokens
        self._regex = regex.compile(pattern)
        self._decoder = {rank: token for token, rank in self.ranks.items()}
        self._decoder.update({rank: text.encode("utf-8") for text, rank in special_tokens.items()})
        self._cache: dict[bytes, list[int]] = {}
        self.merges: list[tuple[bytes, bytes]] = []  # filled by train(); unknown for loaded ranks

    # --- training ------------------------------------------------------------------------------------

    @classmethod
    def train(cls, text: str, vocab_size: int, pattern: str = GPT2_PATTERN,
              special_tokens: Iterable[str] = (), method: Literal["incremental", "naive"] = "incremental",
              name: str = "bpe") -> BPETokenizer:
        """Learn vocab_size - 256 merges from `text`; special tokens get the ids after the last rank.

        `method` "naive" recounts all pairs after every merge; "incremental" updates only what a
        merge changed. Both produce the same merges (same counts, same tie-break: the smallest pair of
        ids among the most frequent).
        """
        if not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"vocab_size must be an int >= 256 (the single bytes), got {vocab_size!r}")
        if method not in ("incremental", "naive"):
            raise ValueError(f"method must be 'incremental' or 'naive', got {method!r}")
        pieces = Counter(piece.encode("utf-8") for piece in regex.findall(pattern, text))
        words = [list(piece) for piece in pieces]
        counts = list(pieces.values())
        train = _train_incremental if method == "incremental" else _train_naive
        merge_ids = train(words, counts, vocab_size - 256)

        vocab = [bytes([b]) for b in range(256)]
        for left, right in merge_ids:
            vocab.append(vocab[left] + vocab[right])
        ranks = {token: rank for rank, token in enumerate(vocab)}
        if len(ranks) != len(vocab):  # a merge rebuilt an existing byte string: cannot be one rank each
            raise RuntimeError("training produced a duplicate token")
        specials = {token: len(vocab) + i for i, token in enumerate(special_tokens)}
        tokenizer = cls(ranks, pattern, specials, name)
        tokenizer.merges = [(vocab[left], vocab[right]) for left, right in merge_ids]
        return tokenizer

    # --- encoding ------------------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return max(self._decoder) + 1

    def _bpe(self, piece: bytes) -> list[int]:
        """Merge one piece's bytes by rank: always the adjacent pair with the lowest rank, leftmost first."""
        rank = self.ranks.get(piece)
        if rank is not None:
            return [rank]
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best_rank, best = None, -1
            for i in range(len(parts) - 1):
                r = self.ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, i
            if best_rank is None:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return [self.ranks[p] for p in parts]

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text with no special-token handling (special strings are ordinary text here)."""
        ids: list[int] = []
        cache = self._cache
        for piece in self._regex.findall(text):
            data = piece.encode("utf-8")
            tokens = cache.get(data)
            if tokens is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                tokens = cache[data] = self._bpe(data)
            ids.extend(tokens)
        return ids

    def encode(self, text: str, allowed_special: Collection[str] | Literal["all"] = frozenset(),
               disallowed_special: Collection[str] | Literal["all"] = "all") -> list[int]:
        """Encode text; special tokens in `allowed_special` become their ids.

        As in tiktoken, a special token's text that appears in `text` but is not allowed raises
        ValueError (by default all of them): text from users must not be able to inject an
        `<|endoftext|>`. Pass disallowed_special=() to encode such text as ordinary characters.
        """
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special names unknown special tokens {sorted(unknown)}; "
                             f"known: {sorted(self.special_tokens)}")
        disallowed = (set(self.special_tokens) - allowed) if disallowed_special == "all" else set(disallowed_special)
        for token in sorted(disallowed):
            if token in text:
                raise ValueError(
                    f"text contains the special token {token!r}, which is not allowed. Pass "
                    f"allowed_special={{{token!r}}} to encode it as a special token, or disallowed_special=() "
                    f"to encode it as ordinary text"
                )
        if not allowed:
            return self.encode_ordinary(text)
        # split on the allowed special tokens, longest first so that no token shadows a longer one
        splitter = regex.compile("|".join(regex.escape(t) for t in sorted(allowed, key=len, reverse=True)))
        ids: list[int] = []
        start = 0
        for match in splitter.finditer(text):
            ids.extend(self.encode_ordinary(text[start:match.start()]))
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids.extend(self.encode_ordinary(text[start:]))
        return ids

    # --- decoding ------------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(self._decoder[i] for i in ids)
        except KeyError as err:
            raise ValueError(f"token id {err.args[0]} is not in this tokenizer (n_vocab {self.n_vocab})") from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Bytes -> UTF-8 text; a token sequence that cuts a character in half decodes to U+FFFD there."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # --- files and tiktoken --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """The ranks in tiktoken's `.tiktoken` format (the pattern and special tokens are not part of it)."""
        write_tiktoken_ranks(self.ranks, path)

    @classmethod
    def from_tiktoken_file(cls, path: str | os.PathLike, pattern: str,
                           special_tokens: dict[str, int] | None = None, name: str | None = None) -> BPETokenizer:
        """Load ranks from a `.tiktoken` file into our own encoder (pattern: the regex string)."""
        return cls(read_tiktoken_ranks(path), pattern, special_tokens, name or pathlib.Path(path).stem)

    def to_tiktoken(self):
        """A `tiktoken.Encoding` with these ranks, pattern and special tokens: same ids, compiled speed."""
        import tiktoken

        return tiktoken.Encoding(name=self.name, pat_str=self.pattern, mergeable_ranks=self.ranks,
                                 special_tokens=self.special_tokens)

    def __repr__(self) -> str:
        return f"BPETokenizer(name={self.name!r}, n_vocab={self.n_vocab}, special_tokens={len(self.special_tokens)})"
