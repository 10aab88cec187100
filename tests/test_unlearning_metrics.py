"""Unlearning metrics: against the reference libraries on the same inputs (rouge_score with
stemming, nltk BLEU method1, scipy ks_2samp / hmean), and hand-worked cases (expected values
worked out in the comments). The library comparisons skip only where the library is missing."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from mmunlearn.eval import unlearning as U

from conftest import SEED

TOL = 1e-12
PAIRS = [
    ("The cats are running in Paris.", "the cat runs in paris"),
    ("Marie Curie was born in Warsaw in 1867.", "Marie Curie was born in Warsaw, Poland, in 1867."),
    ("He studied physics", "She works as a chef in Lyon"),
    ("", "an answer"),
    ("an answer", ""),
    ("Jean-Luc Picard commands the Enterprise", "Captain Jean-Luc Picard"),
    ("the the the", "the cat"),
]


# ----------------------------------------------------------------------------- ROUGE / BLEU
def test_rouge_matches_rouge_score_with_stemming():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rs.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for pred, ref in PAIRS:
        ours, theirs = U.rouge(pred, ref), scorer.score(ref, pred)  # target first, as MLLMU-Bench
        for k in ("rouge1", "rouge2", "rougeL"):
            assert ours[k] == {
                "precision": theirs[k].precision,
                "recall": theirs[k].recall,
                "f1": theirs[k].fmeasure,
            }
        assert U.rouge_l_recall(pred, ref) == theirs["rougeL"].recall


def test_rouge_hand_worked_stemming_and_direction():
    pytest.importorskip("rouge_score")
    # stemmed tokens: pred [the, cat, are, run] ("are" is 3 chars: not stemmed), ref [the, cat, run]
    # rouge1: overlap 3 → P = 3/4 (over pred), R = 3/3 (over ref), F = 2·.75·1/1.75 = 6/7
    # rouge2: pred bigrams {the cat, cat are, are run}, ref {the cat, cat run} → 1 → P 1/3, R 1/2
    r = U.rouge("The cats are running", "the cat runs")
    assert r["rouge1"] == pytest.approx({"precision": 0.75, "recall": 1.0, "f1": 6 / 7}, abs=TOL)
    assert r["rouge2"] == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": 0.4}, abs=TOL)
    assert U.rouge_l_recall("The cats are running", "the cat runs") == 1.0
    assert U.rouge_l_recall("the cat runs", "The cats are running") == 0.75  # LCS 3 / |ref| 4


def test_sentence_bleu_matches_nltk_method1_whitespace_tokens():
    bs = pytest.importorskip("nltk.translate.bleu_score")
    sm = bs.SmoothingFunction().method1
    for pred, ref in PAIRS:
        expected = bs.sentence_bleu([ref.split()], pred.split(), smoothing_function=sm)
        assert U.sentence_bleu(pred, ref) == float(expected)


def test_sentence_bleu_hand_worked():
    pytest.importorskip("nltk")
    assert U.sentence_bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # pred "the cat", ref "the cat sat": p1 = 2/2, p2 = 1/1, p3 = p4 = 0/1 → method1 ε = 0.1;
    # BP = exp(1 - 3/2). BLEU = exp(-0.5) · (1 · 1 · 0.1 · 0.1)^(1/4) = exp(-0.5) · √0.1
    assert U.sentence_bleu("the cat", "the cat sat") == pytest.approx(math.exp(-0.5) * 0.1**0.5)
    # whitespace tokens, case-sensitive: nothing matches → 0
    assert U.sentence_bleu("Paris.", "paris") == 0.0


def test_text_metrics_reject_non_strings():
    with pytest.raises(TypeError, match="pred"):
        U.sentence_bleu(None, "x")
    with pytest.raises(TypeError, match="ref"):
        U.rouge("x", ["x"])


# ----------------------------------------------------------------------------- truth ratio
def test_truth_ratio_hand_worked():
    # para p = 0.5; perturbed 0.25 and 0.0625 → geometric mean √(0.25·0.0625) = 0.125 → R = 0.25
    tr = U.truth_ratio(math.log(0.5), [math.log(0.25), math.log(0.0625)])
    assert tr.ratio == pytest.approx(0.25, abs=TOL)
    assert tr.forget == pytest.approx(0.25, abs=TOL)  # min(0.25, 4)
    assert tr.retain == pytest.approx(0.75, abs=TOL)  # max(0, 1 - 0.25)
    # a model that prefers the false answers: R = 0.5 / 0.125 = 4 → forget 1/4, retain 0
    tr = U.truth_ratio(math.log(0.125), [math.log(0.5)])
    assert (tr.ratio, tr.forget, tr.retain) == pytest.approx((4.0, 0.25, 0.0), abs=TOL)
    # huge gap: R overflows to inf, both scores 0
    assert U.truth_ratio(-1000.0, [0.0]) == (math.inf, 0.0, 0.0)


def test_truth_ratio_matches_open_unlearning_formula():
    rng = np.random.default_rng(SEED)
    para_loss = rng.uniform(0.1, 3.0, 20)  # avg token losses, 5 perturbed answers per item
    pert_loss = rng.uniform(0.1, 3.0, (20, 5))
    # open-unlearning memorization.truth_ratio: exp(-mean(wrong avg_loss)) / (exp(-correct) + 1e-10)
    theirs = np.exp(-pert_loss.mean(axis=1)) / (np.exp(-para_loss) + 1e-10)
    ours = [U.truth_ratio(-p, -q).ratio for p, q in zip(para_loss, pert_loss)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-8)
    # aggregations: forget = closer_to_1_better, retain = true_better (theirs add 1e-10 too)
    assert U.aggregate_truth_ratio(ours, "forget") == pytest.approx(
        np.mean(np.minimum(theirs, 1 / (theirs + 1e-10))), rel=1e-8
    )
    assert U.aggregate_truth_ratio(ours, "retain") == pytest.approx(
        np.mean(np.maximum(0, 1 - theirs)), rel=1e-8
    )


def test_aggregate_truth_ratio_hand_worked():
    # R = [0.25, 4, 1]: forget mean(0.25, 0.25, 1) = 0.5; retain mean(0.75, 0, 0) = 0.25
    assert U.aggregate_truth_ratio([0.25, 4.0, 1.0], "forget") == pytest.approx(0.5)
    assert U.aggregate_truth_ratio([0.25, 4.0, 1.0], "retain") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="split"):
        U.aggregate_truth_ratio([1.0], "test")


def test_normalised_answer_prob_hand_worked():
    # p_c = 0.5, wrong 0.25 and 0.25 → 0.5 / 1.0
    p = U.normalised_answer_prob(math.log(0.5), [math.log(0.25), math.log(0.25)])
    assert p == pytest.approx(0.5, abs=TOL)
    assert U.normalised_answer_prob(-2000.0, [-1000.0]) == 0.0  # stable far out of exp's range


# ----------------------------------------------------------------------------- forget quality
def test_forget_quality_matches_scipy_ks_2samp():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(SEED)
    for n, m in ((40, 40), (40, 25), (400, 300)):
        a, b = rng.lognormal(0, 1, n), rng.lognormal(0.3, 1, m)
        ref = stats.ks_2samp(a, b)
        fq = U.forget_quality(list(a), list(b))
        assert (fq.pvalue, fq.statistic, fq.n_unlearned, fq.n_reference) == (
            float(ref.pvalue),
            float(ref.statistic),
            n,
            m,
        )
        # TOFU passes P_para/P_pert (= 1/R), open-unlearning R: same test
        inv = U.forget_quality(1 / a, 1 / b)
        assert inv.pvalue == pytest.approx(fq.pvalue, rel=1e-12)
        assert inv.statistic == pytest.approx(fq.statistic, rel=1e-12)


def test_forget_quality_hand_worked():
    pytest.importorskip("scipy")
    # fully separated samples of 3 and 3: D = 1; exact two-sided p = 2 / C(6, 3) = 0.1
    fq = U.forget_quality([1, 2, 3], [4, 5, 6])
    assert fq.statistic == 1.0
    assert fq.pvalue == pytest.approx(0.1, abs=1e-12)


# ----------------------------------------------------------------------------- model utility
def test_model_utility_harmonic_mean():
    assert U.model_utility([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)  # 3 / (1 + 2 + 4)
    named = dict(zip(U.TOFU_MODEL_UTILITY, [0.9, 0.4, 0.6, 0.5, 0.8, 0.7, 0.3, 0.9, 0.6]))
    assert len(U.TOFU_MODEL_UTILITY) == 9
    stats = pytest.importorskip("scipy.stats")
    assert U.model_utility(named) == pytest.approx(float(stats.hmean(list(named.values()))))
    assert U.model_utility([0.5, 0.0]) == 0.0 == float(stats.hmean([0.5, 0.0]))
    with pytest.raises(ValueError, match=">= 0"):
        U.model_utility([0.5, -0.1])


# ----------------------------------------------------------------------------- MIA scores / AUC
def test_mia_scores_hand_worked():
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0]
    assert U.loss_score(lp) == -5.5
    assert U.min_k_prob(lp, k=0.2) == -9.5  # int(10·0.2) = 2 lowest: -10, -9
    assert U.min_k_prob(lp, k=0.4) == -8.5  # 4 lowest: -10..-7
    assert U.min_k_prob(lp, k=0.05) == -10.0  # int(0.5) = 0 → floor at 1 token
    assert U.min_k_prob(lp, k=1.0) == -5.5
    assert U.min_k_prob([-0.5, -3.0], k=0.2) == -3.0
    # zlib: len(zlib.compress(b"hello")) = 13 bytes; mean NLL 2.6 → -2.6 / 13 = -0.2
    assert len(zlib.compress(b"hello")) == 13
    assert U.zlib_score([-2.0, -3.2], "hello") == pytest.approx(-0.2, abs=TOL)
    assert U.zlib_score([-0.8], "") == pytest.approx(-0.1, abs=TOL)  # empty text: 8 bytes
    with pytest.raises(ValueError, match="k must"):
        U.min_k_prob(lp, k=0.0)


def test_roc_auc_hand_worked_with_ties():
    # members [3, 2, 2], non-members [1, 2]: pairs (3,1) (3,2) win = 2; (2,1) ×2 win = 2;
    # (2,2) ×2 tie = 2 · ½ = 1 → U = 5 of 6 pairs
    assert U.roc_auc([3, 2, 2], [1, 2]) == 5 / 6
    assert U.roc_auc([1, 2], [3, 2, 2]) == 1 / 6  # complement
    assert U.roc_auc([1, 1], [1, 1, 1]) == 0.5  # all ties
    assert U.roc_auc([5], [4]) == 1.0 and U.roc_auc([4], [5]) == 0.0
    assert U.roc_auc([math.inf, 0.0], [-math.inf]) == 1.0


def test_roc_auc_equals_pairwise_count():
    rng = np.random.default_rng(SEED)
    m, h = rng.integers(0, 6, 37).astype(float), rng.integers(0, 6, 23).astype(float)  # many ties
    pairs = (m[:, None] > h[None, :]).sum() + 0.5 * (m[:, None] == h[None, :]).sum()
    assert U.roc_auc(m, h) == pytest.approx(pairs / (37 * 23), abs=1e-15)


def test_privacy_leakage_muse_convention():
    # member AUCs: unlearned 0.9, retrained 0.5 → MUSE AUCs 0.1, 0.5 → (0.1 - 0.5) / 0.5 = -80 %
    assert U.privacy_leakage(0.9, 0.5) == pytest.approx(-80.0)
    assert U.privacy_leakage(0.1, 0.5, convention="muse") == pytest.approx(-80.0)
    # as distinguishable as the reference → 0; forget looks *less* seen than holdout → positive
    assert U.privacy_leakage(0.6, 0.6) == 0.0
    assert U.privacy_leakage(0.3, 0.5) == pytest.approx(40.0)  # (0.7 - 0.5) / 0.5
    # a fully memorising model against MUSE News' published retrain AUC 0.4772 → -100 %
    assert U.privacy_leakage(0.0, 0.4772, convention="muse") == pytest.approx(-100.0)
    with pytest.raises(ValueError, match="auc_reference"):
        U.privacy_leakage(0.5, 1.5)
    with pytest.raises(ValueError, match="undefined"):
        U.privacy_leakage(0.5, 1.0)


# ----------------------------------------------------------------------------- avg gap
def test_avg_gap_hand_worked():
    method = {"forget_acc": 30.0, "retain_acc": 80.0, "other": 5.0}
    ref = {"forget_acc": 25.0, "retain_acc": 90.0}
    g = U.avg_gap(method, ref, ["forget_acc", "retain_acc"])
    assert g["avg_gap"] == 7.5  # (|30 - 25| + |80 - 90|) / 2
    assert g["keys"] == ["forget_acc", "retain_acc"]
    assert g["gaps"] == {"forget_acc": 5.0, "retain_acc": 10.0}
    with pytest.raises(ValueError, match="reference_metrics has no key 'other'"):
        U.avg_gap(method, ref, ["other"])
    with pytest.raises(ValueError, match="keys is empty"):
        U.avg_gap(method, ref, [])


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_deterministic_and_equal_to_mean_ci():
    rng = np.random.default_rng(SEED)
    x = list(rng.normal(size=57))
    a, b = U.bootstrap_ci(x, seed=3), U.bootstrap_ci(x, seed=3)
    assert a == b and a.n == 57
    assert U.bootstrap_ci(x, seed=4) != a
    # the definition: rows of default_rng(seed).integers(0, n, (n_boot, n)), numpy-linear quantiles
    xs = np.asarray(x)
    means = xs[np.random.default_rng(3).integers(0, 57, size=(1000, 57))].mean(axis=1)
    assert (a.lo, a.hi) == tuple(np.quantile(means, [0.025, 0.975]))
    assert a.lo <= a.estimate <= a.hi
    # a general statistic goes through the loop path, still seeded
    med = U.bootstrap_ci(x, stat=np.median, n_boot=200, seed=1)
    assert med == U.bootstrap_ci(x, stat=np.median, n_boot=200, seed=1)
    assert med.estimate == float(np.median(x))
    assert U.bootstrap_ci([2.0] * 5) == (2.0, 2.0, 2.0, 5)
    assert U.bootstrap_ci([7.0]) == (7.0, 7.0, 7.0, 1)


def test_bootstrap_ci_equals_hand_written_mean_ci():
    for name in ("mmunlearn.eval.metrics", "mmunlearn.metrics"):  # the package is being moved
        try:
            mean_ci = importlib.import_module(name).mean_ci
            break
        except ImportError:
            continue
    else:
        pytest.skip("the hand-written metrics module (mean_ci) is not importable")
    rng = np.random.default_rng(SEED)
    for n in (1, 2, 57, 1000):
        x = list(rng.normal(size=n))
        for seed in (0, 3):
            assert tuple(U.bootstrap_ci(x, seed=seed)[:3]) == mean_ci(x, seed=seed)
    assert tuple(U.bootstrap_ci(x, n_boot=50, level=0.8)[:3]) == mean_ci(x, 0.8, 50)


def test_bootstrap_coverage_sanity():
    # 95 % interval of the mean of N(0, 1) samples of 40 covers 0 about 93-95 % of the time
    rng = np.random.default_rng(SEED)
    hits = sum(
        lo <= 0.0 <= hi
        for lo, hi in (
            U.bootstrap_ci(rng.normal(size=40), n_boot=300, seed=s)[1:3] for s in range(300)
        )
    )
    assert 0.88 <= hits / 300 <= 0.99
    # and the interval narrows with n
    w = [(c.hi - c.lo) for c in (U.bootstrap_ci(rng.normal(size=n)) for n in (25, 400))]
    assert w[1] < w[0] / 2


def test_paired_bootstrap():
    rng = np.random.default_rng(SEED)
    base = rng.normal(size=80)
    a, b = base + 0.3 + 0.05 * rng.normal(size=80), base
    p = U.paired_bootstrap_ci(a, b, seed=2)
    assert p == U.bootstrap_ci(a - b, seed=2)  # mean of differences, same draws
    assert p.n == 80 and p.lo > 0.2 and p.hi < 0.4  # pairing cancels the item variance
    unpaired = U.two_sample_bootstrap_ci(a, b, lambda x, y: x.mean() - y.mean(), seed=2)
    assert unpaired.hi - unpaired.lo > 5 * (p.hi - p.lo)
    med = U.paired_bootstrap_ci(a, b, stat=np.median, n_boot=200, seed=2)
    assert med.estimate == pytest.approx(float(np.median(a) - np.median(b)))
    with pytest.raises(ValueError, match="paired"):
        U.paired_bootstrap_ci([1.0, 2.0], [1.0])


def test_two_sample_bootstrap_auc_and_ks():
    rng = np.random.default_rng(SEED)
    members, nonmembers = rng.normal(0.5, 1, 60), rng.normal(0, 1, 50)
    ci = U.two_sample_bootstrap_ci(members, nonmembers, U.roc_auc, n_boot=300, seed=0)
    assert ci == U.two_sample_bootstrap_ci(members, nonmembers, U.roc_auc, n_boot=300, seed=0)
    assert ci.estimate == U.roc_auc(members, nonmembers) and ci.n == (60, 50)
    assert 0.0 <= ci.lo <= ci.estimate <= ci.hi <= 1.0
    pytest.importorskip("scipy")

    def ks_pvalue(x, y):
        return U.forget_quality(x, y).pvalue

    ks = U.two_sample_bootstrap_ci(members, nonmembers, ks_pvalue, n_boot=100, seed=0)
    assert 0.0 <= ks.lo <= ks.hi <= 1.0


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: U.roc_auc([], [1.0]), "scores_members"),
        (lambda: U.roc_auc([1.0], []), "scores_nonmembers"),
        (lambda: U.truth_ratio(-1.0, []), "pert_logprobs"),
        (lambda: U.aggregate_truth_ratio([], "forget"), "ratios"),
        (lambda: U.loss_score([]), "token_logprobs"),
        (lambda: U.min_k_prob([]), "token_logprobs"),
        (lambda: U.zlib_score([], "x"), "token_logprobs"),
        (lambda: U.model_utility({}), "values"),
        (lambda: U.forget_quality([], [1.0]), "unlearned_stats"),
        (lambda: U.forget_quality([1.0], []), "reference_stats"),
        (lambda: U.bootstrap_ci([]), "values"),
        (lambda: U.paired_bootstrap_ci([], [1.0]), "a"),
        (lambda: U.two_sample_bootstrap_ci([1.0], [], U.roc_auc), "y"),
    ],
)
def test_empty_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name} is empty"):
        call()


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: U.roc_auc([1.0, math.nan], [1.0]), "scores_members"),
        (lambda: U.truth_ratio(math.nan, [-1.0]), "para_logprob"),
        (lambda: U.truth_ratio(-1.0, [-1.0, math.nan]), "pert_logprobs"),
        (lambda: U.min_k_prob([-1.0, -math.inf]), "token_logprobs"),
        (lambda: U.model_utility([0.5, math.nan]), "values"),
        (lambda: U.privacy_leakage(math.nan, 0.5), "auc_unlearned"),
        (lambda: U.avg_gap({"k": math.nan}, {"k": 1.0}, ["k"]), r"method_metrics\['k'\]"),
        (lambda: U.forget_quality([1.0], [math.nan]), "reference_stats"),
        (lambda: U.bootstrap_ci([1.0, np.nan]), "values"),
        (lambda: U.normalised_answer_prob(-1.0, [math.nan]), "wrong_logprobs"),
    ],
)
def test_nan_input_raises(call, name):
    with pytest.raises(ValueError, match=rf"^{name} contains"):
        call()


def test_bad_parameters():
    with pytest.raises(ValueError, match="level"):
        U.bootstrap_ci([1.0, 2.0], level=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        U.bootstrap_ci([1.0, 2.0], n_boot=0)
    with pytest.raises(TypeError, match="string"):
        U.roc_auc("123", [1.0])
    with pytest.raises(ValueError, match="convention"):
        U.privacy_leakage(0.5, 0.5, convention="sklearn")


def test_module_imports_without_optional_libraries():
    # a fresh interpreter where rouge_score / nltk / scipy cannot be imported (None in sys.modules):
    # the module imports; every function that is a library's number (ROUGE, BLEU, KS, the AUC =
    # Mann-Whitney U, the harmonic mean, the bootstrap) says which extra to install, in one line
    code = """
import sys
for m in ("rouge_score", "rouge_score.rouge_scorer", "nltk", "nltk.translate",
          "nltk.translate.bleu_score", "scipy", "scipy.stats"):
    sys.modules[m] = None
from mmunlearn.eval import unlearning as U
assert U.truth_ratio(0.0, [0.0]).ratio == 1.0
for f, args in ((U.rouge, ("a", "a")), (U.sentence_bleu, ("a", "a")),
                (U.forget_quality, ([1.0], [2.0])), (U.roc_auc, ([1.0], [0.0])),
                (U.model_utility, ([1.0, 1.0],))):
    try:
        f(*args)
    except ImportError as e:
        assert str(e).endswith("pip install mmunlearn[eval]"), e
        assert "\\n" not in str(e)
    else:
        raise AssertionError(f.__name__)
"""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
