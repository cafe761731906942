"""Verifiable rewards for reinforcement learning on math problems: extract the answer, compare it, check the format.

    r = accuracy_reward(completion, "72") + format_reward(completion)        # 0.0, 1.0 or 2.0
    rs = total_rewards(completions, references)                              # the same over a batch, list[float]

RL with verifiable rewards scores a completion with a rule instead of a learned reward model: is the final answer
right, and is the output in the expected shape. DeepSeek-R1-Zero (DeepSeek-AI 2025, arXiv:2501.12948, section 2.2.2)
uses two such rules, an accuracy reward and a format reward; `total_rewards` combines rules as a weighted sum (as
TRL's GRPOTrainer combines its reward functions), and GRPO (grpo.py) turns the sums into advantages within each
group.

Where the answer is. Three conventions, tried in this order:
1. The last `\\boxed{...}` (MATH, Hendrycks et al. 2021, whose solutions box the final answer; R1 asks for a boxed
   answer too). Braces are matched, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`; `\\boxed {x}` (a space before the
   brace) and MATH's `\\fbox{x}` count as well. If the last box is never closed (a completion cut off mid-answer),
   there is no answer: we do not fall back to an earlier box or to a number inside the unfinished one.
2. The text after the last `####` up to the end of its line (GSM8K, Cobbe et al. 2021, whose solutions end in
   `#### 72`).
3. A fallback, weaker than both: the last number in the text (`-3`, `2.5`, `.5`, `1,000`, `3/4`, a Unicode minus
   `−3`). Digits glued to letters are not numbers here (`H2O`, `5th`, `x2`), and a `-` right after a letter or digit
   is subtraction, not a sign (`7-3` ends in `3`). Models that never learned the format still get graded on
   something, as with the "flexible-extract" filter of EleutherAI's lm-evaluation-harness for GSM8K; a stricter
   grader can require `format_reward` as well.

When are two answers equal. If both parse as numbers (`parse_number`) they are compared exactly as
`fractions.Fraction`s, so `1,000` = `1000`, `3.0` = `3`, `0.5` = `1/2` = `\\frac{1}{2}`, with no float rounding
(0.1 + 0.2 style errors cannot happen). Otherwise the two strings are compared after a light normalization (below).
This is deliberately much less than a computer algebra system: `x+1` and `1+x` differ, `\\sqrt{8}` and `2\\sqrt{2}`
differ, `5 \\text{ cm}` and `5` differ. `math-verify` (Hugging Face) does the symbolic comparison with SymPy;
tests/test_rewards.py cross-checks the two and lists every case where they disagree, with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fractions import Fraction

__all__ = [
    "accuracy_reward",
    "answers_equal",
    "extract_answer",
    "format_reward",
    "parse_number",
    "total_rewards",
]

# ---------------------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------------------

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")

# A number in running text, for the fallback. Python 3.11's atomic group (?>...) stops the engine from backing off
# to a shorter number when the one it found turns out to be glued to a word: "1,000abc" is no number, not "1".
_NUMBER_IN_TEXT = re.compile(
    r"""
    (?<![\w./])                          # not inside a word, a decimal or a fraction (H2O, 1.2.3, 2024/01/05)
    [-+\u2212]?                          # sign; U+2212 is the typographic minus
    (?>
        \d+/\d+                          # a simple fraction 3/4
      | \d{1,3}(?:,\d{3})+(?:\.\d+)?     # thousands separated by commas: 1,000 or 1,234.5
      | \d+(?:\.\d+)?                    # 12 or 12.5
      | \.\d+                            # .5
    )
    (?![\w/]|\.\d)                       # not followed by a word (5th, 3x), a fraction bar or more decimals
    """,
    re.VERBOSE,
)


def _check_str(value: object, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}: {value!r}")


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} with its braces matched, "" if there is a box but it is never closed."""
    opens = list(_BOX_OPEN.finditer(text))
    if not opens:
        return None
    start = opens[-1].end()  # just after the opening brace
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return ""  # unclosed: the answer was cut off


def extract_answer(text: str) -> str | None:
    """The final answer of a solution or completion, stripped, or None if it has none.

    In order: the content of the last `\\boxed{...}` (MATH), else what follows the last `####` on its line (GSM8K),
    else the last number in the text (a fallback). A box or `####` that is present but empty, or a last box that is
    never closed, gives None rather than falling through: the model chose the format and left the answer out.
    """
    _check_str(text, "text")
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip() or None
    # MATH's spacing inside numbers (10,\!000 and 10{,}000) would otherwise split them in two.
    numbers = _NUMBER_IN_TEXT.findall(text.replace("\\!", "").replace("{,}", ","))
    return numbers[-1] if numbers else None


# ---------------------------------------------------------------------------------------------------------------
# Numbers and equality
# ---------------------------------------------------------------------------------------------------------------

# A whole answer that is a number: an optional sign, digits (with well-formed thousands commas or none), an optional
# decimal part; or the decimal part alone (.5).
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_LATEX_FRAC = re.compile(r"([-+]?)\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_FRAC_SHORTHAND = re.compile(r"\\frac(\d)(\d)")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}")


def _strip_latex_noise(text: str) -> str:
    """What both parse_number and answers_equal ignore: $ signs, \\text{...} wrappers, LaTeX spacing, a final period.

    MATH writes 10,000 as `10,\\!000` or `10{,}000`, dollars as `\\$` and 1/2 as `\\frac12`; Hendrycks et al.'s own
    answer normalizer (`_strip_string` in the MATH repository) removes or rewrites the same marks.
    """
    text = text.strip().replace("\u2212", "-")  # typographic minus -> ASCII
    text = _TEXT.sub(r"\1", text)
    text = text.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\ ", " ").replace("\\$", "")
    text = text.replace("$", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _FRAC_SHORTHAND.sub(r"\\frac{\1}{\2}", text)  # \frac12 -> \frac{1}{2}, as MATH's _fix_fracs does
    return text.strip().removesuffix(".").strip()


def _plain_number(text: str) -> Fraction | None:
    text = text.strip()
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    return Fraction(text.replace(",", ""))  # Fraction("1.25") is exactly 5/4: decimal strings are parsed exactly


def parse_number(text: str) -> Fraction | None:
    """The exact value of an answer that is a number, or None if it is anything else.

    Accepted: integers and decimals with an optional sign (`-2`, `+5`, `3.0`, `.5`), thousands commas when they
    group by three (`1,000`, `12,345.5`; `1,00` is no number), fractions `a/b` and `\\frac{a}{b}` (`\\dfrac`,
    `\\tfrac`, `\\frac12`, a sign before it), with surrounding `$`, `\\text{}`, spaces and a final period ignored.
    A trailing percent sign (`50%`, `50\\%`) is dropped, so `50%` is 50, not 1/2: GSM8K's answers to "what
    percent" questions are the bare number. Not accepted: scientific notation, decimal commas (`3,5`), mixed numbers
    (`1 1/2`), anything with a variable or a unit.
    """
    _check_str(text, "text")
    text = _strip_latex_noise(text)
    if text.endswith("\\%"):
        text = text[:-2]
    elif text.endswith("%"):
        text = text[:-1]
    text = text.strip()
    frac = _LATEX_FRAC.fullmatch(text)
    if frac:
        sign, num, den = frac.groups()
        parts = (_plain_number(num), _plain_number(den))
    elif text.count("/") == 1:
        sign, (num, den) = "", text.split("/")
        parts = (_plain_number(num), _plain_number(den))
    else:
        return _plain_number(text)
    if parts[0] is None or parts[1] is None or parts[1] == 0:
        return None
    value = parts[0] / parts[1]
    return -value if sign == "-" else value


def _normalize(text: str) -> str:
    return re.sub(r"\s+", "", _strip_latex_noise(text))


def answers_equal(predicted: str, reference: str) -> bool:
    """Whether two final answers are the same: as exact numbers when both are numbers, else as normalized strings.

    The string comparison drops `$`, `\\text{}` wrappers, LaTeX spacing, all whitespace and a final period, and reads
    `\\dfrac`/`\\tfrac` as `\\frac`; it is otherwise exact (case-sensitive, no algebra).
    """
    _check_str(predicted, "predicted")
    _check_str(reference, "reference")
    p, r = parse_number(predicted), parse_number(reference)
    if p is not None and r is not None:
        return p == r
    p_norm = _normalize(predicted)
    return p_norm != "" and p_norm == _normalize(reference)


# ---------------------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------------------


def accuracy_reward(completion: str, reference: str) -> float:
    """1.0 if the completion's final answer (extract_answer) equals the reference answer (answers_equal), else 0.0.

    `reference` is the final answer itself ("72", "\\frac{1}{2}"), not a whole solution: run extract_answer on a
    dataset's solution first (extracting from "\\frac{1}{2}" would fall back to its last number, 2).
    """
    _check_str(completion, "completion")
    _check_str(reference, "reference")
    answer = extract_answer(completion)
    return 1.0 if answer is not None and answers_equal(answer, reference) else 0.0


_THINK_FORMAT = re.compile(r"\s*<think>(?P<thought>.*?)</think>(?P<answer>.*)", re.DOTALL)


def format_reward(completion: str, reference: str | None = None) -> float:
    """1.0 if the completion is `<think>` reasoning `</think>` followed by an answer, else 0.0 (R1, section 2.2.2).

    Strict on purpose, since a reward is what the policy learns to satisfy: only whitespace before `<think>`; exactly
    one think block (no further `<think>` or `</think>` anywhere); non-empty reasoning, or `<think></think>` would
    earn the reward for free; a non-empty answer after `</think>`. The answer's own shape is not checked (R1 also
    wraps it in `<answer>` tags; here a box or plain text is fine). `reference` is ignored: it is accepted so every
    reward function can be called as f(completion, reference) by total_rewards.
    """
    _check_str(completion, "completion")
    match = _THINK_FORMAT.fullmatch(completion)
    if match is None:
        return 0.0
    thought, answer = match["thought"], match["answer"]
    if any(tag in part for part in (thought, answer) for tag in ("<think>", "</think>")):
        return 0.0
    return 1.0 if thought.strip() and answer.strip() else 0.0


RewardFn = Callable[[str, str], float]


def total_rewards(completions: Sequence[str], references: Sequence[str],
                  funcs: Sequence[RewardFn] = (accuracy_reward, format_reward),
                  weights: Sequence[float] | None = None) -> list[float]:
    """One reward per completion: sum_k weights[k] * funcs[k](completion, reference), by default accuracy + format.

    completions and references are aligned (repeat each prompt's reference once per completion of its group);
    weights default to 1.0 each.
    """
    if isinstance(completions, str) or isinstance(references, str):
        raise TypeError("completions and references must be sequences of str, not a single str")
    if len(completions) != len(references):
        raise ValueError(f"completions and references must have the same length, got {len(completions)} "
                         f"and {len(references)}")
    if len(funcs) == 0:
        raise ValueError("funcs must hold at least one reward function")
    weights = [1.0] * len(funcs) if weights is None else list(weights)
    if len(weights) != len(funcs):
        raise ValueError(f"weights must have one entry per reward function ({len(funcs)}), got {len(weights)}")
    return [sum(w * f(c, r) for f, w in zip(funcs, weights, strict=True))
            for c, r in zip(completions, references, strict=True)]
