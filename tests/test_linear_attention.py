"""Linear attention, simple decay and gated linear attention: the parallel, chunked and recurrent forms agree
(float64 to 1e-10, float32 to 1e-4, lengths not a multiple of the chunk), and agree with the definitions
written directly in the test (Katharopoulos et al. 2020, eqs. 4-6; the decayed recurrence)."""

import pytest
import torch

from llm_scratch.attention.linear import (
    GatedLinearAttention,
    LinearAttention,
    elu_feature_map,
    linear_attention_chunked,
    linear_attention_parallel,
    linear_attention_recurrent,
)


def _inputs(dtype, decay, T=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (elu_feature_map(torch.randn(2, 3, T, 8, generator=g, dtype=dtype)) for _ in range(2))
    v = torch.randn(2, 3, T, 5, generator=g, dtype=dtype)
    log_decay = {
        None: None,
        "per-head": torch.tensor([-0.05, -0.3, -1.0], dtype=dtype)[None, :, None, None].expand(2, 3, T, 8),
        "gated": torch.nn.functional.logsigmoid(torch.randn(2, 3, T, 8, generator=g, dtype=dtype) + 2),
        # strong decay: over all 37 tokens the log-decay passes -30 (the exact path: parallel form, chunks of 64)
        # while chunks of 8 and 10 stay above it (the factorized path), so both ways of computing weights run
        "strong": torch.nn.functional.logsigmoid(torch.randn(2, 3, T, 8, generator=g, dtype=dtype) - 2),
    }[decay]
    return q, k, v, log_decay


@pytest.mark.parametrize("decay", [None, "per-head", "gated", "strong"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_parallel_chunked_recurrent_agree(decay, normalize, dtype, atol):
    q, k, v, log_decay = _inputs(dtype, decay)
    parallel = linear_attention_parallel(q, k, v, log_decay, normalize)
    recurrent, state, _ = linear_attention_recurrent(q, k, v, log_decay, normalize)
    assert state.shape == (2, 3, 8, 5)  # D_k x D_v per head, whatever T is
    for chunk in (1, 8, 10, 64):  # 37 tokens: chunks of 8 and 10 leave a remainder
        chunked, chunk_state, _ = linear_attention_chunked(q, k, v, log_decay, normalize, chunk_size=chunk)
        torch.testing.assert_close(chunked, parallel, atol=atol, rtol=0)
        torch.testing.assert_close(chunk_state, state, atol=atol, rtol=0)
    torch.testing.assert_close(recurrent, parallel, atol=atol, rtol=0)


def test_definitions_written_out():
    q, k, v, log_decay = _inputs(torch.float64, "gated", T=9)
    # eq. 6: V'_i = φ(Q_i)ᵀ Σ_{j<=i} φ(K_j) V_jᵀ / φ(Q_i)ᵀ Σ_{j<=i} φ(K_j)
    expected = torch.stack([
        (q[:, :, i, None] @ (k[:, :, :i + 1].transpose(-2, -1) @ v[:, :, :i + 1]))[:, :, 0]
        / (q[:, :, i] * k[:, :, :i + 1].sum(2)).sum(-1, keepdim=True) for i in range(9)], dim=2)
    torch.testing.assert_close(linear_attention_parallel(q, k, v, normalize=True, eps=0.0), expected, atol=1e-12,
                               rtol=0)
    # decayed: o_t = Σ_{s<=t} Σ_d q_td k_sd Π_{r=s+1..t} α_rd v_s
    alpha = log_decay.exp()
    out = torch.zeros_like(v)
    for t in range(9):
        for s in range(t + 1):
            decay = alpha[:, :, s + 1:t + 1].prod(2)  # (B, H, D_k); empty product = 1
            out[:, :, t] += (q[:, :, t] * k[:, :, s] * decay).sum(-1, keepdim=True) * v[:, :, s]
    torch.testing.assert_close(linear_attention_parallel(q, k, v, log_decay), out, atol=1e-12, rtol=0)


def test_recurrent_state_continues_across_calls():
    q, k, v, log_decay = _inputs(torch.float64, "gated", T=20)
    full, _, _ = linear_attention_recurrent(q, k, v, log_decay, normalize=True)
    first, state, key_sum = linear_attention_recurrent(q[:, :, :12], k[:, :, :12], v[:, :, :12], log_decay[:, :, :12],
                                                       normalize=True)
    rest, _, _ = linear_attention_recurrent(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], log_decay[:, :, 12:],
                                            normalize=True, state=state, key_sum=key_sum)
    torch.testing.assert_close(torch.cat([first, rest], 2), full, atol=1e-12, rtol=0)
    chunk_first, S, z = linear_attention_chunked(q[:, :, :12], k[:, :, :12], v[:, :, :12], log_decay[:, :, :12],
                                                 normalize=True, chunk_size=5)
    chunk_rest, _, _ = linear_attention_chunked(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], log_decay[:, :, 12:],
                                                normalize=True, chunk_size=5, state=S, key_sum=z)
    torch.testing.assert_close(torch.cat([chunk_first, chunk_rest], 2), full, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls", [LinearAttention, GatedLinearAttention])
def test_modules_agree_across_modes_and_are_causal(cls):
    torch.manual_seed(0)
    layer = cls(32, 4, chunk_size=8).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    outs = [layer(x, mode=m) for m in ("parallel", "chunked", "recurrent")]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-10, rtol=0)
    changed = x.clone()
    changed[:, 10:] += 1.0
    torch.testing.assert_close(layer(changed)[:, :10], outs[1][:, :10], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="mode must be"):
        layer(x, mode="fast")


def test_bad_input():
    q, k, v, _ = _inputs(torch.float32, None, T=4)
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        linear_attention_parallel(q, k, v, torch.ones_like(q))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        linear_attention_chunked(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match=r"q and k must be \(B, H, T, D_k\)"):
        linear_attention_parallel(q, k[:, :, :3], v)
    with pytest.raises(ValueError, match=r"n_heads \(3\) must divide d_model \(32\)"):
        LinearAttention(32, 3)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_lightning_attention_equals_minimax(layer):
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    from llm_scratch.attention.linear import LightningAttention

    torch.manual_seed(layer)
    cfg = MiniMaxConfig(hidden_size=32, num_attention_heads=4, head_dim=8, num_hidden_layers=3, block_size=8,
                        hidden_act="silu")
    theirs = MiniMaxLightningAttention(cfg, layer).eval()
    ours = LightningAttention(32, 4, layer, 3, head_dim=8, block_size=8)
    with torch.no_grad():
        theirs.norm.weight.add_(torch.randn(32) * 0.2)
        missing = ours.load_state_dict({k: v for k, v in theirs.state_dict().items()
                                        if k in ("qkv_proj.weight", "norm.weight", "output_gate.weight",
                                                 "out_proj.weight")}, strict=True)
    assert not missing.missing_keys
    torch.testing.assert_close(ours.slopes, theirs.slope_rate.flatten())
    x = torch.randn(2, 21, 32)  # 21 tokens: two full blocks of 8 and a partial one
    with torch.no_grad():
        expected, _ = theirs(x, position_embeddings=None, attention_mask=None)
        for mode in ("chunked", "recurrent", "parallel"):
            torch.testing.assert_close(ours(x, mode=mode), expected, atol=1e-5, rtol=0)


def test_modules_decode_from_their_state_as_the_full_forward():
    from llm_scratch.attention.linear import LightningAttention

    torch.manual_seed(0)
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    for layer in (LinearAttention(32, 4, chunk_size=8), GatedLinearAttention(32, 4, chunk_size=8),
                  LightningAttention(32, 4, layer=0, n_layers=2, block_size=8)):
        layer = layer.double()
        cache = layer.init_cache(2, 23)
        pieces = [layer(x[:, :10], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(10, 23)]
        torch.testing.assert_close(torch.cat(pieces, 1), layer(x), atol=1e-10, rtol=0)
        assert cache.length == 23 and cache.nbytes == 2 * 4 * (8 * 8 + 8) * 8  # fixed size, float64
        with pytest.raises(ValueError, match="does not support padding"):
            layer(x, padding_mask=torch.tensor([[False] * 3 + [True] * 20] * 2))
