"""Text metrics of the MLLMU-Bench protocol, in pure Python/numpy (no NLP packages).

- ``normalize_text``: lowercase; punctuation → space; drop the articles a/an/the; collapse
  whitespace. ``tokenize`` splits the normalised text on whitespace.
- ROUGE-N: clipped n-gram overlap; P = overlap/|pred n-grams|, R = overlap/|ref n-grams|,
  F1 = 2PR/(P+R) (the F-measure with β = 1, as the rouge_score package reports). ROUGE-L uses
  the longest common subsequence with the same P/R/F1.
- BLEU: geometric mean of clipped n-gram precisions (n ≤ 4) times the brevity penalty
  ``exp(1 - r/c)`` for ``c < r``; smoothing adds 1 to numerator and denominator of every
  n > 1 precision (Lin & Och 2004, "add-one" / NLTK's method2), so short sentences do not
  collapse to 0.
- Cloze: the normalised ground truth occurs in the normalised generation (case-insensitive).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = {"a", "an", "the"}


def normalize_text(s: str) -> str:
    """Lowercase, punctuation → spaces, articles (a/an/the) removed, whitespace collapsed."""
    words = _PUNCT.sub(" ", str(s).lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def tokenize(s: str) -> list[str]:
    """Tokens of :func:`normalize_text`."""
    return normalize_text(s).split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _prf(overlap: float, n_pred: int, n_ref: int) -> dict:
    p = overlap / n_pred if n_pred else 0.0
    r = overlap / n_ref if n_ref else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f}


def rouge_n(pred: str, ref: str, n: int = 1) -> dict:
    """ROUGE-N precision / recall / F1 with clipped n-gram counts."""
    pc, rc = _ngrams(tokenize(pred), n), _ngrams(tokenize(ref), n)
    return _prf(sum((pc & rc).values()), sum(pc.values()), sum(rc.values()))


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> dict:
    """ROUGE-L (LCS) precision / recall / F1."""
    p, r = tokenize(pred), tokenize(ref)
    return _prf(_lcs(p, r), len(p), len(r))


def rouge_scores(pred: str, ref: str) -> dict:
    """``{"rouge1", "rouge2", "rougeL"}`` F1 scores."""
    return {
        "rouge1": rouge_n(pred, ref, 1)["f1"],
        "rouge2": rouge_n(pred, ref, 2)["f1"],
        "rougeL": rouge_l(pred, ref)["f1"],
    }


def _bleu_from_counts(matches, totals, c: int, r: int, max_n: int, smooth: bool) -> float:
    if c == 0:
        return 0.0
    logs = []
    for n in range(max_n):
        m, t = matches[n], totals[n]
        if smooth and n > 0:
            m, t = m + 1, t + 1
        if m == 0 or t == 0:
            return 0.0
        logs.append(math.log(m / t))
    bp = 1.0 if c >= r else math.exp(1 - r / c)
    return bp * math.exp(sum(logs) / max_n)


def _counts(pred: str, ref: str, max_n: int):
    p, r = tokenize(pred), tokenize(ref)
    matches, totals = [], []
    for n in range(1, max_n + 1):
        pc, rc = _ngrams(p, n), _ngrams(r, n)
        matches.append(sum((pc & rc).values()))
        totals.append(max(0, len(p) - n + 1))
    return matches, totals, len(p), len(r)


def bleu(pred: str, ref: str, max_n: int = 4, smooth: bool = True) -> float:
    """Sentence BLEU in [0, 1] (brevity penalty; add-one smoothing for n > 1 when ``smooth``)."""
    m, t, c, r = _counts(pred, ref, max_n)
    return _bleu_from_counts(m, t, c, r, max_n, smooth)


def corpus_bleu(
    preds: Sequence[str], refs: Sequence[str], max_n: int = 4, smooth: bool = True
) -> float:
    """Corpus BLEU: n-gram counts and lengths summed over the corpus before combining."""
    M, T, C, R = [0] * max_n, [0] * max_n, 0, 0
    for p, r in zip(preds, refs):
        m, t, c, rl = _counts(p, r, max_n)
        M = [a + b for a, b in zip(M, m)]
        T = [a + b for a, b in zip(T, t)]
        C, R = C + c, R + rl
    return _bleu_from_counts(M, T, C, R, max_n, smooth)


def cloze_match(generated: str, ground_truth: str) -> bool:
    """True when the normalised ground truth occurs in the normalised generation."""
    gt = normalize_text(ground_truth)
    return bool(gt) and f" {gt} " in f" {normalize_text(generated)} "


def mcq_from_loglik(
    option_logliks: dict, length_normalized: bool = False, option_lengths: dict | None = None
) -> str:
    """The option letter with the highest log-likelihood (divided by ``option_lengths`` when
    ``length_normalized``). Ties go to the earliest letter in alphabetical order."""
    best, best_v = None, -math.inf
    for k in sorted(option_logliks):
        v = option_logliks[k]
        if length_normalized:
            v = v / max(1, (option_lengths or {}).get(k, 1))
        if v > best_v:
            best, best_v = k, v
    return best


_LETTER = re.compile(
    r"^\s*(?:answer\s*(?:is)?\s*[:\-]?\s*)?\(?([A-H])\)?(?:[.:)\s]|$)", re.IGNORECASE
)


def mcq_letter_from_text(generated: str, options: dict) -> str | None:
    """The letter a generation names ("B", "(B)", "B.", "Answer: B") or whose option text it
    contains; None when nothing parses."""
    m = _LETTER.match(generated or "")
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    norm = normalize_text(generated)
    hits = [
        k
        for k, v in options.items()
        if normalize_text(v) and f" {normalize_text(v)} " in f" {norm} "
    ]
    return hits[0] if len(hits) == 1 else None


def accuracy(preds: Sequence, golds: Sequence) -> float:
    """Fraction of positions where pred == gold (0.0 for empty input)."""
    if not golds:
        return 0.0
    return sum(p == g for p, g in zip(preds, golds)) / len(golds)


def mean_ci(
    values: Sequence[float], confidence: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): a seeded percentile-bootstrap interval of the mean."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    a = (1 - confidence) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
