"""llm_scratch: large-language-model parts written from scratch in PyTorch, each verified
against an implementation we did not write. See README.md for the map."""

from llm_scratch.device import get_device, seed_everything

__all__ = ["get_device", "seed_everything"]
__version__ = "0.1.0"
