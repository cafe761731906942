"""Mamba-2 / SSD: the quadratic, chunked and sequential forms agree (float64 to 1e-10, float32 to 1e-4), the
chunked scan equals Hugging Face's torch `mamba2_chunk_scan`, a tiny random `Mamba2ForCausalLM` loaded through
`load_hf_checkpoint` gives the same logits, recurrent decoding equals the full forward, and bad inputs fail.

Tolerances: 1e-4 in float32 (the issue's); the three forms sum the same terms in different orders, so they
differ by float32 round-off (~1e-6 here), and float64 shows they are the same function (~1e-15).
"""

import pytest
import torch
from transformers import Mamba2Config as HFMamba2Config
from transformers import Mamba2ForCausalLM
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

from llm_scratch.generation import generate
from llm_scratch.models.hf import load_hf_checkpoint
from llm_scratch.models.mamba2 import Mamba2Config, Mamba2LM
from llm_scratch.ssm import Mamba2, ssd_chunked, ssd_quadratic, ssd_sequential

V = 101
TINY_HF = dict(vocab_size=V, hidden_size=64, state_size=16, head_dim=16, num_heads=8, expand=2, n_groups=1,
               num_hidden_layers=2, chunk_size=8, conv_kernel=4)


def _ssd_inputs(dtype, Bsz=2, T=21, H=4, D=3, G=2, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bsz, T, H, D, generator=g, dtype=dtype)
    dt = torch.rand(Bsz, T, H, generator=g, dtype=dtype) * 0.5 + 0.05
    A = -torch.rand(H, generator=g, dtype=dtype) * 2 - 0.1
    B_ssm = torch.randn(Bsz, T, G, N, generator=g, dtype=dtype)
    C_ssm = torch.randn(Bsz, T, G, N, generator=g, dtype=dtype)
    D_skip = torch.randn(H, generator=g, dtype=dtype)
    h0 = torch.randn(Bsz, H, D, N, generator=g, dtype=dtype)
    return x, dt, A, B_ssm, C_ssm, D_skip, h0


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("T, chunk_size", [(21, 4), (21, 8), (16, 8), (5, 8), (1, 3)])
@pytest.mark.parametrize("with_state", [False, True])
def test_three_forms_agree(dtype, atol, T, chunk_size, with_state):
    x, dt, A, B_ssm, C_ssm, D_skip, h0 = _ssd_inputs(dtype, T=T)
    h0 = h0 if with_state else None
    y_seq, h_seq = ssd_sequential(x, dt, A, B_ssm, C_ssm, D_skip, h0)
    for y, h in (ssd_quadratic(x, dt, A, B_ssm, C_ssm, D_skip, h0),
                 ssd_chunked(x, dt, A, B_ssm, C_ssm, chunk_size, D_skip, h0)):
        assert y.shape == y_seq.shape and h.shape == h_seq.shape
        torch.testing.assert_close(y, y_seq, atol=atol, rtol=0)
        torch.testing.assert_close(h, h_seq, atol=atol, rtol=0)


def test_sequential_is_the_recurrence_written_out():
    """One head, one channel, T = 2, by hand: h1 = dt1 x1 B1, h2 = exp(dt2 A) h1 + dt2 x2 B2, y_t = C_t·h_t."""
    x, dt, A, B_ssm, C_ssm, _, _ = _ssd_inputs(torch.float64, Bsz=1, T=2, H=1, D=1, G=1, N=3)
    h1 = dt[0, 0, 0] * x[0, 0, 0, 0] * B_ssm[0, 0, 0]
    h2 = torch.exp(dt[0, 1, 0] * A[0]) * h1 + dt[0, 1, 0] * x[0, 1, 0, 0] * B_ssm[0, 1, 0]
    y, h = ssd_sequential(x, dt, A, B_ssm, C_ssm)
    torch.testing.assert_close(y[0, :, 0, 0], torch.stack([C_ssm[0, 0, 0] @ h1, C_ssm[0, 1, 0] @ h2]))
    torch.testing.assert_close(h[0, 0, 0], h2)


@pytest.mark.parametrize("T, chunk_size", [(21, 8), (24, 8), (7, 16)])
def test_chunked_matches_transformers_chunk_scan(T, chunk_size):
    x, dt, A, B_ssm, C_ssm, D_skip, h0 = _ssd_inputs(torch.float32, T=T)
    y_hf, h_hf = mamba2_chunk_scan(x, dt, A, B_ssm, C_ssm, chunk_size=chunk_size, D=D_skip, initial_states=h0,
                                   return_final_states=True)
    y, h = ssd_chunked(x, dt, A, B_ssm, C_ssm, chunk_size, D_skip, h0)
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, h_hf, atol=1e-5, rtol=0)


def _hf_folder(tmp_path, **overrides):
    torch.manual_seed(0)
    theirs = Mamba2ForCausalLM(HFMamba2Config(**{**TINY_HF, **overrides})).eval()
    with torch.no_grad():  # move the parameters that start at constants away from them
        for name, p in theirs.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(("dt_bias", "D", "conv1d.bias")):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.copy_(torch.rand_like(p) * 2 - 1)
    theirs.save_pretrained(tmp_path)
    return theirs


@pytest.mark.parametrize("overrides", [{}, {"n_groups": 2, "tie_word_embeddings": True}],
                         ids=["untied-1-group", "tied-2-groups"])
def test_logits_match_transformers(tmp_path, overrides):
    theirs = _hf_folder(tmp_path, **overrides)
    ours = load_hf_checkpoint(tmp_path)
    assert isinstance(ours, Mamba2LM)
    assert ours.cfg.tie_embeddings == bool(overrides.get("tie_word_embeddings", False))
    ids = torch.randint(0, V, (2, 19))  # 19: not a multiple of chunk_size 8
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids)
    assert got.shape == (2, 19, V)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_mixer_matches_transformers_mixer(tmp_path):
    """The mixer alone, weights copied by name (ours are named as Mamba2Mixer's), with n_groups = 2."""
    theirs = _hf_folder(tmp_path, n_groups=2).backbone.layers[0].mixer
    cfg = TINY_HF
    ours = Mamba2(cfg["hidden_size"], cfg["state_size"], cfg["head_dim"], 2, 2, 4, cfg["chunk_size"])
    ours.load_state_dict(theirs.state_dict())
    u = torch.randn(2, 13, cfg["hidden_size"])
    with torch.no_grad():
        torch.testing.assert_close(ours(u), theirs(u), atol=1e-5, rtol=0)


def _tiny_lm(**overrides):
    torch.manual_seed(0)
    cfg = Mamba2Config(**{**dict(vocab_size=V, d_model=32, n_layers=2, d_state=8, head_dim=8, n_groups=2,
                                 chunk_size=4), **overrides})
    model = Mamba2LM(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.A_log.copy_(torch.rand_like(block.mixer.A_log) * 2 - 1)
            block.mixer.dt_bias.add_(torch.randn_like(block.mixer.dt_bias))
    return model


def test_recurrent_step_equals_full_forward():
    model = _tiny_lm()
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        full = model(ids)
        # token by token through Mamba2LM with caches (each call runs the chunked scan on one token)
        caches = model.init_caches(2, 11)
        by_token = torch.cat([model(ids[:, t:t + 1], caches=caches) for t in range(11)], dim=1)
        # a prompt of 6 (prefill), then the rest one token at a time
        caches = model.init_caches(2, 11)
        prefill_then_steps = torch.cat([model(ids[:, :6], caches=caches)]
                                       + [model(ids[:, t:t + 1], caches=caches) for t in range(6, 11)], dim=1)
        # the mixer's own recurrent step (the O(1) decoding path), and the naive sequential SSD
        mixer = model.blocks[0].mixer
        u = torch.randn(2, 11, 32)
        state = mixer.init_state(2)
        stepped = torch.stack([mixer.step(u[:, t], state) for t in range(11)], dim=1)
        mixer_full = mixer(u)
        naive = mixer(u, naive=True)
    torch.testing.assert_close(by_token, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(prefill_then_steps, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(stepped, mixer_full, atol=1e-5, rtol=0)
    torch.testing.assert_close(naive, mixer_full, atol=1e-5, rtol=0)
    assert state.length == 11 and caches[0].length == 11
    # the state does not grow with the sequence: (conv_dim·(K - 1) + H·D·N) floats per row
    assert state.nbytes == 2 * (mixer.conv_dim * 3 + mixer.n_heads * 8 * 8) * 4


def test_generate_with_states_equals_without():
    model = _tiny_lm()
    ids = torch.randint(0, V, (2, 5))
    cached = generate(model, ids, max_new_tokens=6)
    uncached = generate(model, ids, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached, uncached)


def test_causal():
    model = _tiny_lm()
    ids = torch.randint(0, V, (1, 12))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=0, rtol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


def test_codestral_parameter_count_matches_transformers():
    """transformers' Mamba2Config defaults are Mamba-Codestral 7B's: the same parameter count on the meta device."""
    with torch.device("meta"):
        ours = Mamba2LM(Mamba2Config.from_preset("mamba-codestral-7b"))
        theirs = Mamba2ForCausalLM(HFMamba2Config())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in theirs.parameters())
    assert 7.0e9 < n_ours < 7.5e9  # "7.3B" in Mistral's announcement


def test_bad_inputs():
    x, dt, A, B_ssm, C_ssm, D_skip, h0 = _ssd_inputs(torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked(x, dt, A, B_ssm, C_ssm, 0)
    with pytest.raises(ValueError, match="dt must have shape"):
        ssd_quadratic(x, dt[:, :-1], A, B_ssm, C_ssm)
    with pytest.raises(ValueError, match="groups G"):
        ssd_sequential(x, dt, A, B_ssm[:, :, :1].expand(-1, -1, 3, -1), C_ssm[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x, dt, A, B_ssm, C_ssm, 4, initial_state=h0[:1])
    with pytest.raises(ValueError, match="head_dim"):
        Mamba2Config(d_model=30, head_dim=8)
    with pytest.raises(ValueError, match="n_groups"):
        Mamba2Config(d_model=32, head_dim=16, n_groups=3)
    with pytest.raises(ValueError, match="unknown Mamba2Config preset"):
        Mamba2Config.from_preset("mamba2-999b")
    model = _tiny_lm()
    ids = torch.randint(0, V, (2, 4))
    with pytest.raises(ValueError, match="padding_mask"):
        model(ids, padding_mask=torch.tensor([[False, True, True, True], [True] * 4]))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="one state per layer"):
        model(ids, caches=model.init_caches(2)[:1])
    with pytest.raises(ValueError, match="state does not fit"):
        model(ids, caches=model.init_caches(3))
    with pytest.raises(ValueError, match="u_t must have shape"):
        model.blocks[0].mixer.step(torch.randn(2, 1, 32), model.blocks[0].mixer.init_state(2))
