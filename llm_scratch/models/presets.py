"""What every model config shares: published sizes by name, and a plain dict for checkpoints' JSON."""

from __future__ import annotations

import dataclasses

__all__ = ["PresetConfig"]


class PresetConfig:
    """Mixin for a config dataclass with a class attribute `presets` (name -> field overrides)."""

    presets: dict[str, dict] = {}

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """A released size by name; `cls.presets` lists them. Keyword overrides win (e.g. a shorter context)."""
        if name not in cls.presets:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; known: {', '.join(cls.presets)}")
        return cls(**{**cls.presets[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
