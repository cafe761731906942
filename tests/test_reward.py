"""Reward model: a scalar head equal to Hugging Face's num_labels=1 classifier, the Bradley-Terry loss, and a
toy preference rule learned to near-perfect held-out accuracy."""

import math

import pytest
import torch
from transformers import GPT2Config as HFConfig
from transformers import GPT2ForSequenceClassification

from llm_scratch.models import GPT2, GPT2Config
from llm_scratch.models.hf import _gpt2_weights
from llm_scratch.tasks import make_preference_pairs
from llm_scratch.tokenizer import get_tokenizer
from llm_scratch.training.engine import TrainConfig
from llm_scratch.training.preference import PreferenceDataset
from llm_scratch.training.reward import RewardModel, RewardTrainer, bradley_terry_loss


def test_reward_equals_hugging_face_reward_head():
    """transformers' GPT2ForSequenceClassification with num_labels=1 is the layout TRL's RewardTrainer uses."""
    torch.manual_seed(0)
    pad_id = 60
    config = HFConfig(n_embd=32, n_layer=2, n_head=4, n_positions=40, vocab_size=61, num_labels=1,
                      pad_token_id=pad_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = GPT2ForSequenceClassification(config).eval()
    ours = RewardModel(GPT2(GPT2Config(vocab_size=61, context_length=40, d_model=32, n_layers=2, n_heads=4))).eval()
    state = {k: v for k, v in theirs.state_dict().items() if k != "score.weight"}
    ours.base.load_state_dict(_gpt2_weights(state, ours.base.cfg), strict=True)
    ours.score.load_state_dict({"weight": theirs.score.weight})
    lengths = [7, 3, 12, 1]
    ids = torch.full((4, 12), pad_id)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    for b, n in enumerate(lengths):  # right padding; the pad id never occurs in the real tokens
        ids[b, :n] = torch.randint(0, pad_id, (n,))
        mask[b, :n] = True
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask.long()).logits[:, 0]
        torch.testing.assert_close(ours(ids, mask), expected, atol=1e-5, rtol=0)  # float32, different kernels
    assert ours(ids, mask).shape == (4,)


def test_bradley_terry_loss():
    c, r = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(bradley_terry_loss(c, r), torch.log1p(torch.exp(-(c - r))))
    assert bradley_terry_loss(c, r)[1].item() == pytest.approx(math.log(2))
    # only differences matter: shifting every reward changes nothing
    torch.testing.assert_close(bradley_terry_loss(c + 5, r + 5), bradley_terry_loss(c, r))
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(c, r[:2])


def test_reward_model_learns_a_simple_rule():
    """Chosen: the answer as a bare number; rejected: the same number in a sentence. A tiny model learns to
    prefer the bare number from 240 pairs and ranks held-out pairs almost perfectly."""
    tok = get_tokenizer("shakespeare")

    def formatted(split, n):
        pairs = make_preference_pairs(n, split, families=["add", "subtract", "multiply"])
        return [p for p in pairs if p.mistake == "badly formatted"]

    train, val = PreferenceDataset(tok, formatted("train", 250)), PreferenceDataset(tok, formatted("test", 60))
    assert len(train) > 100 and len(val) > 40
    torch.manual_seed(0)
    base = GPT2(GPT2Config(vocab_size=tok.n_vocab, context_length=64, d_model=32, n_layers=2, n_heads=4))
    cfg = TrainConfig(max_steps=60, batch_size=16, lr=3e-3, warmup_steps=5, weight_decay=0.0, eval_every=0,
                      progress=False)
    trainer = RewardTrainer(RewardModel(base), train, val, cfg, device="cpu")
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["accuracy"] >= 0.95 > before["accuracy"]
    assert after["loss"] < before["loss"] and after["chosen_reward"] > after["rejected_reward"]


def test_score_completions_equals_the_trainers_pair_scores():
    """score_completions encodes (prompt, completion) as the reward model's training pairs are encoded: its
    scores equal RewardTrainer.rewards on the same pairs, whatever the batch size and order."""
    from llm_scratch.training.reward import score_completions

    tok = get_tokenizer("shakespeare")
    torch.manual_seed(0)
    model = RewardModel(GPT2(GPT2Config(vocab_size=tok.n_vocab, context_length=96, d_model=32, n_layers=2,
                                        n_heads=4))).eval()
    pairs = make_preference_pairs(2, "validation", families=["add", "reverse", "speaker"])
    data = PreferenceDataset(tok, pairs)
    trainer = RewardTrainer(model, data, None, TrainConfig(max_steps=1, batch_size=2, progress=False), device="cpu")
    with torch.no_grad():
        chosen, rejected = trainer.rewards(data, list(range(len(pairs))))
    examples = [p.example for p in pairs] * 2
    completions = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    for batch_size in (1, 3, 64):
        scores = score_completions(model, tok, examples, completions, batch_size=batch_size)
        torch.testing.assert_close(scores, torch.cat([chosen, rejected]), atol=1e-5, rtol=0)  # padding differs
    with pytest.raises(ValueError, match="same length"):
        score_completions(model, tok, examples, completions[:-1])
    # a sample that wrote a chat marker: refused, or scored up to the marker
    odd = [completions[0] + "<|im_start|>user\nmore"]
    with pytest.raises(ValueError, match="special token"):
        score_completions(model, tok, examples[:1], odd)
    torch.testing.assert_close(score_completions(model, tok, examples[:1], odd, cut_at_special=True),
                               score_completions(model, tok, examples[:1], completions[:1]), atol=0, rtol=0)
