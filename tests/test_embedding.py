"""Weight tying stays one tensor through everything a model goes through: loading a state dict, our
checkpoints, torch.save, dtype and device moves (meta and to_empty included), and an optimizer step.
The last test records why TiedLMHead exists: the shared-Parameter idiom does not survive to_empty."""

import copy
import io

import pytest
import torch
from torch import nn

from llm_scratch.checkpoint import load_checkpoint, save_checkpoint
from llm_scratch.device import get_device
from llm_scratch.embedding import TiedLMHead, weights_are_tied

V, C = 50, 16


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(V, C)
        self.lm_head = TiedLMHead(self.tok_emb)

    def forward(self, idx):
        return self.lm_head(self.tok_emb(idx))


def _tied(model):
    return weights_are_tied(model.lm_head, model.tok_emb)


def test_one_tensor_counted_and_saved_once():
    model = TinyLM()
    assert _tied(model)
    assert sum(p.numel() for p in model.parameters()) == V * C
    assert list(model.state_dict()) == ["tok_emb.weight"]
    idx = torch.tensor([[3, 1, 4]])
    torch.testing.assert_close(model(idx), model.tok_emb(idx) @ model.tok_emb.weight.T, atol=1e-6, rtol=0)
    untied = nn.Linear(C, V, bias=False)
    with torch.no_grad():
        untied.weight.copy_(model.tok_emb.weight)
    assert not weights_are_tied(untied, model.tok_emb)  # equal values are not tying


def test_tying_survives_loading_and_saving(tmp_path):
    source = TinyLM()
    target = TinyLM()
    target.load_state_dict(source.state_dict())
    assert _tied(target) and torch.equal(target.lm_head.weight, source.tok_emb.weight)

    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = TinyLM()
    target.load_state_dict(torch.load(buffer, weights_only=True))
    assert _tied(target) and torch.equal(target.tok_emb.weight, source.tok_emb.weight)

    save_checkpoint(tmp_path / "tiny", source, {"V": V, "C": C})
    target = TinyLM()
    load_checkpoint(tmp_path / "tiny", target)
    assert _tied(target) and torch.equal(target.lm_head.weight, source.lm_head.weight)

    clone = copy.deepcopy(source)
    assert _tied(clone) and clone.lm_head.weight is not source.tok_emb.weight


def test_tying_survives_dtype_and_device_moves():
    model = TinyLM()
    moves = (lambda m: m.double(), lambda m: m.to(torch.bfloat16), lambda m: m.to(get_device()),
             lambda m: m.to("meta"), lambda m: m.to_empty(device="cpu"))
    for move in moves:
        model = move(model)
        assert _tied(model)
    with torch.device("meta"):
        model = TinyLM()
    model = model.to_empty(device=get_device())
    assert _tied(model) and model.tok_emb.weight.device.type == get_device().type


def test_an_optimizer_step_updates_both_uses():
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.tok_emb.weight.detach().clone()
    model(torch.tensor([[1, 2, 3]])).logsumexp(-1).sum().backward()
    opt.step()
    assert not torch.equal(model.tok_emb.weight, before) and _tied(model)


def test_the_shared_parameter_idiom_comes_untied_by_to_empty():
    """Why TiedLMHead: `head.weight = emb.weight` is one Parameter until a meta round trip."""
    model = nn.ModuleDict({"emb": nn.Embedding(V, C), "head": nn.Linear(C, V, bias=False)})
    model["head"].weight = model["emb"].weight
    assert weights_are_tied(model["head"], model["emb"])
    model = model.to("meta").to_empty(device="cpu")
    assert not weights_are_tied(model["head"], model["emb"])


def test_bad_input():
    with pytest.raises(TypeError, match="nn.Embedding"):
        TiedLMHead(nn.Linear(C, V))
    with pytest.raises(ValueError, match="last dimension is 15, the embedding's width is 16"):
        TinyLM().lm_head(torch.randn(2, 15))
