"""The Number Token Loss: closed forms, and equality with the maintained `ntloss` package (reweigh=False, the
paper's loss) on random inputs."""

import math

import pytest
import torch
from hf_tiny import char_tokenizer
from ntloss import NTLoss, NTLossDotProduct

from llm_scratch.tokenizer import CharTokenizer, get_tokenizer
from llm_scratch.training.losses import NumberTokenLoss, number_token_values

ALPHABET = "ab0123456789+=;x"  # digits not at the start, so token id != value


def _values():
    return number_token_values(CharTokenizer(ALPHABET))  # V = 17: 16 characters and the eos token


def _logits_with_mass_on(value, V=17, scale=60.0):
    logits = torch.zeros(1, 1, V)
    logits[0, 0, ALPHABET.index(str(value))] = scale  # practically all mass on one digit
    return logits


def test_number_token_values_of_our_tokenizers():
    values = _values()
    assert values.shape == (17,)
    assert [values[ALPHABET.index(d)].item() for d in "0123456789"] == list(range(10))
    assert int((~values.isnan()).sum()) == 10
    shakespeare = number_token_values(get_tokenizer("shakespeare"))
    assert int((~shakespeare.isnan()).sum()) == 10 and shakespeare.shape == (4099,)
    with pytest.raises(ValueError, match="no number tokens"):
        number_token_values(CharTokenizer("abc"))


def test_closed_forms():
    values = _values()
    was, mse = NumberTokenLoss(values), NumberTokenLoss(values, kind="mse")
    label = torch.tensor([[ALPHABET.index("4")]])
    assert was(_logits_with_mass_on(3), label).item() == pytest.approx(1.0, abs=1e-6)  # |3 − 4|
    assert was(_logits_with_mass_on(9), label).item() == pytest.approx(5.0, abs=1e-6)  # |9 − 4|
    assert mse(_logits_with_mass_on(9), label).item() == pytest.approx(25.0, abs=1e-5)
    uniform = torch.zeros(1, 1, 17)
    uniform[0, 0, 0] = 50.0  # mass on a non-number token changes nothing: p is a softmax over the digits only
    assert was(uniform, label).item() == pytest.approx(sum(abs(v - 4) for v in range(10)) / 10)  # 2.5
    assert was(uniform, label).item() == pytest.approx(2.5)
    assert mse(uniform, label).item() == pytest.approx((4.5 - 4) ** 2)  # expected value 4.5
    # no number label: exactly 0, and backward works
    logits = torch.randn(2, 3, 17, requires_grad=True)
    labels = torch.tensor([[0, 1, -100], [12, 14, 1]])  # "a", "b", ignored, "+", ";", "b"
    loss = was(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().max() == 0


@pytest.mark.parametrize("kind", ["wasserstein", "mse"])
def test_equals_ntloss_without_reweighting(kind):
    vocab = {c: i for i, c in enumerate(ALPHABET)}
    vocab["<eos>"], vocab["<pad>"] = 16, 17
    hf_tok = char_tokenizer(vocab)
    V = len(vocab)
    if kind == "wasserstein":
        theirs = NTLoss(hf_tok, vocab_size=V, digit_level=True, reweigh=False)
    else:
        theirs = NTLossDotProduct(hf_tok, vocab_size=V, digit_level=True, reweigh=False)
    values = torch.full((V,), float("nan"))
    values[: len(ALPHABET)] = _values()[: len(ALPHABET)]
    torch.testing.assert_close(values, theirs.number_values, equal_nan=True)  # the same value table
    ours = NumberTokenLoss(values, kind=kind)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        logits = 3 * torch.randn(4, 9, V, generator=g, dtype=torch.float64)
        labels = torch.randint(0, V, (4, 9), generator=g)
        labels[0, :3] = -100  # ignored positions
        torch.testing.assert_close(ours(logits, labels).double(), theirs(logits.float(), labels).double(),
                                   atol=1e-5, rtol=1e-5)  # theirs computes in the logits' float32


def test_gradient_pulls_mass_toward_the_right_digit():
    values = _values()
    logits = torch.zeros(1, 1, 17, requires_grad=True)
    label = torch.tensor([[ALPHABET.index("7")]])
    NumberTokenLoss(values)(logits, label).backward()
    grads = {d: logits.grad[0, 0, ALPHABET.index(d)].item() for d in "0123456789"}
    assert grads["7"] < 0 and grads["6"] < grads["0"] and grads["8"] < grads["0"]  # far digits pushed down most
    assert math.isclose(sum(grads.values()), 0.0, abs_tol=1e-6)


def test_errors():
    values = _values()
    with pytest.raises(ValueError, match="kind"):
        NumberTokenLoss(values, kind="huber")
    with pytest.raises(ValueError, match="all NaN"):
        NumberTokenLoss(torch.full((5,), float("nan")))
    loss = NumberTokenLoss(values)
    with pytest.raises(ValueError, match="logits"):
        loss(torch.randn(2, 3, 16), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        loss(torch.randn(2, 3, 17), torch.zeros(2, 4, dtype=torch.long))
