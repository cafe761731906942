"""Corpora: found in a cache folder, else downloaded once and checked against a known SHA-256.

    text = load_corpus("tinyshakespeare")

Lookup order for a corpus file:
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

__all__ = ["CORPORA", "Corpus", "cache_dir", "corpus_path", "load_corpus"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Corpus:
    filename: str
    url: str
    sha256: str
    size: int  # bytes


CORPORA: dict[str, Corpus] = {
    # Karpathy's char-rnn repository; the complete works of Shakespeare, 40,000 lines (public domain)
    "tinyshakespeare": Corpus(
        filename="tinyshakespeare.txt",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1_115_394,
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


def _verified(path: pathlib.Path, corpus: Corpus) -> pathlib.Path:
    actual = _sha256(path)
    if actual != corpus.sha256:
        raise ValueError(
            f"{path} has SHA-256 {actual}, expected {corpus.sha256} for {corpus.filename}: the file is corrupted or "
            f"a different version; delete it and run again to re-download"
        )
    return path


def _download(corpus: Corpus, dest: pathlib.Path) -> pathlib.Path:
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


def corpus_path(name: str, download: bool = True) -> pathlib.Path:
    """The verified local path of corpus `name`, downloading it into data/cache/ if it is nowhere yet."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    corpus = CORPORA[name]
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
    """The text of corpus `name` (see CORPORA), from the cache or downloaded once and verified."""
    return corpus_path(name, download).read_text(encoding="utf-8")
