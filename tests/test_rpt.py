"""Reinforcement pre-training: the prefix-match reward on hand cases (multi-byte UTF-8, predictions spanning
tokens) and the entropy filter on hand-made logits."""

import math

import pytest
import torch

from llm_scratch.training.rpt import hard_positions, prefix_match_reward, topk_entropy

TOKENS = ["Rom", "eo", ",", " wh", "ere"]


@pytest.mark.parametrize(("prediction", "reward"), [
    ("Rom", 1.0),            # exactly the next token
    ("Romeo", 1.0),          # two whole tokens: the prediction spans a boundary and ends on the next one
    ("Romeo, where", 1.0),   # the whole continuation
    ("Ro", 0.0),             # a prefix, but it stops inside "Rom"
    ("Romeo, wh", 1.0),
    ("Romeo, w", 0.0),       # inside " wh"
    ("Rome", 0.0),           # inside "eo"
    ("Juliet", 0.0),         # not a prefix at all
    ("Romeo, where art", 0.0),  # longer than the continuation
    ("rom", 0.0),            # case matters: bytes are compared
    ("", 0.0),               # predicts nothing
])
def test_prefix_match_reward_hand_cases(prediction, reward):
    assert prefix_match_reward(prediction, TOKENS) == reward


def test_prefix_match_reward_counts_bytes_not_characters():
    # "é" is two UTF-8 bytes, so token boundaries in bytes and in characters differ after it
    tokens = ["caf", "é", " au", " lait"]
    # boundaries at bytes 3, 5, 8, 13; "café" is 5 bytes (4 characters): mixing byte lengths with character
    # boundaries (3, 4, 7, 12) would reject it
    assert prefix_match_reward("café", tokens) == 1.0
    assert prefix_match_reward("caf", tokens) == 1.0
    assert prefix_match_reward("ca", tokens) == 0.0
    assert prefix_match_reward("café au", tokens) == 1.0
    assert prefix_match_reward("café a", tokens) == 0.0  # 7 bytes: inside " au"
    # the same words where "é" arrives inside a longer token
    tokens = ["ca", "fé au", " lait"]
    assert prefix_match_reward("café au", tokens) == 1.0
    assert prefix_match_reward("café", tokens) == 0.0  # inside "fé au"


def test_prefix_match_reward_with_tokens_that_split_a_character():
    """Our byte-level tokenizer spells "é" as two one-byte tokens; decoded alone each is a replacement character,
    so such tokens are passed as bytes, and the boundary between the two bytes is a token boundary too."""
    from llm_scratch.tokenizer import get_tokenizer

    enc = get_tokenizer("shakespeare")
    ids = enc.encode("café au lait")
    pieces = [enc.decode_single_token_bytes(i) for i in ids]
    assert b"".join(pieces) == "café au lait".encode()
    assert any(len(p) == 1 and p[0] >= 0x80 for p in pieces)  # a token holding half of "é"
    assert prefix_match_reward("café", pieces) == 1.0
    assert prefix_match_reward("café au", pieces) == 1.0
    assert prefix_match_reward("cafe", pieces) == 0.0
    as_text = [enc.decode([i]) for i in ids]
    assert prefix_match_reward("café", as_text) == 0.0  # the bytes of "é" are lost in the decoded halves


def test_prefix_match_reward_errors():
    with pytest.raises(TypeError, match="prediction"):
        prefix_match_reward(None, TOKENS)
    with pytest.raises(TypeError, match="target_tokens"):
        prefix_match_reward("a", "abc")


def test_topk_entropy_on_hand_made_logits():
    V = 20
    uniform4 = torch.full((V,), -1e9)
    uniform4[:4] = 0.0  # four equally likely tokens, the rest impossible
    certain = torch.full((V,), -1e9)
    certain[7] = 0.0
    flat = torch.zeros(V)  # all 20 equally likely
    logits = torch.stack([uniform4, certain, flat])
    torch.testing.assert_close(topk_entropy(logits, k=16), torch.tensor([math.log(4), 0.0, math.log(16)]))
    torch.testing.assert_close(topk_entropy(logits, k=20)[2], torch.tensor(math.log(20)))
    with pytest.raises(ValueError, match="k=30"):
        topk_entropy(logits, k=30)
    with pytest.raises(ValueError, match="k must"):
        topk_entropy(logits, k=0)


def test_hard_positions_keep_high_entropy_real_positions():
    V = 20
    easy = torch.full((V,), -1e9)
    easy[3] = 0.0  # entropy 0
    hard = torch.zeros(V)  # entropy log 16 over the top 16
    medium = torch.full((V,), -1e9)
    medium[:2] = 0.0  # entropy log 2 = 0.69
    logits = torch.stack([torch.stack([easy, hard, medium]), torch.stack([hard, hard, easy])])  # (2, 3, V)
    assert hard_positions(logits, k=16, threshold=1.0).tolist() == [[False, True, False], [True, True, False]]
    assert hard_positions(logits, k=16, threshold=0.5).tolist() == [[False, True, True], [True, True, False]]
    pad = torch.tensor([[True, True, True], [False, True, True]])
    assert hard_positions(logits, k=16, threshold=1.0, padding_mask=pad).tolist() == [[False, True, False],
                                                                                     [False, True, False]]
    with pytest.raises(ValueError, match="padding_mask"):
        hard_positions(logits, padding_mask=pad.long())
    with pytest.raises(ValueError, match="logits"):
        hard_positions(logits[0])
