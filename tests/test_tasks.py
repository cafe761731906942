"""The offline task generator: deterministic, disjoint splits, checkers that grade hard cases correctly."""

import hashlib

import pytest

from llm_scratch.tasks import FAMILIES, Example, make_line_classification, make_tasks, split_of


def test_same_seed_same_examples_and_stable_prefix():
    a = make_tasks(20, "train", seed=3)
    assert a == make_tasks(20, "train", seed=3)
    longer = make_tasks(30, "train", seed=3)
    for family in FAMILIES:  # asking for more extends each family's list without changing its start
        assert [e for e in longer if e.family == family][:20] == [e for e in a if e.family == family]
    assert a != make_tasks(20, "train", seed=4)
    assert {e.family for e in a} == set(FAMILIES) and len(a) == 20 * len(FAMILIES)
    # a fingerprint of the whole list: any change in generation (platform, Python version) fails here
    digest = hashlib.sha256("\n".join(f"{e.key}\n{e.answer}" for e in make_tasks(5, "test", seed=0)).encode())
    assert digest.hexdigest() == FINGERPRINT


FINGERPRINT = "bd0832075de56b5f63905c9e85635481d4baada30167e9476523c7fd59943914"  # make_tasks(5, "test", seed=0)


def test_splits_are_disjoint_and_self_consistent():
    splits = {s: make_tasks(40, s, seed=0) for s in ("train", "validation", "test")}
    keys = {s: {e.key for e in ex} for s, ex in splits.items()}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert all(split_of(e) == s for s, ex in splits.items() for e in ex)
    assert all(len(k) == 40 * len(FAMILIES) for k in keys.values())  # no duplicates within a split


def test_every_reference_answer_passes_its_own_check():
    for e in make_tasks(50, "validation", seed=1):
        assert e.check(e.answer) and e.check(f"  {e.answer} \n"), e


def test_checker_hard_cases():
    num = Example("add", "What is 7 + 5?", "", "12")
    assert num.check("12") and num.check(" 12.0 ") and num.check("+12")
    assert Example("multiply", "What is 50 * 25?", "", "1250").check("1,250")
    assert not num.check("12 apples") and not num.check("13") and not num.check("") and not num.check("twelve")
    neg = Example("subtract", "What is 5 - 7?", "", "-2")
    assert neg.check("-2") and not neg.check("2")
    text = Example("speaker", "Which character speaks this line?", "x", "First Citizen")
    assert text.check("First  Citizen") and text.check("First Citizen\n") and not text.check("first citizen")
    assert not text.check("First Citizen.")


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of train, validation, test"):
        make_tasks(1, "dev")
    with pytest.raises(ValueError, match=r"unknown task families \['divide'\]"):
        make_tasks(1, families=["add", "divide"])
    with pytest.raises(ValueError, match="n_per_family must be a positive int"):
        make_tasks(0)


def test_line_classification_deterministic_balanced_and_disjoint():
    splits = {s: make_line_classification(200, s, seed=0) for s in ("train", "validation", "test")}
    assert splits["train"] == make_line_classification(200, "train", seed=0)
    assert splits["train"] != make_line_classification(200, "train", seed=1)
    for data in splits.values():
        assert len(data) == 200 and sum(label for _, label in data) == 100  # balanced
    real = {s: {text for text, label in data if label == 1} for s, data in splits.items()}
    assert not real["train"] & real["validation"] and not real["train"] & real["test"]
    assert not real["validation"] & real["test"]
    odd = make_line_classification(7, "test", seed=2)
    assert len(odd) == 7 and sum(label for _, label in odd) in (3, 4)
    digest = hashlib.sha256("\n".join(f"{label}\t{text}" for text, label in splits["test"][:10]).encode())
    assert digest.hexdigest() == LINE_FINGERPRINT


# make_line_classification(200, "test", seed=0)[:10]
LINE_FINGERPRINT = "dcc7d2deef39832493b6a42f65116b704668bed3e4824d8e616481ba3dc2659d"


def test_line_classification_shuffles_are_real_lines_reordered():
    data = make_line_classification(300, "validation", seed=3)
    real = sorted(text for text, label in data if label == 1)
    shuffled = [text for text, label in data if label == 0]
    lines = {tuple(sorted(text.split())): text for text in real}
    assert len(lines) == len(real) == len(shuffled)
    for text in shuffled:  # each shuffle has exactly the words of a real line in the same split, in another order
        original = lines[tuple(sorted(text.split()))]
        assert text != original and sorted(text.split()) == sorted(original.split())
    assert all(len(text.split()) >= 6 for text, _ in data)


def test_line_classification_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of train, validation, test"):
        make_line_classification(4, "dev")
    with pytest.raises(ValueError, match="n must be a positive int"):
        make_line_classification(0)
    with pytest.raises(ValueError, match="the test split has"):
        make_line_classification(100_000, "test")


def test_preference_pairs_are_checkable_deterministic_and_split():
    from llm_scratch.tasks import make_preference_pairs

    pairs = make_preference_pairs(30, "train")
    assert pairs == make_preference_pairs(30, "train")
    assert len(pairs) == 30 * len(FAMILIES)
    for p in pairs:
        assert p.example.check(p.chosen) and not p.example.check(p.rejected) and not p.flipped
        assert p.chosen == p.example.answer and p.mistake
    # the first pairs do not change when more are drawn
    assert make_preference_pairs(10, "train", families=["add"]) == make_preference_pairs(30, "train",
                                                                                          families=["add"])[:10]
    held_out = make_preference_pairs(30, "test")
    assert not {p.example.key for p in pairs} & {p.example.key for p in held_out}
    assert {p.mistake for p in pairs if p.example.family == "add"} == {"off by one", "off by ten", "digits swapped",
                                                                         "badly formatted"}


def test_noisy_preference_pairs_flip_an_exact_fraction():
    from llm_scratch.tasks import make_preference_pairs

    clean = make_preference_pairs(20, "train")
    for noise in (0.2, 0.4):
        noisy = make_preference_pairs(20, "train", noise=noise)
        flipped = [n.flipped for n in noisy]
        assert sum(flipped) == round(noise * len(clean))
        for c, n in zip(clean, noisy, strict=True):
            assert (n.chosen, n.rejected) == ((c.rejected, c.chosen) if n.flipped else (c.chosen, c.rejected))
            assert n.example == c.example
    with pytest.raises(ValueError, match="noise"):
        make_preference_pairs(2, noise=1.5)


def test_sum_chains_steps_and_splits():
    from llm_scratch.tasks import SumChain, make_sum_chains

    chain = SumChain((8, 6, 5, 8))
    assert chain.prompt == "8+6+5+8=" and chain.partial_sums == (14, 19, 27) and chain.solution == "14;19;27"
    # (step rewards, index of each step's last character)
    assert chain.step_rewards("14;19;27") == ([1.0, 1.0, 1.0], [1, 4, 7])
    assert chain.step_rewards("14;18;27") == ([1.0, 0.0, 1.0], [1, 4, 7])  # a wrong middle step
    assert chain.step_rewards("14;19;27;") == ([1.0, 1.0, 1.0], [1, 4, 7])  # trailing separator: no new step
    assert chain.step_rewards("14;19;27;35") == ([1.0, 1.0, 1.0, 0.0], [1, 4, 7, 10])  # one step too many
    assert chain.step_rewards("9") == ([0.0], [0])
    assert chain.step_rewards("") == ([0.0], [0])
    assert chain.step_rewards("14;;27") == ([1.0, 0.0, 1.0], [1, 3, 5])  # an empty step ends at its separator
    assert chain.check("14;19;27") and chain.check("3;27") and chain.check("14;19;27;")
    assert not chain.check("14;19;26") and not chain.check("")
    train = make_sum_chains(200, "train", n_terms=4)
    test = make_sum_chains(50, "test", n_terms=4)
    assert len({c.terms for c in train}) == 200 and not {c.terms for c in train} & {c.terms for c in test}
    assert all(len(c.terms) == 4 and all(1 <= t <= 9 for t in c.terms) for c in train)
    assert make_sum_chains(200, "train", n_terms=4) == train  # seeded
    assert make_sum_chains(20, "train", n_terms=4) == train[:20]  # asking for more extends the list
    with pytest.raises(ValueError, match="n_terms"):
        make_sum_chains(5, n_terms=1)
    with pytest.raises(ValueError, match="distinct"):
        make_sum_chains(81, "test", n_terms=2)  # only 81 sums of two digits exist, ~8 of them in test
