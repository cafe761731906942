"""Supervised fine-tuning (SFT): instruction data in the chat template, a loss on the answers only, packing,
and evaluation by generating answers and grading them.

    data = SFTDataset(tokenizer, make_tasks(500, "train"), context_length=128, pack=True)
    trainer = Trainer(model, data, val_data, TrainConfig(max_steps=300), collate=data.collate)
    trainer.train()
    accuracy = evaluate_tasks(model, tokenizer, make_tasks(20, "test"))   # {"add": 0.35, ..., "all": 0.52}

Each task example becomes a two-turn conversation -- user: the instruction (and its input on the next
line); assistant: the answer -- rendered with `llm_scratch.tokenizer.chat` (ChatML markers, special tokens
of the project's tokenizer). Training is next-token prediction on that text with the targets of every
token the assistant did not write set to -100 (ignored): the model is not taught to predict the user's
question, only to answer it, and the assistant's closing <|im_end|> is a target too, so the model learns
when to stop (Ouyang et al. 2022 train on the demonstration's completion only; InstructGPT, section 3.5).

Packing (Raffel et al. 2020, T5, section 3.5.2; Krell et al. 2021, "Efficient Sequence Packing without
Cross-contamination"): SFT examples are short, so a batch padded to its longest example is mostly
padding. Packing places several examples end to end in one row of up to `context_length` tokens. To keep
each example computed exactly as if it were alone, the row gets (1) a block-diagonal causal attention
mask, so no token attends to another example, and (2) position ids that restart at 0 with each example.
Then the packed loss equals the unpacked one (a test checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm_scratch.generation import generate
from llm_scratch.tasks import Example
from llm_scratch.tokenizer.chat import IM_END, encode_chat
from llm_scratch.training.engine import TrainConfig, Trainer
from llm_scratch.training.losses import IGNORE_INDEX

__all__ = [
    "SFTDataset",
    "accuracy_by_family",
    "collate_sft",
    "encode_example",
    "encode_prompt",
    "evaluate_tasks",
    "generate_answers",
    "left_pad",
    "pack_sequences",
    "packed_attention_mask",
    "packed_positions",
    "sft_trainer",
    "task_messages",
]


# --- examples as conversations --------------------------------------------------------------------------

def task_messages(example: Example, with_answer: bool = True) -> list[dict]:
    """The example as a conversation: the user asks (instruction, then the input on its own line), the
    assistant answers. with_answer=False leaves the assistant's turn out (the prompt for generation)."""
    question = example.instruction + (f"\n{example.input}" if example.input else "")
    messages = [{"role": "user", "content": question}]
    if with_answer:
        messages.append({"role": "assistant", "content": example.answer})
    return messages


def encode_example(tokenizer, example: Example) -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation, and per token whether the assistant wrote it (the loss mask)."""
    return encode_chat(tokenizer, task_messages(example))


def encode_prompt(tokenizer, example: Example) -> list[int]:
    """The user's turn plus an open assistant turn: what the model continues at evaluation time."""
    return encode_chat(tokenizer, task_messages(example, with_answer=False), add_generation_prompt=True)[0]


def _end_of_turn_id(tokenizer) -> int:
    ids = tokenizer.encode(IM_END, allowed_special={IM_END})
    if len(ids) != 1:
        raise ValueError(f"the tokenizer has no special token {IM_END!r}")
    return ids[0]


# --- packing ----------------------------------------------------------------------------------------------

def pack_sequences(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group sequence indexes into rows whose lengths sum to at most `capacity` (first fit, in order).

    Each sequence goes into the first row with room for it, else into a new row, so the result depends only
    on the lengths; rows keep their sequences in the original order.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"sequence {i} has length {n}; lengths must be in [1, capacity={capacity}]")
        row = next((r for r, free in enumerate(room) if free >= n), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= n
    return rows


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids (B, T) -> (B, T, T) bool: query t may attend to key s only within its own segment.

    The model adds the causal mask on top, so each segment sees a causal mask of its own: block-diagonal
    causal attention.
    """
    return segment_ids[:, :, None] == segment_ids[:, None, :]


def packed_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids (B, T) -> (B, T) position ids that restart at 0 at the start of every segment."""
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    # the column where the current segment began: running maximum of the start columns
    segment_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - segment_start


# --- the dataset ------------------------------------------------------------------------------------------

def _shift(ids: list[int], loss_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, loss_mask) of length n -> inputs ids[:-1] and targets ids[1:], targets -100 where not trained."""
    ids_t = torch.tensor(ids, dtype=torch.long)
    trained = torch.tensor(loss_mask[1:], dtype=torch.bool)
    return ids_t[:-1], torch.where(trained, ids_t[1:], IGNORE_INDEX)


def collate_sft(rows: list[list[tuple[torch.Tensor, torch.Tensor]]], pad_id: int, packed: bool = False
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A batch of rows, each a list of (inputs, targets) segments -> (model inputs, targets (B, T)).

    Rows are right-padded to the longest one with pad_id (targets -100 there). Model inputs: input_ids and
    padding_mask; with packed=True instead attn_mask (block-diagonal: the padding is a segment of its own,
    which no real token can see) and positions (restarting per segment). Unpacked rows hold one segment.
    """
    if not packed and any(len(row) != 1 for row in rows):
        raise ValueError("unpacked rows must hold exactly one sequence each; use packed=True for more")
    T = max(sum(len(x) for x, _ in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    segment_ids = torch.zeros(B, T, dtype=torch.long)  # 0 = padding, 1.. = the row's sequences
    for b, row in enumerate(rows):
        start = 0
        for s, (x, y) in enumerate(row, start=1):
            input_ids[b, start:start + len(x)] = x
            targets[b, start:start + len(x)] = y
            segment_ids[b, start:start + len(x)] = s
            start += len(x)
    if packed:
        return {"input_ids": input_ids, "attn_mask": packed_attention_mask(segment_ids),
                "positions": packed_positions(segment_ids)}, targets
    return {"input_ids": input_ids, "padding_mask": segment_ids > 0}, targets


class SFTDataset:
    """Task examples encoded for SFT; items are rows of (inputs, targets) segments, batched by `collate`.

    context_length: the longest row (in input tokens) the model takes; an example that does not fit is an
        error, never silently cut.
    pack: several examples per row (first fit), with a block-diagonal mask; otherwise one example per row.
    """

    def __init__(self, tokenizer, examples: Sequence[Example], context_length: int, pack: bool = False,
                 pad_id: int | None = None):
        if not examples:
            raise ValueError("examples is empty")
        self.examples = list(examples)
        self.pack = pack
        self.pad_id = pad_id if pad_id is not None else _end_of_turn_id(tokenizer)  # masked anyway
        self.sequences = [_shift(*encode_example(tokenizer, ex)) for ex in self.examples]
        lengths = [len(x) for x, _ in self.sequences]
        for i, n in enumerate(lengths):
            if n > context_length:
                raise ValueError(f"example {i} ({self.examples[i].family!r}) needs {n} tokens, more than "
                                 f"context_length={context_length}")
        self.rows = pack_sequences(lengths, context_length) if pack else [[i] for i in range(len(lengths))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.sequences[j] for j in self.rows[i]]

    def collate(self, items: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return collate_sft(items, self.pad_id, packed=self.pack)

    def stats(self) -> dict[str, float]:
        """Sequences, rows, tokens, trained (assistant) tokens, and how full the rows are."""
        tokens = sum(len(x) for x, _ in self.sequences)
        longest = max(sum(len(self.sequences[j][0]) for j in row) for row in self.rows)
        return {"sequences": len(self.sequences), "rows": len(self.rows), "tokens": tokens,
                "trained_tokens": sum(int((y != IGNORE_INDEX).sum()) for _, y in self.sequences),
                "fill": tokens / (len(self.rows) * longest)}


def sft_trainer(model, tokenizer, train_examples: Sequence[Example], val_examples: Sequence[Example],
                cfg: TrainConfig, context_length: int | None = None, pack: bool = True,
                device: torch.device | str | None = None) -> Trainer:
    """The project's Trainer set up for SFT: packed training rows, unpacked validation rows, loss on answers."""
    context_length = context_length or model.cfg.context_length
    train = SFTDataset(tokenizer, train_examples, context_length, pack=pack)
    val = SFTDataset(tokenizer, val_examples, context_length, pack=False)

    def collate(items):  # validation items hold one sequence each, training rows one or more
        return collate_sft(items, train.pad_id, packed=pack)

    return Trainer(model, train, val, cfg, device=device, collate=collate)


# --- evaluation by generation ---------------------------------------------------------------------------

def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (ids (B, T), padding_mask (B, T)), padded on the left as generation needs."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = True
    return ids, mask


@torch.no_grad()
def generate_answers(model, tokenizer, examples: Sequence[Example], max_new_tokens: int = 16,
                     batch_size: int = 64, temperature: float = 0.0, top_p: float | None = None,
                     generator: torch.Generator | None = None) -> list[str]:
    """The model's answer to each example's prompt: generated (greedy by default) until <|im_end|>.

    Prompts are left-padded in batches; the answer is the text before the first <|im_end|> (all of the
    generated text if the model never closed its turn within max_new_tokens).
    """
    end = _end_of_turn_id(tokenizer)
    device = next(model.parameters()).device
    limit = getattr(getattr(model, "cfg", None), "context_length", None)
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        prompts = [encode_prompt(tokenizer, ex) for ex in examples[start:start + batch_size]]
        T = max(len(p) for p in prompts)
        if limit is not None and T + max_new_tokens > limit:
            raise ValueError(f"a prompt of {T} tokens plus max_new_tokens={max_new_tokens} exceeds the context "
                             f"length {limit}")
        ids, mask = left_pad(prompts, end)
        out = generate(model, ids.to(device), max_new_tokens, temperature=temperature, top_p=top_p,
                       eos_token_id=end, padding_mask=mask.to(device), generator=generator)
        for row in out[:, T:].tolist():
            row = row[:row.index(end)] if end in row else row
            answers.append(tokenizer.decode(row))
    return answers


def evaluate_tasks(model, tokenizer, examples: Sequence[Example], **generation) -> dict[str, float]:
    """Exact-match accuracy (each example's own checker) per task family, and over all examples ("all")."""
    return accuracy_by_family(examples, generate_answers(model, tokenizer, examples, **generation))


def accuracy_by_family(examples: Sequence, answers: Sequence[str]) -> dict[str, float]:
    """Share of answers each example's own `check` accepts, per family and over all examples ("all")."""
    right: dict[str, list[bool]] = {}
    for ex, answer in zip(examples, answers, strict=True):
        right.setdefault(ex.family, []).append(ex.check(answer))
    accuracy = {family: sum(r) / len(r) for family, r in right.items()}
    accuracy["all"] = sum(sum(r) for r in right.values()) / len(examples)
    return accuracy
