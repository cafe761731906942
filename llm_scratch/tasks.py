"""Instruction tasks with answers a program can check, generated offline from a seed.

Fine-tuning, preference and RL chapters need prompts whose answers can be graded automatically, and nothing
may be downloaded. Each `Example` has an instruction, an optional input, the reference answer, and
`check(answer)`, which grades a generated answer: numbers compared as numbers ("12" = "12.0" = " 12 "),
text compared with runs of whitespace collapsed.

Families: arithmetic ("add", "subtract", "multiply", 1-3 digit operands; "word_problem"), string tasks
("reverse", "uppercase", "count_letter", "sort_digits", on words of Tiny Shakespeare), and a language task
from the corpus ("speaker": which character speaks this line). For classification fine-tuning,
`make_line_classification` labels real lines of Tiny Shakespeare 1 and the same words shuffled 0.

Splits never share an example: an example's split is decided by a hash of its text (instruction + input),
not by the order it was drawn in, so train / validation / test are disjoint by construction, and the same
seed gives the same examples on any machine (Python's `random.Random` and SHA-256 are platform-independent).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["DIGIT_WORDS", "FAMILIES", "IMAGE_FAMILIES", "SPLITS", "Example", "ImageExample", "PreferencePair",
           "SumChain", "make_digit_examples", "make_line_classification", "make_preference_pairs", "make_sum_chains",
           "make_tasks", "split_of"]

SPLITS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}  # shares of the hash range
NUMERIC = {"add", "subtract", "multiply", "word_problem", "count_letter"}


@dataclass(frozen=True)
class Example:
    family: str
    instruction: str
    input: str
    answer: str

    def check(self, answer: str) -> bool:
        """True if `answer` (e.g. a model's generation, stripped of its end-of-turn token) is right."""
        if self.family in NUMERIC:
            return _as_number(answer) is not None and _as_number(answer) == _as_number(self.answer)
        return " ".join(answer.split()) == " ".join(self.answer.split())

    @property
    def key(self) -> str:
        return f"{self.family}\n{self.instruction}\n{self.input}"


def _as_number(text: str) -> float | None:
    text = text.strip().replace(",", "")
    if not re.fullmatch(r"[-+]?\d+(\.\d*)?", text):
        return None
    return float(text)


def split_of(example: Example) -> str:
    """The split an example belongs to, from a SHA-256 of its text (the same on every machine)."""
    return _split_of_text(example.key)


def _split_of_text(text: str) -> str:
    u = int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16**12  # uniform in [0, 1)
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= u < hi)


def _operand(rng: random.Random) -> int:
    digits = rng.randint(1, 3)
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def _add(rng, words, lines):
    a, b = _operand(rng), _operand(rng)
    return Example("add", f"What is {a} + {b}?", "", str(a + b))


def _subtract(rng, words, lines):
    a, b = _operand(rng), _operand(rng)
    return Example("subtract", f"What is {a} - {b}?", "", str(a - b))


def _multiply(rng, words, lines):
    a, b = _operand(rng), _operand(rng)
    return Example("multiply", f"What is {a} * {b}?", "", str(a * b))


def _word_problem(rng, words, lines):
    name = rng.choice(["Anne", "Ben", "Clara", "Duncan", "Emilia", "Feste"])
    thing = rng.choice(["apples", "coins", "letters", "candles", "roses"])
    a, b = rng.randint(2, 99), rng.randint(1, 99)
    if rng.random() < 0.5:
        return Example("word_problem", f"{name} has {a} {thing} and gets {b} more. How many {thing} does "
                       f"{name} have now?", "", str(a + b))
    a, b = max(a, b), min(a, b)
    return Example("word_problem", f"{name} has {a} {thing} and gives away {b}. How many {thing} does "
                   f"{name} have left?", "", str(a - b))


def _reverse(rng, words, lines):
    word = rng.choice(words)
    return Example("reverse", "Reverse the letters of this word.", word, word[::-1])


def _uppercase(rng, words, lines):
    word = rng.choice(words)
    return Example("uppercase", "Write this word in capital letters.", word, word.upper())


def _count_letter(rng, words, lines):
    word = rng.choice(words)
    letter = rng.choice(sorted(set(word))) if rng.random() < 0.8 else rng.choice("aeiourst")
    return Example("count_letter", f"How many times does the letter '{letter}' appear in this word?", word,
                   str(word.count(letter)))


def _sort_digits(rng, words, lines):
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8)))
    return Example("sort_digits", "Sort these digits from smallest to largest.", digits, "".join(sorted(digits)))


def _speaker(rng, words, lines):
    speaker, line = rng.choice(lines)
    return Example("speaker", "Which character speaks this line?", line, speaker)


FAMILIES: dict[str, Callable] = {"add": _add, "subtract": _subtract, "multiply": _multiply,
                                 "word_problem": _word_problem, "reverse": _reverse, "uppercase": _uppercase,
                                 "count_letter": _count_letter, "sort_digits": _sort_digits, "speaker": _speaker}


@lru_cache(maxsize=1)
def _corpus_material() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Words (4-9 lowercase letters) and (speaker, line) pairs of Tiny Shakespeare, in corpus order."""
    from llm_scratch.data import load_corpus

    text = load_corpus("tinyshakespeare")
    words = tuple(sorted(set(re.findall(r"\b[a-z]{4,9}\b", text))))
    lines = []
    for block in text.split("\n\n"):
        head, _, speech = block.partition("\n")
        if head.endswith(":") and speech:
            first = speech.split("\n")[0].strip()
            if len(first.split()) >= 4:  # long enough to carry some style
                lines.append((head[:-1], first))
    return words, tuple(lines)


def make_tasks(n_per_family: int, split: str = "train", seed: int = 0,
               families: list[str] | tuple[str, ...] | None = None) -> list[Example]:
    """n_per_family distinct examples of each family that belong to `split`, drawn with `seed`.

    Candidates are drawn from one seeded stream per family and kept when their hash puts them in `split`,
    so asking for more examples extends the list without changing its start.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not isinstance(n_per_family, int) or n_per_family < 1:
        raise ValueError(f"n_per_family must be a positive int, got {n_per_family!r}")
    families = list(FAMILIES) if families is None else list(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown task families {unknown}; known: {', '.join(FAMILIES)}")
    words, lines = _corpus_material() if set(families) & {"reverse", "uppercase", "count_letter",
                                                          "speaker"} else ((), ())
    out: list[Example] = []
    for family in families:
        rng = random.Random(f"{seed}:{family}")  # a string seed is hashed the same way on every platform
        seen: set[str] = set()
        kept: list[Example] = []
        for _ in range(200 * n_per_family):
            ex = FAMILIES[family](rng, words, lines)
            if ex.key in seen or split_of(ex) != split:
                continue
            seen.add(ex.key)
            kept.append(ex)
            if len(kept) == n_per_family:
                break
        else:
            raise ValueError(f"family {family!r} has fewer than {n_per_family} distinct {split} examples")
        out.extend(kept)
    return out


def _classification_lines() -> tuple[str, ...]:
    """Distinct first lines of speeches as lowercase words without punctuation, >= 6 words, not all the same."""
    _, lines = _corpus_material()
    out = {" ".join(re.findall(r"[a-z]+(?:'[a-z]+)*", line.lower())) for _, line in lines}
    return tuple(sorted(line for line in out if len(line.split()) >= 6 and len(set(line.split())) > 1))


def make_line_classification(n: int, split: str = "train", seed: int = 0) -> list[tuple[str, int]]:
    """n (text, label) pairs: label 1 = a real line of Tiny Shakespeare, 0 = the same line's words shuffled.

    Lines are lowercased and stripped of punctuation first: a real line starts with a capital letter and often
    ends with a comma or a full stop, and a classifier could answer from those alone without reading the
    words. Lines come in pairs, the real line and its shuffle, so the two classes share their words exactly
    and only the order tells them apart; the pairs are then put in a seeded random order (labels balanced: n // 2 of one
    class and n - n // 2 of the other). A line's split is decided by a SHA-256 of the line itself, so a line
    and its shuffle are always in the same split and train / validation / test never share a line.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    lines = [line for line in _classification_lines() if _split_of_text(f"line\n{line}") == split]
    if n > 2 * len(lines):
        raise ValueError(f"the {split} split has {len(lines)} lines, {2 * len(lines)} examples; asked for n={n}")
    rng = random.Random(f"{seed}:line_classification:{split}")  # a string seed is hashed the same on any platform
    chosen = rng.sample(lines, (n + 1) // 2)
    out: list[tuple[str, int]] = []
    for line in chosen:
        words = line.split()
        shuffled = words[:]
        while shuffled == words:  # a shuffle that gives back the line would be a mislabeled example
            rng.shuffle(shuffled)
        out += [(line, 1), (" ".join(shuffled), 0)]
    out = out[:n]
    rng.shuffle(out)
    return out


# --- preference pairs (alignment chapter) -----------------------------------------------------------------

@dataclass(frozen=True)
class PreferencePair:
    """A task example with a chosen and a rejected answer. `flipped` marks a pair whose labels were swapped on
    purpose (the noisy variant): then `chosen` is the wrong answer and `rejected` the right one."""

    example: Example
    chosen: str
    rejected: str
    flipped: bool = False
    mistake: str = ""  # what kind of plausible mistake the wrong answer makes


def _near_number(rng: random.Random, value: int) -> tuple[str, str]:
    """A plausible arithmetic slip: off by one or by ten, two digits swapped, or the answer in a sentence."""
    kinds = ["off by one", "off by ten", "badly formatted"]
    digits = str(abs(value))
    if len(digits) >= 2 and digits[-1] != digits[-2]:
        kinds.append("digits swapped")
    kind = rng.choice(kinds)
    if kind == "off by one":
        return str(value + rng.choice([-1, 1])), kind
    if kind == "off by ten":
        return str(value + rng.choice([-10, 10])), kind
    if kind == "digits swapped":
        swapped = digits[:-2] + digits[-1] + digits[-2]
        return ("-" if value < 0 else "") + swapped, kind
    return f"The answer is {value}.", kind  # right number, wrong format: the checker (and the user) want a number


def _wrong_answer(rng: random.Random, ex: Example, speakers: tuple[str, ...]) -> tuple[str, str]:
    if ex.family in ("add", "subtract", "multiply", "word_problem"):
        return _near_number(rng, int(ex.answer))
    if ex.family == "count_letter":
        n = int(ex.answer)
        return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1), "off by one"
    if ex.family == "reverse":
        word, kind = ex.input, rng.choice(["half reversed", "not reversed", "letter dropped"])
        if kind == "half reversed":  # the first half reversed in place, the rest left alone
            half = len(word) // 2
            return word[:half][::-1] + word[half:], kind
        if kind == "not reversed":
            return word, kind
        i = rng.randrange(len(word))
        return (word[:i] + word[i + 1:])[::-1], kind
    if ex.family == "uppercase":
        word, kind = ex.input, rng.choice(["unchanged", "capitalized", "one letter missed"])
        if kind == "unchanged":
            return word, kind
        if kind == "capitalized":
            return word.capitalize(), kind
        i = rng.randrange(len(word))
        return word[:i].upper() + word[i] + word[i + 1:].upper(), kind
    if ex.family == "sort_digits":
        digits, kind = ex.answer, rng.choice(["descending", "unsorted", "adjacent swap"])
        if kind == "descending":
            return digits[::-1], kind
        if kind == "unsorted":
            return ex.input, kind
        i = rng.randrange(len(digits) - 1)
        return digits[:i] + digits[i + 1] + digits[i] + digits[i + 2:], kind
    if ex.family == "speaker":
        return rng.choice(speakers), "another speaker"
    raise ValueError(f"no wrong answers for family {ex.family!r}")


def make_preference_pairs(n_per_family: int, split: str = "train", seed: int = 0, noise: float = 0.0,
                          families: list[str] | tuple[str, ...] | None = None) -> list[PreferencePair]:
    """Preference pairs from the task generator: the reference answer is chosen, a plausible mistake rejected.

    The examples are `make_tasks(n_per_family, split, seed, families)`, so held-out pairs never share a prompt
    with training pairs. Every rejected answer fails the example's checker (a checkable preference); where a
    family's mistake happens to be right (sorting digits that were already sorted, say) another is drawn.
    noise: the fraction of pairs whose chosen and rejected answers are swapped, exactly round(noise * n) of them,
    chosen by a seeded draw and marked `flipped` (Mitchell 2023's label noise, for cDPO and robust DPO).
    """
    if not 0 <= noise <= 1:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    _, lines = _corpus_material()
    speakers = tuple(sorted({s for s, _ in lines}))
    pairs = []
    for ex in make_tasks(n_per_family, split, seed, families):
        rng = random.Random(f"{seed}:pair:{ex.key}")  # per example: the same pair however many are drawn
        for _ in range(100):
            wrong, kind = _wrong_answer(rng, ex, speakers)
            if not ex.check(wrong):
                break
        else:
            raise RuntimeError(f"no wrong answer found for {ex}")  # cannot happen for the families above
        pairs.append(PreferencePair(ex, ex.answer, wrong, mistake=kind))
    n_flip = round(noise * len(pairs))
    flip = set(random.Random(f"{seed}:flip:{split}:{noise}").sample(range(len(pairs)), n_flip))
    return [PreferencePair(p.example, p.rejected, p.chosen, True, p.mistake) if i in flip else p
            for i, p in enumerate(pairs)]


# --- multi-step sums: every intermediate result can be checked (process supervision) ---------------------------

@dataclass(frozen=True)
class SumChain:
    """A sum of single-digit terms solved one running total at a time: prompt "5+3+8=", solution "8;16".

    Each step of the solution is one partial sum (the first two terms, then each further term added), so a
    solution of n terms has n − 1 steps, separated by ";", and the last step is the answer. A checker can grade
    each step on its own, which is what process supervision needs (DeepSeekMath section 4.1.3).
    """

    terms: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return "+".join(map(str, self.terms)) + "="

    @property
    def partial_sums(self) -> tuple[int, ...]:
        sums, total = [], self.terms[0]
        for t in self.terms[1:]:
            total += t
            sums.append(total)
        return tuple(sums)

    @property
    def solution(self) -> str:
        return ";".join(map(str, self.partial_sums))

    def check(self, completion: str) -> bool:
        """Outcome: the last step written is the total (the steps before it are not looked at; a trailing ";" is
        ignored, as in step_rewards)."""
        return completion.removesuffix(";").split(";")[-1].strip() == str(self.partial_sums[-1])

    def step_rewards(self, completion: str) -> tuple[list[float], list[int]]:
        """(reward of each written step, index of each step's last character in `completion`).

        Step j earns 1.0 when it is the j-th partial sum, else 0.0; steps beyond the last partial sum earn 0.0.
        An empty step (two ";" in a row, or an empty completion) is a step too and earns 0.0; its "last
        character" is the separator after it (or 0 for an empty completion).
        """
        rewards, ends, start = [], [], 0
        for j, piece in enumerate(completion.split(";")):
            end = start + len(piece)  # the separator's index, or len(completion) for the last piece
            last = end - 1 if piece else min(end, max(len(completion) - 1, 0))
            right = j < len(self.partial_sums) and piece.strip() == str(self.partial_sums[j])
            rewards.append(1.0 if right else 0.0)
            ends.append(last)
            start = end + 1
        if not completion:
            return [0.0], [0]
        if completion.endswith(";"):  # a trailing separator starts no step
            rewards, ends = rewards[:-1], ends[:-1]
        return rewards, ends


def make_sum_chains(n: int, split: str = "train", n_terms: int = 3, seed: int = 0) -> list[SumChain]:
    """n distinct sums of n_terms digits 1..9 that belong to `split` (by a hash of the prompt, as make_tasks)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not isinstance(n_terms, int) or n_terms < 2:
        raise ValueError(f"n_terms must be an int >= 2, got {n_terms!r}")
    available = 9 ** n_terms
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = random.Random(f"{seed}:sum_chain:{n_terms}")
    seen: set[tuple[int, ...]] = set()
    out: list[SumChain] = []
    for _ in range(50 * available):
        chain = SumChain(tuple(rng.randint(1, 9) for _ in range(n_terms)))
        if chain.terms in seen:
            continue
        seen.add(chain.terms)
        if _split_of_text(chain.prompt) == split:
            out.append(chain)
            if len(out) == n:
                return out
        if len(seen) == available:
            break
    raise ValueError(f"only {len(out)} distinct {split} sums of {n_terms} terms exist, fewer than n={n}")


# --- questions about images of digits (the vision-language chapter) --------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_FAMILIES = ("caption", "digit", "parity", "plus_two")
# family -> (question, answer template); the answer templates see the digit d, its word w and a yes/no y/n
_IMAGE_TEMPLATES = {
    "caption": [("Describe the image.", "a handwritten {w}"),
                ("Write a caption for this picture.", "the digit {w}, written by hand"),
                ("What is in the picture?", "a handwritten {w}")],
    "digit": [("What digit is this?", "{d}"), ("Which digit is shown?", "{d}"),
              ("What number is written here?", "{d}")],
    "parity": [("Is it even?", "{even}"), ("Is this digit odd?", "{odd}"), ("Is the number even?", "{even}")],
    "plus_two": [("What is it plus two?", "{p}"), ("Add two to this digit.", "{p}"),
                 ("What do you get if you add 2 to it?", "{p}")],
}


@dataclass(frozen=True)
class ImageExample:
    """A question about image number `image` (an index into the images it was made for) of the digit `label`."""

    image: int
    label: int
    family: str
    question: str
    answer: str

    def check(self, answer: str) -> bool:
        """Digit and plus_two: the number; parity: "yes"/"no" (case and a final "." ignored); caption: it names
        the right digit as a word and no other digit word (so "a handwritten 7" or "seven or one" fail)."""
        if self.family in ("digit", "plus_two"):
            return _as_number(answer) is not None and _as_number(answer) == _as_number(self.answer)
        if self.family == "parity":
            return answer.strip().lower().removesuffix(".") == self.answer
        words = set(re.findall(r"[a-z]+", answer.lower()))
        return DIGIT_WORDS[self.label] in words and len(words & set(DIGIT_WORDS)) == 1


def make_digit_examples(labels, families: tuple[str, ...] | list[str] = IMAGE_FAMILIES,
                        seed: int = 0) -> list[ImageExample]:
    """One example per image and family, for the images whose digits are `labels` (a sequence or tensor of ints
    0..9, e.g. a split of data.load_digits): the question's wording drawn from three templates per family with a
    seeded generator. The held-out split is the images' own (train images for training, test images to evaluate).
    """
    unknown = [f for f in families if f not in IMAGE_FAMILIES]
    if unknown or not families:
        raise ValueError(f"families must be a non-empty subset of {', '.join(IMAGE_FAMILIES)}, got {list(families)}")
    labels = [int(x) for x in labels]
    if any(not 0 <= x <= 9 for x in labels):
        raise ValueError("labels must be digits 0..9")
    rng = random.Random(f"{seed}:digit_images")
    out = []
    for i, d in enumerate(labels):
        for family in families:
            question, template = rng.choice(_IMAGE_TEMPLATES[family])
            answer = template.format(d=d, w=DIGIT_WORDS[d], p=d + 2, even="yes" if d % 2 == 0 else "no",
                                     odd="yes" if d % 2 else "no")
            out.append(ImageExample(i, d, family, question, answer))
    return out
