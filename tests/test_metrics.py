"""Text metrics on hand-made cases; every expected value is worked out by hand in a comment."""

from __future__ import annotations

import math

import pytest

from mmunlearn.eval import metrics as M

TOL = 1e-9
PRED = "the cat sat on the mat"
REF = "the cat is on the mat"


# ---------------------------------------------------------------- normalisation / tokens


def test_normalize_text():
    # lower → delete punctuation (no space inserted) → drop a/an/the → collapse whitespace
    assert M.normalize_text("  The  Eiffel-Tower, in   PARIS! ") == "eiffeltower in paris"
    assert M.normalize_text("An apple a day") == "apple day"
    assert M.normalize_text("Theatre, anthem") == "theatre anthem"  # whole words only
    assert M.normalize_text("\u201cQuoted\u201d \u2014 text") == "quoted text"  # unicode P*
    assert M.normalize_text("") == ""


def test_tokenize_keeps_articles_splits_punctuation():
    assert M.tokenize("The cat's mat, 2 m long.") == ["the", "cat", "s", "mat", "2", "m", "long"]
    assert M.tokenize("Jean-Luc Picard") == ["jean", "luc", "picard"]
    assert M.tokenize("  ") == []


# ---------------------------------------------------------------- identical / disjoint


def test_identical_strings_score_one_everywhere():
    s = "Marie Curie was born in Warsaw in 1867."
    for n in (1, 2):
        assert M.rouge_n(s, s, n) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert M.rouge_l(s, s) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert M.rouge_scores(s, s) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert M.bleu(s, s) == pytest.approx(1.0, abs=TOL)
    assert M.bleu(s, s, smooth=False) == pytest.approx(1.0, abs=TOL)
    assert M.corpus_bleu([s, PRED], [s, PRED]) == pytest.approx(1.0, abs=TOL)
    assert M.cloze_match(s, s)
    # case and punctuation do not matter
    assert M.rouge_scores("Paris, France!", "paris france") == {
        "rouge1": 1.0,
        "rouge2": 1.0,
        "rougeL": 1.0,
    }
    # two tokens, smoothed: p1 = 2/2, p2 = (1+1)/(1+1), p3 = p4 = (0+1)/(0+1); BP = 1 → 1
    assert M.bleu("Paris, France", "paris france") == pytest.approx(1.0, abs=TOL)


def test_disjoint_strings_score_zero():
    a, b = "red green blue", "one two three four"
    assert M.rouge_n(a, b, 1) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert M.rouge_scores(a, b) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert M.bleu(a, b) == 0.0  # no unigram match: 0 even with smoothing
    assert M.corpus_bleu([a], [b]) == 0.0
    assert not M.cloze_match(a, b)


def test_empty_inputs_score_zero():
    assert M.rouge_scores("", REF) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert M.rouge_scores(PRED, "") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert M.bleu("", REF) == 0.0 and M.bleu(PRED, "") == 0.0
    assert M.corpus_bleu([], []) == 0.0


# ---------------------------------------------------------------- ROUGE


def test_rouge_worked_example():
    # pred tokens: the cat sat on the mat (6); ref tokens: the cat is on the mat (6)
    # ROUGE-1: pred {the:2, cat, sat, on, mat}, ref {the:2, cat, is, on, mat}
    #   clipped overlap = 2 + 1 + 0 + 1 + 1 = 5 → P = 5/6, R = 5/6, F = 5/6
    r1 = M.rouge_n(PRED, REF, 1)
    for k in ("precision", "recall", "f1"):
        assert r1[k] == pytest.approx(5 / 6, abs=TOL)
    # ROUGE-2: pred {the cat, cat sat, sat on, on the, the mat} (5),
    #          ref  {the cat, cat is, is on, on the, the mat} (5)
    #   overlap {the cat, on the, the mat} = 3 → P = R = F = 3/5
    r2 = M.rouge_n(PRED, REF, 2)
    for k in ("precision", "recall", "f1"):
        assert r2[k] == pytest.approx(3 / 5, abs=TOL)
    # ROUGE-L: LCS = "the cat on the mat" = 5 → P = R = F = 5/6
    rl = M.rouge_l(PRED, REF)
    for k in ("precision", "recall", "f1"):
        assert rl[k] == pytest.approx(5 / 6, abs=TOL)
    s = M.rouge_scores(PRED, REF)
    assert s["rouge1"] == pytest.approx(5 / 6, abs=TOL)
    assert s["rouge2"] == pytest.approx(3 / 5, abs=TOL)
    assert s["rougeL"] == pytest.approx(5 / 6, abs=TOL)


def test_rouge_unequal_lengths():
    # pred "the cat sat" (3) vs ref "the cat sat on the mat" (6)
    # ROUGE-1: overlap 3 → P = 1, R = 1/2, F = 2·(1/2)/(3/2) = 2/3
    r1 = M.rouge_n("the cat sat", "the cat sat on the mat", 1)
    assert (r1["precision"], r1["recall"]) == pytest.approx((1.0, 0.5), abs=TOL)
    assert r1["f1"] == pytest.approx(2 / 3, abs=TOL)
    # ROUGE-2: pred bigrams {the cat, cat sat} both in ref (5 bigrams) → P = 1, R = 2/5,
    #   F = 2·(2/5)/(7/5) = 4/7
    r2 = M.rouge_n("the cat sat", "the cat sat on the mat", 2)
    assert (r2["precision"], r2["recall"]) == pytest.approx((1.0, 0.4), abs=TOL)
    assert r2["f1"] == pytest.approx(4 / 7, abs=TOL)
    # ROUGE-L: LCS 3 → P = 1, R = 1/2, F = 2/3
    assert M.rouge_l("the cat sat", "the cat sat on the mat")["f1"] == pytest.approx(2 / 3, abs=TOL)


def test_rouge_clipped_counts_and_short_inputs():
    # pred {the:4} vs ref {the:1, cat:1}: overlap min(4, 1) = 1 → P = 1/4, R = 1/2,
    #   F = 2·(1/8)/(3/4) = 1/3
    r = M.rouge_n("the the the the", "the cat", 1)
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((0.25, 0.5, 1 / 3), abs=TOL)
    # a one-token prediction has no bigram → ROUGE-2 = 0 even though the token matches
    assert M.rouge_n("cat", "the cat", 2)["f1"] == 0.0
    with pytest.raises(ValueError):
        M.rouge_n(PRED, REF, 0)


def test_rouge_l_non_contiguous():
    # pred "w b c d" (4) vs ref "w x c y d" (5): LCS "w c d" = 3 (gaps allowed)
    #   P = 3/4, R = 3/5, F = 2·(9/20)/(27/20) = 2/3
    r = M.rouge_l("w b c d", "w x c y d")
    assert (r["precision"], r["recall"]) == pytest.approx((0.75, 0.6), abs=TOL)
    assert r["f1"] == pytest.approx(2 / 3, abs=TOL)
    # word order matters for L but not for 1: "mat the on" vs "on the mat": LCS 1
    assert M.rouge_l("mat the on", "on the mat")["f1"] == pytest.approx(1 / 3, abs=TOL)
    assert M.rouge_n("mat the on", "on the mat", 1)["f1"] == pytest.approx(1.0, abs=TOL)


# ---------------------------------------------------------------- BLEU


def test_bleu_brevity_penalty():
    # pred "the cat sat" (c = 3) vs ref "the cat sat on the mat" (r = 6)
    # p1 = 3/3, p2 = 2/2, p3 = 1/1; p4: no pred 4-gram → smoothed (0+1)/(0+1) = 1
    # BP = exp(1 - 6/3) = e^-1 → BLEU = e^-1
    assert M.bleu("the cat sat", "the cat sat on the mat") == pytest.approx(math.exp(-1), abs=TOL)
    # unsmoothed: l4 = 0 → 0
    assert M.bleu("the cat sat", "the cat sat on the mat", smooth=False) == 0.0
    # max_n = 3, unsmoothed: all p_n = 1 → BLEU = BP = e^-1
    assert M.bleu("the cat sat", "the cat sat on the mat", max_n=3, smooth=False) == pytest.approx(
        math.exp(-1), abs=TOL
    )
    # a prediction longer than the reference is not penalised (BP = 1): see the next test


def test_bleu_known_values():
    # PRED vs REF (c = r = 6, BP = 1): matches/totals m1/l1 = 5/6, m2/l2 = 3/5,
    #   m3/l3 = 1/4 ({on the mat}), m4/l4 = 0/3
    # smoothed (n ≥ 2 add-one): 5/6 · 4/6 · 2/5 · 1/4 = 1/18 → BLEU = (1/18)^(1/4)
    assert M.bleu(PRED, REF) == pytest.approx((1 / 18) ** 0.25, abs=TOL)
    assert M.bleu(PRED, REF, smooth=False) == 0.0  # m4 = 0
    # max_n = 1: BLEU-1 = p1 = 5/6
    assert M.bleu(PRED, REF, max_n=1) == pytest.approx(5 / 6, abs=TOL)
    # pred "the cat sat on the mat today" (c = 7) vs ref "the cat sat on the mat" (r = 6)
    #   c > r → BP = 1; m/l = 6/7, 5/6, 4/5, 3/4
    #   unsmoothed: product 3/7 → (3/7)^(1/4)
    #   smoothed: 6/7 · 6/7 · 5/6 · 4/5 = 24/49 → (24/49)^(1/4)
    long_pred, ref = "the cat sat on the mat today", "the cat sat on the mat"
    assert M.bleu(long_pred, ref, smooth=False) == pytest.approx((3 / 7) ** 0.25, abs=TOL)
    assert M.bleu(long_pred, ref) == pytest.approx((24 / 49) ** 0.25, abs=TOL)
    with pytest.raises(ValueError):
        M.bleu(PRED, REF, max_n=0)


def test_corpus_bleu_sums_counts():
    a = ("the cat sat on the mat today", "the cat sat on the mat")
    b = ("one two three four", "one two three four five six seven eight")
    # one pair: the same as the sentence BLEU with the same smoothing
    assert M.corpus_bleu([a[0]], [a[1]]) == pytest.approx(M.bleu(*a, smooth=False), abs=TOL)
    assert M.corpus_bleu([a[0]], [a[1]], smooth=True) == pytest.approx(M.bleu(*a), abs=TOL)
    # a: m = 6,5,4,3  l = 7,6,5,4  c = 7 r = 6;  b: m = l = 4,3,2,1  c = 4 r = 8
    # sums: m = 10,8,6,4  l = 11,9,7,5  c = 11 r = 14
    # BP = exp(1 - 14/11) = exp(-3/11); product = 10/11 · 8/9 · 6/7 · 4/5 = 128/231
    expected = math.exp(-3 / 11) * (128 / 231) ** 0.25
    assert M.corpus_bleu([a[0], b[0]], [a[1], b[1]]) == pytest.approx(expected, abs=TOL)
    # not the mean of the sentence BLEUs
    mean_sent = (M.bleu(*a, smooth=False) + M.bleu(*b, smooth=False)) / 2
    assert abs(expected - mean_sent) > 1e-3
    with pytest.raises(ValueError):
        M.corpus_bleu([a[0]], [])


# ---------------------------------------------------------------- cloze


def test_cloze_match():
    assert M.cloze_match("She was born in Warsaw, Poland.", "Warsaw")  # positive
    assert not M.cloze_match("She was born in Krakow.", "Warsaw")  # negative
    assert M.cloze_match("SHE WAS BORN IN WARSAW", "warsaw")  # case-insensitive
    assert M.cloze_match("warsaw", "Warsaw.")  # punctuation of the ground truth ignored
    assert M.cloze_match("He works as the chief engineer", "a chief engineer")  # articles
    assert not M.cloze_match("anything at all", "")  # empty ground truth never matches
    assert not M.cloze_match("", "Warsaw")
    # plain substring containment (the reference rule) vs whole words on request
    assert M.cloze_match("What a party!", "art")
    assert not M.cloze_match("What a party!", "art", whole_words=True)
    assert M.cloze_match("Born in New York City", "new york", whole_words=True)


# ---------------------------------------------------------------- MCQ


def test_mcq_from_loglik_argmax():
    assert M.mcq_from_loglik({"A": -5.0, "B": -2.0, "C": -3.0, "D": -10.0}) == "B"
    # NaN counts as -inf
    assert M.mcq_from_loglik({"A": float("nan"), "B": -7.0}) == "B"
    with pytest.raises(ValueError):
        M.mcq_from_loglik({})


def test_mcq_from_loglik_tie_goes_to_first_letter():
    assert M.mcq_from_loglik({"A": -1.0, "B": -3.0, "C": -1.0}) == "A"
    # independent of the dict's insertion order: C and D tie → C
    assert M.mcq_from_loglik({"D": -0.5, "C": -0.5, "B": -2.0, "A": -4.0}) == "C"


def test_mcq_from_loglik_length_normalisation():
    ll, lengths = {"A": -6.0, "B": -4.0}, {"A": 6, "B": 2}
    assert M.mcq_from_loglik(ll) == "B"  # sums: -4 > -6
    # means: A = -6/6 = -1, B = -4/2 = -2 → A
    assert M.mcq_from_loglik(ll, length_normalized=True, option_lengths=lengths) == "A"
    # tie after normalisation (A = -3/3 = -1 = B = -2/2) → A
    assert M.mcq_from_loglik({"A": -3.0, "B": -2.0}, True, {"A": 3, "B": 2}) == "A"
    with pytest.raises(ValueError):
        M.mcq_from_loglik(ll, length_normalized=True)
    with pytest.raises(ValueError):
        M.mcq_from_loglik(ll, length_normalized=True, option_lengths={"A": 0, "B": 2})


OPTS = {"A": "Paris", "B": "London", "C": "Paris, Texas", "D": "Rome"}


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        (" **B** ", "B"),
        ("Answer: B", "B"),
        ("answer: d", "D"),
        ("The answer is (D).", "D"),
        ("The correct answer is C.", "C"),
        ("B. London", "B"),
        ("(D) Rome", "D"),
        ("b) London", "B"),
        ("B is correct", "B"),
        ("A", "A"),
        ("A. Paris", "A"),
        ("A Paris", "A"),  # "A" followed by its own option text
        ("I think (D) is right.", "D"),
        ("It is London.", "B"),  # option text
        ("Rome, clearly", "D"),
        ("Paris, Texas", "C"),  # "Paris" is inside "Paris, Texas": the longer option wins
        ("The capital is Paris.", "A"),
    ],
)
def test_mcq_letter_from_text_parses(text, letter):
    assert M.mcq_letter_from_text(text, OPTS) == letter


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "E",
        "(E)",  # not an option letter
        "A man in a hat",  # article, not option A; no option text
        "The answer is a dog",
        "Either Paris or London",  # two options named
        "I do not know",
    ],
)
def test_mcq_letter_from_text_none(text):
    assert M.mcq_letter_from_text(text, OPTS) is None


# ---------------------------------------------------------------- aggregation


def test_accuracy():
    # A=A ✓, C≠B, None (unparsed) ✗, D=D ✓ → 2/4
    assert M.accuracy(["A", "C", None, "D"], ["A", "B", "C", "D"]) == 0.5
    assert M.accuracy([True, True], [True, True]) == 1.0
    assert math.isnan(M.accuracy([], []))
    with pytest.raises(ValueError):
        M.accuracy(["A"], ["A", "B"])


def test_mean_ci_bootstrap():
    vals = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]  # mean 7/10
    m, lo, hi = M.mean_ci(vals, seed=3)
    assert m == pytest.approx(0.7, abs=TOL)
    assert 0.0 <= lo <= m <= hi <= 1.0 and lo < hi
    assert M.mean_ci(vals, seed=3) == (m, lo, hi)  # same seed → same interval
    assert M.mean_ci(vals, seed=3, n_boot=500) == M.mean_ci(vals, seed=3, n_boot=500)
    # a wider confidence level never gives a narrower interval (same resamples)
    _, lo80, hi80 = M.mean_ci(vals, confidence=0.8, seed=3)
    assert lo <= lo80 <= hi80 <= hi
    # continuous values: contains the mean, within [min, max]
    xs = [0.12, 0.5, 0.33, 0.91, 0.47, 0.05, 0.76, 0.64]
    m2, lo2, hi2 = M.mean_ci(xs, n_boot=2000, seed=0)
    assert m2 == pytest.approx(sum(xs) / len(xs), abs=TOL)
    assert min(xs) <= lo2 <= m2 <= hi2 <= max(xs)
    # degenerate inputs
    assert M.mean_ci([0.4]) == (0.4, 0.4, 0.4)
    assert all(math.isnan(v) for v in M.mean_ci([]))
    with pytest.raises(ValueError):
        M.mean_ci(vals, confidence=1.0)


def test_rouge_is_rouge_score_stemming_optional():
    """ROUGE is rouge_score's (issue #26): unstemmed by default (the default protocol's
    behaviour before, when it was hand-written), Porter-stemmed with ``stemmer=True``."""
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    pairs = [
        (PRED, REF),
        ("The cat sat on the mat.", "the cat is on the mat"),
        ("Born in 1970, in Oslo", "She was born in Oslo in 1970."),
        ("The cats are running", "the cat runs"),
    ]
    for stem in (False, True):
        scorer = rs.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
        for pred, ref in pairs:
            got = M.rouge_scores(pred, ref, stemmer=stem)
            want = scorer.score(ref, pred)
            assert got == {k: want[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")}
            assert M.rouge_l(pred, ref, stemmer=stem)["recall"] == want["rougeL"].recall
    assert M.rouge_scores("he running", "he runs")["rouge1"] == 0.5  # unstemmed: 1 of 2
    assert M.rouge_scores("he running", "he runs", stemmer=True)["rouge1"] == 1.0
    # the documented change: rouge_score drops non-ASCII letters, "zoë" → "zo" ≠ "zoe"
    # (the hand-written ROUGE before #26 kept them: there "Zoë Smith" vs itself and these agreed)
    assert M.rouge_scores("Zoë Smith", "Zoe Smith")["rouge1"] == 0.5
    with pytest.raises(ValueError, match="1..9"):
        M.rouge_n(PRED, REF, 10)
