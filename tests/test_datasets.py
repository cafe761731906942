"""Token datasets: the cached token stream, the train/validation split, windows and their one-token shift,
and deterministic shuffling."""

import numpy as np
import pytest
import torch

from llm_scratch import data
from llm_scratch.data import TokenWindows, load_corpus, make_loader, tokenize_corpus, train_val_split
from llm_scratch.tokenizer import get_tokenizer


def test_tokenized_corpus_is_cached_and_equals_the_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path)
    ids = tokenize_corpus("tinyshakespeare", "shakespeare")
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert ids.tolist() == get_tokenizer("shakespeare").encode_ordinary(load_corpus("tinyshakespeare"))
    (cached,) = (tmp_path / "tokens").iterdir()
    monkeypatch.setattr(data, "load_corpus", lambda *a, **k: pytest.fail("re-tokenized instead of using the cache"))
    again = tokenize_corpus("tinyshakespeare", "shakespeare")
    assert np.array_equal(again, ids) and list((tmp_path / "tokens").iterdir()) == [cached]


def test_gpt2_token_count_of_tiny_shakespeare(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path)
    assert len(tokenize_corpus("tinyshakespeare", "gpt2")) == 338_025  # nanoGPT's prepare.py: 301,966 + 36,059


def test_windows_shift_by_one_and_stride():
    ids = np.arange(100, dtype=np.uint16)
    ds = TokenWindows(ids, context_length=10, stride=5)
    assert len(ds) == (100 - 10 - 1) // 5 + 1 == 18
    x, y = ds[3]
    assert x.dtype == torch.int64 and x.tolist() == list(range(15, 25)) and y.tolist() == list(range(16, 26))
    last_x, last_y = ds[-1]
    assert last_y[-1].item() <= 99  # the last window fits entirely
    assert len(TokenWindows(ids, 10)) == 9  # stride defaults to context_length: no overlap
    with pytest.raises(IndexError):
        ds[18]
    with pytest.raises(ValueError, match="context_length must be a positive int"):
        TokenWindows(ids, 0)
    with pytest.raises(ValueError, match="at least context_length"):
        TokenWindows(ids[:10], 10)


def test_split_is_contiguous():
    train, val = train_val_split(np.arange(1000), 0.1)
    assert len(train) == 900 and train[-1] + 1 == val[0]
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(np.arange(10), 1.0)


def test_shuffling_is_deterministic():
    ds = TokenWindows(np.arange(500, dtype=np.uint16), 8)
    order = lambda seed: [x[:, 0].tolist() for x, _ in make_loader(ds, batch_size=4, seed=seed)]
    assert order(0) == order(0) and order(0) != order(1)
    batches = order(0)
    assert len(batches) == len(ds) // 4 and all(len(b) == 4 for b in batches)  # drop_last
    seen = sorted(v for b in batches for v in b)
    assert len(set(seen)) == len(seen)  # each window at most once per epoch
