"""The one bootstrap of mmunlearn: seeded, vectorized confidence intervals on
:func:`scipy.stats.bootstrap` (issue #26). Every interval mmunlearn reports is drawn here.

* :func:`bootstrap` -- the core: one or more samples (1-D arrays), a vectorized statistic
  (scalar- or vector-valued), paired or independent resampling, the ``"percentile"`` or
  ``"BCa"`` interval; returns :class:`Bootstrap` (estimate, lo, hi and the replicates);
* :func:`bootstrap_ci`, :func:`paired_bootstrap_ci`, :func:`two_sample_bootstrap_ci` -- the
  common cases, as :class:`BootstrapCI` ``(estimate, lo, hi, n)``;
* :func:`rowwise` -- a statistic of 1-D arrays made vectorized (a loop over rows), e.g. for a
  statistic of *item indices* (``bootstrap([np.arange(n)], rowwise(f))``): the way
  :mod:`mmunlearn.eval.compare` resamples models scored on the same items with one draw.

Randomness: ``scipy.stats.bootstrap(..., rng=numpy.random.default_rng(seed))``, which draws
each sample's indices as ``rng.integers(0, n, (n_boot, n))`` (samples in order, per batch),
so an interval is a deterministic function of the data, the statistic, ``n_boot``, ``seed``,
``level`` and ``method``. Percentile bounds are scipy's linear quantiles (``(1 ∓ level) / 2``)
of the replicates. Beyond scipy: a sample of one item is constant under resampling (scipy
refuses it); replicates that are NaN (the statistic is undefined on that draw, e.g. PrivLeak
when the reference AUC is 1) are dropped from a percentile interval; a degenerate bootstrap
distribution (every replicate equal) gives the point interval, also under BCa (where scipy
gives NaN).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "METHODS",
    "Bootstrap",
    "BootstrapCI",
    "bootstrap",
    "bootstrap_ci",
    "paired_bootstrap_ci",
    "rowwise",
    "two_sample_bootstrap_ci",
]

METHODS = ("percentile", "BCa")
_MAX_DRAWN = 4_000_000  # bound on the indices held at once (rows x n int64: 32 MB)


class Bootstrap(NamedTuple):
    """:func:`bootstrap`'s result; arrays of the statistic's shape (``()`` or ``(k,)``)."""

    estimate: np.ndarray  # the statistic on the full sample(s)
    lo: np.ndarray
    hi: np.ndarray
    replicates: np.ndarray  # the bootstrap distribution, shape (*estimate.shape, n_boot)


class BootstrapCI(NamedTuple):
    estimate: float  # the statistic on the full sample(s)
    lo: float
    hi: float
    n: int | tuple[int, int]  # items (one sample / pairs) or (n_x, n_y)


def _check(n_boot: int, level: float, method: str) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def _sample(values, name: str) -> np.ndarray:
    """``values`` as a 1-D float64 array; ValueError naming ``name`` if empty or NaN."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of numbers, got a string")
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a flat sequence of numbers") from e
    if x.ndim != 1:
        raise TypeError(f"{name} must be a flat sequence of numbers")
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(x).any():
        raise ValueError(f"{name} contains nan; numbers needed")
    return x


def rowwise(fn: Callable) -> Callable:
    """``fn`` (1-D arrays, one per sample → a number or a 1-D vector) as a vectorized statistic
    for :func:`bootstrap`: applied to every row of the inputs' leading axes (``axis`` must be
    -1); a vector's axis comes first in the output, as scipy expects."""

    def stat(*arrays, axis=-1):
        if axis != -1:
            raise ValueError("rowwise statistics work along axis -1")
        lead = np.broadcast_shapes(*(np.shape(a)[:-1] for a in arrays))
        rows = [
            np.broadcast_to(a, lead + np.shape(a)[-1:]).reshape(-1, np.shape(a)[-1]) for a in arrays
        ]
        out = np.asarray([fn(*r) for r in zip(*rows)], dtype=np.float64)
        if out.ndim == 2:  # (rows, k) → (k, rows)
            out = out.T
        return out.reshape(out.shape[:-1] + lead)

    return stat


def _vectorized(stat: Callable) -> Callable:
    """``stat`` itself when it takes ``axis`` (``np.mean``, ``np.median``, ...), else
    :func:`rowwise` of it."""
    try:
        if "axis" in inspect.signature(stat).parameters:
            return stat
    except (TypeError, ValueError):  # builtins without a signature
        pass
    return rowwise(stat)


def _nan_quantiles(reps: np.ndarray, *p: float) -> np.ndarray:
    """The linear quantiles ``p`` of each row, NaN dropped (NaN for a row of NaN only), on the
    last axis: ``scipy.stats.quantile`` (scipy 1.16+), else numpy's same rule (scipy 1.15, the
    last for Python 3.10, has no ``stats.quantile``)."""
    from scipy import stats

    if hasattr(stats, "quantile"):
        return stats.quantile(reps, np.asarray(p), axis=-1, nan_policy="omit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (an all-NaN row: NaN, as scipy's)
        return np.moveaxis(np.nanquantile(reps, p, axis=-1), 0, -1)


def _interval(res, reps: np.ndarray, level: float, method: str):
    """``(lo, hi)`` of scipy's result, with the NaN / degenerate rules of the module doc."""
    lo = np.asarray(res.confidence_interval.low, dtype=np.float64)
    hi = np.asarray(res.confidence_interval.high, dtype=np.float64)
    nan = np.isnan(reps).any(axis=-1)
    finite = np.where(np.isnan(reps), reps[..., :1], reps) if nan.any() else reps
    if method == "percentile" and nan.any():
        a = (1.0 - level) / 2.0
        q = _nan_quantiles(reps, a, 1.0 - a)
        lo, hi = np.where(nan, q[..., 0], lo), np.where(nan, q[..., 1], hi)
    flat = ~nan & (finite.max(axis=-1) == finite.min(axis=-1))
    lo, hi = np.where(flat, reps[..., 0], lo), np.where(flat, reps[..., 0], hi)
    return lo, hi


def bootstrap(
    samples: Sequence,
    statistic: Callable,
    *,
    paired: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "percentile",
) -> Bootstrap:
    """Bootstrap interval of ``statistic(*samples)`` by :func:`scipy.stats.bootstrap`.

    ``samples``: 1-D arrays (numbers, or item indices ``np.arange(n)`` for statistics of
    several aligned per-item lists); ``statistic(*arrays, axis=-1)`` must be vectorized along
    the last axis (leading axes are resamples; wrap a plain function with :func:`rowwise`) and
    return a number or, per resample, a vector (``(k, ...)``: every component then gets its
    interval from the *same* draws). ``paired=True``: the samples have equal length and are
    resampled with the same indices (items scored by several models); otherwise each sample
    is resampled independently to its own size. ``method``: ``"percentile"`` (default) or
    ``"BCa"`` (bias-corrected and accelerated; jackknife over each sample).
    """
    from scipy import stats

    _check(n_boot, level, method)
    data = [np.asarray(s) for s in samples]
    if not data or any(d.ndim != 1 or d.size == 0 for d in data):
        raise ValueError("samples must be non-empty 1-D arrays")
    if paired and len({d.size for d in data}) > 1:
        raise ValueError(f"paired samples must have equal sizes, got {[d.size for d in data]}")
    est = np.asarray(statistic(*data, axis=-1), dtype=np.float64)
    live = [i for i, d in enumerate(data) if d.size > 1]  # a one-item sample is constant
    if not live:
        reps = np.repeat(est[..., None], n_boot, axis=-1)
        return Bootstrap(est, est.copy(), est.copy(), reps)

    def stat(*resampled, axis=-1):
        lead = np.broadcast_shapes(*(r.shape[:-1] for r in resampled))
        args = [np.broadcast_to(d, lead + d.shape) for d in data]
        for i, r in zip(live, resampled):
            args[i] = r
        return statistic(*args, axis=axis)

    batch = max(1, _MAX_DRAWN // sum(data[i].size for i in live))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            [data[i] for i in live],
            stat,
            n_resamples=n_boot,
            batch=batch,  # also bounds BCa's jackknife (n rows of n - 1 indices)
            vectorized=True,
            paired=paired and len(live) > 1,
            confidence_level=level,
            method=method,
            rng=np.random.default_rng(seed),
        )
    reps = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    lo, hi = _interval(res, reps, level, method)
    return Bootstrap(est, lo, hi, reps)


def _ci(b: Bootstrap, n) -> BootstrapCI:
    return BootstrapCI(float(b.estimate), float(b.lo), float(b.hi), n)


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable = np.mean,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "percentile",
) -> BootstrapCI:
    """Interval of ``stat(values)`` over ``n_boot`` resamples of the values (:func:`bootstrap`;
    ``stat`` takes a 1-D float array, vectorized when it accepts ``axis``). ``n = len(values)``.
    Empty or NaN values are a ValueError naming ``values``."""
    x = _sample(values, "values")
    _check(n_boot, level, method)
    b = bootstrap([x], _vectorized(stat), n_boot=n_boot, seed=seed, level=level, method=method)
    return _ci(b, int(x.size))


def paired_bootstrap_ci(
    a: Sequence[float],
    b: Sequence[float],
    stat: Callable = np.mean,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "percentile",
) -> BootstrapCI:
    """Interval of ``stat(a) - stat(b)`` for two models scored on the **same items** (``a[i]``,
    ``b[i]`` = item i): items are resampled jointly, so the between-item variance cancels. With
    ``np.mean`` this is :func:`bootstrap_ci` of ``a - b`` (the mean of the differences)."""
    xa, xb = _sample(a, "a"), _sample(b, "b")
    if xa.size != xb.size:
        raise ValueError(f"a has {xa.size} items and b {xb.size}; paired samples must match")
    if stat is np.mean:
        return bootstrap_ci(xa - xb, np.mean, n_boot, seed, level, method)
    _check(n_boot, level, method)
    s = _vectorized(stat)

    def diff(x, y, axis=-1):
        return s(x, axis=axis) - s(y, axis=axis)

    res = bootstrap([xa, xb], diff, paired=True, n_boot=n_boot, seed=seed, level=level,
                    method=method)  # fmt: skip
    return _ci(res, int(xa.size))


def two_sample_bootstrap_ci(
    x: Sequence[float],
    y: Sequence[float],
    stat: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "percentile",
) -> BootstrapCI:
    """Interval of a two-sample statistic ``stat(x, y)`` (e.g. a ROC AUC of members vs.
    non-members, or a KS p-value), resampling ``x`` and ``y`` independently, each to its own
    size. ``n = (len(x), len(y))``. A p-value's bootstrap distribution is skewed: read it as
    spread."""
    ax, ay = _sample(x, "x"), _sample(y, "y")
    _check(n_boot, level, method)
    res = bootstrap([ax, ay], _vectorized(stat), n_boot=n_boot, seed=seed, level=level,
                    method=method)  # fmt: skip
    return _ci(res, (int(ax.size), int(ay.size)))
