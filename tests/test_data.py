"""llm_scratch.data: the corpus cache lookup, checksum and download, all offline.

Downloads are exercised with a file:// URL, so nothing here touches the network.
"""

import dataclasses
import hashlib
import os

import pytest
import torch

from llm_scratch import data
from llm_scratch.data import DATA_FILES, data_path, load_corpus

TEXT = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"


@pytest.fixture
def fake_corpus(tmp_path, monkeypatch):
    """A registered corpus "fake" whose URL is a local file, a cache at tmp_path/cache and no $LLM_SCRATCH_CACHE."""
    source = tmp_path / "source.txt"
    source.write_bytes(TEXT)
    corpus = data.DataFile("fake.txt", source.as_uri(), hashlib.sha256(TEXT).hexdigest(), len(TEXT))
    monkeypatch.setitem(DATA_FILES, "fake", corpus)
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.delenv("LLM_SCRATCH_CACHE", raising=False)
    return corpus


def test_downloads_once_into_the_cache_and_verifies(fake_corpus, tmp_path):
    assert load_corpus("fake") == TEXT.decode()
    assert os.listdir(tmp_path / "cache") == ["fake.txt"]  # no temporary file left behind
    (tmp_path / "source.txt").unlink()  # the second call must not need the source
    assert load_corpus("fake") == TEXT.decode()


def test_a_bad_download_never_lands_in_the_cache(fake_corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(DATA_FILES, "fake", dataclasses.replace(fake_corpus, sha256="0" * 64))
    with pytest.raises(ValueError, match="fake.txt"):
        load_corpus("fake")
    assert os.listdir(tmp_path / "cache") == []


def test_an_unreachable_url_says_where_to_put_the_file(fake_corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(DATA_FILES, "fake", dataclasses.replace(fake_corpus, url=(tmp_path / "absent").as_uri()))
    with pytest.raises(OSError, match="LLM_SCRATCH_CACHE"):
        load_corpus("fake")
    assert os.listdir(tmp_path / "cache") == []
    with pytest.raises(FileNotFoundError, match="download=False"):
        data_path("fake", download=False)


def test_a_corrupted_cached_file_is_an_error_naming_it(fake_corpus, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "fake.txt").write_bytes(TEXT[:-5])  # truncated
    with pytest.raises(ValueError, match=r"cache/fake.txt has SHA-256"):
        load_corpus("fake")


def test_the_environment_folder_comes_first(fake_corpus, tmp_path, monkeypatch):
    offline = tmp_path / "offline"
    offline.mkdir()
    (offline / "fake.txt").write_bytes(TEXT)
    monkeypatch.setenv("LLM_SCRATCH_CACHE", str(offline))
    (tmp_path / "source.txt").unlink()
    assert data_path("fake") == offline / "fake.txt"
    assert not (tmp_path / "cache").exists()  # nothing downloaded or copied


def test_unknown_corpus_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: tinyshakespeare, gpt2.tiktoken"):
        load_corpus("shakespeare")


@pytest.mark.parametrize("name", list(DATA_FILES))
def test_registered_files_are_found_offline_and_verified(name):
    """In CI, .ci/run points $LLM_SCRATCH_CACHE at ../shared/data; locally data/cache/ may hold them."""
    try:
        path = data_path(name, download=False)  # verifies the SHA-256
    except FileNotFoundError as err:
        if os.environ.get("LLM_SCRATCH_CACHE"):  # CI sets it: there the file must be found
            raise
        pytest.skip(f"{name} is not cached on this machine: {err}")
    assert path.stat().st_size == DATA_FILES[name].size


def test_tiny_shakespeare_text():
    try:
        text = load_corpus("tinyshakespeare", download=False)
    except FileNotFoundError as err:
        if os.environ.get("LLM_SCRATCH_CACHE"):
            raise
        pytest.skip(f"Tiny Shakespeare is not cached on this machine: {err}")
    assert text.startswith("First Citizen:\n") and len(text) == 1_115_394


def test_load_digits_split_is_stratified_disjoint_and_seeded():
    from llm_scratch.data import load_digits

    x_tr, y_tr, x_te, y_te = load_digits()
    assert x_tr.shape[1:] == (1, 8, 8) and len(x_tr) + len(x_te) == 1797
    assert x_tr.dtype == torch.float32 and 0 <= x_tr.min() and x_tr.max() <= 1
    assert set(y_te.tolist()) == set(range(10))
    for digit in range(10):  # each class ~20 % in test
        n_te, n_all = int((y_te == digit).sum()), int((y_te == digit).sum() + (y_tr == digit).sum())
        assert n_te == round(0.2 * n_all)
    rows_tr = {tuple(r) for r in x_tr.flatten(1).tolist()}
    rows_te = [tuple(r) for r in x_te.flatten(1).tolist()]
    assert sum(r in rows_tr for r in rows_te) <= 2  # the dataset itself has a few duplicate images
    again = load_digits()
    assert torch.equal(again[2], x_te) and torch.equal(again[3], y_te)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)
