"""Checkpoints (checkpoint.py) and the context-extension experiment (position/context_extension.py).

The committed checkpoint must load with strict keys into a model built from its own JSON and still
solve its training task, so a change to the model that makes it stale fails here, not in a notebook.
"""

import json
import os

import pytest
import torch
from torch import nn

import llm_scratch.checkpoint as checkpoint_module
from llm_scratch.checkpoint import checkpoint_paths, load_checkpoint, read_checkpoint_info, save_checkpoint
from llm_scratch.position import RopeScaling
from llm_scratch.position.context_extension import (
    CHECKPOINT,
    DIGITS,
    KEY_MARKER,
    METHODS,
    QUERY_MARKER,
    TinyRopeConfig,
    TinyRopeDecoder,
    decode_ids,
    encode_text,
    evaluate,
    passkey_batch,
    scaling_for_length,
    shakespeare_splits,
    text_windows,
    train_short_context_model,
)

TINY = TinyRopeConfig(d_model=32, n_layers=1, n_heads=2, train_len=32)
TEXT = encode_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 8)


# --- the committed checkpoint -------------------------------------------------------------------------


def test_committed_checkpoint_loads_strictly_and_still_solves_its_task():
    st_path, json_path = checkpoint_paths(CHECKPOINT)
    assert st_path.exists() and json_path.exists(), "run `python -m llm_scratch.artifacts` to build it"
    assert st_path.stat().st_size < 2_000_000
    info = read_checkpoint_info(CHECKPOINT)
    for key in ("seed", "steps", "data", "loss_log", "train_len"):
        assert key in info["metadata"], key
    model = TinyRopeDecoder(TinyRopeConfig.from_dict(info["config"]))
    load_checkpoint(CHECKPOINT, model)  # strict keys, shapes and the recorded SHA-256
    # the weights still mean what they meant: at the training length the model finds the passkey
    _, held_out = shakespeare_splits()
    (result,) = evaluate(model, None, [model.cfg.train_len], held_out, n_windows=4, n_passkey=32)
    assert result["passkey_accuracy"] >= 0.8 and result["perplexity"] < 8, result


# --- checkpoint.py ------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = TinyRopeDecoder(TINY)
    metadata = {"seed": 3, "loss_log": [{"step": 1, "loss": 2.5}]}
    save_checkpoint(tmp_path / "m", model, TINY.to_dict(), metadata)
    torch.manual_seed(1)
    other = TinyRopeDecoder(TINY)
    assert not torch.equal(other.tok_emb.weight, model.tok_emb.weight)
    info = load_checkpoint(tmp_path / "m.safetensors", other)  # either suffix names the pair
    assert info["config"] == TINY.to_dict() and info["metadata"] == metadata
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    assert torch.equal(model(idx), other(idx))


def test_atomic_write_leaves_no_temporary_files(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    save_checkpoint(tmp_path / "lin", model, {"in": 3})
    assert sorted(os.listdir(tmp_path)) == ["lin.json", "lin.safetensors"]
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}

    def crash(tensors, filename, metadata=None):  # a write that dies half-way
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "lin", nn.Linear(3, 2), {"in": 3})
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before  # old pair intact, no debris
    with pytest.raises(TypeError):  # a config JSON cannot hold fails before any file is touched
        save_checkpoint(tmp_path / "lin", model, {"bad": object()})
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before


def test_mismatched_state_dict_lists_missing_unexpected_and_shapes(tmp_path):
    saved = nn.ModuleDict({"shared": nn.Linear(4, 4), "old": nn.Linear(4, 2), "resized": nn.Linear(4, 3)})
    save_checkpoint(tmp_path / "m", saved, {})
    target = nn.ModuleDict({"shared": nn.Linear(4, 4), "new": nn.Linear(4, 2), "resized": nn.Linear(4, 5)})
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path / "m", target)
    text = str(err.value)
    assert "missing keys (2): new.bias, new.weight" in text
    assert "unexpected keys (2): old.bias, old.weight" in text
    assert "resized.weight: checkpoint (3, 4) vs model (5, 4)" in text and "resized.bias" in text
    # nothing was loaded into the target
    assert not torch.equal(target["shared"].weight, saved["shared"].weight)


def test_out_of_sync_pair_is_refused(tmp_path):
    save_checkpoint(tmp_path / "a", nn.Linear(3, 2), {})
    save_checkpoint(tmp_path / "b", nn.Linear(3, 2), {})
    os.replace(tmp_path / "b.safetensors", tmp_path / "a.safetensors")  # new weights beside an old .json
    with pytest.raises(ValueError, match="SHA-256"):
        load_checkpoint(tmp_path / "a", nn.Linear(3, 2))


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.head = nn.Linear(4, 6, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    save_checkpoint(tmp_path / "t", model, {})
    info = read_checkpoint_info(tmp_path / "t")
    assert info["tied_weights"] == {"head.weight": "emb.weight"}
    other = Tied()
    load_checkpoint(tmp_path / "t", other)
    assert torch.equal(other.head.weight, model.emb.weight) and other.head.weight is other.emb.weight


# --- data ---------------------------------------------------------------------------------------------


def test_text_round_trip_and_markers():
    ids = encode_text("Hark! 3 ducats.\n")
    assert ids.dtype == torch.int64 and decode_ids(ids) == "Hark! 3 ducats.\n"
    assert decode_ids([KEY_MARKER, int(DIGITS[4]), QUERY_MARKER]) == "[KEY]4[QUERY]"
    with pytest.raises(ValueError, match="ASCII"):
        encode_text("café")
    with pytest.raises(ValueError, match="ASCII"):
        encode_text("a\x01b")  # the key marker's byte cannot come from text


def test_text_windows_are_contiguous_slices():
    windows = text_windows(TEXT, 50, 17, torch.Generator().manual_seed(0))
    assert windows.shape == (50, 17)
    text = decode_ids(TEXT)
    assert all(decode_ids(w) in text for w in windows)
    with pytest.raises(ValueError, match="seq_len"):
        text_windows(TEXT, 1, len(TEXT) + 1)


def test_passkey_batch_puts_the_key_where_it_says():
    k, T = 5, 48
    batch = passkey_batch(TEXT, 64, T, key_len=k, generator=torch.Generator().manual_seed(0))
    tokens = batch.tokens
    assert tokens.shape == (64, T)
    for row, pos, key in zip(tokens, batch.key_pos.tolist(), batch.keys, strict=True):
        assert row[pos] == KEY_MARKER and torch.equal(row[pos + 1:pos + 1 + k], key)
        assert row[T - k - 1] == QUERY_MARKER and torch.equal(row[T - k:], key)
        assert (row == KEY_MARKER).sum() == 1 and (row == QUERY_MARKER).sum() == 1
        assert torch.isin(key, DIGITS).all()
        # everything else is an unbroken piece of the text
        before, after = decode_ids(row[:pos]), decode_ids(row[pos + 1 + k:T - k - 1])
        assert before in decode_ids(TEXT) and after in decode_ids(TEXT)
    assert batch.loss_mask.sum(1).eq(k).all() and batch.loss_mask[:, -k:].all()
    many = passkey_batch(TEXT, 2000, T, key_len=k, generator=torch.Generator().manual_seed(1))
    assert many.key_pos.min() == 0 and many.key_pos.max() == T - 2 * k - 2  # every depth occurs
    with pytest.raises(ValueError, match="seq_len"):
        passkey_batch(TEXT, 1, 11, key_len=5)


# --- model and experiment -----------------------------------------------------------------------------


def test_config_is_validated():
    with pytest.raises(ValueError, match="n_heads"):
        TinyRopeConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        TinyRopeConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        TinyRopeConfig(vocab_size=64)
    with pytest.raises(ValueError, match="unknown TinyRopeConfig fields"):
        TinyRopeConfig.from_dict({"d_model": 32, "dropout": 0.1})
    with pytest.raises(ValueError, match="method"):
        scaling_for_length("rope2", 256, 128)


def test_scaling_for_length():
    assert scaling_for_length("none", 512, 128) is None
    yarn = scaling_for_length("yarn", 512, 128)
    assert (yarn.rope_type, yarn.factor, yarn.original_max_position_embeddings) == ("yarn", 4.0, 128)
    assert scaling_for_length("linear", 64, 128).factor == 1.0  # shorter than trained: nothing to stretch
    assert scaling_for_length("dynamic", 1024, 128).factor == 1.0  # it derives s = T / L by itself


def _sharp(model: nn.Module) -> nn.Module:
    """Larger random weights than the training init, so attention is far from uniform and position matters."""
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.5)
    return model.eval()


def test_rope_scaling_swap_changes_only_what_it_should():
    model = _sharp(TinyRopeDecoder(TINY))
    idx = torch.randint(0, TINY.vocab_size, (2, 3 * TINY.train_len))
    with torch.no_grad():
        plain = model(idx)
        L = TINY.train_len
        for same in (RopeScaling(), RopeScaling("linear", 1.0), scaling_for_length("yarn", L, L)):
            model.set_rope_scaling(same)
            assert torch.equal(model(idx), plain), same
        model.set_rope_scaling(scaling_for_length("linear", 2 * TINY.train_len, TINY.train_len))
        assert all(b.attn.rope.scaling.factor == 2.0 for b in model.blocks)
        assert (model(idx) - plain).abs().max() > 0.1
        # dynamic NTK leaves lengths up to the trained one alone and changes longer ones
        model.set_rope_scaling(scaling_for_length("dynamic", 3 * TINY.train_len, TINY.train_len))
        assert torch.equal(model(idx[:, :TINY.train_len]), plain[:, :TINY.train_len])
        assert (model(idx) - plain).abs().max() > 0.1
    assert {m for m in METHODS} == {"none", "linear", "ntk", "dynamic", "yarn", "llama3"}


def test_short_training_lowers_the_loss_and_evaluate_restores_rope():
    model, log = train_short_context_model(TINY, TEXT, steps=30, batch_size=8, lr=3e-3, warmup=5, log_every=5,
                                           progress=False)
    assert len(log) == 6 and log[-1]["step"] == 30
    assert log[-1]["loss"] < log[0]["loss"] - 0.3, log
    results = evaluate(model, lambda n: scaling_for_length("linear", n, TINY.train_len), [32, 64],
                       TEXT, n_windows=2, n_passkey=4, batch_size=2)
    assert [r["length"] for r in results] == [32, 64]
    assert all(r["perplexity"] > 1 and 0 <= r["passkey_accuracy"] <= 1 for r in results)
    assert model.rope.scaling is None and not model.training
    json.dumps(log)  # the log goes into the checkpoint's JSON
