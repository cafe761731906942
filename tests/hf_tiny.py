"""Tiny Hugging Face pieces built in the tests (no download) for the TRL reference tests: a one-character-per-token
tokenizer and a small random GPT2LMHeadModel with weights far from uniform."""

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast


def char_tokenizer(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    """One token per character (WordLevel over single characters), <eos> and <pad> as special tokens."""
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # decode joins the characters without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


def tiny_gpt2(seed: int, vocab_size: int, n_embd: int, n_positions: int) -> GPT2LMHeadModel:
    """A 2-layer GPT2LMHeadModel without dropout, <pad> = 0 and <eos> = 1, its weights perturbed by N(0, 0.1²)
    (larger than the 0.02 init, so the log-probabilities are far from uniform)."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=n_embd, n_layer=2, n_head=n_embd // 8, n_positions=n_positions, vocab_size=vocab_size,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0, bos_token_id=1,
                        eos_token_id=1, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model
