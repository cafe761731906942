"""Rebuild every committed artifact under data/ from the package's own functions.

    python -m llm_scratch.artifacts            # rebuild all (slow: minutes on a CPU)
    python -m llm_scratch.artifacts --list     # what would be built, and where
    python -m llm_scratch.artifacts NAME ...   # rebuild only these

Each artifact is retrained from scratch with its fixed seed and written atomically (the old files
stay in place until the new ones are complete), together with a JSON describing its config, seed,
data, steps and loss log. Results are reproducible on one machine and torch version; across
machines the floating-point path may differ, so the bytes may too.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time
from collections.abc import Callable

__all__ = ["ARTIFACTS", "build", "main"]


def _into_place(path: pathlib.Path, load_or_train: Callable) -> None:
    """Train with `load_or_train(fresh_path, device="cpu")` into an empty temporary folder beside `path` (these
    functions train only when no checkpoint exists), then move the finished .safetensors/.json pair over the
    committed one: the committed files are replaced only by a complete new pair."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        fresh = pathlib.Path(tmp) / path.name
        load_or_train(fresh, device="cpu")
        for suffix in (".safetensors", ".json"):
            fresh.with_name(fresh.name + suffix).replace(path.with_name(path.name + suffix))


def _rope_context_extension(path: pathlib.Path) -> None:
    from llm_scratch.position.context_extension import load_or_train

    _into_place(path, load_or_train)


def _shakespeare_tokenizer(path: pathlib.Path) -> None:
    from llm_scratch.tokenizer.pretrained import save_shakespeare_tokenizer

    save_shakespeare_tokenizer(path)


def _shakespeare_gpt(path: pathlib.Path) -> None:
    from llm_scratch.training.pretrained import load_or_pretrain

    _into_place(path, load_or_pretrain)


def _shakespeare_sft(path: pathlib.Path) -> None:
    from llm_scratch.training.pretrained import load_or_finetune

    _into_place(path, load_or_finetune)


def _digits_vit(path: pathlib.Path) -> None:
    from llm_scratch.training.pretrained import load_or_train_digits_vit

    _into_place(path, load_or_train_digits_vit)


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> (path stem relative to the repository, builder, the suffixes it writes), in dependency order
ARTIFACTS: dict[str, tuple[str, Callable[[pathlib.Path], None], tuple[str, ...]]] = {
    "shakespeare_tokenizer": ("data/tokenizers/shakespeare", _shakespeare_tokenizer, (".tiktoken", ".json")),
    "rope_context_extension": ("data/checkpoints/rope_context_extension", _rope_context_extension,
                               (".safetensors", ".json")),
    "shakespeare_gpt": ("data/checkpoints/shakespeare_gpt", _shakespeare_gpt, (".safetensors", ".json")),
    "shakespeare_sft": ("data/checkpoints/shakespeare_sft", _shakespeare_sft, (".safetensors", ".json")),
    "digits_vit": ("data/checkpoints/digits_vit", _digits_vit, (".safetensors", ".json")),
}


def build(names: list[str] | None = None) -> None:
    """Rebuild the named artifacts (all when None), printing each one's path and time."""
    names = list(ARTIFACTS) if not names else names
    unknown = [n for n in names if n not in ARTIFACTS]
    if unknown:
        raise ValueError(f"unknown artifacts {unknown}; known: {', '.join(ARTIFACTS)}")
    for name in names:
        stem, builder, suffixes = ARTIFACTS[name]
        path = REPO_ROOT / stem
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        builder(path)
        written = " and ".join(stem + suffix for suffix in suffixes)
        print(f"{name}: wrote {written} in {time.perf_counter() - start:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llm_scratch.artifacts", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"artifacts to rebuild (default: all of {', '.join(ARTIFACTS)})")
    parser.add_argument("--list", action="store_true", help="list the artifacts and their paths, build nothing")
    args = parser.parse_args(argv)
    if args.list:
        for name, (stem, _, suffixes) in ARTIFACTS.items():
            print(f"{name}: {', '.join(stem + suffix for suffix in suffixes)}")
        return
    build(args.names)


if __name__ == "__main__":
    main()
