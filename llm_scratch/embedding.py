"""Token embeddings and weight tying.

A language model maps token ids to vectors with an embedding table E (V, C) and its last hidden states
back to vocabulary logits with an output matrix W (V, C): logits = h Wᵀ. Tying uses one matrix for
both, W = E (Press & Wolf 2017, arXiv:1608.05859; GPT-2, Gemma, Llama 3.2 1B/3B). It saves V·C
parameters (38.6 M of GPT-2 small's 124 M) and gives a token the same vector going in and coming out.

The common PyTorch idiom, `lm_head.weight = tok_emb.weight`, shares one Parameter between two modules,
and most moves keep it shared (`.to(dtype)`, a move to a GPU, `load_state_dict`). Not all: in PyTorch
2.13 `.to("meta")` and `to_empty(device=...)` -- the usual way to build a large model without
allocating it, then load weights -- give each module its own new Parameter, and the two silently
drift apart in training. `TiedLMHead` avoids the question: it owns no weight and reads the
embedding's at every call, so there is only one tensor whatever happens to the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TiedLMHead", "weights_are_tied"]


class TiedLMHead(nn.Module):
    """logits = h Eᵀ with E the given embedding's weight: an LM head that cannot come untied.

    The embedding is kept out of this module's registered children (in a one-element list), so it is
    still owned, saved and moved by the model alone: the state dict holds the matrix once, under the
    embedding's name, and `parameters()` yields it once.
    """

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        self._embedding = [embedding]

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., C) -> logits (..., V)."""
        if h.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"h's last dimension is {h.shape[-1]}, the embedding's width is {self.weight.shape[1]}")
        return F.linear(h, self.weight)

    def extra_repr(self) -> str:
        vocab, width = self.weight.shape
        return f"tied to Embedding({vocab}, {width})"


def weights_are_tied(a: nn.Module, b: nn.Module) -> bool:
    """True when a.weight and b.weight are the same tensor object (not merely equal values)."""
    return a.weight is b.weight
