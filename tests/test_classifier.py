"""SequenceClassifier: the last real token found from the mask under left and right padding, pooling against
hand computations, logits unchanged by extra padding, frozen parameters untouched by a step, and logits equal
to Hugging Face's GPT2ForSequenceClassification with the same weights.

Tolerance 1e-5 as in test_gpt2.py: the same float32 arithmetic in different kernels (~1e-7 apart here).
"""

import pytest
import torch
from torch import nn
from transformers import GPT2Config as HFConfig
from transformers import GPT2ForSequenceClassification

from llm_scratch.models import GPT2, GPT2Config, Llama3, Llama3Config, SequenceClassifier, last_token_index, pool_hidden
from llm_scratch.models.hf import _gpt2_weights

CFG = GPT2Config(vocab_size=61, context_length=32, d_model=32, n_layers=3, n_heads=4)


def _random_masks(B=16, T=12, side="right"):
    lengths = torch.randint(1, T + 1, (B,))
    cols = torch.arange(T)
    if side == "right":
        return cols < lengths[:, None]
    return cols >= T - lengths[:, None]


def _pad(seqs, T, side, pad_id=0):
    """Token lists -> (ids (B, T), padding_mask (B, T)) padded on `side`."""
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, cols], mask[i, cols] = torch.tensor(s), True
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_index_equals_a_hand_loop(side):
    mask = _random_masks(side=side)
    expected = [max(t for t in range(mask.shape[1]) if mask[b, t]) for b in range(mask.shape[0])]
    assert last_token_index(mask).tolist() == expected
    if side == "left":
        assert (last_token_index(mask) == mask.shape[1] - 1).all()
    holes = torch.rand(8, 10) < 0.5
    holes[:, 0] = True  # every row has a real token
    assert last_token_index(holes).tolist() == [max(t for t in range(10) if holes[b, t]) for b in range(8)]


def test_last_token_index_errors():
    with pytest.raises(ValueError, match="padding_mask must be a bool tensor"):
        last_token_index(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_mask must be a bool tensor"):
        last_token_index(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"padding_mask has rows with no real token: \[1\]"):
        last_token_index(torch.tensor([[True, False], [False, False]]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_pool_hidden_equals_hand_computations(side):
    mask = _random_masks(B=6, T=7, side=side)
    hidden = torch.randn(6, 7, 5)
    hidden[~mask] = float("inf")  # whatever sits at pad positions must not leak in
    for b in range(6):
        real = [t for t in range(7) if mask[b, t]]
        torch.testing.assert_close(pool_hidden(hidden, mask, "first")[b], hidden[b, real[0]])
        torch.testing.assert_close(pool_hidden(hidden, mask, "last")[b], hidden[b, real[-1]])
        torch.testing.assert_close(pool_hidden(hidden, mask, "mean")[b], sum(hidden[b, t] for t in real) / len(real))
    full = torch.randn(2, 4, 3)
    torch.testing.assert_close(pool_hidden(full, None, "mean"), full.mean(1))
    torch.testing.assert_close(pool_hidden(full, None, "first"), full[:, 0])
    torch.testing.assert_close(pool_hidden(full, None, "last"), full[:, -1])
    with pytest.raises(ValueError, match="pooling must be one of last, mean, first, got 'max'"):
        pool_hidden(full, None, "max")


@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
def test_logits_unchanged_by_extra_padding(pooling):
    model = SequenceClassifier(GPT2(CFG), 3, pooling=pooling).eval()
    seqs = [torch.randint(1, 61, (n,)).tolist() for n in (5, 9, 2, 7)]
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([s])) for s in seqs])  # (4, 3), no padding at all
        for side in ("left", "right"):
            for T in (9, 14):
                ids, mask = _pad(seqs, T, side)
                torch.testing.assert_close(model(ids, mask), alone, atol=1e-5, rtol=0)


def test_frozen_parameters_unchanged_after_a_step():
    model = SequenceClassifier(GPT2(CFG), 2, train_last_blocks=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"score.weight"} | {n for n, _ in model.named_parameters()
                                   if n.startswith(("base.blocks.2.", "base.ln_f."))}
    assert trainable == expected
    assert model.n_trainable() == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all parameters: decay must skip frozen
    ids, mask = _pad([[1, 2, 3], [4, 5, 6, 7, 8]], 6, "left")
    nn.functional.cross_entropy(model(ids, mask), torch.tensor([0, 1])).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trainable), n

    none = SequenceClassifier(GPT2(CFG), 2, train_last_blocks=0)  # the head alone, final norm frozen too
    assert {n for n, p in none.named_parameters() if p.requires_grad} == {"score.weight"}
    everything = SequenceClassifier(GPT2(CFG), 2)
    assert all(p.requires_grad for p in everything.parameters())
    llama = Llama3(Llama3Config(vocab_size=50, context_length=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_hidden=64, rope_scaling=None))
    clf = SequenceClassifier(llama, 4, train_last_blocks=1)
    assert {n.split(".")[1] for n, p in clf.named_parameters() if p.requires_grad and n.startswith("base.")} == \
        {"blocks", "norm"}
    assert clf(torch.randint(0, 50, (2, 5))).shape == (2, 4)


def _hf_pair(pad_id):
    torch.manual_seed(0)
    config = HFConfig(n_embd=32, n_layer=2, n_head=4, n_positions=40, vocab_size=71, num_labels=3,
                      pad_token_id=pad_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = GPT2ForSequenceClassification(config).eval()
    with torch.no_grad():  # LayerNorm gains and biases away from 1 and 0, so a mix-up would show
        for name, p in theirs.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ours = SequenceClassifier(GPT2(GPT2Config(vocab_size=71, context_length=40, d_model=32, n_layers=2,
                                              n_heads=4)), 3).eval()
    state = {k: v for k, v in theirs.state_dict().items() if k != "score.weight"}
    ours.base.load_state_dict(_gpt2_weights(state, ours.base.cfg), strict=True)
    ours.score.load_state_dict({"weight": theirs.score.weight})
    return ours, theirs


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_equal_hugging_face(side):
    pad_id = 70
    ours, theirs = _hf_pair(pad_id)
    seqs = [torch.randint(0, pad_id, (n,)).tolist() for n in (6, 11, 3, 11, 1)]  # the pad id never occurs
    ids, mask = _pad(seqs, 11, side, pad_id)
    # our model numbers a left-padded row's real tokens from 0; give Hugging Face the same positions
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask.long(), position_ids=positions).logits  # (B, 3)
        torch.testing.assert_close(ours(ids, mask), expected, atol=1e-5, rtol=0)


def test_bad_arguments():
    base = GPT2(CFG)
    with pytest.raises(ValueError, match="n_classes must be a positive int, got 0"):
        SequenceClassifier(base, 0)
    with pytest.raises(ValueError, match="pooling must be one of last, mean, first, got 'max'"):
        SequenceClassifier(base, 2, pooling="max")
    for n in (-1, 4):
        with pytest.raises(ValueError, match=rf"train_last_blocks must be None or an int in \[0, 3\].*got {n}"):
            SequenceClassifier(base, 2, train_last_blocks=n)
    with pytest.raises(TypeError, match="must have a hidden_states"):
        SequenceClassifier(nn.Linear(3, 3), 2)
