"""The small models later chapters start from: a GPT-2-architecture model pretrained on Tiny Shakespeare with
the project's own 4,096-token BPE, and the same model after supervised fine-tuning on the task generator.

    model, info = load_or_pretrain()      # the committed checkpoint, or train it (about an hour on a CPU)
    model, info = load_or_finetune()      # the SFT model (chat template, nine task families)
    vit, info = load_or_train_digits_vit()  # a small ViT on scikit-learn's 8 x 8 digits (the VLM's encoder)

`make artifacts` retrains them with the fixed settings below and rewrites
data/checkpoints/shakespeare_{gpt,sft}.{safetensors,json}; each JSON records the config, seed, data, steps,
wall time and the train/validation loss history (the SFT one also its held-out accuracy per task family, and
that of the same fine-tuning run started from random weights).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import torch

from llm_scratch.checkpoint import checkpoint_paths, load_checkpoint, read_checkpoint_info, save_checkpoint
from llm_scratch.data import TokenWindows, tokenize_corpus, train_val_split
from llm_scratch.models.gpt2 import GPT2, GPT2Config
from llm_scratch.models.vit import ViT, ViTConfig
from llm_scratch.tokenizer import get_tokenizer
from llm_scratch.training.engine import TrainConfig, Trainer

__all__ = ["DIGITS_VIT", "SFT_TRAINING", "SHAKESPEARE_GPT", "SHAKESPEARE_SFT", "load_or_finetune", "load_or_pretrain",
           "load_or_train_digits_vit", "shakespeare_gpt_config", "shakespeare_gpt_data", "sft_eval_examples"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHAKESPEARE_GPT = REPO_ROOT / "data" / "checkpoints" / "shakespeare_gpt"
SHAKESPEARE_SFT = REPO_ROOT / "data" / "checkpoints" / "shakespeare_sft"
CONTEXT = 128
# 1,500 steps: the validation loss stops improving around step 1,200 (5.14) while the training loss keeps falling
TRAINING = dict(max_steps=1500, batch_size=32, lr=3e-3, min_lr_ratio=0.1, warmup_steps=30, weight_decay=0.1,
                grad_clip=1.0, eval_every=100, eval_batches=16, seed=0)


def _load_if_present(path, device) -> tuple[GPT2, dict] | None:
    """(model, info) from `<path>.safetensors` + `.json` (strict keys) if both exist, else None."""
    st_path, json_path = checkpoint_paths(path)
    if not (st_path.exists() and json_path.exists()):
        return None
    info = read_checkpoint_info(path)
    model = GPT2(GPT2Config(**info["config"]))
    load_checkpoint(path, model)
    return model.to(device).eval(), info


def shakespeare_gpt_config() -> GPT2Config:
    """GPT-2's architecture at toy size: 4 layers, width 128, 4 heads, context 128, our tokenizer's vocabulary."""
    return GPT2Config(vocab_size=get_tokenizer("shakespeare").n_vocab, context_length=CONTEXT, d_model=128,
                      n_layers=4, n_heads=4, dropout=0.0)


def shakespeare_gpt_data(context_length: int = CONTEXT) -> tuple[TokenWindows, TokenWindows]:
    """(train, validation) windows of Tiny Shakespeare in our tokenizer: 90/10 contiguous split; training
    windows overlap by half (stride context/2), validation windows do not."""
    train_ids, val_ids = train_val_split(tokenize_corpus("tinyshakespeare", "shakespeare"), 0.1)
    return TokenWindows(train_ids, context_length, context_length // 2), TokenWindows(val_ids, context_length)


def load_or_pretrain(path: str | pathlib.Path = SHAKESPEARE_GPT, device: torch.device | str = "cpu",
                     progress: bool = True, **training) -> tuple[GPT2, dict]:
    """The model from `<path>.safetensors` + `.json` if present (strict keys), else train it and save it."""
    if (committed := _load_if_present(path, device)) is not None:
        return committed
    settings = {**TRAINING, **training}
    cfg = shakespeare_gpt_config()
    torch.manual_seed(settings["seed"])
    model = GPT2(cfg)
    train, val = shakespeare_gpt_data(cfg.context_length)
    trainer = Trainer(model, train, val, TrainConfig(**settings, progress=progress), device=device)
    start = time.perf_counter()
    history = trainer.train()
    metadata = {
        **settings,
        "steps": settings["max_steps"],
        "data": "Tiny Shakespeare, tokenizer 'shakespeare' (4,096 BPE ranks), first 90% for training in windows of "
                f"{cfg.context_length} tokens with stride {cfg.context_length // 2}, last 10% for validation",
        "tokens_seen": trainer.tokens_seen,
        "train_seconds": round(time.perf_counter() - start, 1),
        "device": str(trainer.device),
        "torch": torch.__version__,
        "loss_log": {"step": history.step, "train_loss": [round(x, 4) for x in history.train_loss],
                     "val_step": history.val_step, "val_loss": [round(x, 4) for x in history.val_loss]},
    }
    save_checkpoint(path, model.cpu(), dataclasses.asdict(cfg), metadata)
    return model.to(device).eval(), read_checkpoint_info(path)


# Supervised fine-tuning of shakespeare_gpt on every task family (llm_scratch.tasks), packed rows of 128
# tokens. examples_per_family distinct training examples per family, cycled for max_steps steps.
SFT_TRAINING = dict(max_steps=1500, batch_size=16, lr=1e-3, min_lr_ratio=0.1, warmup_steps=50, weight_decay=0.0,
                    grad_clip=1.0, eval_every=100, eval_batches=8, seed=0, examples_per_family=3000,
                    eval_per_family=50)


def sft_eval_examples(n_per_family: int = SFT_TRAINING["eval_per_family"]):
    """The held-out examples the SFT model's recorded accuracy is measured on (test split, every family)."""
    from llm_scratch.tasks import make_tasks

    return make_tasks(n_per_family, "test")


def _finetune(model: GPT2, settings: dict, progress: bool, device) -> tuple[Trainer, float]:
    from llm_scratch.tasks import make_tasks
    from llm_scratch.training.sft import sft_trainer

    train = make_tasks(settings["examples_per_family"], "train", seed=settings["seed"])
    val = make_tasks(20, "validation", seed=settings["seed"])
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k not in ("examples_per_family", "eval_per_family")},
                      progress=progress)
    trainer = sft_trainer(model, get_tokenizer("shakespeare"), train, val, cfg, device=device)
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def load_or_finetune(path: str | pathlib.Path = SHAKESPEARE_SFT, device: torch.device | str = "cpu",
                     progress: bool = True) -> tuple[GPT2, dict]:
    """The SFT model from `<path>.safetensors` + `.json` if present, else fine-tune shakespeare_gpt and save it.

    Training also runs the same fine-tuning from random weights (not saved), so the JSON can record what
    pretraining is worth: greedy exact-match accuracy per family on `sft_eval_examples()` for the base
    model, the fine-tuned model, and the fine-tuned random-init model.
    """
    from llm_scratch.training.sft import evaluate_tasks

    if (committed := _load_if_present(path, device)) is not None:
        return committed
    settings = dict(SFT_TRAINING)
    tokenizer = get_tokenizer("shakespeare")
    evaluation = sft_eval_examples()
    base, base_info = load_or_pretrain(device=device, progress=progress)
    accuracy = {"pretrained_base": evaluate_tasks(base, tokenizer, evaluation)}
    torch.manual_seed(settings["seed"])
    control = GPT2(GPT2Config(**base_info["config"]))
    control_trainer, control_seconds = _finetune(control, settings, progress, device)
    accuracy["random_init_sft"] = evaluate_tasks(control, tokenizer, evaluation)
    trainer, seconds = _finetune(base, settings, progress, device)
    accuracy["pretrained_sft"] = evaluate_tasks(base, tokenizer, evaluation)

    def log(t: Trainer) -> dict:
        h = t.history
        return {"step": h.step, "train_loss": [round(x, 4) for x in h.train_loss], "val_step": h.val_step,
                "val_loss": [round(x, 4) for x in h.val_loss]}

    metadata = {
        **settings,
        "steps": settings["max_steps"],
        "base_model": "shakespeare_gpt (data/checkpoints/shakespeare_gpt)",
        "data": f"llm_scratch.tasks.make_tasks({settings['examples_per_family']}, 'train', seed={settings['seed']}): "
                "every family, chat template (loss on the assistant's answer and <|im_end|>), packed rows of "
                f"{base.cfg.context_length} tokens; validation make_tasks(20, 'validation')",
        "evaluation": f"greedy generation, exact match by Example.check, on make_tasks({settings['eval_per_family']}, "
                      "'test') (sft_eval_examples())",
        "accuracy": {name: {k: round(v, 4) for k, v in acc.items()} for name, acc in accuracy.items()},
        "tokens_seen": trainer.tokens_seen,
        "train_seconds": round(seconds, 1),
        "random_init_train_seconds": round(control_seconds, 1),
        "device": str(trainer.device),
        "torch": torch.__version__,
        "loss_log": log(trainer),
        "random_init_loss_log": log(control_trainer),
    }
    save_checkpoint(path, base.cpu(), base_info["config"], metadata)
    return base.to(device).eval(), read_checkpoint_info(path)


# --- a small ViT on the 8 x 8 digits (the vision encoder of the vision-language notebook) ------------------------

DIGITS_VIT = REPO_ROOT / "data" / "checkpoints" / "digits_vit"
# the ViT notebook's model (patch 2 -> 16 patches, width 64, 3 layers) trained twice as long: 20 epochs of the
# 1,438 training images at batch 48 (30 steps an epoch), cosine to 0 after 30 warm-up steps
DIGITS_VIT_TRAINING = dict(max_steps=600, batch_size=48, lr=1.5e-3, min_lr_ratio=0.0, warmup_steps=30,
                           weight_decay=0.05, grad_clip=None, eval_every=150, eval_batches=7, seed=0)


def load_or_train_digits_vit(path: str | pathlib.Path = DIGITS_VIT, device: torch.device | str = "cpu",
                             progress: bool = True) -> tuple[ViT, dict]:
    """A ViT trained on data.load_digits()'s training split, from `<path>.safetensors` + `.json` if present (strict
    keys), else trained (about 30 s on a laptop CPU) and saved; the JSON records the held-out accuracy."""
    st_path, json_path = checkpoint_paths(path)
    if st_path.exists() and json_path.exists():
        info = read_checkpoint_info(path)
        model = ViT(ViTConfig(**info["config"]))
        load_checkpoint(path, model)
        return model.to(device).eval(), info
    from llm_scratch.data import load_digits

    train_x, train_y, test_x, test_y = load_digits()
    settings = dict(DIGITS_VIT_TRAINING)
    torch.manual_seed(settings["seed"])
    cfg = ViTConfig(image_size=8, patch_size=2, n_channels=1, d_model=64, n_layers=3, n_heads=4, ffn_hidden=128,
                    n_classes=10, layer_norm_eps=1e-6)
    model = ViT(cfg)
    trainer = Trainer(model, list(zip(train_x, train_y, strict=True)), list(zip(test_x, test_y, strict=True)),
                      TrainConfig(**settings, progress=progress), device=device)
    start = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = {name: (model(x.to(trainer.device)).argmax(-1).cpu() == y).float().mean().item()
                    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y))}
    metadata = {
        **settings,
        "data": f"llm_scratch.data.load_digits(): {len(train_y)} training images (the loss is on them), "
                f"{len(test_y)} held-out images (the validation loss and the test accuracy)",
        "accuracy": {k: round(v, 4) for k, v in accuracy.items()},
        "train_seconds": round(seconds, 1),
        "device": str(trainer.device),
        "torch": torch.__version__,
        "loss_log": {"step": history.step, "train_loss": [round(x, 4) for x in history.train_loss],
                     "val_step": history.val_step, "val_loss": [round(x, 4) for x in history.val_loss]},
    }
    save_checkpoint(path, model.cpu(), cfg.to_dict(), metadata)
    return model.to(device).eval(), read_checkpoint_info(path)
