"""Unlearning metrics as pure functions (issue #14): each reproduces one published definition.

Inputs are plain sequences of floats or strings (numpy arrays work too); outputs are floats,
dicts or small ``NamedTuple``s. No torch. Empty inputs raise ``ValueError`` naming the argument,
and so does a NaN anywhere.

The reference libraries (``rouge_score``, ``nltk``, ``scipy``) are imported lazily by the
functions that *are* those libraries' numbers: :func:`rouge`, :func:`rouge_l_recall`
(rouge_score), :func:`sentence_bleu` (nltk), :func:`forget_quality` (``ks_2samp``),
:func:`roc_auc` (``mannwhitneyu``), :func:`model_utility` (``hmean``); the bootstraps are
:mod:`mmunlearn.eval.bootstrap` (``scipy.stats.bootstrap``; :func:`bootstrap_ci`,
:func:`paired_bootstrap_ci`, :func:`two_sample_bootstrap_ci` are re-exported here). What no
library computes is ours (truth ratio, MIA scores, PrivLeak, gap), tested against
hand-worked cases.

Sources read (commit, date of the snapshot read):

* MLLMU-Bench ``eval.py`` -- franciscoliu/MLLMU-Bench 0e3098e (2025-03-12);
* TOFU ``aggregate_eval_stat.py``, ``evals/eval_everything.py`` -- locuslab/tofu bdc209e;
* open-unlearning ``src/evals/metrics/{memorization,privacy,utility,utils}.py``, ``mia/*.py``,
  ``configs/eval/tofu_metrics/*.yaml`` -- locuslab/open-unlearning d3d7cf9 (2025-12-23);
* MUSE ``eval.py`` (swj0419/muse_bench) and ``privleak/scripts/get_ppl.py``,
  ``privleak/get_ppl_utils.py`` (jaechan-repo/muse_bench 54719c5);
* CLEAR ``mm/calculate_metrics.py`` -- somvy/multimodal_unlearning bb14c96 (2025-08-06);
* SalUn, Fan et al., ICLR 2024 (arXiv 2310.12508): "Avg. Gap" is defined in the paper's tables;
  its code (OPTML-Group/Unlearn-Saliency) does not compute it.

Membership-inference sign convention: every MIA score here is **higher = more member-like**
(:func:`loss_score`, :func:`zlib_score`, :func:`min_k_prob`), and :func:`roc_auc` is
``P(member score > non-member score)``. open-unlearning and MUSE store the negated scores (a loss,
``-mean`` of the lowest log-probs, ``loss / zlib``) and flip the labels; the AUC is the same.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np

from mmunlearn.eval.bootstrap import (  # the one bootstrap; re-exported under the old home
    BootstrapCI,
    bootstrap_ci,
    paired_bootstrap_ci,
    two_sample_bootstrap_ci,
)

__all__ = [
    "ROUGE_TYPES",
    "TOFU_MODEL_UTILITY",
    "rouge",
    "rouge_l_recall",
    "rouge_scorer",
    "sentence_bleu",
    "TruthRatio",
    "truth_ratio",
    "aggregate_truth_ratio",
    "normalised_answer_prob",
    "KSResult",
    "forget_quality",
    "model_utility",
    "loss_score",
    "zlib_score",
    "min_k_prob",
    "roc_auc",
    "auc_statistic",
    "hmean_statistic",
    "privacy_leakage",
    "avg_gap",
    "BootstrapCI",
    "bootstrap_ci",
    "paired_bootstrap_ci",
    "two_sample_bootstrap_ci",
]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# The nine retain-side values TOFU's get_model_utility (and open-unlearning's model_utility.yaml)
# put into the harmonic mean: {Prob., ROUGE-L recall, Truth Ratio} x {retain, real authors, world
# facts}. Prob. is exp(-mean token loss) on retain and normalised_answer_prob on the other two; the
# truth ratio is the "retain" aggregation. CLEAR takes every non-forget entry of its table instead.
TOFU_MODEL_UTILITY = tuple(
    f"{s}_{m}"
    for s in ("retain", "real_authors", "world_facts")
    for m in ("prob", "rougeL_recall", "truth_ratio")
)


# ----------------------------------------------------------------------------- input checks
def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is missing: pip install mmunlearn[eval]") from e


def _floats(values, name: str, finite: bool = False) -> list[float]:
    """``values`` as a list of floats; ValueError if empty, NaN (or, with ``finite``, inf)."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of numbers, got a string")
    try:
        xs = [float(v) for v in values]
    except TypeError as e:
        raise TypeError(f"{name} must be a flat sequence of numbers") from e
    if not xs:
        raise ValueError(f"{name} is empty")
    for x in xs:
        if math.isnan(x) or (finite and math.isinf(x)):
            raise ValueError(f"{name} contains {x}; {'finite ' if finite else ''}numbers needed")
    return xs


def _scalar(x, name: str, finite: bool = True) -> float:
    return _floats([x], name, finite)[0]


def _text(s, name: str) -> str:
    if not isinstance(s, str):
        raise TypeError(f"{name} must be a str, got {type(s).__name__}")
    return s


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


# ----------------------------------------------------------------------------- text metrics
@functools.lru_cache(maxsize=16)
def rouge_scorer(types: tuple[str, ...], stemmer: bool = True):
    """A cached ``rouge_score`` ``RougeScorer(list(types), use_stemmer=stemmer)``: every ROUGE of
    mmunlearn (this module's and :mod:`mmunlearn.eval.metrics`') is scored by one of these."""
    return _require("rouge_score.rouge_scorer").RougeScorer(list(types), use_stemmer=stemmer)


def rouge(pred: str, ref: str, stemmer: bool = True) -> dict[str, dict[str, float]]:
    """ROUGE-1/2/L of ``pred`` against ``ref``: ``rouge_score``'s
    ``RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True).score(ref, pred)``.

    Reproduces MLLMU-Bench ``eval.py`` (which reports the ``fmeasure``s) and TOFU / open-unlearning
    / CLEAR (``score(gt, gen)``, recalls). With overlap ``o`` (clipped n-gram counts; LCS length for
    rougeL): precision = o / |pred|, recall = o / |ref|, f1 = 2PR / (P + R). rouge_score lowercases,
    replaces every character outside ``[a-z0-9]`` by a space (accented letters split words) and
    Porter-stems tokens longer than 3 characters (``stemmer=False``: not; the default protocol's
    setting, :mod:`mmunlearn.eval.metrics`). An empty side gives zeros.
    Returns ``{"rouge1"|"rouge2"|"rougeL": {"precision", "recall", "f1"}}``.
    """
    ref, pred = _text(ref, "ref"), _text(pred, "pred")
    s = rouge_scorer(ROUGE_TYPES, stemmer).score(ref, pred)
    return {
        k: {"precision": float(v.precision), "recall": float(v.recall), "f1": float(v.fmeasure)}
        for k, v in s.items()
    }


def rouge_l_recall(pred: str, ref: str, stemmer: bool = True) -> float:
    """ROUGE-L recall = LCS(pred, ref) / |ref| (rouge_score tokens, stemmed): the "ROUGE" of TOFU
    (``evals/eval_everything.py``), open-unlearning (``rouge_type: rougeL_recall``) and CLEAR
    (``mm/calculate_metrics.py``), all ``RougeScorer([...], use_stemmer=True).score(gt, gen)``
    (``stemmer=False``: unstemmed)."""
    ref, pred = _text(ref, "ref"), _text(pred, "pred")
    return float(rouge_scorer(("rougeL",), stemmer).score(ref, pred)["rougeL"].recall)


def sentence_bleu(pred: str, ref: str) -> float:
    """Sentence BLEU exactly as MLLMU-Bench ``eval.py:compute_bleu``: ``nltk``'s
    ``sentence_bleu([ref.split()], pred.split(), smoothing_function=SmoothingFunction().method1)``.

    ``BLEU = BP * exp(sum_{n=1..4} 1/4 log p_n)``, ``BP = min(1, exp(1 - |ref| / |pred|))``; method1
    replaces a zero clipped count ``m_n`` by epsilon = 0.1 (``p_n = 0.1 / l_n``). Tokens are
    ``str.split()``: whitespace only, case-sensitive, punctuation stays attached (``"Paris."`` !=
    ``"paris"``), unlike :func:`rouge` and unlike the hand-written ``metrics.bleu``
    (lowercased, punctuation split, add-one smoothing = nltk method2). Empty side → 0.
    """
    hyp, refs = _text(pred, "pred").split(), [_text(ref, "ref").split()]
    bs = _require("nltk.translate.bleu_score")
    return float(bs.sentence_bleu(refs, hyp, smoothing_function=bs.SmoothingFunction().method1))


# ----------------------------------------------------------------------------- TOFU family
class TruthRatio(NamedTuple):
    ratio: float  # R = P_pert / P_para
    forget: float  # min(R, 1/R): forget-set score, 1 = cannot tell true from false
    retain: float  # max(0, 1 - R): retain-set score, 1 = strongly prefers the truth


def truth_ratio(para_logprob: float, pert_logprobs: Sequence[float]) -> TruthRatio:
    """TOFU truth ratio of one item: ``R = exp(mean_j pert_j - para)``.

    Inputs are **length-normalised** log-probabilities (``-`` mean token NLL over the answer
    tokens) of the paraphrased answer and of each perturbed answer, so ``R`` is the geometric
    mean of the perturbed answers' per-token probabilities over the paraphrased one's:
    open-unlearning's ``truth_ratio`` (``wrong_prob / correct_prob``, ``wrong`` = exp(-mean of
    the perturbed avg losses)) and TOFU's ``1 / curr_stat_1``. Per-item scores, averaged by
    :func:`aggregate_truth_ratio`: ``forget = min(R, 1/R)`` (open-unlearning
    ``closer_to_1_better``, used for the forget set) and ``retain = max(0, 1 - R)``
    (``true_better``: retain, real authors, world facts). open-unlearning adds 1e-10 to the
    denominator; we do not (``R`` is computed in log space; it becomes ``inf`` past exp's range,
    with both scores then 0).
    """
    para = _scalar(para_logprob, "para_logprob")
    d = _mean(_floats(pert_logprobs, "pert_logprobs", finite=True)) - para
    r = math.exp(d) if d < 709.0 else math.inf
    closer = 0.0 if r == 0.0 or math.isinf(r) else min(r, 1.0 / r)
    return TruthRatio(r, closer, max(0.0, 1.0 - r))


def aggregate_truth_ratio(ratios: Sequence[float], split: Literal["forget", "retain"]) -> float:
    """Mean truth-ratio score over items from their raw ratios ``R_i`` (TOFU, open-unlearning):
    ``forget``: ``mean_i min(R_i, 1/R_i)``; ``retain``: ``mean_i max(0, 1 - R_i)``."""
    rs = _floats(ratios, "ratios")
    if any(r < 0 for r in rs):
        raise ValueError("ratios must be >= 0")
    if split == "forget":
        return _mean([0.0 if r in (0.0, math.inf) else min(r, 1.0 / r) for r in rs])
    if split == "retain":
        return _mean([max(0.0, 1.0 - r) for r in rs])
    raise ValueError(f"split must be 'forget' or 'retain', got {split!r}")


def normalised_answer_prob(correct_logprob: float, wrong_logprobs: Sequence[float]) -> float:
    """TOFU's "Prob." on real authors / world facts (open-unlearning ``probability_w_options``):
    ``p_c / (p_c + sum_j p_j)`` with ``p = exp(length-normalised log-prob)``; computed as
    ``1 / (1 + sum_j exp(w_j - c))``. open-unlearning adds 1e-10 to the denominator; we do not."""
    c = _scalar(correct_logprob, "correct_logprob")
    ws = _floats(wrong_logprobs, "wrong_logprobs", finite=True)
    m = max([c, *ws])  # shift for range: p_c / (p_c + sum p_j) is shift-invariant
    return math.exp(c - m) / math.fsum([math.exp(c - m)] + [math.exp(w - m) for w in ws])


class KSResult(NamedTuple):
    pvalue: float  # forget quality
    statistic: float  # KS D
    n_unlearned: int
    n_reference: int


def forget_quality(unlearned_stats: Sequence[float], reference_stats: Sequence[float]) -> KSResult:
    """Forget quality = ``scipy.stats.ks_2samp(unlearned_stats, reference_stats).pvalue``
    (defaults: two-sided, ``method='auto'``, i.e. exact for small samples).

    As TOFU ``get_forget_quality``, open-unlearning ``ks_test`` and CLEAR: the per-item truth
    ratios on the **forget** set of the unlearned model vs. those of the reference model (trained
    without the forget set) on the same set. TOFU passes ``P_para / P_pert`` and open-unlearning
    ``1 / R`` or ``R``; the KS test is invariant to a monotone map applied to both samples, so the
    p-value is the same. (CLEAR's ``mm/calculate_metrics.py`` averages the perturbed losses over
    *all* items before the ratio -- a deviation we do not copy; pass per-item ratios.)
    """
    a = _floats(unlearned_stats, "unlearned_stats")
    b = _floats(reference_stats, "reference_stats")
    res = _require("scipy.stats").ks_2samp(a, b)
    return KSResult(float(res.pvalue), float(res.statistic), len(a), len(b))


def model_utility(values: Mapping[str, float] | Sequence[float]) -> float:
    """Model utility = harmonic mean ``n / sum_i 1/x_i`` of the retain-side metrics:
    ``scipy.stats.hmean``, as TOFU ``get_model_utility``, open-unlearning ``hm_aggregate`` and
    CLEAR. For TOFU the nine values named in :data:`TOFU_MODEL_UTILITY`; pass a mapping to keep
    the names with the numbers. A zero value gives 0 (as scipy); a negative one is a ValueError.
    """
    xs = _floats(list(values.values()) if isinstance(values, Mapping) else values, "values")
    if any(x < 0 for x in xs):
        raise ValueError("values must be >= 0 for a harmonic mean")
    return float(hmean_statistic(np.asarray(xs), axis=0))


def hmean_statistic(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """``scipy.stats.hmean`` along ``axis``, unchecked (a zero value gives 0, silently)."""
    stats = _require("scipy.stats")
    with np.errstate(divide="ignore"):
        return stats.hmean(values, axis=axis)


# ----------------------------------------------------------------------------- membership inference
def loss_score(token_logprobs: Sequence[float]) -> float:
    """LOSS attack (Yeom et al. 2018): ``mean_t log p(x_t | x_<t)`` = minus the mean token NLL
    (open-unlearning ``mia_loss`` scores ``+avg_loss``; higher here = more member-like)."""
    return _mean(_floats(token_logprobs, "token_logprobs", finite=True))


def zlib_score(token_logprobs: Sequence[float], text: str) -> float:
    """zlib attack (Carlini et al. 2021): ``-(mean token NLL) / len(zlib.compress(text.encode()))``.

    MUSE ``PPL/zlib`` and open-unlearning ``mia_zlib`` use ``loss / zlib_entropy`` with zlib's
    default level and UTF-8 bytes; negated here so that higher = member-like. The compressed
    length is >= 8 bytes (an empty text compresses to 8)."""
    return loss_score(token_logprobs) / len(zlib.compress(_text(text, "text").encode("utf-8")))


def min_k_prob(token_logprobs: Sequence[float], k: float = 0.2) -> float:
    """Min-k % Prob (Shi et al. 2024): mean of the ``max(1, int(n * k))`` lowest token
    log-probabilities (open-unlearning ``min_k``; it stores ``-`` this). Shi et al. and MUSE use
    ``int(n * k)`` without the floor at 1 (NaN for short texts). MUSE's PrivLeak uses k = 0.4."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    lp = sorted(_floats(token_logprobs, "token_logprobs", finite=True))
    return _mean(lp[: max(1, int(len(lp) * k))])


def roc_auc(scores_members: Sequence[float], scores_nonmembers: Sequence[float]) -> float:
    """ROC AUC = ``P(s_member > s_nonmember) + 1/2 P(s_member = s_nonmember)`` over all pairs:
    the Mann-Whitney ``U`` of the members (``scipy.stats.mannwhitneyu``, mid-ranks for ties)
    over ``n_m n_n``. Equals ``sklearn.metrics.roc_auc_score`` with members labelled 1.
    ``±inf`` scores are allowed. :func:`auc_statistic` is the vectorized form."""
    m = _floats(scores_members, "scores_members")
    h = _floats(scores_nonmembers, "scores_nonmembers")
    return float(auc_statistic(np.asarray(m), np.asarray(h)))


def auc_statistic(members: np.ndarray, nonmembers: np.ndarray, axis: int = -1) -> np.ndarray:
    """:func:`roc_auc` along ``axis`` of (broadcast) arrays, unchecked: what the bootstrap
    resamples (``mannwhitneyu(..., method="asymptotic")``: the p-value is not used)."""
    stats = _require("scipy.stats")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-tied rows: no p-value
        u = stats.mannwhitneyu(members, nonmembers, axis=axis, method="asymptotic").statistic
    return u / (np.shape(members)[axis] * np.shape(nonmembers)[axis])


def privacy_leakage(
    auc_unlearned: float, auc_reference: float, convention: Literal["member", "muse"] = "member"
) -> float:
    """MUSE PrivLeak in percent: ``(AUC_unlearn - AUC_retrain) / AUC_retrain * 100``.

    MUSE (``eval.py``, ``privleak/scripts/get_ppl.py``) computes its AUC with the forget set as the
    *negative* class against holdout, i.e. ``AUC_muse = 1 - a`` where ``a`` is this module's
    :func:`roc_auc` ``(forget, holdout)``. With ``convention="member"`` (default; pass our AUCs) the
    formula is therefore ``(a_ref - a_unl) / (1 - a_ref) * 100``; with ``convention="muse"`` the
    AUCs are used as given. open-unlearning ``privleak`` does the same ``1 - auc`` conversion.
    Sign: 0 = as distinguishable as the retrained reference; **negative = under-unlearning** (forget
    items still look like training data; the original model scores about -100); positive =
    over-unlearning (forget items look *less* seen than never-seen holdout text).
    """
    au = _scalar(auc_unlearned, "auc_unlearned")
    ar = _scalar(auc_reference, "auc_reference")
    for v, name in ((au, "auc_unlearned"), (ar, "auc_reference")):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    if convention == "member":
        au, ar = 1.0 - au, 1.0 - ar
    elif convention != "muse":
        raise ValueError(f"convention must be 'member' or 'muse', got {convention!r}")
    if ar == 0.0:
        raise ValueError("the reference AUC (MUSE orientation) is 0: PrivLeak is undefined")
    return (au - ar) / ar * 100.0


def avg_gap(
    method_metrics: Mapping[str, float], reference_metrics: Mapping[str, float], keys: Sequence[str]
) -> dict:
    """SalUn "Avg. Gap": ``mean_k |method[k] - reference[k]|`` over ``keys`` (SalUn: UA, RA, TA,
    MIA-Efficacy against Retrain; here the forget/retain metrics against the reference model).
    In the inputs' units (SalUn uses percent). Returns ``{"avg_gap", "keys", "gaps": {k: |diff|}}``.
    """
    if isinstance(keys, str):
        raise TypeError("keys must be a sequence of metric names, not one string")
    keys = list(keys)
    if not keys:
        raise ValueError("keys is empty")
    gaps = {}
    for k in keys:
        for metrics, name in (
            (method_metrics, "method_metrics"),
            (reference_metrics, "reference_metrics"),
        ):
            if k not in metrics:
                raise ValueError(f"{name} has no key {k!r}")
        gaps[k] = abs(
            _scalar(method_metrics[k], f"method_metrics[{k!r}]")
            - _scalar(reference_metrics[k], f"reference_metrics[{k!r}]")
        )
    return {"avg_gap": _mean(list(gaps.values())), "keys": keys, "gaps": gaps}
