"""Comparing models (mmunlearn.eval.compare): the average gap to the reference, bootstrap
intervals of task metrics and the unlearning metrics of several models, on hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmunlearn.eval import metrics, unlearning
from mmunlearn.eval.compare import (
    gap_to_reference,
    parse_key,
    task_intervals,
    unlearning_metrics,
)
from mmunlearn.eval.likelihood import ItemStats


def _set(**items):
    """Set metrics with per-item scores: the reported value is their mean."""
    return {
        **{k: float(np.mean(v)) for k, v in items.items()},
        "_items": {k: list(map(float, v)) for k, v in items.items()},
    }


RESULTS = {
    "reference": {"forget": _set(acc=[1, 1, 0, 0]), "retain": _set(acc=[1, 1])},
    "A": {"forget": _set(acc=[0, 0, 0, 0]), "retain": _set(acc=[1, 1])},
    "B": {"forget": _set(acc=[1, 0, 0, 0]), "retain": _set(acc=[0, 1])},
    "same": {"forget": _set(acc=[1, 1, 0, 0]), "retain": _set(acc=[1, 1])},
}
KEYS = ["forget/acc", "retain/acc"]


def test_gap_hand_worked():
    g = gap_to_reference(RESULTS, "reference", KEYS, n_boot=300, seed=1)
    m = g["methods"]
    # A: |0 - 0.5| and |1 - 1| → 0.25; B: |0.25 - 0.5| and |0.5 - 1| → 0.375; same: 0
    assert m["A"]["avg_gap"]["estimate"] == pytest.approx(0.25)
    assert m["B"]["avg_gap"]["estimate"] == pytest.approx(0.375)
    assert m["A"]["gaps"]["forget/acc"]["estimate"] == pytest.approx(0.5)
    assert m["B"]["gaps"]["retain/acc"]["estimate"] == pytest.approx(0.5)
    # paired resampling: a model equal to the reference item by item has gap 0 in every draw
    assert m["same"]["avg_gap"] == {
        "estimate": 0.0,
        "lo": 0.0,
        "hi": 0.0,
        "n": {"forget/acc": 4, "retain/acc": 2},
    }
    share = g["closest_share"]
    assert g["closest"] == "same" and share["same"] == max(share.values()) > 0.5
    assert sum(share.values()) == pytest.approx(1.0)
    assert g["keys"] == KEYS and g["n"] == {"forget/acc": 4, "retain/acc": 2}
    assert "reference" not in m
    for name in ("A", "B"):
        d = m[name]["avg_gap"]
        assert 0.0 <= d["lo"] <= d["hi"] <= 1.0
    # deterministic in the seed; tuple keys are the same keys
    assert (
        gap_to_reference(RESULTS, "reference", [("forget", "acc"), ("retain", "acc")], 300, 1) == g
    )
    assert gap_to_reference(RESULTS, "reference", KEYS, 300, 2) != g


def test_gap_default_keys_and_errors():
    res = {
        "reference": {"forget": _set(vqa_mcq_acc=[1, 0]), "retain": _set(qa_mcq_acc=[1, 1])},
        "m": {"forget": _set(vqa_mcq_acc=[0, 0]), "retain": _set(qa_mcq_acc=[1, 0])},
    }
    g = gap_to_reference(res, n_boot=20)  # the main table's columns that have items
    assert g["keys"] == ["forget/vqa_mcq_acc", "retain/qa_mcq_acc"]
    assert g["methods"]["m"]["avg_gap"]["estimate"] == pytest.approx((0.5 + 0.5) / 2)
    with pytest.raises(ValueError, match="reference"):
        gap_to_reference({"m": res["m"]})
    with pytest.raises(ValueError, match="retain/nope"):
        gap_to_reference(RESULTS, keys=["retain/acc", "retain/nope"], n_boot=5)
    bad = {**RESULTS, "short": {"forget": _set(acc=[1]), "retain": _set(acc=[1, 1])}}
    with pytest.raises(ValueError, match="1 items"):
        gap_to_reference(bad, keys=KEYS, n_boot=5)
    with pytest.raises(ValueError):
        parse_key("no-slash")


def test_task_intervals_are_the_bootstrap_of_the_items():
    iv = task_intervals(RESULTS, n_boot=400, seed=3)
    ci = unlearning.bootstrap_ci([0, 0, 1, 0], np.mean, 400, 3)
    d = task_intervals({"B": {"forget": _set(acc=[0, 0, 1, 0])}}, 400, 3)["B"]["forget"]["acc"]
    assert d == {"estimate": 0.25, "lo": ci.lo, "hi": ci.hi, "n": 4}
    assert iv["A"]["forget"]["acc"]["n"] == 4 and iv["same"]["retain"]["acc"]["lo"] == 1.0
    # corpus BLEU: the statistic is recomputed on every resample of the pairs
    preds, refs = ["a b c d", "e f g", "x y"], ["a b c d", "e f h", "z y"]
    stats = [metrics.bleu_stats(p, r) for p, r in zip(preds, refs)]
    assert metrics.corpus_bleu_from_stats(stats) == metrics.corpus_bleu(preds, refs)
    m = {"bleu": metrics.corpus_bleu(preds, refs), "_bleu_stats": {"bleu": stats}}
    d = task_intervals({"x": {"s": m}}, n_boot=100, seed=0)["x"]["s"]["bleu"]
    assert d["estimate"] == m["bleu"] and d["n"] == 3 and d["lo"] <= d["hi"]


# ----------------------------------------------------------------------------- unlearning metrics
def _st(avg, para=None, pert=None, n=2, text="some answer"):
    """Item stats with a mean token log-prob ``avg`` (n equal tokens)."""
    return ItemStats([avg] * n, text, para, pert)


def test_unlearning_metrics_hand_worked():
    scipy_stats = pytest.importorskip("scipy.stats")
    # forget items: para log-prob and perturbed log-probs → R = exp(mean(pert) - para)
    forget_u = [_st(-1.0, None, [-1.0, -3.0]), _st(-0.5, None, [-0.5]), _st(-2.0, None, [-1.0])]
    forget_r = [_st(-1.0, None, [-1.5, -1.5]), _st(-3.0, None, [-0.5]), _st(-2.0, None, [-2.0])]
    retain = [_st(-0.1, None, [-2.0]), _st(-0.2, None, [-0.2])]
    holdout = [_st(-0.3), _st(-4.0)]
    stats = {
        "u": {"forget": forget_u, "retain": retain, "holdout": holdout},
        "reference": {"forget": forget_r, "retain": retain, "holdout": holdout},
    }
    roles = {"forget": "forget", "retain": "retain", "holdout": "holdout"}
    out = unlearning_metrics(stats, roles, "reference", n_boot=100, seed=0)
    u = out["u"]
    r_u = [math.exp(-2.0 + 1.0), math.exp(0.0), math.exp(1.0)]
    assert u["forget_truth_ratio"]["estimate"] == pytest.approx(
        np.mean([min(r, 1 / r) for r in r_u])
    )
    r_ret = [math.exp(-2.0 + 0.1), 1.0]
    assert u["retain_truth_ratio"]["estimate"] == pytest.approx(
        np.mean([max(0, 1 - r) for r in r_ret])
    )
    assert u["retain_prob"]["estimate"] == pytest.approx(np.mean(np.exp([-0.1, -0.2])))
    assert u["model_utility"]["estimate"] == pytest.approx(
        scipy_stats.hmean([u["retain_prob"]["estimate"], u["retain_truth_ratio"]["estimate"]])
    )
    # LOSS attack: member scores -1, -0.5, -2 vs non-members -0.3, -4: 3 of 6 pairs → 0.5
    assert u["mia_loss_auc"]["estimate"] == pytest.approx(0.5)
    assert u["mia_loss_auc"]["n"] == [3, 2]
    r_ref = [math.exp(-1.5 + 1.0), math.exp(-0.5 + 3.0), math.exp(0.0)]
    assert u["forget_quality"]["estimate"] == pytest.approx(scipy_stats.ks_2samp(r_u, r_ref).pvalue)
    # PrivLeak from the min-k (40 %, 2 tokens → the lowest one) AUCs
    auc_u = unlearning.roc_auc([-1.0, -0.5, -2.0], [-0.3, -4.0])
    auc_r = unlearning.roc_auc([-1.0, -3.0, -2.0], [-0.3, -4.0])
    assert u["privleak"]["estimate"] == pytest.approx(unlearning.privacy_leakage(auc_u, auc_r))
    assert "forget_quality" not in out["reference"] and "privleak" not in out["reference"]
    for d in u.values():
        if isinstance(d, dict):
            assert d["lo"] <= d["hi"] or math.isnan(d["lo"])


def test_unlearning_metrics_real_sets_members_and_rouge():
    stats = {
        "m": {
            "forget": [_st(-1.0, None, [-2.0])],
            "faces": [_st(-0.5, None, [-1.0, -2.0]), _st(-1.0, None, [-1.0])],
            "members": [_st(-0.1), _st(-0.2)],
            "holdout": [_st(-1.0)],
        }
    }
    task = {"m": {"retain": _set(rougeL=[0.5, 1.0])}}
    roles = {"forget": "forget", "real": ["faces"], "members": "members", "holdout": "holdout"}
    roles["rouge"] = ["retain/rougeL"]
    out = unlearning_metrics(stats, roles, task_results=task, n_boot=50)["m"]
    p = [unlearning.normalised_answer_prob(-0.5, [-1.0, -2.0]), 0.5]
    assert out["faces_prob"]["estimate"] == pytest.approx(np.mean(p))
    assert out["mia_loss_auc"]["estimate"] == 1.0  # members look more seen than the holdout
    parts = [np.mean(p), out["faces_truth_ratio"]["estimate"], 0.75]
    assert out["model_utility"]["estimate"] == pytest.approx(unlearning.model_utility(parts))
    assert set(out["model_utility"]["n"]) == {"faces_prob", "faces_truth_ratio", "retain/rougeL"}


def test_intervals_take_the_bca_method():
    """Every compare interval goes through the one bootstrap; ``method="BCa"`` reaches it."""
    x = [0.1, 0.4, 0.35, 0.8, 0.5, 0.9, 0.2, 0.65]
    d = task_intervals({"m": {"s": _set(r=x)}}, n_boot=300, seed=2, method="BCa")["m"]["s"]["r"]
    ci = unlearning.bootstrap_ci(x, np.mean, 300, 2, method="BCa")
    assert (d["estimate"], d["lo"], d["hi"]) == pytest.approx(tuple(ci[:3]), rel=1e-12)
    assert (d["lo"], d["hi"]) != tuple(unlearning.bootstrap_ci(x, np.mean, 300, 2)[1:3])
    g = gap_to_reference(RESULTS, "reference", KEYS, n_boot=200, seed=1, method="BCa")
    assert g["methods"]["same"]["avg_gap"]["hi"] == 0.0  # degenerate: the point interval
