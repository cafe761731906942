"""A small vision-language model in the LLaVA recipe (Liu et al. 2023, "Visual Instruction Tuning",
arXiv:2304.08485; the two-layer MLP projector of LLaVA-1.5, Liu et al. 2023, arXiv:2310.03744).

    image (C, H, W) -> frozen ViT -> patch features (N, D_v) -> projector MLP -> N vectors of width D_lm
    text  "<image>\\nWhat digit is this?"  -> ids with N image slots where "<image>" stood
    the LM's token embeddings, with the N slots overwritten by the image's N vectors -> decoder LM -> logits

The placeholder is expanded into N slots when the text is encoded (`ImagePlaceholderTokenizer`), so every length,
padding mask and loss target is known before the model runs; the model then writes each image's vectors into its
slots, in reading order. The slot id is -200, as in LLaVA: no vocabulary has it, so text can never forge an image,
and the LM's vocabulary and embedding stay as they were.

Training comes in two stages: (1) alignment, only the projector trains, on image -> caption pairs, so that the
projected patches land where the frozen LM can read them; (2) instruction tuning, the projector and the LM (or
LoRA adapters on the LM) train on image question -> answer pairs. The vision encoder stays frozen throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llm_scratch.generation import generate
from llm_scratch.models.vit import ViT
from llm_scratch.tokenizer.chat import IM_END, encode_chat
from llm_scratch.training.losses import IGNORE_INDEX
from llm_scratch.training.sft import accuracy_by_family, left_pad

__all__ = ["IMAGE_PLACEHOLDER", "IMAGE_TOKEN_ID", "ImagePlaceholderTokenizer", "VLMDataset", "VisionLanguageModel",
           "encode_image_example", "evaluate_image_examples", "generate_image_answers", "image_messages",
           "set_trainable"]

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_ID = -200  # LLaVA's IMAGE_TOKEN_INDEX: an id outside every vocabulary


class ImagePlaceholderTokenizer:
    """A tokenizer whose encode turns each "<image>" in the text into `n_image_tokens` copies of image_token_id
    (the image's slots); decode writes one "<image>" per run of slots. Everything else is the wrapped tokenizer's,
    so `encode_chat` works through it unchanged."""

    def __init__(self, tokenizer, n_image_tokens: int, image_token_id: int = IMAGE_TOKEN_ID,
                 placeholder: str = IMAGE_PLACEHOLDER):
        if not isinstance(n_image_tokens, int) or n_image_tokens < 1:
            raise ValueError(f"n_image_tokens must be a positive int, got {n_image_tokens!r}")
        if 0 <= image_token_id < tokenizer.n_vocab:
            raise ValueError(f"image_token_id {image_token_id} is a token of the vocabulary "
                             f"(0..{tokenizer.n_vocab - 1})")
        self.tokenizer, self.n_image_tokens = tokenizer, n_image_tokens
        self.image_token_id, self.placeholder = image_token_id, placeholder

    def encode(self, text: str, **kwargs) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(text.split(self.placeholder)):
            if i:
                ids.extend([self.image_token_id] * self.n_image_tokens)
            if piece:
                ids.extend(self.tokenizer.encode(piece, **kwargs))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out, text, previous = [], [], None
        for token in ids:
            if token == self.image_token_id:
                if previous != self.image_token_id:
                    out.append(self.tokenizer.decode(text) + self.placeholder)
                    text = []
            else:
                text.append(token)
            previous = token
        return "".join(out) + self.tokenizer.decode(text)

    def __getattr__(self, name):  # n_vocab, special tokens, ...: the wrapped tokenizer's
        return getattr(self.tokenizer, name)


class VisionLanguageModel(nn.Module):
    """vision (a ViT) + projector (Linear, GELU, Linear: LLaVA-1.5's) + language_model (a decoder of the models
    chapter with `embed_tokens` and `inputs_embeds`, e.g. GPT2, Llama3, Qwen3, Gemma3).

    The image features are the ViT's final (LayerNorm'd) states of the N patch tokens; the CLS token is dropped.
    (LLaVA takes CLIP's second-to-last layer instead: CLIP's last layer is tuned to its contrastive objective.)
    `freeze_vision` (default) sets requires_grad False on the ViT and computes its features without a graph.
    """

    def __init__(self, vision: ViT, language_model: nn.Module, image_token_id: int = IMAGE_TOKEN_ID,
                 freeze_vision: bool = True):
        super().__init__()
        for attr in ("embed_tokens", "init_caches", "cfg"):
            if not hasattr(language_model, attr):
                raise ValueError(f"language_model must be a decoder of llm_scratch.models (it has no {attr!r})")
        self.vision, self.language_model = vision, language_model
        self.image_token_id = image_token_id
        d_vision, d_text = vision.cfg.d_model, language_model.cfg.d_model
        self.projector = nn.Sequential(nn.Linear(d_vision, d_text), nn.GELU(), nn.Linear(d_text, d_text))
        if freeze_vision:
            vision.requires_grad_(False)

    @property
    def n_image_tokens(self) -> int:
        """Slots per image: the ViT's patch count at its configured image size."""
        return self.vision.cfg.grid ** 2

    @property
    def cfg(self):  # the language model's: generation reads context_length from it
        return self.language_model.cfg

    def init_caches(self, batch_size: int, max_len: int, dtype=None, device=None) -> list:
        return self.language_model.init_caches(batch_size, max_len, dtype=dtype, device=device)

    def _check_images(self, pixel_values: torch.Tensor) -> None:
        c = self.vision.cfg
        expected = (c.n_channels, c.image_size, c.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must have shape (n_images, {', '.join(map(str, expected))}), "
                             f"got {tuple(pixel_values.shape)}")

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (n, C, H, W) -> projected patch features (n, N, D_lm)."""
        self._check_images(pixel_values)
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = self.vision.hidden_states(pixel_values)[:, 1:]  # (n, N, D_v): the patches, not CLS
        return self.projector(features)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) with image slots -> (B, T, D_lm): token embeddings, and at the slots the images'
        vectors, image i (in reading order: row by row, left to right) filling the i-th run of N slots."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        slots = input_ids == self.image_token_id
        n_slots, N = int(slots.sum()), self.n_image_tokens
        text = self.language_model.embed_tokens(input_ids.masked_fill(slots, 0))  # slot ids are not in the vocab
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots // N} image placeholder(s) but no pixel_values were given")
            return text
        self._check_images(pixel_values)
        if n_slots == 0:
            raise ValueError(f"pixel_values holds {len(pixel_values)} image(s) but input_ids have no image "
                             f"placeholder (token id {self.image_token_id}): put {IMAGE_PLACEHOLDER!r} in the text")
        if n_slots != len(pixel_values) * N:
            raise ValueError(f"input_ids hold {n_slots} image slots ({n_slots / N:g} placeholders of {N} slots) "
                             f"but pixel_values holds {len(pixel_values)} image(s)")
        features = self.encode_images(pixel_values).to(text.dtype)  # (n, N, D)
        # masked_scatter fills the True positions in row-major order: image 0's N vectors, then image 1's, ...
        return text.masked_scatter(slots[..., None], features.reshape(-1, features.shape[-1]))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, caches: list | None = None, positions=None,
                last_only: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) with image slots, pixel_values (n_images, C, H, W) -> logits (B, T, V). The other
        arguments are the language model's (a cached decoding step passes new text tokens and no images)."""
        return self.language_model(padding_mask=padding_mask, caches=caches, positions=positions,
                                   last_only=last_only, attn_mask=attn_mask,
                                   inputs_embeds=self.embed(input_ids, pixel_values))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, max_new_tokens: int,
                 **generation) -> torch.Tensor:
        """`llm_scratch.generation.generate` with images: (B, T) prompt ids with image slots -> (B, T + new).
        The images enter where the prompt's slots are; with the KV cache (default) only the prefill sees them."""
        return generate(_WithImages(self, pixel_values), input_ids, max_new_tokens, **generation)


class _WithImages(nn.Module):
    """The VLM with its images bound, looking like a plain decoder to `generate`: a call whose ids hold image
    slots gets the images (the prefill, or every uncached step); a cached step of new tokens gets none."""

    def __init__(self, vlm: VisionLanguageModel, pixel_values: torch.Tensor | None):
        super().__init__()
        self.vlm, self.pixel_values = vlm, pixel_values
        self.cfg = vlm.cfg

    def init_caches(self, *args, **kwargs):
        return self.vlm.init_caches(*args, **kwargs)

    def forward(self, input_ids, **kwargs):
        has_slots = bool((input_ids == self.vlm.image_token_id).any())
        return self.vlm(input_ids, self.pixel_values if has_slots else None, **kwargs)


def set_trainable(vlm: VisionLanguageModel, projector: bool = True, language_model: bool = False,
                  vision: bool = False) -> int:
    """Which parts train (requires_grad); returns the number of trainable parameters. Stage 1 (alignment):
    the defaults. Stage 2 (instruction tuning): language_model=True (or apply LoRA to it afterwards: apply_lora
    freezes the base weights and adds trainable adapters)."""
    vlm.projector.requires_grad_(projector)
    vlm.language_model.requires_grad_(language_model)
    vlm.vision.requires_grad_(vision)
    return sum(p.numel() for p in vlm.parameters() if p.requires_grad)


# --- data ----------------------------------------------------------------------------------------------------

def image_messages(example, with_answer: bool = True) -> list[dict]:
    """A user turn with the image first, then the question; the assistant's answer unless with_answer=False."""
    messages = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{example.question}"}]
    if with_answer:
        messages.append({"role": "assistant", "content": example.answer})
    return messages


def encode_image_example(tokenizer: ImagePlaceholderTokenizer, example, with_answer: bool = True
                         ) -> tuple[list[int], list[bool]]:
    """Chat-template ids with the image's slots in the user turn, and the loss mask (True on the assistant's
    tokens only: never on image slots, the prompt or the template's role lines). Without the answer: the
    prompt with an open assistant turn, for generation."""
    return encode_chat(tokenizer, image_messages(example, with_answer), add_generation_prompt=not with_answer)


def _end_of_turn(tokenizer) -> int:
    return tokenizer.encode(IM_END, allowed_special={IM_END})[0]


class VLMDataset:
    """ImageExamples (tasks.make_digit_examples) with their images, for the Trainer: item i is example i;
    `collate` right-pads a batch into ({input_ids, pixel_values, padding_mask}, targets), targets[t] = ids[t + 1]
    where that token is the assistant's, else -100 (image slots, prompt, template, padding)."""

    def __init__(self, tokenizer: ImagePlaceholderTokenizer, examples: Sequence, images: torch.Tensor,
                 context_length: int):
        if not examples:
            raise ValueError("examples is empty")
        if images.dim() != 4:
            raise ValueError(f"images must have shape (n, C, H, W), got {tuple(images.shape)}")
        self.examples, self.images = list(examples), images
        self.pad_id = _end_of_turn(tokenizer)  # masked anyway
        self.sequences = []
        for i, ex in enumerate(self.examples):
            if not 0 <= ex.image < len(images):
                raise ValueError(f"examples[{i}].image = {ex.image} is not an index into the {len(images)} images")
            ids, mask = encode_image_example(tokenizer, ex)
            if len(ids) - 1 > context_length:
                raise ValueError(f"examples[{i}] needs {len(ids) - 1} tokens, more than context_length="
                                 f"{context_length}")
            ids_t = torch.tensor(ids)
            self.sequences.append((ids_t[:-1], torch.where(torch.tensor(mask[1:]), ids_t[1:], IGNORE_INDEX)))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        x, y = self.sequences[i]
        return x, y, self.images[self.examples[i].image]

    def collate(self, items: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        T = max(len(x) for x, _, _ in items)
        input_ids = torch.full((len(items), T), self.pad_id, dtype=torch.long)
        targets = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)
        padding_mask = torch.zeros(len(items), T, dtype=torch.bool)
        for b, (x, y, _) in enumerate(items):
            input_ids[b, :len(x)], targets[b, :len(x)], padding_mask[b, :len(x)] = x, y, True
        pixel_values = torch.stack([image for _, _, image in items])
        return {"input_ids": input_ids, "pixel_values": pixel_values, "padding_mask": padding_mask}, targets


@torch.no_grad()
def generate_image_answers(vlm: VisionLanguageModel, tokenizer: ImagePlaceholderTokenizer, examples: Sequence,
                           images: torch.Tensor, max_new_tokens: int = 12, batch_size: int = 64,
                           **generation) -> list[str]:
    """Each example's answer, generated (greedy by default) with the KV cache from a left-padded batch of prompts,
    cut at the first <|im_end|>."""
    end = _end_of_turn(tokenizer)
    device = next(vlm.projector.parameters()).device
    answers = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [encode_image_example(tokenizer, ex, with_answer=False)[0] for ex in chunk]
        ids, mask = left_pad(prompts, end)
        T = ids.shape[1]
        pixel_values = torch.stack([images[ex.image] for ex in chunk]).to(device)
        out = vlm.generate(ids.to(device), pixel_values, max_new_tokens, padding_mask=mask.to(device),
                           eos_token_id=end, **generation)
        for row in out[:, T:].tolist():
            answers.append(tokenizer.decode(row[:row.index(end)] if end in row else row))
    return answers


def evaluate_image_examples(vlm: VisionLanguageModel, tokenizer: ImagePlaceholderTokenizer, examples: Sequence,
                            images: torch.Tensor, **generation) -> dict[str, float]:
    """Accuracy per family (each example's own check) and over all examples ("all")."""
    return accuracy_by_family(examples, generate_image_answers(vlm, tokenizer, examples, images, **generation))
