"""Comparing models: bootstrap intervals of every reported number, the unlearning metrics of a
list of models against a reference model, and the average gap to the reference.

Inputs are the per-item scores the evaluation keeps (``EvalConfig(keep_items=True)``: each set's
metrics carry ``"_items": {metric: [score per item]}`` and, for corpus BLEU,
``"_bleu_stats"``) and the per-item likelihood statistics of
:func:`mmunlearn.eval.likelihood.item_stats`. Every interval is a seeded percentile bootstrap
over **items** (:mod:`mmunlearn.eval.unlearning`), written as ``{"estimate", "lo", "hi", "n"}``;
models scored on the same items are resampled with the same indices (paired), so a difference
between two models is not blurred by which items were drawn. The one bootstrap is
:func:`mmunlearn.eval.bootstrap.bootstrap` (``scipy.stats.bootstrap``); here its samples are
item indices and the statistics look the items up (``method``: ``"percentile"`` or ``"BCa"``).

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
from mmunlearn.eval.bootstrap import bootstrap, rowwise

MIN_K = 0.4  # min-k % prob for the MIA and PrivLeak: MUSE and open-unlearning's TOFU/MUSE configs

__all__ = [
    "MIN_K",
    "ci_dict",
    "clear_truth_ratios",
    "gap_to_reference",
    "hmean_interval",
    "item_statistic",
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


def _row_stat(kind: str, rows) -> float:
    """The corpus statistic ``kind`` of (resampled) per-item rows."""
    if kind == "bleu":
        return metrics.corpus_bleu_from_stats(rows)
    r = clear_truth_ratios(rows)
    if kind == "clear_tr_forget":  # CLEAR: mean(min(R, 1/R)) on forget tasks
        return float(np.mean(np.minimum(r, 1.0 / r)))
    return float(np.mean(np.maximum(0.0, 1.0 - 1.0 / r)))  # mean(max(0, 1 - 1/R)) elsewhere


def item_statistic(kind: str, values, idx) -> np.ndarray:
    """The reported statistic ``kind`` (:func:`item_values`) of the items at ``idx``, an index
    array ``(..., n)``: one number per row (``"mean"`` vectorized, corpus statistics a loop)."""
    idx = np.asarray(idx)
    x = np.asarray(values, dtype=np.float64)
    if kind == "mean":
        return x[idx].mean(axis=-1)
    return rowwise(lambda i: _row_stat(kind, x[i]))(idx)


def _ci(b, k=()) -> tuple[float, float, float]:
    return float(b.estimate[k]), float(b.lo[k]), float(b.hi[k])


def _over_items(kind: str, values, n_boot, seed, level, method) -> dict:
    """``{"estimate", "lo", "hi", "n"}`` of one metric from its per-item values."""
    n = len(values)
    b = bootstrap(
        [np.arange(n)],
        lambda i, axis=-1: item_statistic(kind, values, i),
        n_boot=n_boot, seed=seed, level=level, method=method,
    )  # fmt: skip
    est, lo, hi = _ci(b)
    return {"estimate": est, "lo": lo, "hi": hi, "n": n}


def task_intervals(
    methods: Mapping[str, Mapping],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "percentile",
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
                d = _over_items(kind, vals, n_boot, seed, level, method)
                out.setdefault(name, {}).setdefault(sn, {})[k] = d
    return out


def gap_to_reference(
    results_by_method: Mapping[str, Mapping],
    reference: str = "reference",
    keys: Sequence | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "percentile",
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
        keys = _default_gap_keys(results_by_method, [reference, *names])
    pairs = [parse_key(k) for k in keys]
    if not pairs:
        raise ValueError("keys is empty")
    labels = [f"{s}/{m}" for s, m in pairs]
    data = _gap_data(results_by_method, reference, names, labels, pairs)
    b = _gap_bootstrap(data, reference, names, labels, n_boot, seed, level, method)
    n_lab = {lab: len(data[lab][reference][1]) for lab in labels}
    out_methods = {}
    for j, m in enumerate(names):
        gaps = {}
        for i, lab in enumerate(labels):
            est, lo, hi = _ci(b, len(names) + i * len(names) + j)
            gaps[lab] = {"estimate": est, "lo": lo, "hi": hi, "n": n_lab[lab]}
        est, lo, hi = _ci(b, j)
        out_methods[m] = {
            "avg_gap": {"estimate": est, "lo": lo, "hi": hi, "n": dict(n_lab)},
            "gaps": gaps,
        }
    stacked = b.replicates[: len(names)]
    best = stacked <= stacked.min(axis=0) + 1e-12  # ties share the draw
    share = {m: float(np.mean(best[i] / best.sum(axis=0))) for i, m in enumerate(names)}
    closest = min(names, key=lambda m: out_methods[m]["avg_gap"]["estimate"])
    return {
        "reference": reference,
        "keys": labels,
        "n": n_lab,
        "n_boot": n_boot,
        "seed": seed,
        "level": level,
        "methods": out_methods,
        "closest": closest,
        "closest_share": share,
    }


def _default_gap_keys(results_by_method: Mapping, models: list) -> list:
    """The main table's columns with per-item scores for every model."""
    from mmunlearn.eval.report import COLUMNS

    keys = []
    for _, sn, mk, _ in COLUMNS:
        if all(item_values(results_by_method[m].get(sn, {}), mk)[0] for m in models):
            keys.append((sn, mk))
    if not keys:
        raise ValueError("no metric of the main table has per-item scores for every model")
    return keys


def _gap_data(results_by_method, reference, names, labels, pairs) -> dict:
    """``{label: {model: (kind, per-item values)}}``, checked: every model has the items of
    every key, as many as the reference."""
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
    return data


def _gap_bootstrap(data, reference, names, labels, n_boot, seed, level, method):
    """One bootstrap of every gap: a sample of item indices per key (independent between keys,
    shared by the reference and every method). The statistic is the vector ``[avg gap of each
    method, then |m − ref| per key and method]``."""
    n_m, n_l = len(names), len(labels)

    def stat(*idx, axis=-1):
        g = []
        for lab, i in zip(labels, idx):
            ref = item_statistic(*data[lab][reference], i)
            g.append([np.abs(item_statistic(*data[lab][m], i) - ref) for m in names])
        g = np.asarray(g)  # (keys, methods, ...)
        return np.concatenate([g.mean(axis=0), g.reshape((n_l * n_m, *g.shape[2:]))])

    samples = [np.arange(len(data[lab][reference][1])) for lab in labels]
    return bootstrap(samples, stat, n_boot=n_boot, seed=seed, level=level, method=method)


# ----------------------------------------------------------------------------- unlearning metrics
def _ratios(stats) -> list[float]:
    """Per-item truth ratio ``R = P_pert / P_para`` of the items that have perturbed answers."""
    return [unlearning.truth_ratio(s.para_avg, s.pert).ratio for s in stats if s.pert]


def _forget_score(r: float) -> float:
    return 0.0 if r in (0.0, math.inf) else min(r, 1.0 / r)


def _retain_score(r: float) -> float:
    return max(0.0, 1.0 - r)


def _mean_ci(values, boot: dict) -> dict:
    return ci_dict(unlearning.bootstrap_ci(values, np.mean, **boot))


def _mia_scores(stats) -> dict[str, list[float]]:
    return {
        "loss": [unlearning.loss_score(s.logprobs) for s in stats],
        "zlib": [unlearning.zlib_score(s.logprobs, s.text) for s in stats],
        "min_k": [unlearning.min_k_prob(s.logprobs, MIN_K) for s in stats],
    }


def hmean_interval(
    groups: Sequence[Mapping], n_boot=1000, seed=0, level=0.95, method="percentile"
) -> dict:
    """Model utility with its interval: the harmonic mean
    (:func:`~mmunlearn.eval.unlearning.model_utility`, ``scipy.stats.hmean``) of components,
    each a statistic of per-item values. ``groups``: ``[{name: values or (kind, values)}, ...]``;
    the components of a group are scores of the same items (one resample per group and draw,
    groups independent; kinds as :func:`item_values`, plain values are ``"mean"``).
    ``n`` = ``{component: items}``."""
    norm = [
        {
            k: (v if isinstance(v, tuple) else ("mean", np.asarray(v, np.float64)))
            for k, v in g.items()
        }
        for g in groups
    ]

    def stat(*idx, axis=-1):
        parts = [item_statistic(k, v, i) for g, i in zip(norm, idx) for k, v in g.values()]
        return unlearning.hmean_statistic(np.stack(np.broadcast_arrays(*parts)), axis=0)

    samples = [np.arange(len(next(iter(g.values()))[1])) for g in norm]
    b = bootstrap(samples, stat, n_boot=n_boot, seed=seed, level=level, method=method)
    est, lo, hi = _ci(b)
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
    method: str = "percentile",
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
    boot = {"n_boot": n_boot, "seed": seed, "level": level, "method": method}
    members = roles.get("members") or roles.get("forget")
    out: dict = {}
    ref_stats = stats.get(reference) if reference else None
    for name, st in stats.items():
        rouge = []
        for key in roles.get("rouge") or ():
            sn, mk = parse_key(key)
            kind, vals = item_values((task_results or {}).get(name, {}).get(sn, {}), mk)
            if kind == "mean" and len(vals):
                rouge.append({f"{sn}/{mk}": np.asarray(vals, dtype=np.float64)})
        res, groups = _likelihood_metrics(st, roles, boot)
        groups += rouge
        if groups:
            res["model_utility"] = hmean_interval(groups, **boot)
        holdout = roles.get("holdout")
        if members in st and holdout in st and st[members] and st[holdout]:
            fm, hm = _mia_scores(st[members]), _mia_scores(st[holdout])
            for attack in ("loss", "zlib", "min_k"):
                ci = unlearning.two_sample_bootstrap_ci(
                    fm[attack], hm[attack], unlearning.auc_statistic, **boot
                )
                res[f"mia_{attack}_auc"] = ci_dict(ci)
        if ref_stats is not None and name != reference:
            res.update(
                _against_reference(st, ref_stats, roles.get("forget"), members, holdout, boot)
            )
        out[name] = res
    return out


def _likelihood_metrics(st: Mapping, roles: Mapping, boot: dict) -> tuple[dict, list]:
    """Truth ratios and probabilities of one model, and its model-utility groups."""
    forget, retain = roles.get("forget"), roles.get("retain")
    res: dict = {}
    groups: list[dict[str, np.ndarray]] = []
    if forget in st:
        r = _ratios(st[forget])
        if r:
            res["forget_truth_ratio"] = _mean_ci([_forget_score(x) for x in r], boot)
        res["forget_prob"] = _mean_ci([math.exp(s.avg) for s in st[forget]], boot)
    if retain in st:
        g = {"retain_prob": np.array([math.exp(s.avg) for s in st[retain]])}
        res["retain_prob"] = _mean_ci(g["retain_prob"], boot)
        tr = np.array([_retain_score(x) for x in _ratios(st[retain])])
        if tr.size:
            res["retain_truth_ratio"] = _mean_ci(tr, boot)
            if tr.size == g["retain_prob"].size:  # the same items: resampled together
                g["retain_truth_ratio"] = tr
            else:
                groups.append({"retain_truth_ratio": tr})
        groups.append(g)
    for sn in list(roles.get("real") or ()):
        items = [s for s in st.get(sn, ()) if s.pert]
        if not items:
            continue
        p = [unlearning.normalised_answer_prob(s.avg, s.pert) for s in items]
        t = [_retain_score(x) for x in _ratios(items)]
        res[f"{sn}_prob"] = _mean_ci(p, boot)
        res[f"{sn}_truth_ratio"] = _mean_ci(t, boot)
        groups.append({f"{sn}_prob": np.array(p), f"{sn}_truth_ratio": np.array(t)})
    return res, groups


def _against_reference(st, ref, forget, members, holdout, boot: dict) -> dict:
    """Forget quality and PrivLeak of one model against the reference model's statistics
    (items resampled jointly for both models)."""
    res: dict = {}
    if forget in st and forget in ref:
        a, b = _ratios(st[forget]), _ratios(ref[forget])
        if a and len(a) == len(b):
            xa, xb = np.asarray(a), np.asarray(b)
            fq = rowwise(lambda i: unlearning.forget_quality(xa[i], xb[i]).pvalue)
            est, lo, hi = _ci(bootstrap([np.arange(len(xa))], fq, **boot))
            res["forget_quality"] = {"estimate": est, "lo": lo, "hi": hi, "n": len(xa)}
            res["forget_quality_ks"] = unlearning.forget_quality(xa, xb).statistic
    if members in st and holdout in st and members in ref and holdout in ref:
        fm, hm = _mia_scores(st[members])["min_k"], _mia_scores(st[holdout])["min_k"]
        fr, hr = _mia_scores(ref[members])["min_k"], _mia_scores(ref[holdout])["min_k"]
        if fm and hm and len(fm) == len(fr) and len(hm) == len(hr):
            fm, hm, fr, hr = map(np.asarray, (fm, hm, fr, hr))

            def leak(i, j, axis=-1):  # members' and non-members' indices, shared by both models
                a_unl = np.asarray(unlearning.auc_statistic(fm[i], hm[j]))
                a_ref = np.asarray(unlearning.auc_statistic(fr[i], hr[j]))
                out = [
                    math.nan if r == 1.0 else unlearning.privacy_leakage(u, r)  # r = 1: undefined
                    for u, r in zip(a_unl.ravel().tolist(), a_ref.ravel().tolist())
                ]
                return np.asarray(out).reshape(a_ref.shape)

            samples = [np.arange(len(fm)), np.arange(len(hm))]
            est, lo, hi = _ci(bootstrap(samples, leak, **boot))
            res["privleak"] = {"estimate": est, "lo": lo, "hi": hi, "n": [len(fm), len(hm)]}
    return res
