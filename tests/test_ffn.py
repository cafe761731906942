"""Activations and feed-forward blocks against PyTorch's functions and Hugging Face's GPT-2, Llama and
Gemma 3 MLPs with copied weights; the hidden-size rules against published configs.

Tolerances: our activations are written with the same elementary functions PyTorch's kernels use
(erf, tanh, sigmoid) but not the same fused code, so float32 results differ by a few ulps; atol 1e-6 on
outputs of size up to 10 is tight (the tanh approximation of GELU differs from the exact one by ~5e-4,
so mixing them up fails). The blocks are three matmuls of size 32-128: atol 1e-5.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaMLP

from llm_scratch.ffn import (
    ACTIVATIONS,
    MLP,
    GatedMLP,
    GeGLU,
    SwiGLU,
    ffn_hidden_size,
    gelu,
    gelu_tanh,
    get_activation,
    relu,
    relu2,
    silu,
)

X = torch.linspace(-10, 10, 20001)

REFERENCES = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu2": lambda x: F.relu(x).square(),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_activations_match_torch(name):
    ours = get_activation(name)
    torch.testing.assert_close(ours(X), REFERENCES[name](X), atol=1e-6, rtol=1e-6)
    x64 = X.double()
    torch.testing.assert_close(ours(x64), REFERENCES[name](x64), atol=1e-12, rtol=1e-12)
    assert ours(X.bfloat16()).dtype == torch.bfloat16


def test_gelu_approximation_error_and_function_names():
    assert set(ACTIVATIONS) == set(REFERENCES)
    assert (relu, gelu, gelu_tanh, silu, relu2) == tuple(ACTIVATIONS[n] for n in REFERENCES)
    x = X.double()
    error = (gelu_tanh(x) - gelu(x)).abs().max().item()
    assert 1e-4 < error < 1e-3  # the approximation is close, and not the same function
    with pytest.raises(ValueError, match="known: relu, gelu, gelu_tanh, silu, relu2"):
        get_activation("swish")


def _tiny(cls, **kw):
    return cls(hidden_size=32, intermediate_size=88, num_attention_heads=4, num_hidden_layers=1, vocab_size=64, **kw)


def test_swiglu_equals_llama_mlp():
    theirs = LlamaMLP(_tiny(LlamaConfig, hidden_act="silu")).eval()
    ours = SwiGLU(32, 88)
    ours.load_state_dict(theirs.state_dict())  # same names: gate_proj, up_proj, down_proj
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
    assert all(m.bias is None for m in (ours.gate_proj, ours.up_proj, ours.down_proj))


def test_geglu_equals_gemma3_mlp():
    theirs = Gemma3MLP(_tiny(Gemma3TextConfig, hidden_activation="gelu_pytorch_tanh")).eval()
    ours = GeGLU(32, 88)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
    # the gate really goes through the tanh GELU: swapping in SiLU changes the output
    swapped = GatedMLP(32, 88, activation="silu")
    swapped.load_state_dict(theirs.state_dict())
    assert (swapped(x) - theirs(x)).abs().max() > 1e-3


def test_mlp_equals_gpt2_mlp():
    config = GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=64, resid_pdrop=0.0)
    theirs = GPT2MLP(4 * 32, config).eval()
    ours = MLP(32)  # hidden 4·d, GELU-tanh, biases: GPT-2's defaults
    with torch.no_grad():
        for our_linear, their_conv in ((ours.up_proj, theirs.c_fc), (ours.down_proj, theirs.c_proj)):
            our_linear.weight.copy_(their_conv.weight.T)  # GPT-2's Conv1D stores (in, out)
            our_linear.bias.copy_(their_conv.bias)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "d_model, kwargs, published",
    [
        (4096, {}, 11008),  # Llama 2 7B
        (5120, {}, 13824),  # Llama 2 13B
        (4096, {"ffn_dim_multiplier": 1.3, "multiple_of": 1024}, 14336),  # Llama 3 8B
        (8192, {"ffn_dim_multiplier": 1.3, "multiple_of": 4096}, 28672),  # Llama 3 70B
        (2048, {"ffn_dim_multiplier": 1.5, "multiple_of": 256}, 8192),  # Llama 3.2 1B
        (3072, {"ffn_dim_multiplier": 1.0, "multiple_of": 256}, 8192),  # Llama 3.2 3B
    ],
)
def test_llama_hidden_size_rule_reproduces_published_configs(d_model, kwargs, published):
    assert ffn_hidden_size("llama", d_model, **kwargs) == published


def test_other_hidden_size_rules_and_equal_parameters():
    assert ffn_hidden_size("gpt2", 768) == 3072
    assert ffn_hidden_size("gemma", 1152, expansion=6) == 6912  # Gemma 3 1B
    assert ffn_hidden_size("gemma", 2048, expansion=8) == 16384  # Gemma 2B
    # the 2/3 rule keeps a SwiGLU block at (almost) the parameter count of a 4·d MLP
    d = 512
    mlp = sum(p.numel() for p in MLP(d, bias=False).parameters())
    swiglu = sum(p.numel() for p in SwiGLU(d, ffn_hidden_size("llama", d, multiple_of=1)).parameters())
    assert abs(swiglu - mlp) / mlp < 0.001
    with pytest.raises(ValueError, match="known: gpt2, llama, gemma"):
        ffn_hidden_size("mistral", 512)
    with pytest.raises(ValueError, match="expansion"):
        ffn_hidden_size("gemma", 512)
    with pytest.raises(ValueError, match="not an integer size"):
        ffn_hidden_size("gemma", 100, expansion=2.555)
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        SwiGLU(32, 0)
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(32, activation="tanh")
