"""Context extension, measured: a tiny RoPE decoder trained on short text, run on longer text.

The pieces of notebook 02/04's experiment:

- `TinyRopeConfig`, `TinyRopeDecoder`: byte embedding -> n_layers x [RMSNorm -> grouped-query
  attention with RoPE -> residual -> RMSNorm -> GELU MLP -> residual] -> RMSNorm -> LM head.
  `set_rope_scaling` swaps every layer's `RotaryEmbedding` for one with a given `RopeScaling` and the
  same weights: how PI, NTK, YaRN or Llama 3 scaling are applied to a trained model without any
  fine-tuning.
- data from Tiny Shakespeare, read as bytes (the corpus is ASCII): `shakespeare_splits` (90 % to
  train on, the last 10 % held out), `text_windows` (random windows for language modeling) and
  `passkey_batch` (a passkey hidden at a random depth in Shakespeare, to be recalled at the end).
- `train_short_context_model` trains on one length; `evaluate` measures held-out perplexity and
  passkey accuracy at other lengths under a given scaling; `load_or_train` caches the trained model
  as a committed checkpoint (`data/checkpoints/rope_context_extension.*`, rebuilt by `make artifacts`).

Vocabulary: 128 ids, one per ASCII byte. Two control bytes that never occur in the text stand for the
passkey prompt's sentences: KEY_MARKER ("the pass key is") and QUERY_MARKER ("what is the pass key?").
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llm_scratch.attention.gqa import GroupedQueryAttention
from llm_scratch.checkpoint import checkpoint_paths, load_checkpoint, read_checkpoint_info, save_checkpoint
from llm_scratch.data import load_corpus
from llm_scratch.device import seed_everything
from llm_scratch.norm import RMSNorm
from llm_scratch.position.rope import RopeScaling, RotaryEmbedding

__all__ = [
    "CHECKPOINT",
    "DIGITS",
    "KEY_MARKER",
    "METHODS",
    "QUERY_MARKER",
    "VOCAB_SIZE",
    "PasskeyBatch",
    "TinyRopeConfig",
    "TinyRopeDecoder",
    "decode_ids",
    "encode_text",
    "evaluate",
    "load_or_train",
    "lm_loss",
    "passkey_batch",
    "scaling_for_length",
    "shakespeare_splits",
    "text_windows",
    "train_short_context_model",
]

VOCAB_SIZE = 128  # one id per ASCII byte
KEY_MARKER = 1  # "the pass key is": the key's digits follow
QUERY_MARKER = 2  # "what is the pass key?": the model must answer with the digits
DIGITS = torch.arange(ord("0"), ord("9") + 1)  # the ids of the ten digit bytes

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECKPOINT = REPO_ROOT / "data" / "checkpoints" / "rope_context_extension"

# the context-extension methods compared in the notebook; "none" is plain RoPE run past its length
METHODS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")


# ---------------------------------------------------------------------------------------------------
# the model


@dataclass
class TinyRopeConfig:
    """A decoder small enough to train on a laptop CPU in minutes.

    train_len is the length the model is trained on (RoPE's "original_max_position_embeddings");
    nothing in the model enforces it: positions beyond it are exactly what the experiment probes.
    """

    vocab_size: int = VOCAB_SIZE
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (multi-head attention)
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    train_len: int = 128
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_ratio", "train_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.vocab_size < VOCAB_SIZE:
            raise ValueError(f"vocab_size must be >= {VOCAB_SIZE} (one id per ASCII byte), got {self.vocab_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head_dim = d_model / n_heads must be even for RoPE, got {self.d_model // self.n_heads}")
        kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if not isinstance(kv, int) or kv < 1 or self.n_heads % kv:
            raise ValueError(
                f"n_kv_heads must be a positive divisor of n_heads ({self.n_heads}), got {self.n_kv_heads!r}"
            )
        if not self.rope_base > 1:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TinyRopeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TinyRopeConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TinyRopeConfig, rope: RotaryEmbedding):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = GroupedQueryAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, rope=rope)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        hidden = cfg.mlp_ratio * cfg.d_model
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyRopeDecoder(nn.Module):
    """A causal language model whose only position signal is RoPE inside attention."""

    def __init__(self, cfg: TinyRopeConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        rope = RotaryEmbedding(cfg.head_dim, cfg.rope_base)  # no parameters: one module serves every layer
        self.blocks = nn.ModuleList(Block(cfg, rope) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def rope(self) -> RotaryEmbedding:
        return self.blocks[0].attn.rope

    def set_rope_scaling(self, scaling: RopeScaling | None) -> None:
        """Give every layer a RotaryEmbedding with `scaling` (None = plain RoPE). Weights are untouched:
        only the rotation angles (and, for YaRN, the attention temperature) change."""
        rope = RotaryEmbedding(self.cfg.head_dim, self.cfg.rope_base, scaling=scaling).to(self.tok_emb.weight.device)
        for block in self.blocks:
            block.attn.rope = rope

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V) for the next token at every position."""
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def scaling_for_length(method: str, length: int, train_len: int) -> RopeScaling | None:
    """The RopeScaling one would configure to run a model trained on `train_len` tokens at `length`.

    Static methods (linear, ntk, yarn, llama3) get the extension factor s = length / train_len (1 when
    length <= train_len, which leaves RoPE unchanged) and the published defaults for everything else
    (YaRN β=32, α=1; Llama 3 low/high_freq_factor 1 and 4). Dynamic NTK gets factor 1: it computes its
    own scale from the length it is run at, s_T = T / train_len, so it needs no target length. "none"
    is plain RoPE (None).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if length < 1 or train_len < 1:
        raise ValueError(f"length and train_len must be positive, got length={length}, train_len={train_len}")
    if method == "none":
        return None
    factor = 1.0 if method == "dynamic" else max(length / train_len, 1.0)
    return RopeScaling(rope_type=method, factor=factor, original_max_position_embeddings=train_len)


# ---------------------------------------------------------------------------------------------------
# data


def encode_text(text: str) -> torch.Tensor:
    """ASCII text -> 1-D int64 tensor of byte ids; anything outside ASCII or a marker byte is an error."""
    raw = text.encode("utf-8")
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    bad = (ids >= VOCAB_SIZE) | (ids == KEY_MARKER) | (ids == QUERY_MARKER)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"text must be ASCII without bytes {KEY_MARKER} and {QUERY_MARKER}; byte {i} is {raw[i]}")
    return ids


def decode_ids(ids: torch.Tensor | Sequence[int]) -> str:
    """Byte ids -> text, the two markers shown as [KEY] and [QUERY]."""
    names = {KEY_MARKER: "[KEY]", QUERY_MARKER: "[QUERY]"}
    return "".join(names.get(int(i), chr(int(i))) for i in ids)


def shakespeare_splits(val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiny Shakespeare as byte ids: (the first 1 - val_fraction to train on, the rest held out)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids = encode_text(load_corpus("tinyshakespeare"))
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


def text_windows(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """`batch_size` windows of `seq_len` consecutive ids, at uniformly random offsets of `ids`: (B, T)."""
    if ids.dim() != 1 or len(ids) < seq_len:
        raise ValueError(f"ids must be 1-D and at least seq_len={seq_len} long, got shape {tuple(ids.shape)}")
    starts = torch.randint(0, len(ids) - seq_len + 1, (batch_size,), generator=generator)
    return ids[starts[:, None] + torch.arange(seq_len)]


@dataclass
class PasskeyBatch:
    """tokens (B, T); loss_mask (B, T), True on the answer digits (the tokens the model must predict);
    key_pos (B,) the position of the key marker; keys (B, k) the digits' ids."""

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    key_pos: torch.Tensor
    keys: torch.Tensor


def passkey_batch(
    filler: torch.Tensor,
    batch_size: int,
    seq_len: int,
    key_len: int = 5,
    generator: torch.Generator | None = None,
) -> PasskeyBatch:
    """Passkey retrieval (Mohtashami & Jaggi 2023, arXiv:2305.16300) hidden in text from `filler`.

    Each sequence is  [text ...] KEY d1..dk [text ...] QUERY d1..dk  of exactly seq_len tokens: a
    random window of `filler` (1-D ids), with k random digits after the key marker at a uniformly
    random position and, at the end, the query marker and the same digits. The model reads the whole
    sequence (teacher forcing); it succeeds when its prediction at QUERY is d1 and at each answer
    digit the next digit. Because each prediction sees the *true* earlier digits, "all k argmax
    predictions right" is exactly "greedy decoding after QUERY reproduces the key", so accuracy needs
    one forward pass, not k. Nothing but the key's content links the answer to the key, and the key
    may sit at any depth, so the model must retrieve across every distance up to seq_len.
    """
    if key_len < 1 or seq_len < 2 * key_len + 2:
        raise ValueError(f"seq_len must be >= 2 * key_len + 2 = {2 * key_len + 2}, got seq_len={seq_len}")
    tokens = text_windows(filler, batch_size, seq_len, generator).clone()
    keys = DIGITS[torch.randint(0, 10, (batch_size, key_len), generator=generator)]
    query_pos = seq_len - key_len - 1
    # the key block (marker + k digits) must end before the query marker
    key_pos = torch.randint(0, query_pos - key_len, (batch_size,), generator=generator)
    rows = torch.arange(batch_size)
    tokens[rows, key_pos] = KEY_MARKER
    tokens[rows[:, None], key_pos[:, None] + torch.arange(1, key_len + 1)] = keys
    tokens[:, query_pos] = QUERY_MARKER
    tokens[:, query_pos + 1:] = keys
    loss_mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    loss_mask[:, query_pos + 1:] = True
    return PasskeyBatch(tokens, loss_mask, key_pos, keys)


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross entropy: logits (B, T, V) at t predict tokens[t+1]; loss_mask (B, T) marks
    the tokens that count as targets (default: all but the first, which nothing predicts)."""
    logits, targets = logits[:, :-1], tokens[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask[:, 1:].reshape(-1).to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------
# training and evaluation


def train_short_context_model(
    config: TinyRopeConfig,
    train_ids: torch.Tensor,
    train_len: int | None = None,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    key_len: int = 5,
    warmup: int = 50,
    weight_decay: float = 0.01,
    log_every: int = 10,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[TinyRopeDecoder, list[dict]]:
    """Train a TinyRopeDecoder on sequences of `train_len` tokens (default config.train_len) of `train_ids`.

    Each step draws a fresh batch: half plain text windows (loss on every next byte), half passkey
    sequences (loss on the answer digits), and minimizes the sum of the two mean losses. AdamW, linear
    warm-up for `warmup` steps, then cosine decay to lr/10; gradients clipped at norm 1. Returns the
    model (in eval mode) and a loss log: one dict {"step", "loss", "text_loss", "passkey_loss", "lr"}
    every `log_every` steps (losses averaged over those steps).
    """
    train_len = config.train_len if train_len is None else train_len
    if steps < 1 or batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got steps={steps}, batch_size={batch_size}")
    seed_everything(seed)
    device = torch.device(device)
    model = TinyRopeDecoder(config).to(device)
    # weight decay on matrices only (embeddings, projections), not on norms' gains or biases
    groups = [
        {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress_ = (step - warmup) / max(steps - warmup, 1)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_)))

    gen = torch.Generator().manual_seed(seed)
    half = batch_size // 2
    log: list[dict] = []
    sums = [0.0, 0.0, 0.0]
    model.train()
    bar = tqdm(range(steps), desc="training", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        text = text_windows(train_ids, batch_size - half, train_len, gen)
        pk = passkey_batch(train_ids, half, train_len, key_len, gen)
        tokens = torch.cat([text, pk.tokens]).to(device)
        logits = model(tokens)
        text_loss = lm_loss(logits[:batch_size - half], tokens[:batch_size - half])
        pk_loss = lm_loss(logits[batch_size - half:], tokens[batch_size - half:], pk.loss_mask.to(device))
        loss = text_loss + pk_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for i, v in enumerate((loss, text_loss, pk_loss)):
            sums[i] += v.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            entry = {"step": step + 1, "loss": sums[0] / n, "text_loss": sums[1] / n, "passkey_loss": sums[2] / n,
                     "lr": lr_at(step)}
            log.append({k: round(v, 5) if isinstance(v, float) else v for k, v in entry.items()})
            sums = [0.0, 0.0, 0.0]
            bar.set_postfix(loss=f"{entry['loss']:.3f}")
    model.eval()
    return model, log


ScalingSpec = RopeScaling | None | Callable[[int], RopeScaling | None]


@torch.no_grad()
def evaluate(
    model: TinyRopeDecoder,
    scaling: ScalingSpec,
    lengths: Sequence[int],
    text_ids: torch.Tensor,
    n_windows: int = 16,
    n_passkey: int = 64,
    batch_size: int = 16,
    key_len: int = 5,
    seed: int = 1234,
) -> list[dict]:
    """Perplexity on `text_ids` and passkey accuracy at each length, with RoPE `scaling`.

    `scaling` is a RopeScaling, None (plain RoPE), or a function length -> RopeScaling | None, for a
    factor chosen per length (e.g. `lambda n: scaling_for_length("yarn", n, train_len)`). The data for
    each length come from `seed`, so every scaling is scored on the same windows and keys. The model's
    RoPE is restored afterwards.
    Returns one dict per length: {"length", "perplexity", "passkey_accuracy"}: perplexity =
    exp(mean next-byte loss over every position of n_windows windows), accuracy = fraction of the
    n_passkey sequences (text from `text_ids`) whose every answer digit is the argmax prediction.
    """
    device = model.tok_emb.weight.device
    original = model.rope.scaling
    was_training = model.training
    model.eval()
    results = []
    try:
        for length in lengths:
            model.set_rope_scaling(scaling(length) if callable(scaling) else scaling)
            gen = torch.Generator().manual_seed(seed + length)
            nll, count = 0.0, 0
            for start in range(0, n_windows, batch_size):
                tokens = text_windows(text_ids, min(batch_size, n_windows - start), length, gen).to(device)
                nll += lm_loss(model(tokens), tokens).item() * tokens.shape[0] * (length - 1)
                count += tokens.shape[0] * (length - 1)
            correct = 0
            for start in range(0, n_passkey, batch_size):
                pk = passkey_batch(text_ids, min(batch_size, n_passkey - start), length, key_len, gen)
                # logits at QUERY and at the first k-1 answer digits predict the k answer digits
                logits = model(pk.tokens.to(device))[:, -key_len - 1:-1]
                correct += (logits.argmax(-1).cpu() == pk.keys).all(dim=-1).sum().item()
            results.append({"length": length, "perplexity": math.exp(nll / count),
                            "passkey_accuracy": correct / n_passkey})
    finally:
        model.set_rope_scaling(original)
        model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------------
# the committed checkpoint

DEFAULT_CONFIG = TinyRopeConfig()
DEFAULT_TRAINING = {"steps": 1500, "batch_size": 32, "lr": 3e-3, "seed": 0, "key_len": 5}
DATA_DESCRIPTION = (
    "Tiny Shakespeare as ASCII bytes, first 90% (llm_scratch.data.load_corpus, "
    "llm_scratch.position.context_extension.shakespeare_splits); each batch is half random text windows "
    "(loss on every next byte) and half passkey_batch sequences (KEY marker + 5 random digits at a uniform "
    "position in a text window, QUERY marker + the same digits at the end; loss on the 5 answer digits)"
)


def load_or_train(
    path: str | pathlib.Path = CHECKPOINT,
    config: TinyRopeConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    **training,
) -> tuple[TinyRopeDecoder, dict]:
    """The trained model from `<path>.safetensors` + `<path>.json` if they exist, else train and save it.

    Loading builds the model from the JSON's config and loads the weights with strict keys (a stale
    checkpoint raises ValueError naming the keys). Training (minutes on a CPU) uses `config`
    (default DEFAULT_CONFIG) and DEFAULT_TRAINING updated with `training`, and writes the checkpoint
    atomically with the config, seed, data description, steps, wall time and loss log.
    Returns (model in eval mode on `device`, the checkpoint's JSON record).
    """
    st_path, json_path = checkpoint_paths(path)
    if st_path.exists() and json_path.exists():
        info = read_checkpoint_info(path)
        model = TinyRopeDecoder(TinyRopeConfig.from_dict(info["config"]))
        load_checkpoint(path, model)
        return model.to(device).eval(), info
    cfg = config or DEFAULT_CONFIG
    settings = {**DEFAULT_TRAINING, **training}
    train_ids, _ = shakespeare_splits()
    start = time.perf_counter()
    model, log = train_short_context_model(cfg, train_ids, device=device, progress=progress, **settings)
    seconds = time.perf_counter() - start
    metadata = {
        **settings,
        "train_len": cfg.train_len,
        "data": DATA_DESCRIPTION,
        "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.01 on matrices), warm-up 50 steps, cosine to lr/10",
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "loss_log": log,
    }
    save_checkpoint(path, model.cpu(), cfg.to_dict(), metadata)
    return model.to(device).eval(), read_checkpoint_info(path)
