"""The pretraining engine: it learns (overfits one batch), resumes bit for bit, accumulates gradients
correctly, schedules the learning rate as documented and decays only what it should."""


import math

import pytest
import torch
import torch.nn.functional as F

from llm_scratch.data import TokenWindows
from llm_scratch.models import GPT2, GPT2Config
from llm_scratch.training import (
    IGNORE_INDEX,
    ResumableBatches,
    TrainConfig,
    Trainer,
    count_targets,
    cross_entropy_loss,
    lr_at,
    param_groups,
)

CFG = GPT2Config(vocab_size=64, context_length=32, d_model=32, n_layers=2, n_heads=4, dropout=0.1)


def _data(n_tokens=2000, seed=0):
    ids = torch.randint(0, 64, (n_tokens,), generator=torch.Generator().manual_seed(seed)).numpy()
    return TokenWindows(ids, 16)


def _model():
    torch.manual_seed(0)
    return GPT2(CFG)


def test_overfits_a_single_batch():
    data = TokenWindows(torch.randint(0, 64, (8 * 16 + 1,)).numpy(), 16)  # exactly one batch of 8
    cfg = TrainConfig(max_steps=150, batch_size=8, lr=3e-3, warmup_steps=10, weight_decay=0.0, eval_every=0,
                      progress=False)
    model = GPT2(GPT2Config(vocab_size=64, context_length=32, d_model=32, n_layers=2, n_heads=4))
    history = Trainer(model, data, data, cfg, device="cpu").train()
    assert history.train_loss[0] > 3.5  # ~ln 64 at the start
    assert history.train_loss[-1] < 0.1 and history.val_loss[-1] < 0.1


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    cfg = TrainConfig(max_steps=8, batch_size=4, lr=1e-3, warmup_steps=2, grad_accum_steps=2, eval_every=4,
                      eval_batches=2, progress=False)
    train, val = _data(), _data(600, seed=1)
    straight = Trainer(_model(), train, val, cfg, device="cpu")
    straight.train()

    first = Trainer(_model(), train, val, cfg, device="cpu")
    first.train(steps=5)
    first.save(tmp_path / "run")
    torch.manual_seed(12345)  # whatever happens in between must not matter
    resumed = Trainer.resume(tmp_path / "run", GPT2(CFG), train, val, device="cpu")
    assert resumed.step == 5 and resumed.tokens_seen == first.tokens_seen
    resumed.train()
    assert resumed.history.train_loss == straight.history.train_loss  # exact, dropout included
    assert resumed.history.val_loss == straight.history.val_loss
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class _Masked(torch.utils.data.Dataset):
    """Windows whose targets are partly ignore_index, a different number in each (as in fine-tuning)."""

    def __init__(self, windows):
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        x, y = self.windows[i]
        y = y.clone()
        y[: 3 * i] = IGNORE_INDEX
        return x, y


@pytest.mark.parametrize("masked", [False, True])
def test_gradient_accumulation_equals_one_large_batch(masked):
    data = TokenWindows(torch.randint(0, 64, (4 * 16 + 1,)).numpy(), 16)  # 4 windows: one epoch = one batch of 4
    data = _Masked(data) if masked else data
    results, losses = [], []
    for batch_size, accum in ((4, 1), (2, 2)):
        model = GPT2(GPT2Config(vocab_size=64, context_length=32, d_model=32, n_layers=2, n_heads=4))
        model.load_state_dict(_model().state_dict())
        cfg = TrainConfig(max_steps=1, batch_size=batch_size, grad_accum_steps=accum, lr=1e-2, eval_every=0,
                          grad_clip=None, progress=False)
        trainer = Trainer(model, data, data, cfg, device="cpu")
        grads = {}
        # capture the gradient the optimizer would apply (Adam's first step divides it by its own size,
        # which would turn float32 rounding in tiny gradient entries into visible parameter differences)
        trainer.optimizer.step = lambda g=grads, m=model: g.update({n: p.grad.clone() for n, p in m.named_parameters()})
        losses.append(trainer.train_step())
        results.append(grads)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)  # the reported loss is the step's mean either way
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=1e-6, rtol=1e-5)


def test_schedule_and_weight_decay_groups():
    cfg = TrainConfig(max_steps=110, lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    model = _model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith("proj.weight") for n in decayed)  # linear matrices only
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} <= {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(max_steps=1, precision="fp8")


def test_loss_ignores_masked_targets():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :3] = IGNORE_INDEX
    kept = targets != IGNORE_INDEX
    manual = -F.log_softmax(logits, -1)[kept].gather(-1, targets[kept][:, None]).mean()
    torch.testing.assert_close(cross_entropy_loss(logits, targets), manual, atol=1e-6, rtol=0)
    assert count_targets(targets) == 7
    assert cross_entropy_loss(logits.bfloat16(), targets).dtype == torch.float32
    with pytest.raises(ValueError, match="plus a vocab dim"):
        cross_entropy_loss(logits, targets[:, :4])


def test_resumable_batches_order_depends_only_on_seed_and_epoch():
    data = _data(400)
    a, b = ResumableBatches(data, 4, seed=3), ResumableBatches(data, 4, seed=3)
    first = [next(a)[0] for _ in range(40)]  # crosses an epoch boundary (24 windows / 4 = 6 per epoch)
    assert all(torch.equal(x, next(b)[0]) for x in first)
    c = ResumableBatches(data, 4, seed=3)
    c.load_state_dict({"epoch": 2, "index": 3})
    assert torch.equal(next(c)[0], first[2 * (len(data) // 4) + 3])
    assert not torch.equal(next(ResumableBatches(data, 4, seed=4))[0], first[0])


def test_committed_shakespeare_gpt_loads_strictly_and_still_predicts():
    """The model later chapters start from: strict keys (a changed GPT2 fails here), and its validation loss
    recomputed on the windows its training run evaluated (the first eval_batches x batch_size that exist) equals
    the recorded one. 1e-3 leaves room for float32 summation order on another CPU; a stale or wrong
    checkpoint is off by far more."""
    from llm_scratch.checkpoint import checkpoint_paths
    from llm_scratch.training.pretrained import SHAKESPEARE_GPT, TRAINING, load_or_pretrain, shakespeare_gpt_data

    st_path, json_path = checkpoint_paths(SHAKESPEARE_GPT)
    assert st_path.exists() and json_path.exists(), "run `make artifacts` to build it"
    assert st_path.stat().st_size < 8_000_000
    model, info = load_or_pretrain(device="cpu")
    meta = info["metadata"]
    assert {"seed", "steps", "data", "loss_log"} <= set(meta)
    assert {k: meta[k] for k in TRAINING} == TRAINING  # `make artifacts` would rebuild this very run
    _, val = shakespeare_gpt_data()
    bs = meta["batch_size"]
    n_batches = min(meta["eval_batches"], len(val) // bs)
    losses = []
    with torch.no_grad():
        for b in range(n_batches):
            x, y = (torch.stack(t) for t in zip(*(val[i] for i in range(b * bs, (b + 1) * bs)), strict=True))
            losses.append(cross_entropy_loss(model(x), y).item())
    assert sum(losses) / len(losses) == pytest.approx(meta["loss_log"]["val_loss"][-1], abs=1e-3)
    assert meta["loss_log"]["val_loss"][-1] < 5.3  # below the interpolated bigram's 5.47 (notebook 08/01)


def test_bf16_autocast_step_runs_and_keeps_fp32_weights():
    cfg = TrainConfig(max_steps=2, batch_size=4, lr=1e-3, precision="bf16", eval_every=0, eval_batches=1,
                      progress=False)
    trainer = Trainer(_model(), _data(), _data(600, seed=1), cfg, device="cpu")
    history = trainer.train()
    assert all(math.isfinite(v) for v in history.train_loss + history.val_loss)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
