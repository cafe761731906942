"""Downloaded files (corpora, tokenizer ranks) with a cache and checksums, and token datasets.

    text = load_corpus("tinyshakespeare")
    path = data_path("gpt2.tiktoken")                    # GPT-2's BPE ranks in tiktoken's format
    ids = tokenize_corpus("tinyshakespeare", "gpt2")     # cached numpy memmap of token ids
    train, val = train_val_split(ids, 0.1)
    loader = make_loader(TokenWindows(train, context_length=256, stride=128), batch_size=8, seed=0)

Lookup order for a file:
1. `$LLM_SCRATCH_CACHE/<file>` when the environment variable is set (CI points it at a read-only
   folder of offline copies, so tests and notebooks never touch the network there);
2. `data/cache/<file>` in the repository (git-ignored);
3. otherwise download from the corpus's URL into `data/cache/` — to a temporary file first, which is
   renamed into place only after its checksum matches, so a partial or corrupted download never
   lands in the cache.

A cached file whose SHA-256 differs from the known one is an error naming the file, never silently
used (a truncated copy would otherwise give quietly wrong results).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "load_digits",
    "DATA_FILES",
    "DataFile",
    "TokenWindows",
    "cache_dir",
    "data_path",
    "load_corpus",
    "make_loader",
    "tokenize_corpus",
    "train_val_split",
]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DataFile:
    filename: str
    url: str
    sha256: str
    size: int  # bytes


DATA_FILES: dict[str, DataFile] = {
    # Karpathy's char-rnn repository: 40,000 lines of Shakespeare's plays (public domain)
    "tinyshakespeare": DataFile(
        filename="tinyshakespeare.txt",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1_115_394,
    ),
    # GPT-2's 50,000 merges as tiktoken ranks (tiktoken calls the encoding r50k_base); the special
    # token <|endoftext|> = 50256 is not in the file
    "gpt2.tiktoken": DataFile(
        filename="gpt2.tiktoken",
        url="https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
        sha256="306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        size=835_554,
    ),
}


def cache_dir() -> pathlib.Path:
    """Where corpora are written when downloaded: data/cache/ in the repository."""
    return REPO_ROOT / "data" / "cache"


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: pathlib.Path, corpus: DataFile) -> pathlib.Path:
    actual = _sha256(path)
    if actual != corpus.sha256:
        raise ValueError(
            f"{path} has SHA-256 {actual}, expected {corpus.sha256} for {corpus.filename}: the file is corrupted or "
            f"a different version; delete it and run again to re-download"
        )
    return path


def _download(corpus: DataFile, dest: pathlib.Path) -> pathlib.Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(corpus.url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
        except OSError as err:  # URLError and socket errors are OSErrors
            raise OSError(
                f"could not download {corpus.filename} from {corpus.url} ({err}); without network, put the file in "
                f"{dest.parent} or in a folder named by $LLM_SCRATCH_CACHE"
            ) from err
        _verified(pathlib.Path(tmp), corpus)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def data_path(name: str, download: bool = True) -> pathlib.Path:
    """The verified local path of file `name` (see DATA_FILES), downloaded into data/cache/ if it is nowhere yet."""
    if name not in DATA_FILES:
        raise ValueError(f"unknown data file {name!r}; known: {', '.join(DATA_FILES)}")
    corpus = DATA_FILES[name]
    folders = [pathlib.Path(os.environ["LLM_SCRATCH_CACHE"])] if os.environ.get("LLM_SCRATCH_CACHE") else []
    folders.append(cache_dir())
    for folder in folders:
        path = folder / corpus.filename
        if path.exists():
            return _verified(path, corpus)
    if not download:
        raise FileNotFoundError(f"{corpus.filename} is not in {' or '.join(map(str, folders))} and download=False")
    return _download(corpus, cache_dir() / corpus.filename)


def load_corpus(name: str, download: bool = True) -> str:
    """The text of corpus `name` (see DATA_FILES), from the cache or downloaded once and verified."""
    return data_path(name, download).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# token datasets for pretraining


def _tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what determines the ids: ranks (or the encoding's byte table), pattern, special tokens."""
    digest = hashlib.sha256()
    ranks = getattr(tokenizer, "ranks", None) or getattr(tokenizer, "_mergeable_ranks", None)
    if ranks is None:
        raise TypeError(f"cannot fingerprint {type(tokenizer).__name__}: it exposes no ranks")
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        digest.update(token + b"\0" + str(rank).encode() + b"\n")
    pattern = getattr(tokenizer, "pattern", None) or getattr(tokenizer, "_pat_str", "")
    digest.update(pattern.encode())
    specials = getattr(tokenizer, "special_tokens", None) or getattr(tokenizer, "_special_tokens", {})
    digest.update(repr(sorted(specials.items())).encode())
    return digest.hexdigest()


def tokenize_corpus(corpus: str, tokenizer_name: str) -> np.ndarray:
    """The corpus as token ids, a read-only numpy memmap (uint16, or uint32 for vocabularies over 65,536).

    Tokenized once and cached in data/cache/tokens/, keyed by the corpus's SHA-256 and a fingerprint of
    the tokenizer (ranks, pattern, special tokens): a changed tokenizer gets a new file, never stale ids.
    """
    from llm_scratch.tokenizer import get_tokenizer  # the tokenizer package itself reads corpora from here

    tokenizer = get_tokenizer(tokenizer_name)
    key = hashlib.sha256((DATA_FILES[corpus].sha256 + _tokenizer_fingerprint(tokenizer)).encode()).hexdigest()[:16]
    dtype = np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.uint32
    path = cache_dir() / "tokens" / f"{corpus}.{tokenizer_name}.{key}.{np.dtype(dtype).name}"
    if not path.exists():
        ids = np.asarray(tokenizer.encode_ordinary(load_corpus(corpus)), dtype=dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(ids.tobytes())
        os.replace(tmp, path)
    return np.memmap(path, dtype=dtype, mode="r")


def train_val_split(ids, val_fraction: float = 0.1):
    """(the first 1 - val_fraction of the ids, the rest): a contiguous split, so no window straddles both."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


class TokenWindows(torch.utils.data.Dataset):
    """Windows of a token stream for next-token prediction: item i is (x, y), both (context_length,) int64,
    x = ids[i·stride : i·stride + T] and y the same window shifted by one token (the targets).

    stride = context_length gives non-overlapping windows; a smaller stride overlaps them (more,
    correlated, samples). The last incomplete window is dropped, never padded.
    """

    def __init__(self, ids, context_length: int, stride: int | None = None):
        stride = context_length if stride is None else stride
        for name, value in (("context_length", context_length), ("stride", stride)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if len(ids) < context_length + 1:
            raise ValueError(f"need at least context_length + 1 = {context_length + 1} tokens, got {len(ids)}")
        self.ids, self.context_length, self.stride = ids, context_length, stride

    def __len__(self) -> int:
        return (len(self.ids) - self.context_length - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = (i % len(self)) * self.stride
        chunk = torch.from_numpy(np.asarray(self.ids[start:start + self.context_length + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                drop_last: bool = True, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader whose shuffling depends only on `seed`: the same seed gives the same batches, anywhere."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                       generator=generator, num_workers=num_workers)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    """The 1,797 handwritten digits (8 x 8 grey images, 10 classes) that scikit-learn ships inside its wheel: no
    download. -> (train_images (N, 1, 8, 8) float32 in [0, 1], train_labels (N,) int64, test_images, test_labels).

    The split is stratified (each digit keeps the same share in both halves) and seeded, so it is the same on every
    machine. scikit-learn is a dev dependency, imported here only.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # pragma: no cover - the dev extra installs it
        raise ImportError("load_digits needs scikit-learn: pip install -e '.[dev]'") from error
    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # pixel values are 0..16
    labels = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):
        idx = (labels == digit).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: round(test_fraction * len(idx))]] = True
    return images[~test], labels[~test], images[test], labels[test]
