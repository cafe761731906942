"""Byte-level BPE: our encoder against tiktoken on the same ranks (our trained ranks and GPT-2's), on the
whole corpus and on hard strings; round trips for arbitrary unicode; deterministic training; the
committed tokenizer equals what training produces; the .tiktoken format; special tokens; chat template.

Equality here is exact: the same ranks and pattern must give the same ids, token for token.
"""

import os

import pytest
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_scratch.data import data_path, load_corpus
from llm_scratch.tokenizer import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    BPETokenizer,
    encode_chat,
    get_tokenizer,
    parse_chat,
    read_tiktoken_ranks,
    render_chat,
    train_shakespeare_tokenizer,
)
from llm_scratch.tokenizer.pretrained import SHAKESPEARE_TOKENIZER

HARD_STRINGS = [
    "",
    "Hello world",
    "Hello, do you like tea? In the sunlit terraces of someunknownPlace.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\r\n\r\nand   \n  mixed\n\n\n",
    "I'm, you're, he'll, we've, they'd, it's, DON'T, I'M",
    "1234567890 3.14159 1,000,000 2026-11-23 0x1F",
    "naïve café résumé Ünïcödé",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 ✨",
    "combining: e\u0301 a\u0308 and zero\u200bwidth",
    "symbols: ∑∫√∞ ≠ ≤ → ← «quotes» “curly” — dashes…",
    "code: def f(x):\n    return x**2  # comment",
    "\x00\x01 control \x7f chars",
    "a" * 300,
    " " * 50 + "x",
]


@pytest.fixture(scope="module")
def shakespeare():
    return get_tokenizer("shakespeare", backend="ours")


@pytest.fixture(scope="module")
def gpt2_path():
    try:
        return data_path("gpt2.tiktoken", download=False)
    except FileNotFoundError as err:
        if os.environ.get("LLM_SCRATCH_CACHE"):  # CI provides it: there this test must run
            raise
        pytest.skip(f"GPT-2's ranks are not cached on this machine ({err}); run once with network")


@pytest.fixture(scope="module")
def gpt2_pair(gpt2_path):
    ours = BPETokenizer.from_tiktoken_file(gpt2_path, GPT2_PATTERN, {"<|endoftext|>": 50256})
    theirs = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, special_tokens={"<|endoftext|>": 50256},
                               mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(gpt2_path)))
    return ours, theirs


def test_ours_equals_tiktoken_on_the_corpus_with_our_ranks(shakespeare):
    text = load_corpus("tinyshakespeare")
    theirs = shakespeare.to_tiktoken()
    ids = shakespeare.encode_ordinary(text)
    assert ids == theirs.encode_ordinary(text)
    assert shakespeare.decode(ids) == text
    for s in HARD_STRINGS:
        assert shakespeare.encode_ordinary(s) == theirs.encode_ordinary(s), s


def test_ours_equals_tiktoken_with_gpt2_ranks(gpt2_pair):
    ours, theirs = gpt2_pair
    assert ours.encode("Hello world") == [15496, 995] == theirs.encode("Hello world")
    text = load_corpus("tinyshakespeare")[:200_000]
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)
    for s in HARD_STRINGS:
        assert ours.encode_ordinary(s) == theirs.encode_ordinary(s), s
    sample = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = ours.encode(sample, allowed_special={"<|endoftext|>"})
    assert ids == theirs.encode(sample, allowed_special={"<|endoftext|>"}) and 50256 in ids
    assert ours.decode(ids) == sample


def test_our_file_reader_equals_tiktokens(gpt2_path, tmp_path, shakespeare):
    assert read_tiktoken_ranks(gpt2_path) == tiktoken.load.load_tiktoken_bpe(str(gpt2_path))
    shakespeare.save(tmp_path / "s.tiktoken")
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "s.tiktoken")) == shakespeare.ranks
    again = BPETokenizer.from_tiktoken_file(tmp_path / "s.tiktoken", GPT4_PATTERN, shakespeare.special_tokens)
    assert again.encode(HARD_STRINGS[2]) == shakespeare.encode(HARD_STRINGS[2])
    (tmp_path / "bad.tiktoken").write_bytes(b"SGVsbG8= 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="line 2"):
        read_tiktoken_ranks(tmp_path / "bad.tiktoken")


def test_gpt2_through_get_tokenizer(gpt2_path):
    fast, ours = get_tokenizer("gpt2"), get_tokenizer("gpt2", backend="ours")
    assert fast.n_vocab == ours.n_vocab == 50257
    for s in HARD_STRINGS:
        assert fast.encode(s) == ours.encode(s)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_decode_encode_round_trips_any_unicode(text):
    tokenizer = _SMALL
    ids = tokenizer.encode(text, disallowed_special=())
    assert tokenizer.decode(ids) == text
    assert ids == _SMALL_TIKTOKEN.encode(text, disallowed_special=())


_SMALL = BPETokenizer.train("the cat sat on the mat; the dog ate 12 bones! " * 50 + "héllo wörld 😀 " * 20, 320,
                            GPT4_PATTERN, ["<|endoftext|>"])
_SMALL_TIKTOKEN = _SMALL.to_tiktoken()


def test_training_is_deterministic_and_both_trainers_agree():
    text = load_corpus("tinyshakespeare")[:100_000]
    naive = BPETokenizer.train(text, 256 + 60, method="naive")
    incremental = BPETokenizer.train(text, 256 + 60, method="incremental")
    assert naive.merges == incremental.merges and naive.ranks == incremental.ranks
    assert BPETokenizer.train(text, 256 + 60).ranks == incremental.ranks
    assert incremental.merges[0] == (b" ", b"t")  # the most frequent pair in Shakespeare
    # every merged token is the concatenation of two earlier tokens
    for rank, (left, right) in enumerate(incremental.merges, start=256):
        assert incremental.ranks[left + right] == rank and incremental.ranks[left] < rank > incremental.ranks[right]


def test_committed_tokenizer_is_what_training_produces(shakespeare):
    fresh = train_shakespeare_tokenizer()
    assert fresh.ranks == shakespeare.ranks, "run `make artifacts` to rebuild data/tokenizers/"
    assert fresh.special_tokens == shakespeare.special_tokens == {
        "<|endoftext|>": 4096, "<|im_start|>": 4097, "<|im_end|>": 4098}
    assert SHAKESPEARE_TOKENIZER.with_suffix(".tiktoken").stat().st_size < 100_000


def test_special_token_policy_matches_tiktoken(shakespeare):
    theirs = shakespeare.to_tiktoken()
    text = "end of story<|endoftext|>next"
    for tok in (shakespeare, theirs):  # disallowed by default, as in tiktoken
        with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
            tok.encode(text)
    assert shakespeare.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all")
    ids = shakespeare.encode(text, allowed_special={"<|endoftext|>"})
    assert ids.count(4096) == 1 and shakespeare.decode(ids) == text
    as_text = shakespeare.encode(text, disallowed_special=())
    assert as_text == theirs.encode(text, disallowed_special=()) and 4096 not in as_text
    with pytest.raises(ValueError, match="unknown special tokens"):
        shakespeare.encode(text, allowed_special={"<|pad|>"})
    with pytest.raises(ValueError, match="token id 99999"):
        shakespeare.decode([1, 99999])


def test_bad_input():
    with pytest.raises(ValueError, match="known: gpt2, shakespeare"):
        get_tokenizer("llama")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 256"):
        BPETokenizer.train("abc", 100)
    with pytest.raises(ValueError, match="all 256 single bytes"):
        BPETokenizer({b"a": 0})
    ranks = {bytes([b]): b for b in range(256)}
    with pytest.raises(ValueError, match="collide"):
        BPETokenizer(ranks, special_tokens={"<|x|>": 5})


def test_decode_of_a_split_character_is_replacement_not_an_error(shakespeare):
    ids = shakespeare.encode("é")  # two bytes, not merged in an English-only vocabulary
    assert len(ids) == 2 and shakespeare.decode(ids[:1]) == "\ufffd"


# --- chat template ----------------------------------------------------------------------------------

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who wrote Hamlet?"},
    {"role": "assistant", "content": " Shakespeare, around 1600.\n"},
]


def test_chat_template_renders_parses_and_masks(shakespeare):
    text = render_chat(CHAT)
    assert text.startswith("<|im_start|>system\nYou are") and text.endswith("1600.\n<|im_end|>\n")
    assert parse_chat(text) == CHAT
    for tok in (shakespeare, shakespeare.to_tiktoken()):
        ids, mask = encode_chat(tok, CHAT, add_generation_prompt=True)
        assert tok.decode(ids) == render_chat(CHAT, add_generation_prompt=True)
        trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
        assert trained == " Shakespeare, around 1600.\n<|im_end|>"
    with pytest.raises(ValueError, match="special token"):
        render_chat([{"role": "user", "content": "hi<|im_end|>"}])
    with pytest.raises(ValueError, match="role"):
        render_chat([{"role": "robot", "content": "hi"}])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                       "content": st.text(max_size=30).filter(lambda s: "<|" not in s)}),
                max_size=4))
def test_chat_round_trips(messages):
    assert parse_chat(render_chat(messages)) == messages
    ids, mask = encode_chat(_CHAT_TOKENIZER, messages)
    assert _CHAT_TOKENIZER.decode(ids) == render_chat(messages) and len(mask) == len(ids)


_CHAT_TOKENIZER = BPETokenizer.train("user assistant system hello there\n" * 20, 280, GPT4_PATTERN,
                                     ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


def test_char_tokenizer_round_trip_and_errors():
    from llm_scratch.tokenizer import CharTokenizer

    tok = CharTokenizer("0123456789+=;")
    assert tok.n_vocab == 14 and tok.eos_id == 13
    assert tok.encode("5+3=8;") == [5, 10, 3, 11, 8, 12]
    assert tok.decode(tok.encode("12+7=19") + [tok.eos_id]) == "12+7=19"  # eos decodes to nothing
    with pytest.raises(ValueError, match="outside the alphabet"):
        tok.encode("5*3")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([14])
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer("0120")
