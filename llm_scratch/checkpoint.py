"""Small checkpoints: a model's weights in safetensors and its config in JSON, side by side.

    save_checkpoint("data/checkpoints/name", model, config, metadata)
        -> data/checkpoints/name.safetensors   the tensors (no pickle: loading runs no code)
        -> data/checkpoints/name.json          {"config": ..., "metadata": ..., "tied_weights": ...,
                                                "safetensors_sha256": ...}
    info = load_checkpoint("data/checkpoints/name", model)   # strict: every key, every shape

Writes are atomic: each file is written to a temporary file in the same folder, flushed to disk and
then renamed over the destination with `os.replace`, which is atomic on one filesystem. A reader
therefore sees the old file or the new one, never half of one, and an interrupted write leaves no
stray files behind. The JSON is renamed last and records the SHA-256 of the safetensors file, so a
crash between the two renames (a new .safetensors beside an old .json) is detected at load time
instead of loading weights under the wrong config.

Tied weights. A model that ties, say, its LM head to its token embedding has two state-dict keys
for one tensor, and safetensors refuses to save tensors that share memory (it could not restore
the sharing). `save_checkpoint` stores each shared tensor once, under the first key that names it
in `model.state_dict()` order, and records the other names in the JSON's "tied_weights"
({alias: stored key}). `load_checkpoint` fills every alias from its stored key before the strict
key check, so tying is transparent to the caller; the model's own code must still tie the
parameters (loading copies values into the existing tensors and does not create sharing).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["checkpoint_paths", "load_checkpoint", "load_tensors", "read_checkpoint_info", "save_checkpoint",
           "save_tensors"]

FORMAT_VERSION = 1


def checkpoint_paths(path: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """(`<path>.safetensors`, `<path>.json`); `path` may be given with either suffix or none."""
    p = pathlib.Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _atomic_write(dest: pathlib.Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a fresh temporary file beside `dest`, then rename it over `dest`."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates the file private (0600); a checkpoint is an ordinary file
        with open(tmp, "rb") as f:  # make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _storage_key(t: torch.Tensor) -> tuple:
    """Tensors with the same key are the same view of the same memory (a tied weight)."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, config: dict, metadata: dict | None = None
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write `model`'s state dict to `<path>.safetensors` and `config`/`metadata` to `<path>.json`.

    `config` should be everything needed to rebuild the model (e.g. `dataclasses.asdict(cfg)`);
    `metadata` what is needed to reproduce or judge it (seed, data, steps, loss log). Both must be
    JSON-serializable. Tensors are saved as they are (dtype kept) after moving to the CPU.
    Returns the two paths written.
    """
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_name: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = _storage_key(t)
        if key in first_name:
            tied[name] = first_name[key]
            continue
        first_name[key] = name
        tensors[name] = t
    record = {"format_version": FORMAT_VERSION, "config": config, "metadata": metadata or {}, "tied_weights": tied}
    return save_tensors(path, tensors, record)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], record: dict
                 ) -> tuple[pathlib.Path, pathlib.Path]:
    """The pair writer under save_checkpoint: `tensors` to `<path>.safetensors`, `record` (plus the weights'
    SHA-256) to `<path>.json`, each atomically, the JSON last."""
    st_path, json_path = checkpoint_paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    # serialize the JSON before writing anything, so a non-serializable record fails with no file changed
    json.dumps(record)
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    _atomic_write(st_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    record = {**record, "safetensors_sha256": _sha256(st_path)}
    text = json.dumps(record, indent=1) + "\n"
    _atomic_write(json_path, lambda tmp: pathlib.Path(tmp).write_text(text))
    return st_path, json_path


def load_tensors(path: str | os.PathLike, check_hash: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, record) of a pair written by save_tensors, refusing a .safetensors that does not match its .json."""
    st_path, _ = checkpoint_paths(path)
    info = read_checkpoint_info(path)
    if not st_path.exists():
        raise FileNotFoundError(f"no checkpoint weights {st_path.name} in {st_path.parent}")
    recorded = info.get("safetensors_sha256")
    if check_hash and recorded is not None and recorded != _sha256(st_path):
        raise ValueError(f"{st_path.name} does not match the SHA-256 recorded in its .json: the pair is out of sync")
    return load_file(st_path), info


def read_checkpoint_info(path: str | os.PathLike) -> dict:
    """The JSON written beside a checkpoint: {"config", "metadata", "tied_weights", ...}."""
    _, json_path = checkpoint_paths(path)
    if not json_path.exists():
        raise FileNotFoundError(f"no checkpoint config {json_path.name} in {json_path.parent}")
    return json.loads(json_path.read_text())


def load_checkpoint(path: str | os.PathLike, model: nn.Module, *, check_hash: bool = True) -> dict:
    """Load `<path>.safetensors` into `model` with strict keys and shapes; return the JSON record.

    Raises ValueError listing every missing key (in the model, not in the file), unexpected key (in
    the file, not in the model) and shape mismatch, so a stale checkpoint says exactly what changed.
    Tensors are copied into the model's existing parameters, keeping their device and dtype.
    With `check_hash`, a .safetensors whose SHA-256 differs from the one its .json recorded is refused.
    """
    st_path, _ = checkpoint_paths(path)
    state, info = load_tensors(path, check_hash)
    for alias, stored in info.get("tied_weights", {}).items():
        if stored in state:
            state[alias] = state[stored]

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        lines = [f"checkpoint {st_path.name} does not fit {type(model).__name__}:"]
        lines += [f"  missing keys ({len(missing)}): {', '.join(missing)}"] if missing else []
        lines += [f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}"] if unexpected else []
        lines += [f"  shape mismatches ({len(shapes)}): {'; '.join(shapes)}"] if shapes else []
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    return info
