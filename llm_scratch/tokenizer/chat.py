"""A chat template: conversations as one token sequence, in the ChatML layout (used by Qwen and others).

    <|im_start|>system
    You are a helpful assistant.<|im_end|>
    <|im_start|>user
    Hi!<|im_end|>
    <|im_start|>assistant
    Hello.<|im_end|>

Each turn is `<|im_start|>` + role + newline + content + `<|im_end|>` + newline. The markers are special
tokens, so a message's *content* can never produce them: content is encoded with every special token
disallowed, and a user who types "<|im_end|>" gets an error instead of a forged turn boundary.
`encode_chat` also returns the mask of the tokens an assistant wrote (its content and closing
`<|im_end|>`), which instruction tuning trains on.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CHAT_SPECIAL_TOKENS", "ROLES", "encode_chat", "parse_chat", "render_chat"]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", IM_START, IM_END)
ROLES = ("system", "user", "assistant")


def _check(messages: Sequence[dict]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f"messages[{i}] must be a dict with exactly the keys 'role' and 'content', "
                             f"got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {', '.join(ROLES)}, got {message['role']!r}")
        if not isinstance(message["content"], str):
            raise ValueError(f"messages[{i}]['content'] must be a str, got {type(message['content']).__name__}")
        for token in CHAT_SPECIAL_TOKENS:
            if token in message["content"]:
                raise ValueError(f"messages[{i}]['content'] contains the special token {token!r}")


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text; with add_generation_prompt, an open assistant turn for the model to continue."""
    _check(messages)
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def parse_chat(text: str) -> list[dict]:
    """The inverse of render_chat (without a generation prompt): parse_chat(render_chat(m)) == m."""
    messages = []
    rest = text
    while rest:
        if not rest.startswith(IM_START):
            raise ValueError(f"expected {IM_START!r} at {rest[:30]!r}")
        header, sep, rest = rest[len(IM_START):].partition("\n")
        content, sep2, rest = rest.partition(IM_END + "\n")
        if not sep or not sep2 or header not in ROLES:
            raise ValueError(f"malformed turn starting {IM_START}{header[:20]!r}")
        messages.append({"role": header, "content": content})
    return messages


def encode_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False
                ) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether an assistant produced it.

    `tokenizer` is a BPETokenizer or tiktoken.Encoding whose special tokens include <|im_start|> and
    <|im_end|>. Markers are inserted as special ids; the role line and the content are encoded
    separately as ordinary text, so no token straddles the start of a message and the mask is exact.
    `tokenizer.decode(ids) == render_chat(messages, add_generation_prompt)` always holds; the ids can
    differ from encoding the rendered string in one go where whitespace meets a turn boundary.
    """
    _check(messages)
    specials = {token: tokenizer.encode(token, allowed_special={token}) for token in (IM_START, IM_END)}
    for token, ids in specials.items():
        if len(ids) != 1:
            raise ValueError(f"the tokenizer has no special token {token!r}")
    start, end = specials[IM_START], specials[IM_END]
    ids: list[int] = []
    mask: list[bool] = []

    def add(new: list[int], trained: bool) -> None:
        ids.extend(new)
        mask.extend([trained] * len(new))

    for m in messages:
        is_assistant = m["role"] == "assistant"
        add(start + tokenizer.encode(m["role"] + "\n", disallowed_special=()), False)
        add(tokenizer.encode(m["content"], disallowed_special=()), is_assistant)
        add(end, is_assistant)
        add(tokenizer.encode("\n", disallowed_special=()), False)
    if add_generation_prompt:
        add(start + tokenizer.encode("assistant\n", disallowed_special=()), False)
    return ids, mask
