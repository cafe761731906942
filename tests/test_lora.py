"""LoRA against PEFT: with the same A and B the outputs are identical, merging gives PEFT's merged weights,
the zero-initialized B leaves the model unchanged, only the adapters get gradients, merge/unmerge round-trips,
and bad targets are clear errors."""

import copy

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraModel

from llm_scratch.models import GPT2, GPT2Config
from llm_scratch.training.lora import LoRALinear, apply_lora, lora_parameters, merge_lora

V = 97
TARGETS = ["q_proj", "v_proj", "mlp.up_proj"]


def _model():
    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=V, context_length=32, d_model=32, n_layers=2, n_heads=4)).eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_and_merged_weights_equal_peft(use_rslora):
    base = _model()
    theirs = LoraModel(copy.deepcopy(base), LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, lora_dropout=0.0,
                                                       use_rslora=use_rslora), "default")
    ours = apply_lora(copy.deepcopy(base), TARGETS, r=4, alpha=8, use_rslora=use_rslora)
    wrapped = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert sorted(wrapped) == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.0.mlp.up_proj",
                               "blocks.1.attn.q_proj", "blocks.1.attn.v_proj", "blocks.1.mlp.up_proj"]
    with torch.no_grad():
        for name, layer in wrapped.items():
            peft_layer = theirs.model.get_submodule(name)
            assert layer.scaling == pytest.approx(peft_layer.scaling["default"])
            layer.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
            peft_layer.lora_B["default"].weight.normal_(0, 0.1)  # B non-zero so the update shows
            layer.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids), atol=1e-6, rtol=0)
        assert (ours(ids) - base(ids)).abs().max() > 1e-3
    merged_ours = merge_lora(ours).state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    for key in merged_ours:
        torch.testing.assert_close(merged_ours[key], merged_theirs[key], atol=1e-6, rtol=0)


def test_zero_init_gradients_and_merge_round_trip():
    base = _model()
    ours = apply_lora(copy.deepcopy(base), ["q_proj", "o_proj"], r=2, alpha=4)
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), base(ids), atol=0, rtol=0)  # B = 0: exactly the base model
    ours.train()
    torch.nn.functional.cross_entropy(ours(ids).flatten(0, 1), ids.flatten()).backward()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in ours.named_parameters() if ".lora_" in n} and len(trainable) == 8
    assert all(p.grad is None for n, p in ours.named_parameters() if n not in trainable)
    assert {id(p) for p in lora_parameters(ours)} == {id(p) for n, p in ours.named_parameters() if n in trainable}
    layer = ours.blocks[0].attn.q_proj
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    before = layer.base_layer.weight.clone()
    x = torch.randn(3, 32)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


def test_bad_targets_and_ranks():
    with pytest.raises(ValueError, match=r"target_modules \['k_projection'\] match no module of GPT2"):
        apply_lora(_model(), ["q_proj", "k_projection"], r=4, alpha=8)
    with pytest.raises(ValueError, match="target 'ln_1' matches 'blocks.0.ln_1', a LayerNorm"):
        apply_lora(_model(), ["ln_1"], r=4, alpha=8)
    with pytest.raises(ValueError, match=r"r \(the LoRA rank\) must be a positive int, got 0"):
        apply_lora(_model(), ["q_proj"], r=0, alpha=8)


def test_adapted_model_generates_and_keeps_modules_to_save_trainable():
    from llm_scratch.generation import generate

    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=50, context_length=16, d_model=16, n_layers=2, n_heads=2))
    prompt = torch.randint(0, 50, (2, 4))
    expected = generate(model, prompt, 5)
    apply_lora(model, ["q_proj", "v_proj"], r=2, alpha=4, modules_to_save=["wte"])
    # B = 0: the adapted model generates exactly what the base did (the KV cache reads the wrapped layers' weight)
    assert torch.equal(generate(model, prompt, 5), expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "wte.weight" in trainable and all(n == "wte.weight" or "lora_" in n for n in trainable)
    layer = model.blocks[0].attn.q_proj
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    with pytest.raises(ValueError, match=r"modules_to_save \['embeddings'\] match no module"):
        apply_lora(GPT2(GPT2Config(vocab_size=50, context_length=16, d_model=16, n_layers=1, n_heads=2)),
                   ["q_proj"], r=2, alpha=4, modules_to_save=["embeddings"])


def test_merge_lora_on_a_single_layer_returns_the_merged_linear():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(copy.deepcopy(base), r=2, alpha=4)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 6)
    expected = layer(x)
    merged = merge_lora(layer)
    assert type(merged) is torch.nn.Linear
    torch.testing.assert_close(merged(x), expected, atol=1e-6, rtol=0)
