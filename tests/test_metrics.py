"""Metrics on hand-made cases whose answers are worked out in the comments."""

from __future__ import annotations

import math

import pytest

from mmunlearn import metrics as M


def test_normalize():
    assert M.normalize_text("The Cat, sat!  on a MAT.") == "cat sat on mat"


def test_rouge_identical_and_disjoint():
    assert M.rouge_scores("paris france", "Paris, France") == {
        "rouge1": 1.0,
        "rouge2": 1.0,
        "rougeL": 1.0,
    }
    assert M.rouge_scores("red blue", "green yellow") == {
        "rouge1": 0.0,
        "rouge2": 0.0,
        "rougeL": 0.0,
    }


def test_rouge_worked_example():
    # normalised: pred "cat sat on mat" (4), ref "cat is on mat" (4)
    # ROUGE-1: overlap {cat, on, mat} = 3 → P = R = F = 3/4
    assert M.rouge_n("the cat sat on the mat", "the cat is on the mat", 1)["f1"] == pytest.approx(
        0.75, abs=1e-9
    )
    # ROUGE-2: pred bigrams {cat sat, sat on, on mat}, ref {cat is, is on, on mat}: 1 → 1/3
    assert M.rouge_n("the cat sat on the mat", "the cat is on the mat", 2)["f1"] == pytest.approx(
        1 / 3, abs=1e-9
    )
    # ROUGE-L: LCS "cat on mat" = 3 → 3/4
    assert M.rouge_l("the cat sat on the mat", "the cat is on the mat")["f1"] == pytest.approx(
        0.75, abs=1e-9
    )
    # unequal lengths: pred "x y" vs ref "x y z w": P = 1, R = 1/2, F = 2/3
    assert M.rouge_n("x y", "x y z w", 1)["f1"] == pytest.approx(2 / 3, abs=1e-9)


def test_bleu_values():
    assert M.bleu("one two three four", "one two three four") == pytest.approx(1.0)
    assert M.bleu("red", "green") == 0.0  # no unigram match: 0 even with smoothing
    # brevity: pred "one two" vs ref "one two three four": c=2, r=4 → BP = e^(1-2)
    # p1 = 2/2; smoothed p2 = (1+1)/(1+1) = 1; p3 = (0+1)/(0+1) = 1; p4 = 1 → BLEU = BP
    assert M.bleu("one two", "one two three four") == pytest.approx(math.exp(-1), abs=1e-12)
    # corpus BLEU of identical corpora is 1
    assert M.corpus_bleu(["a b c d", "e f g h"], ["a b c d", "e f g h"]) == pytest.approx(1.0)


def test_cloze():
    assert M.cloze_match("She was born in New York City.", "new york")
    assert not M.cloze_match("She was born in Newark.", "new york")
    assert M.cloze_match("PILOT", "pilot")
    assert not M.cloze_match("anything", "")


def test_mcq_from_loglik_ties_and_normalisation():
    assert M.mcq_from_loglik({"A": -3.0, "B": -1.0, "C": -2.0}) == "B"
    assert M.mcq_from_loglik({"B": -1.0, "A": -1.0}) == "A"  # tie → earliest letter
    # sums -4 (4 tokens) vs -3 (1 token): raw picks A, per-token picks A too (-1 vs -3)
    assert M.mcq_from_loglik({"A": -4.0, "B": -3.0}, True, {"A": 4, "B": 1}) == "A"
    assert M.mcq_from_loglik({"A": -4.0, "B": -3.0}) == "B"


@pytest.mark.parametrize(
    "text,want",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("D. paris", "D"),
        ("Answer: A", "A"),
        ("it is london", "B"),
        ("no idea", None),
        ("", None),
    ],
)
def test_letter_parsing(text, want):
    opts = {"A": "paris", "B": "london", "C": "rome", "D": "madrid"}
    assert M.mcq_letter_from_text(text, opts) == want


def test_accuracy_and_bootstrap():
    assert M.accuracy(["A", "B", "C"], ["A", "C", "C"]) == pytest.approx(2 / 3)
    vals = [0, 1, 1, 0, 1, 1, 1, 0]
    a, b = M.mean_ci(vals, seed=3), M.mean_ci(vals, seed=3)
    assert a == b and a[1] <= a[0] <= a[2] and a[0] == pytest.approx(5 / 8)
