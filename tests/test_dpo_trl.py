"""DPO against TRL: `DPOTrainer`'s loss and logged metrics equal ours on the same weights and the same batch.

A tiny random GPT2LMHeadModel (the policy) and a second one with other weights (the reference, so the log-ratios
are far from zero) are saved with save_pretrained; TRL trains the Hugging Face copies, we load ours with
load_hf_checkpoint. The tokenizer is character-level, built here (no download), so every tokenized prompt is a
prefix of its tokenized prompt + completion and TRL cuts the completion where we expect.

What TRL 1.x does, and so what these tests rely on (read from trl/trainer/dpo_trainer.py):
- It appends the eos token to each non-conversational completion, tokenizes prompt and prompt + completion, and
  its collator stacks the chosen rows, then the rejected rows (2B rows), padded on the right with pad_token_id;
  completion_mask marks the completion's tokens, eos included. Right padding leaves the real tokens' positions
  as they are, so our model reads the batch with padding_mask = attention_mask.
- The loss is computed inside DPOTrainer.compute_loss, from per-token log-probabilities of a fused LM head
  (model(..., labels=..., fused_lm_head=True)), summed over the completion: what completion_logps computes.
  We call compute_loss on one batch of all pairs, without an optimizer step.
- "ipo" divides each log-ratio by its completion's token count (our chosen_lengths / rejected_lengths);
  "robust" uses label_smoothing; "sigmoid" ignores it (TRL 1.x dropped cDPO: see the last test).

Tolerance: both sides do the same float32 arithmetic in different kernels (TRL's tiled fused head vs our full
logits; Hugging Face attention vs ours); the logits of these models agree to ~1e-7 (see test_gpt2.py). rtol 1e-5
with atol 1e-6 still fails for any off-by-one in the masks, a missing eos, a wrong length normalization or a
wrong sign in the loss (those change the loss in its first or second digit).
"""

import math

import pytest
import torch
import trl
from datasets import Dataset
from hf_tiny import char_tokenizer, tiny_gpt2
from transformers import GPT2LMHeadModel

from llm_scratch.models.hf import load_hf_checkpoint
from llm_scratch.training.dpo import completion_logps, dpo_loss

CHARS = "abcdefghijklmnopqrstuvwxyz ?.!,:"
VOCAB = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
PAIRS = [  # different prompt and completion lengths, so padding and length normalization matter
    dict(prompt="what is up? ", chosen="not much.", rejected="go away!"),
    dict(prompt="hi", chosen=" hello there", rejected=" no"),
    dict(prompt="name a color: ", chosen="red", rejected="a loud noise, i think"),
    dict(prompt="count: one two ", chosen="three", rejected="seven"),
    dict(prompt="yes or no? ", chosen="yes", rejected="maybe, maybe not."),
    dict(prompt="the sky is", chosen=" blue", rejected=" made of cheese, said the moon"),
]
# (loss_type, beta, label_smoothing): sigmoid is plain DPO in TRL 1.x, robust needs a nonzero label_smoothing
CASES = [("sigmoid", 0.1, 0.0), ("ipo", 0.3, 0.0), ("robust", 0.1, 0.2), ("hinge", 0.3, 0.0)]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def _tokenizer():
    return char_tokenizer(VOCAB)


def _save_model(seed, folder):
    tiny_gpt2(seed, len(VOCAB), n_embd=32, n_positions=64).save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_trl")
    _save_model(0, root / "policy")
    _save_model(1, root / "reference")
    return root


def _trl_loss(folders, loss_type, beta, label_smoothing):
    """TRL's loss on one batch of all the pairs, with the gradient of the policy's token embedding; the batch;
    TRL's logged metrics."""
    # fresh models each time: DPOTrainer patches their forward (the fused LM head)
    policy = GPT2LMHeadModel.from_pretrained(folders / "policy")
    reference = GPT2LMHeadModel.from_pretrained(folders / "reference")
    args = trl.DPOConfig(output_dir=str(folders / "out"), loss_type=[loss_type], beta=beta,
                         label_smoothing=label_smoothing, per_device_train_batch_size=len(PAIRS), max_length=None,
                         report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(PAIRS),
                             processing_class=_tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()  # as in training (dropout is off anyway); TRL logs under "train"
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grad = trainer.model.transformer.wte.weight.grad.clone()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grad, batch, metrics


def _our_loss(folders, batch, loss_type, beta, label_smoothing):
    policy = load_hf_checkpoint(folders / "policy")
    reference = load_hf_checkpoint(folders / "reference")
    ids, padding = batch["input_ids"], batch["attention_mask"].bool()
    completion = batch["completion_mask"].bool()
    logps = completion_logps(policy(ids, padding_mask=padding), ids, completion)
    with torch.no_grad():
        ref_logps = completion_logps(reference(ids, padding_mask=padding), ids, completion)
    B = len(PAIRS)
    lengths = completion.sum(1)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta=beta, loss_type=loss_type,
        label_smoothing=label_smoothing, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
    loss = losses.mean()
    loss.backward()
    metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
               "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
               "logps/chosen": logps[:B].detach().mean(), "logps/rejected": logps[B:].detach().mean()}
    return dict(loss=loss.detach(), grad=policy.wte.weight.grad, metrics={k: v.item() for k, v in metrics.items()},
                chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


@pytest.fixture(scope="module")
def results(folders):
    out = {}
    for loss_type, beta, label_smoothing in CASES:
        trl_loss, trl_grad, batch, trl_metrics = _trl_loss(folders, loss_type, beta, label_smoothing)
        out[loss_type] = dict(trl_loss=trl_loss, trl_grad=trl_grad, batch=batch, trl_metrics=trl_metrics,
                              **_our_loss(folders, batch, loss_type, beta, label_smoothing))
    return out


def test_trl_batch_is_what_we_assume(results):
    """Chosen rows then rejected rows, right padding with <pad>, eos closing each completion, all pairs present."""
    tok, B = _tokenizer(), len(PAIRS)
    batch = results["sigmoid"]["batch"]
    ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    assert ids.shape[0] == 2 * B
    lengths = attention.sum(1)
    positions = torch.arange(ids.shape[1])
    assert torch.equal(attention, (positions < lengths[:, None]).long())  # real tokens first: right padding
    assert (ids[attention == 0] == tok.pad_token_id).all()
    assert not (completion.bool() & ~attention.bool()).any()
    assert (completion[:, 0] == 0).all()
    assert (ids[torch.arange(2 * B), lengths - 1] == tok.eos_token_id).all()  # eos appended to each completion
    texts = [(tok.decode(row[(a == 1) & (c == 0)]), tok.decode(row[c == 1]))
             for row, a, c in zip(ids, attention, completion, strict=True)]
    got = sorted((texts[i][0], texts[i][1], texts[B + i][1]) for i in range(B))
    assert got == sorted((p["prompt"], p["chosen"] + "<eos>", p["rejected"] + "<eos>") for p in PAIRS)


@pytest.mark.parametrize(("loss_type", "beta", "label_smoothing"), CASES)
def test_loss_metrics_and_gradient_equal_trl(results, loss_type, beta, label_smoothing):
    r = results[loss_type]
    torch.testing.assert_close(r["loss"], r["trl_loss"], rtol=1e-5, atol=1e-6)
    for name in METRICS:
        assert math.isclose(r["metrics"][name], r["trl_metrics"][name], rel_tol=1e-5, abs_tol=1e-6), name
    # the tied token embedding's gradient: the whole chain (log-probs of both completions, the loss's derivative).
    # Backpropagation through different kernels: observed max difference ~2e-7 of the largest entry.
    scale = r["trl_grad"].abs().max()
    assert scale > 1e-2
    torch.testing.assert_close(r["grad"], r["trl_grad"], rtol=1e-5, atol=1e-5 * scale.item())


def test_the_comparison_is_not_vacuous(results):
    """Log-ratios far from zero, margins of both signs, and a different loss value for each loss type."""
    r = results["sigmoid"]
    chosen_logratios, rejected_logratios = r["chosen_rewards"] / 0.1, r["rejected_rewards"] / 0.1
    assert chosen_logratios.abs().mean() > 0.5 and rejected_logratios.abs().mean() > 0.5
    margins = chosen_logratios - rejected_logratios
    assert (margins > 0).any() and (margins < 0).any()
    hinge = results["hinge"]["chosen_rewards"] - results["hinge"]["rejected_rewards"]  # β z
    assert (hinge > 1).any() and (hinge < 1).any()  # both sides of the hinge's kink
    losses = [results[t]["trl_loss"].item() for t, _, _ in CASES]
    assert min(abs(a - b) for i, a in enumerate(losses) for b in losses[i + 1:]) > 1e-2


def test_label_smoothing_in_trl(folders, results):
    """robust depends on label_smoothing (the test above would see a wrong ε); TRL 1.x's sigmoid ignores it, so
    our sigmoid with ε > 0 (cDPO) is not what TRL computes there: TRL's equals our plain DPO."""
    batch = results["robust"]["batch"]
    assert not math.isclose(_our_loss(folders, batch, "robust", 0.1, 0.0)["loss"].item(),
                            results["robust"]["trl_loss"].item(), rel_tol=1e-3)
    trl_sigmoid, _, batch, _ = _trl_loss(folders, "sigmoid", 0.1, 0.2)
    plain = _our_loss(folders, batch, "sigmoid", 0.1, 0.0)["loss"]
    torch.testing.assert_close(plain, trl_sigmoid, rtol=1e-5, atol=1e-6)
    cdpo = _our_loss(folders, batch, "sigmoid", 0.1, 0.2)["loss"]
    assert not math.isclose(cdpo.item(), trl_sigmoid.item(), rel_tol=1e-3)
