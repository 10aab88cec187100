"""Comparing models: bootstrap intervals of every reported number, the unlearning metrics of a
list of models against a reference model, and the average gap to the reference.

Inputs are the per-item scores the evaluation keeps (``EvalConfig(keep_items=True)``: each set's
metrics carry ``"_items": {metric: [score per item]}`` and, for corpus BLEU,
``"_bleu_stats"``) and the per-item likelihood statistics of
:func:`mmunlearn.eval.likelihood.item_stats`. Every interval is a seeded percentile bootstrap
over **items** (:mod:`mmunlearn.eval.unlearning`), written as ``{"estimate", "lo", "hi", "n"}``;
models scored on the same items are resampled with the same indices (paired), so a difference
between two models is not blurred by which items were drawn.

* :func:`task_intervals` -- the interval of every task metric (accuracy, ROUGE, BLEU, ...);
* :func:`gap_to_reference` -- SalUn's "Avg. Gap": mean |method − reference| over forget / retain
  metrics, with its interval, per-metric gaps and which method is closest;
* :func:`unlearning_metrics` -- truth ratio, "Prob.", forget quality (KS against the reference),
  model utility (harmonic mean), loss / zlib / min-k % MIA AUCs and PrivLeak.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from mmunlearn.eval import metrics, unlearning

MIN_K = 0.4  # min-k % prob for the MIA and PrivLeak: MUSE and open-unlearning's TOFU/MUSE configs

__all__ = [
    "MIN_K",
    "boot_indices",
    "percentile_interval",
    "ci_dict",
    "clear_truth_ratios",
    "gap_to_reference",
    "hmean_interval",
    "item_values",
    "parse_key",
    "task_intervals",
    "unlearning_metrics",
]


def ci_dict(ci: unlearning.BootstrapCI) -> dict:
    """A :class:`~mmunlearn.eval.unlearning.BootstrapCI` as ``{"estimate", "lo", "hi", "n"}``
    (JSON-ready; ``n`` a list for two-sample statistics)."""
    n = list(ci.n) if isinstance(ci.n, tuple) else ci.n
    return {"estimate": ci.estimate, "lo": ci.lo, "hi": ci.hi, "n": n}


def parse_key(key) -> tuple[str, str]:
    """``"set/metric"`` or ``(set, metric)`` → ``(set, metric)``."""
    if isinstance(key, str):
        s, sep, m = key.partition("/")
        if not sep or not s or not m:
            raise ValueError(f"a metric key is 'set/metric', got {key!r}")
        return s, m
    s, m = key
    return str(s), str(m)


def item_values(set_metrics: Mapping, metric: str):
    """``(kind, values)`` of one metric of one set: ``("mean", [scores])`` from ``_items``,
    ``("bleu", [stats])`` from ``_bleu_stats``, ``("clear_tr_forget" | "clear_tr_retain",
    [[para_loss, perturbed_loss_sum, n_perturbed], ...])`` from ``_clear_tr`` (CLEAR's truth
    ratio, whose perturbed mean is one scalar over the items); ``(None, None)`` when no per-item
    scores were kept."""
    if metric in set_metrics.get("_items", {}):
        return "mean", set_metrics["_items"][metric]
    if metric in set_metrics.get("_bleu_stats", {}):
        return "bleu", set_metrics["_bleu_stats"][metric]
    if metric in set_metrics.get("_clear_tr", {}):
        d = set_metrics["_clear_tr"][metric]
        return f"clear_tr_{d['split']}", d["rows"]
    return None, None


def clear_truth_ratios(rows) -> np.ndarray:
    """CLEAR's per-item truth ratios ``R_i = exp(mean_all(perturbed loss) − para_loss_i)``
    (``mm/calculate_metrics.py:114-116``: the perturbed mean is one scalar over all items and
    perturbations) from rows ``[para_loss, perturbed_loss_sum, n_perturbed]``."""
    x = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    return np.exp(x[:, 1].sum() / x[:, 2].sum() - x[:, 0])


def _stat(kind: str, values, idx=None) -> float:
    if kind == "mean":
        x = np.asarray(values, dtype=np.float64)
        return float((x if idx is None else x[idx]).mean())
    rows = values if idx is None else [values[i] for i in idx]
    if kind == "bleu":
        return metrics.corpus_bleu_from_stats(rows)
    r = clear_truth_ratios(rows)
    if kind == "clear_tr_forget":  # CLEAR: mean(min(R, 1/R)) on forget tasks
        return float(np.mean(np.minimum(r, 1.0 / r)))
    return float(np.mean(np.maximum(0.0, 1.0 - 1.0 / r)))  # mean(max(0, 1 - 1/R)) elsewhere


def boot_indices(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """``n_boot`` rows of ``n`` item indices drawn with replacement (one bootstrap draw each)."""
    return rng.integers(0, n, size=(n_boot, n))


def percentile_interval(reps, level: float) -> tuple[float, float]:
    """The ``(1 ∓ level) / 2`` quantiles of the bootstrap replicates (NaN draws dropped)."""
    a = (1.0 - level) / 2.0
    reps = np.asarray(reps, dtype=np.float64)
    reps = reps[~np.isnan(reps)]
    if reps.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(reps, [a, 1.0 - a])
    return float(lo), float(hi)


def task_intervals(
    methods: Mapping[str, Mapping], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """``{method: {set: {metric: {"estimate", "lo", "hi", "n"}}}}`` for every metric with kept
    per-item scores. The estimate is the reported number (mean of the items, or the corpus
    BLEU of all pairs); the interval resamples the items ``n_boot`` times from
    ``numpy.random.default_rng(seed)`` (the same draws for every method on a set of equal size)."""
    out: dict = {}
    for name, sets in methods.items():
        for sn, sm in sets.items():
            if sn.startswith("_") or not isinstance(sm, Mapping):
                continue
            keys = [k for part in ("_items", "_bleu_stats", "_clear_tr") for k in sm.get(part, {})]
            for k in keys:
                kind, vals = item_values(sm, k)
                if not len(vals):
                    continue
                if kind == "mean":
                    ci = unlearning.bootstrap_ci(vals, np.mean, n_boot, seed, level)
                    d = ci_dict(ci)
                else:
                    idx = boot_indices(np.random.default_rng(seed), len(vals), n_boot)
                    reps = [_stat(kind, vals, row) for row in idx]
                    lo, hi = percentile_interval(reps, level)
                    d = {"estimate": _stat(kind, vals), "lo": lo, "hi": hi, "n": len(vals)}
                out.setdefault(name, {}).setdefault(sn, {})[k] = d
    return out


def gap_to_reference(
    results_by_method: Mapping[str, Mapping],
    reference: str = "reference",
    keys: Sequence | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """SalUn's "Avg. Gap" of every method to the reference model, with bootstrap intervals.

    ``results_by_method``: ``{method: {set: metrics}}`` as :func:`mmunlearn.eval.evaluate`
    returns them with ``EvalConfig(keep_items=True)`` (the reference among them, under the name
    ``reference``). ``keys``: the metrics to average, ``"set/metric"`` strings or ``(set,
    metric)`` pairs; default: the main table's forget / retain columns
    (:data:`mmunlearn.eval.report.COLUMNS`) that the reference and every method have per-item
    scores for. Gap of a method = ``mean_k |m_k − ref_k|`` in the metrics' units.

    The interval resamples the items of every metric ``n_boot`` times (seeded); the method and
    the reference are scored on the same items, so one draw of indices serves both (paired),
    and every method sees the same draws. Returns::

        {"reference", "keys": ["set/metric", ...], "n": {key: items}, "n_boot", "seed",
         "level", "methods": {method: {"avg_gap": {"estimate", "lo", "hi", "n"},
                                        "gaps": {key: {"estimate", "lo", "hi", "n"}}}},
         "closest": method with the smallest Avg. Gap,
         "closest_share": {method: fraction of bootstrap draws in which it is closest
                           (a tie shares the draw)}}

    Raises ``ValueError`` when the reference is missing, a key has no per-item scores for some
    model, or a method was scored on a different number of items than the reference."""
    if reference not in results_by_method:
        raise ValueError(f"no results for the reference {reference!r}")
    names = [m for m in results_by_method if m != reference]
    if not names:
        raise ValueError("no method besides the reference")
    if keys is None:
        from mmunlearn.eval.report import COLUMNS

        keys = []
        for _, sn, mk, _ in COLUMNS:
            ok = all(
                item_values(results_by_method[m].get(sn, {}), mk)[0] is not None
                for m in [reference, *names]
            )
            if ok:
                keys.append((sn, mk))
        if not keys:
            raise ValueError("no metric of the main table has per-item scores for every model")
    pairs = [parse_key(k) for k in keys]
    if not pairs:
        raise ValueError("keys is empty")
    labels = [f"{s}/{m}" for s, m in pairs]
    data: dict[str, dict[str, tuple]] = {}
    for lab, (sn, mk) in zip(labels, pairs):
        data[lab] = {}
        for m in [reference, *names]:
            kind, vals = item_values(results_by_method[m].get(sn, {}), mk)
            if kind is None or not len(vals):
                raise ValueError(f"{m}: no per-item scores for {lab} (keep_items=True?)")
            data[lab][m] = (kind, vals)
        n_ref = len(data[lab][reference][1])
        for m in names:
            if len(data[lab][m][1]) != n_ref:
                raise ValueError(
                    f"{lab}: {m} has {len(data[lab][m][1])} items, the reference {n_ref}"
                )
    rng = np.random.default_rng(seed)
    gaps = {m: {} for m in names}
    reps = {m: np.zeros(n_boot) for m in names}
    for lab in labels:
        kind, rv = data[lab][reference]
        idx = boot_indices(rng, len(rv), n_boot)
        ref_est = _stat(kind, rv)
        ref_reps = np.array([_stat(kind, rv, row) for row in idx])
        for m in names:
            kind_m, mv = data[lab][m]
            g = abs(_stat(kind_m, mv) - ref_est)
            g_reps = np.abs(np.array([_stat(kind_m, mv, row) for row in idx]) - ref_reps)
            reps[m] += g_reps / len(labels)
            lo, hi = percentile_interval(g_reps, level)
            gaps[m][lab] = {"estimate": g, "lo": lo, "hi": hi, "n": len(rv)}
    out_methods = {}
    for m in names:
        est = math.fsum(g["estimate"] for g in gaps[m].values()) / len(labels)
        lo, hi = percentile_interval(reps[m], level)
        n = {lab: gaps[m][lab]["n"] for lab in labels}
        out_methods[m] = {
            "avg_gap": {"estimate": est, "lo": lo, "hi": hi, "n": n},
            "gaps": gaps[m],
        }
    stacked = np.stack([reps[m] for m in names])
    best = stacked <= stacked.min(axis=0) + 1e-12  # ties share the draw
    share = {m: float(np.mean(best[i] / best.sum(axis=0))) for i, m in enumerate(names)}
    closest = min(names, key=lambda m: out_methods[m]["avg_gap"]["estimate"])
    return {
        "reference": reference,
        "keys": labels,
        "n": {lab: len(data[lab][reference][1]) for lab in labels},
        "n_boot": n_boot,
        "seed": seed,
        "level": level,
        "methods": out_methods,
        "closest": closest,
        "closest_share": share,
    }


# ----------------------------------------------------------------------------- unlearning metrics
def _ratios(stats) -> list[float]:
    """Per-item truth ratio ``R = P_pert / P_para`` of the items that have perturbed answers."""
    return [unlearning.truth_ratio(s.para_avg, s.pert).ratio for s in stats if s.pert]


def _forget_score(r: float) -> float:
    return 0.0 if r in (0.0, math.inf) else min(r, 1.0 / r)


def _retain_score(r: float) -> float:
    return max(0.0, 1.0 - r)


def _mean_ci(values, n_boot, seed, level) -> dict:
    return ci_dict(unlearning.bootstrap_ci(values, np.mean, n_boot, seed, level))


def _mia_scores(stats) -> dict[str, list[float]]:
    return {
        "loss": [unlearning.loss_score(s.logprobs) for s in stats],
        "zlib": [unlearning.zlib_score(s.logprobs, s.text) for s in stats],
        "min_k": [unlearning.min_k_prob(s.logprobs, MIN_K) for s in stats],
    }


def hmean_interval(groups: Sequence[Mapping], n_boot=1000, seed=0, level=0.95) -> dict:
    """Model utility with its interval: the harmonic mean
    (:func:`~mmunlearn.eval.unlearning.model_utility`) of components, each a statistic of per-item
    values. ``groups``: ``[{name: values or (kind, values)}, ...]``; the components of a group
    are scores of the same items (one resample per group and draw; kinds as
    :func:`item_values`, plain values are ``"mean"``). ``n`` = ``{component: items}``."""
    norm = [
        {
            k: (v if isinstance(v, tuple) else ("mean", np.asarray(v, np.float64)))
            for k, v in g.items()
        }
        for g in groups
    ]
    est = unlearning.model_utility([_stat(k, v) for g in norm for k, v in g.values()])
    rng = np.random.default_rng(seed)
    idx = [boot_indices(rng, len(next(iter(g.values()))[1]), n_boot) for g in norm]
    reps = [
        unlearning.model_utility(
            [_stat(k, v, i[b]) for g, i in zip(norm, idx) for k, v in g.values()]
        )
        for b in range(n_boot)
    ]
    lo, hi = percentile_interval(reps, level)
    n = {name: len(v) for g in norm for name, (_, v) in g.items()}
    return {"estimate": est, "lo": lo, "hi": hi, "n": n}


def unlearning_metrics(
    stats: Mapping[str, Mapping[str, list]],
    roles: Mapping,
    reference: str | None = None,
    task_results: Mapping[str, Mapping] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """The unlearning metrics of every model, each ``{"estimate", "lo", "hi", "n"}``.

    ``stats``: ``{model: {set: [ItemStats]}}`` (:func:`~mmunlearn.eval.likelihood.item_stats`
    of the same items for every model). ``roles``: which set plays which part --
    ``"forget"`` (the forget items), ``"retain"`` (retain items of the unlearned people's kind,
    TOFU's retain set), ``"real"`` (a list of further retain-side sets, TOFU's real authors /
    world facts), ``"holdout"`` (items the models never trained on, the MIA's non-members),
    ``"members"`` (the MIA's members, default the forget set) and
    ``"rouge"`` (a list of ``"set/metric"`` task metrics, with per-item scores in
    ``task_results``, entering model utility as its ROUGE terms); any may be absent.

    Per model (keys present when their inputs are):

    - ``forget_truth_ratio``: mean ``min(R, 1/R)`` over forget items, ``R`` = TOFU truth ratio
      (:func:`~mmunlearn.eval.unlearning.truth_ratio`; 1 = cannot tell true from perturbed);
      ``retain_truth_ratio`` / ``{real}_truth_ratio``: mean ``max(0, 1 − R)``;
    - ``forget_prob`` / ``retain_prob``: mean ``exp(mean token log-prob)`` of the answer;
      ``{real}_prob``: TOFU's normalised ``p_true / (p_true + Σ p_perturbed)``;
    - ``model_utility``: harmonic mean of ``retain_prob``, ``retain_truth_ratio``, every real
      set's prob and truth ratio, and the ``rouge`` task metrics (open-unlearning's
      ``hm_aggregate`` over what the data has; ``n`` names the inputs);
    - ``mia_loss_auc``, ``mia_zlib_auc``, ``mia_min_k_auc``: ROC AUC of the members
      against holdout items, scores higher = more member-like (0.5 = indistinguishable);
    - with ``reference``: ``forget_quality`` = KS p-value of the forget items' truth ratios
      against the reference model's (paired bootstrap over items; a p-value's bootstrap spread
      is skewed), ``privleak`` = MUSE PrivLeak of the min-k AUC against the reference's (%,
      0 = like the reference, negative = forget items still look seen). Not for the
      reference itself.
    """
    forget, retain = roles.get("forget"), roles.get("retain")
    real, holdout = list(roles.get("real") or ()), roles.get("holdout")
    members = roles.get("members") or forget
    out: dict = {}
    ref_stats = stats.get(reference) if reference else None
    for name, st in stats.items():
        res: dict = {}
        groups: list[dict[str, np.ndarray]] = []
        if forget in st:
            r = _ratios(st[forget])
            if r:
                res["forget_truth_ratio"] = _mean_ci(
                    [_forget_score(x) for x in r], n_boot, seed, level
                )
            probs = [math.exp(s.avg) for s in st[forget]]
            res["forget_prob"] = _mean_ci(probs, n_boot, seed, level)
        if retain in st:
            g = {"retain_prob": np.array([math.exp(s.avg) for s in st[retain]])}
            res["retain_prob"] = _mean_ci(g["retain_prob"], n_boot, seed, level)
            tr = np.array([_retain_score(x) for x in _ratios(st[retain])])
            if tr.size:
                res["retain_truth_ratio"] = _mean_ci(tr, n_boot, seed, level)
                if tr.size == g["retain_prob"].size:  # the same items: resampled together
                    g["retain_truth_ratio"] = tr
                else:
                    groups.append({"retain_truth_ratio": tr})
            groups.append(g)
        for sn in real:
            items = [s for s in st.get(sn, ()) if s.pert]
            if not items:
                continue
            p = [unlearning.normalised_answer_prob(s.avg, s.pert) for s in items]
            t = [_retain_score(x) for x in _ratios(items)]
            res[f"{sn}_prob"] = _mean_ci(p, n_boot, seed, level)
            res[f"{sn}_truth_ratio"] = _mean_ci(t, n_boot, seed, level)
            groups.append({f"{sn}_prob": np.array(p), f"{sn}_truth_ratio": np.array(t)})
        for key in roles.get("rouge") or ():
            sn, mk = parse_key(key)
            kind, vals = item_values((task_results or {}).get(name, {}).get(sn, {}), mk)
            if kind == "mean" and len(vals):
                groups.append({f"{sn}/{mk}": np.asarray(vals, dtype=np.float64)})
        if groups:
            res["model_utility"] = hmean_interval(groups, n_boot, seed, level)
        if members in st and holdout in st and st[members] and st[holdout]:
            fm, hm = _mia_scores(st[members]), _mia_scores(st[holdout])
            for attack in ("loss", "zlib", "min_k"):
                ci = unlearning.two_sample_bootstrap_ci(
                    fm[attack], hm[attack], unlearning.roc_auc, n_boot, seed, level
                )
                res[f"mia_{attack}_auc"] = ci_dict(ci)
        if ref_stats is not None and name != reference:
            res.update(
                _against_reference(st, ref_stats, forget, members, holdout, n_boot, seed, level)
            )
        out[name] = res
    return out


def _against_reference(st, ref, forget, members, holdout, n_boot, seed, level) -> dict:
    """Forget quality and PrivLeak of one model against the reference model's statistics."""
    res: dict = {}
    if forget in st and forget in ref:
        a, b = _ratios(st[forget]), _ratios(ref[forget])
        if a and len(a) == len(b):
            xa, xb = np.asarray(a), np.asarray(b)
            est = unlearning.forget_quality(xa, xb)
            idx = boot_indices(np.random.default_rng(seed), len(xa), n_boot)
            reps = [unlearning.forget_quality(xa[i], xb[i]).pvalue for i in idx]
            lo, hi = percentile_interval(reps, level)
            res["forget_quality"] = {"estimate": est.pvalue, "lo": lo, "hi": hi, "n": len(xa)}
            res["forget_quality_ks"] = est.statistic
    if members in st and holdout in st and members in ref and holdout in ref:
        fm, hm = _mia_scores(st[members])["min_k"], _mia_scores(st[holdout])["min_k"]
        fr, hr = _mia_scores(ref[members])["min_k"], _mia_scores(ref[holdout])["min_k"]
        if fm and hm and len(fm) == len(fr) and len(hm) == len(hr):
            fm, hm, fr, hr = map(np.asarray, (fm, hm, fr, hr))

            def leak(i, j):
                a_ref = unlearning.roc_auc(fr[i], hr[j])
                if a_ref == 1.0:  # MUSE orientation 0: PrivLeak undefined for this draw
                    return math.nan
                return unlearning.privacy_leakage(unlearning.roc_auc(fm[i], hm[j]), a_ref)

            all_f, all_h = np.arange(len(fm)), np.arange(len(hm))
            est = leak(all_f, all_h)
            rng = np.random.default_rng(seed)
            reps = [
                leak(rng.integers(0, len(fm), len(fm)), rng.integers(0, len(hm), len(hm)))
                for _ in range(n_boot)
            ]
            lo, hi = percentile_interval(reps, level)
            res["privleak"] = {"estimate": est, "lo": lo, "hi": hi, "n": [len(fm), len(hm)]}
    return res
