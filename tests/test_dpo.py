"""DPO and relatives: completion log-probabilities against a slow loop, the losses' closed forms and gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

from llm_scratch.training.dpo import LOSS_TYPES, completion_logps, dpo_loss


def _slow_completion_logps(logits, input_ids, loss_mask, average=False):
    out = []
    for b in range(input_ids.shape[0]):
        total, count = 0.0, 0
        for t in range(1, input_ids.shape[1]):
            if loss_mask[b, t]:
                probs = torch.softmax(logits[b, t - 1].double(), dim=-1)  # position t-1 predicts token t
                total += math.log(probs[input_ids[b, t]].item())
                count += 1
        out.append(total / count if average else total)
    return torch.tensor(out, dtype=torch.float64)


def test_completion_logps_equals_a_loop_over_positions():
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 9, 13
    logits = torch.randn(B, T, V, generator=g) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 3:] = True
    mask[1, 1:4] = True
    mask[2, 8] = True
    mask[3, 2:7] = True  # ragged completions, including one that stops before the end (right padding after it)
    for average in (False, True):
        ours = completion_logps(logits, ids, mask, average=average)
        torch.testing.assert_close(ours.double(), _slow_completion_logps(logits, ids, mask, average), atol=1e-5,
                                   rtol=0)


def test_completion_logps_is_an_off_by_one_trap():
    """Shifting the mask by one position changes the answer: the test above would catch either mistake."""
    g = torch.Generator().manual_seed(1)
    logits, ids = torch.randn(2, 6, 7, generator=g), torch.randint(0, 7, (2, 6), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    shifted = torch.roll(mask, 1, dims=1)
    assert not torch.allclose(completion_logps(logits, ids, mask), completion_logps(logits, ids, shifted))


def test_completion_logps_errors():
    logits, ids = torch.randn(1, 4, 5), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="position 0"):
        completion_logps(logits, ids, torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="loss_mask"):
        completion_logps(logits, ids, torch.ones(1, 4))
    with pytest.raises(ValueError, match="logits"):
        completion_logps(torch.randn(1, 3, 5), ids, torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="average"):
        completion_logps(logits, ids, torch.zeros(1, 4, dtype=torch.bool), average=True)


def _logps(z: torch.Tensor):
    """Log-probabilities whose chosen-minus-rejected log-ratio difference is z."""
    zeros = torch.zeros_like(z)
    return z - 1.0, zeros - 1.0, zeros - 0.5, zeros - 0.5  # policy chosen, rejected; reference chosen, rejected


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.49])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_sigmoid_variants_equal_log2_at_zero_margin(loss_type, eps):
    losses, _, _ = dpo_loss(*_logps(torch.zeros(3)), beta=0.7, loss_type=loss_type, label_smoothing=eps)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)))


def test_closed_forms_against_the_papers():
    z = torch.linspace(-4, 4, 9)
    beta, eps = 0.3, 0.2
    args = _logps(z)
    sig = -F.logsigmoid(beta * z)
    torch.testing.assert_close(dpo_loss(*args, beta=beta)[0], sig)
    cdpo = -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
    torch.testing.assert_close(dpo_loss(*args, beta=beta, label_smoothing=eps)[0], cdpo)
    robust = (-(1 - eps) * F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1 - 2 * eps)
    torch.testing.assert_close(dpo_loss(*args, beta=beta, loss_type="robust", label_smoothing=eps)[0], robust)
    torch.testing.assert_close(dpo_loss(*args, beta=beta, loss_type="hinge")[0], torch.relu(1 - beta * z))
    torch.testing.assert_close(dpo_loss(*args, beta=beta, loss_type="ipo")[0], (z - 1 / (2 * beta)) ** 2)
    # robust DPO is an unbiased estimate of the clean loss: averaging it over the noise (labels flipped with
    # probability eps) gives back -log σ(βz) (Chowdhury et al. 2024, Lemma 3.1)
    flipped = dpo_loss(*_logps(-z), beta=beta, loss_type="robust", label_smoothing=eps)[0]
    torch.testing.assert_close((1 - eps) * robust + eps * flipped, sig)


def test_ipo_is_zero_at_its_target_and_normalizes_by_length():
    beta = 0.25
    z = torch.full((2,), 1 / (2 * beta))
    torch.testing.assert_close(dpo_loss(*_logps(z), beta=beta, loss_type="ipo")[0], torch.zeros(2))
    # with lengths, each log-ratio is divided by its completion's token count
    pc, pr, rc, rr = torch.tensor([-6.0]), torch.tensor([-9.0]), torch.tensor([-8.0]), torch.tensor([-8.0])
    lc, lr = torch.tensor([4]), torch.tensor([2])
    expected = ((-6.0 + 8.0) / 4 - (-9.0 + 8.0) / 2 - 1 / (2 * beta)) ** 2
    loss = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)[0]
    torch.testing.assert_close(loss, torch.tensor([expected]))
    # the sigmoid loss ignores lengths
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)[0],
                               dpo_loss(pc, pr, rc, rr)[0])


def test_dpo_gradient_and_rewards():
    beta = 0.5
    pc = torch.tensor([-3.0, -1.0, -7.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-2.0, -4.0, -1.0]), torch.tensor([-3.5, -2.0, -6.0]), torch.tensor([-2.5, -3.0, -1.5])
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    z = (pc - rc) - (pr - rr)
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-beta * z.detach()))  # Rafailov et al., section 4
    torch.testing.assert_close(chosen_rewards, beta * (pc - rc).detach())
    torch.testing.assert_close(rejected_rewards, beta * (pr - rr))
    assert not chosen_rewards.requires_grad


def test_dpo_loss_errors():
    args = _logps(torch.zeros(2))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*args, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*args, beta=0.0)
    for eps in (-0.1, 0.5):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(*args, label_smoothing=eps)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(args[0], args[1], torch.zeros(3), args[3])
    with pytest.raises(ValueError, match="both"):
        dpo_loss(*args, chosen_lengths=torch.ones(2))
    assert set(LOSS_TYPES) == {"sigmoid", "robust", "ipo", "hinge"}


# --- the trainer ----------------------------------------------------------------------------------------------

def _tiny_policy():
    from llm_scratch.models.gpt2 import GPT2, GPT2Config
    from llm_scratch.tokenizer import get_tokenizer

    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=get_tokenizer("shakespeare").n_vocab, context_length=96, d_model=32,
                           n_layers=2, n_heads=4))


def _pair_data(n_per_family=4, split="train", families=("add", "uppercase", "sort_digits")):
    from llm_scratch.tasks import make_preference_pairs
    from llm_scratch.tokenizer import get_tokenizer
    from llm_scratch.training.preference import PreferenceDataset

    pairs = make_preference_pairs(n_per_family, split, families=families)
    return PreferenceDataset(get_tokenizer("shakespeare"), pairs)


def test_collate_pairs_puts_chosen_rows_first_and_masks_the_answers():
    from llm_scratch.tokenizer import get_tokenizer
    from llm_scratch.tokenizer.chat import IM_END

    tok = get_tokenizer("shakespeare")
    data = _pair_data()
    batch = data.collate([data[i] for i in range(3)])
    B = 3
    assert batch["input_ids"].shape[0] == 2 * B
    for i in range(B):
        pair = data.pairs[i]
        for row, answer in ((i, pair.chosen), (B + i, pair.rejected)):
            ids = batch["input_ids"][row][batch["loss_mask"][row]].tolist()
            assert tok.decode(ids) == answer + IM_END
            assert not batch["loss_mask"][row, 0] and (batch["loss_mask"][row] <= batch["padding_mask"][row]).all()


def test_dpo_trainer_starts_at_log2_and_learns_the_preferences():
    from llm_scratch.training.dpo import DPOTrainer
    from llm_scratch.training.engine import TrainConfig

    train, val = _pair_data(), _pair_data(2, "validation")
    cfg = TrainConfig(max_steps=30, batch_size=6, lr=3e-3, warmup_steps=0, weight_decay=0.0, eval_every=0,
                      progress=False)
    trainer = DPOTrainer(_tiny_policy(), train, val, cfg, beta=0.5, device="cpu")
    start = trainer.evaluate(train)
    assert start["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: every reward is 0
    assert start["reward_margin"] == 0 and start["reward_accuracy"] == 0
    trainer.train()
    end = trainer.evaluate(train)
    assert end["loss"] < 0.5 * math.log(2) and end["reward_accuracy"] > 0.9  # it fits its training pairs
    assert len(trainer.history.train["loss"]) == 30 and trainer.history.val_step == [30]


def test_precomputed_reference_gives_the_same_training():
    from llm_scratch.training.dpo import DPOTrainer
    from llm_scratch.training.engine import TrainConfig

    train, val = _pair_data(), _pair_data(2, "validation")
    cfg = TrainConfig(max_steps=3, batch_size=4, lr=1e-3, eval_every=0, progress=False)
    a = DPOTrainer(_tiny_policy(), train, val, cfg, device="cpu")
    b = DPOTrainer(_tiny_policy(), train, val, cfg, precompute_ref=True, device="cpu")
    assert b.reference is None and b.ref_train.shape == (len(train), 2)
    ha, hb = a.train(), b.train()
    assert ha.train["loss"] == pytest.approx(hb.train["loss"], abs=1e-6)
    assert a.evaluate()["loss"] == pytest.approx(b.evaluate()["loss"], abs=1e-6)
    with pytest.raises(ValueError, match="precompute_ref"):
        b.evaluate(_pair_data(1, "test"))
