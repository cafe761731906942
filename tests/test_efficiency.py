"""Efficiency options of the training step: activation checkpointing gives the same gradients with fewer saved
bytes, fp16 with a GradScaler (skips an overflowing step, resumes its scale), fused AdamW equals the default
AdamW, the saved-tensor meter on a hand-counted case, and the MFU formula on GPT-2 124M by hand."""

import pytest
import torch
import torch.nn.functional as F

from llm_scratch.data import TokenWindows
from llm_scratch.models import GPT2, GPT2Config, Llama3, Llama3Config
from llm_scratch.training import TrainConfig, Trainer, efficiency
from llm_scratch.training.efficiency import (
    SavedTensorBytes,
    checkpoint_blocks,
    device_peak_flops,
    mfu,
    transformer_flops_per_token,
)

CFG = GPT2Config(vocab_size=64, context_length=32, d_model=32, n_layers=3, n_heads=4, dropout=0.1)


def _data(n_tokens=3000, seed=0):
    return TokenWindows(torch.randint(0, 64, (n_tokens,), generator=torch.Generator().manual_seed(seed)).numpy(), 16)


def _gpt2(dropout=0.1):
    torch.manual_seed(0)
    return GPT2(GPT2Config(**{**CFG.__dict__, "dropout": dropout}))


def _grads(model, ids):
    torch.manual_seed(1)  # the same dropout masks for both runs
    model.zero_grad()
    with SavedTensorBytes(model) as saved:
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, saved


@pytest.mark.parametrize("family", ["gpt2", "llama3"])
def test_checkpointed_blocks_give_the_same_gradients_with_less_saved(family, monkeypatch):
    if family == "gpt2":
        model = _gpt2()
    else:
        torch.manual_seed(0)
        model = Llama3(Llama3Config(vocab_size=64, context_length=32, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                                    ffn_hidden=48, rope_scaling=None, dropout=0.1))
    model.train()
    ids = torch.randint(0, 64, (4, 17))
    keys = list(model.state_dict())
    plain, plain_saved = _grads(model, ids)
    assert checkpoint_blocks(model) == 3
    again, saved = _grads(model, ids)
    for name in plain:  # the recomputation replays the same dropout masks (RNG state restored): same numbers
        torch.testing.assert_close(again[name], plain[name], atol=1e-7, rtol=0)
    assert list(model.state_dict()) == keys  # wrapped in place: checkpoints unchanged
    # only the blocks' inputs (and what lies outside the blocks) are kept: well under half here
    activations = saved.bytes - saved.parameter_bytes
    assert activations < 0.4 * (plain_saved.bytes - plain_saved.parameter_bytes)
    checkpoint_blocks(model, enabled=False)
    assert _grads(model, ids)[1].bytes == plain_saved.bytes
    model.eval()
    with torch.no_grad():
        plain_logits = model(ids)
    checkpoint_blocks(model)

    def no_checkpoint(*args, **kwargs):
        raise AssertionError("checkpoint called without a graph to save memory for")

    monkeypatch.setattr(efficiency, "checkpoint", no_checkpoint)
    with torch.no_grad():  # no graph: the plain forward, nothing to recompute, checkpoint never called
        assert torch.equal(model(ids), plain_logits)
    with pytest.raises(ValueError, match="`blocks`"):
        checkpoint_blocks(torch.nn.Linear(2, 2))


def test_saved_tensor_bytes_counts_what_autograd_keeps():
    linear = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    with SavedTensorBytes(linear) as saved:
        y = linear(x)
    # addmm saves its two matrix operands for backward: x (2 x 4) and W (3 x 4), float32
    assert saved.bytes == (2 * 4 + 3 * 4) * 4 and saved.parameter_bytes == 3 * 4 * 4
    with SavedTensorBytes() as saved:
        z = torch.tanh(y)  # tanh saves its output (2 x 3)
    assert saved.bytes == 2 * 3 * 4
    z.sum().backward()


def test_fp16_with_grad_scaler_skips_an_overflowing_step_and_resumes_its_scale(tmp_path):
    cfg = TrainConfig(max_steps=6, batch_size=4, lr=1e-3, precision="fp16", eval_every=0, eval_batches=1,
                      progress=False)
    trainer = Trainer(_gpt2(), _data(), _data(600, 1), cfg, device="cpu")
    assert trainer.scaler.is_enabled()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # loss x 2^127 overflows float32
    loss = trainer.train_step()
    assert torch.isfinite(torch.tensor(loss))
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())  # the step was skipped
    assert trainer.scaler.get_scale() == 2.0 ** 126  # and the scale halved
    trainer.scaler = torch.amp.GradScaler("cpu")  # the default 2^16: no overflow, the steps go through
    for _ in range(3):
        trainer.train_step()
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    trainer.save(tmp_path / "run")
    expected = trainer.train_step()
    resumed = Trainer.resume(tmp_path / "run", GPT2(CFG), _data(), _data(600, 1), device="cpu")  # RNG restored too
    assert resumed.scaler.get_scale() == 2.0 ** 16
    assert resumed.train_step() == expected  # the same next step, bit for bit


def test_fused_adamw_and_checkpointing_train_like_the_defaults():
    def run(**options):
        cfg = TrainConfig(max_steps=4, batch_size=4, lr=3e-3, eval_every=0, eval_batches=1, progress=False, **options)
        trainer = Trainer(_gpt2(), _data(), _data(600, 1), cfg, device="cpu")
        losses = [trainer.train_step() for _ in range(4)]
        return losses, trainer.model.state_dict()

    base_losses, base = run()
    for options in (dict(fused_adamw=True), dict(activation_checkpointing=True)):
        losses, weights = run(**options)
        # fused AdamW does the same arithmetic in one kernel, in another order: after 4 steps of lr 3e-3 weights
        # differ by ~1e-6 (float32 rounding of the update); a wrong update rule would differ by ~1e-3
        # checkpointing recomputes the same forward
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(base_losses), atol=1e-5, rtol=0)
        for k in base:
            torch.testing.assert_close(weights[k], base[k], atol=5e-6, rtol=0)
    with pytest.raises(ValueError, match="'fp32', 'bf16' or 'fp16'"):
        TrainConfig(max_steps=1, precision="fp8")


def test_flops_per_token_and_mfu_by_hand():
    # GPT-2 124M: 124,439,808 parameters minus the 1024 x 768 position table = 123,653,376 (nanoGPT's
    # non-embedding count); 6N = 741,920,256 and 12 L H Q T = 12 * 12 * 12 * 64 * 1024 = 113,246,208
    with torch.device("meta"):
        model = GPT2(GPT2Config.from_preset("gpt2"))
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    assert n == 123_653_376
    flops = transformer_flops_per_token(n, 12, 12, 64, 1024)
    assert flops == 741_920_256 + 113_246_208 == 855_166_464
    # 100k tokens/s on a 989 TFLOP/s device: 8.55e13 / 9.89e14
    assert mfu(100_000, flops, 989e12) == pytest.approx(855_166_464e5 / 989e12)
    assert device_peak_flops("cpu") is None
    with pytest.raises(ValueError, match="seq_len"):
        transformer_flops_per_token(n, 12, 12, 64, 0)
