"""A character-level tokenizer over a fixed alphabet: one token per character, plus an end-of-sequence token.

For toy tasks whose text uses a handful of symbols (the process-supervision sums "5+3+8=8;16"), where a tiny
model trained in seconds should see one character per position.

    tok = CharTokenizer("0123456789+=;")
    tok.encode("5+3=")            # [5, 10, 3, 11]
    tok.decode([5, 10, 3, 13])    # "5+3" -- the end-of-sequence token decodes to nothing
"""

from __future__ import annotations

__all__ = ["CharTokenizer"]


class CharTokenizer:
    """Ids 0 .. len(alphabet) − 1 are the characters in order; the last id is the end-of-sequence token."""

    def __init__(self, alphabet: str):
        if not isinstance(alphabet, str) or not alphabet:
            raise ValueError("alphabet must be a non-empty str")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
        self.alphabet = alphabet
        self._id = {c: i for i, c in enumerate(alphabet)}
        self.eos_id = len(alphabet)

    @property
    def n_vocab(self) -> int:
        return len(self.alphabet) + 1

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self._id))
        if unknown:
            raise ValueError(f"text has characters outside the alphabet {self.alphabet!r}: {unknown}")
        return [self._id[c] for c in text]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            if not 0 <= int(i) < self.n_vocab:
                raise ValueError(f"token id {int(i)} is outside 0..{self.n_vocab - 1}")
            if int(i) != self.eos_id:
                out.append(self.alphabet[int(i)])
        return "".join(out)
