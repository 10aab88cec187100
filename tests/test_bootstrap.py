"""The one bootstrap (mmunlearn.eval.bootstrap): the same numbers as scipy.stats.bootstrap on the
same seed, the definition of the percentile interval written out, and the cases scipy leaves to
us (one-item samples, NaN replicates, degenerate distributions, vector statistics)."""

from __future__ import annotations

import numpy as np
import pytest

from mmunlearn.eval import bootstrap as B

from conftest import SEED

stats = pytest.importorskip("scipy.stats")


def _scipy(data, stat, **kw):
    kw.setdefault("method", "percentile")
    res = stats.bootstrap(data, stat, n_resamples=1000, rng=np.random.default_rng(0), **kw)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def test_percentile_is_the_written_definition():
    x = np.random.default_rng(SEED).normal(size=57)
    ci = B.bootstrap_ci(x, seed=3)
    means = x[np.random.default_rng(3).integers(0, 57, size=(1000, 57))].mean(axis=1)
    # scipy.stats.quantile's linear interpolation may differ from numpy's in the last ulp
    assert (ci.lo, ci.hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), rel=1e-12)
    assert ci.estimate == float(np.mean(x)) and ci.n == 57


@pytest.mark.parametrize("method", ["percentile", "BCa"])
def test_one_and_two_samples_equal_scipy(method):
    rng = np.random.default_rng(SEED)
    x, y = rng.normal(size=40), rng.normal(0.3, 1.0, size=30)
    ci = B.bootstrap_ci(x, np.median, method=method)
    assert (ci.lo, ci.hi) == _scipy((x,), np.median, method=method)

    def diff(a, b, axis=-1):
        return a.mean(axis=axis) - b.mean(axis=axis)

    ci = B.two_sample_bootstrap_ci(x, y, diff, method=method)
    assert (ci.lo, ci.hi) == _scipy((x, y), diff, method=method) and ci.n == (40, 30)
    z = x + rng.normal(0.0, 0.5, size=40)

    def med_diff(a, b, axis=-1):
        return np.median(a, axis=axis) - np.median(b, axis=axis)

    ci = B.paired_bootstrap_ci(x, z, np.median, method=method)
    assert (ci.lo, ci.hi) == _scipy((x, z), med_diff, method=method, paired=True)


def test_bca_differs_from_percentile_on_skewed_data():
    x = np.random.default_rng(SEED).lognormal(0.0, 1.0, size=30)
    p, bca = B.bootstrap_ci(x), B.bootstrap_ci(x, method="BCa")
    assert p.estimate == bca.estimate and (p.lo, p.hi) != (bca.lo, bca.hi)
    assert bca.lo <= bca.estimate <= bca.hi


def test_vector_statistic_shares_the_draws():
    rng = np.random.default_rng(SEED)
    a, b = rng.normal(size=25), rng.normal(size=25)

    def both(i, axis=-1):
        return np.stack([a[i].mean(axis=axis), b[i].mean(axis=axis)])

    res = B.bootstrap([np.arange(25)], both, n_boot=300, seed=1)
    assert res.estimate.shape == (2,) and res.replicates.shape == (2, 300)
    one = B.bootstrap([np.arange(25)], lambda i, axis=-1: a[i].mean(axis=axis), n_boot=300, seed=1)
    assert np.array_equal(res.replicates[0], one.replicates)
    assert (res.lo[0], res.hi[0]) == (one.lo, one.hi)


def test_rowwise_equals_vectorized():
    x = np.random.default_rng(SEED).normal(size=20)
    v = B.bootstrap([x], np.mean, n_boot=200, method="BCa")
    r = B.bootstrap([x], B.rowwise(lambda s: float(np.mean(s))), n_boot=200, method="BCa")
    np.testing.assert_allclose(r.replicates, v.replicates, rtol=1e-13)
    assert (float(r.lo), float(r.hi)) == pytest.approx((float(v.lo), float(v.hi)), rel=1e-12)


def test_cases_scipy_refuses_or_leaves_nan():
    # one item: every resample is that item, so the interval is the point (scipy: ValueError)
    assert B.bootstrap_ci([7.0]) == (7.0, 7.0, 7.0, 1)
    ci = B.two_sample_bootstrap_ci([1.0], [0.0, 2.0, 3.0], lambda a, b: float(a[0] > b.mean()))
    assert ci.n == (1, 3) and 0.0 <= ci.lo <= ci.hi <= 1.0
    # a constant sample: the point interval also under BCa (scipy: NaN and a warning)
    assert B.bootstrap_ci([2.0] * 5, method="BCa") == (2.0, 2.0, 2.0, 5)
    # NaN replicates (statistic undefined on that draw) are dropped from a percentile interval
    x = np.arange(10.0)

    def stat(s, axis=-1):
        m = s.mean(axis=axis)
        return np.where(m < 3.5, np.nan, m)

    res = B.bootstrap([x], stat, n_boot=500)
    finite = res.replicates[~np.isnan(res.replicates)]
    assert 0 < finite.size < 500
    assert (float(res.lo), float(res.hi)) == pytest.approx(
        tuple(np.quantile(finite, [0.025, 0.975])), rel=1e-12
    )


def test_nan_quantiles_without_scipy_quantile(monkeypatch):
    """scipy 1.15 (the declared minimum) has no stats.quantile: numpy's rule gives the same."""
    from scipy import stats

    reps = np.array([[1.0, np.nan, 3.0, 7.0, 2.0], [np.nan] * 5, [4.0, 4.0, 0.0, 1.0, 9.0]])
    want = np.array([[np.nanquantile(r, p) if not np.isnan(r).all() else np.nan
                      for p in (0.025, 0.975)] for r in reps])  # fmt: skip
    if hasattr(stats, "quantile"):
        np.testing.assert_allclose(B._nan_quantiles(reps, 0.025, 0.975), want, rtol=1e-12)
        monkeypatch.delattr(stats, "quantile")
    np.testing.assert_allclose(B._nan_quantiles(reps, 0.025, 0.975), want, rtol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        B.bootstrap_ci([1.0, 2.0], method="basic")
    with pytest.raises(ValueError, match="paired"):
        B.bootstrap([np.arange(3), np.arange(4)], np.mean, paired=True)
    with pytest.raises(ValueError, match="^values is empty"):
        B.bootstrap_ci([])
