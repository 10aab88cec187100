"""Text metrics of the MLLMU-Bench evaluation protocol (method.md §6).

* :func:`normalize_text` / :func:`tokenize` -- text normalisation and tokenisation (cloze, BLEU);
* :func:`rouge_n`, :func:`rouge_l`, :func:`rouge_scores` -- ROUGE-1/2/L (generation task), by
  the ``rouge_score`` package (:func:`mmunlearn.eval.unlearning.rouge_scorer`);
* :func:`bleu`, :func:`corpus_bleu` -- BLEU (generation task);
* :func:`cloze_match` -- the fill-in-the-blank rule;
* :func:`mcq_from_loglik`, :func:`mcq_letter_from_text` -- the 4-way classification task;
* :func:`accuracy`, :func:`mean_ci` -- aggregation and a seeded bootstrap interval for reporting
  (:mod:`mmunlearn.eval.bootstrap`).

ROUGE is ``rouge_score``'s (``RougeScorer(..., use_stemmer=stemmer).score(ref, pred)``), without
Porter stemming by default (the default protocol's setting; ``--rouge-stemmer`` turns it on, as
MLLMU-Bench and CLEAR score). ``rouge_score`` tokenizes by lowercasing and replacing every
character outside ``[a-z0-9]`` by a space, so accented letters split a word (``"Zoë"`` →
``"zo"``); until issue #26 this module's hand-written ROUGE kept non-ASCII letters. On ASCII
text the two agree. BLEU, the cloze rule and the MCQ parsers are ours, defined in their
docstrings.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "normalize_text",
    "tokenize",
    "ngrams",
    "rouge_n",
    "rouge_l",
    "rouge_scores",
    "bleu",
    "corpus_bleu",
    "bleu_stats",
    "corpus_bleu_from_stats",
    "cloze_match",
    "mcq_from_loglik",
    "mcq_letter_from_text",
    "accuracy",
    "mean_ci",
]

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)


def _is_punct(ch: str) -> bool:
    """ASCII ``string.punctuation`` (which includes symbols such as ``$+<=>^`|~``) or any
    Unicode character of general category ``P*`` (e.g. curly quotes, en/em dashes, ``¿``)."""
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def _strip_punct(s: str, repl: str) -> str:
    return "".join(repl if _is_punct(ch) else ch for ch in s)


def normalize_text(s: str) -> str:
    """Normalise an answer for string matching (SQuAD-style ``normalize_answer``).

    Exactly, in this order:

    1. lowercase (``str.lower``);
    2. delete every punctuation character -- ASCII ``string.punctuation`` and any Unicode
       category ``P*`` character -- *without* inserting a space, so ``"Jean-Luc"`` →
       ``"jeanluc"`` and ``"don't"`` → ``"dont"`` (the same on both sides of a comparison);
    3. replace the whole words ``a``, ``an``, ``the`` by a space;
    4. collapse every run of whitespace into one space and strip both ends.

    >>> normalize_text("  The  Eiffel-Tower, in   PARIS! ")
    'eiffeltower in paris'
    """
    s = s.lower()
    s = _strip_punct(s, "")
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def tokenize(s: str) -> list[str]:
    """Whitespace + punctuation tokenizer used by ROUGE and BLEU.

    Lowercase, replace every punctuation character (as in :func:`normalize_text`) by a space,
    split on whitespace. Articles are *kept* (they count as n-grams, as in ``rouge_score``);
    digits and non-ASCII letters are kept.

    >>> tokenize("The cat's mat, 2 m long.")
    ['the', 'cat', 's', 'mat', '2', 'm', 'long']
    """
    return _strip_punct(s.lower(), " ").split()


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Multiset (``Counter``) of the contiguous ``n``-grams (as tuples) of ``tokens``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _rouge(pred: str, ref: str, types: tuple[str, ...], stemmer: bool) -> dict:
    from mmunlearn.eval.unlearning import rouge_scorer

    if not isinstance(pred, str) or not isinstance(ref, str):
        raise TypeError("pred and ref must be strings")
    return rouge_scorer(types, stemmer).score(ref, pred)


def _prf(score) -> dict[str, float]:
    return {
        "precision": float(score.precision),
        "recall": float(score.recall),
        "f1": float(score.fmeasure),
    }


def rouge_n(pred: str, ref: str, n: int, stemmer: bool = False) -> dict[str, float]:
    """ROUGE-N (n = 1..9) of a prediction against one reference, by ``rouge_score``.

    With ``P`` = n-grams of the prediction's tokens and ``R`` = those of the reference
    (multisets), ``overlap = sum_g min(count_P(g), count_R(g))`` (clipped counts);
    precision = overlap / |P|, recall = overlap / |R|, F1 = 2PR / (P + R). A side with no
    n-gram (empty, or fewer than ``n`` tokens) gives zeros. Tokens: see the module docstring
    (``stemmer``: Porter stemming). Returns ``{"precision", "recall", "f1"}``.
    """
    if not 1 <= n <= 9:
        raise ValueError(f"n must be in 1..9 (rouge_score's rouge1..rouge9), got {n}")
    key = f"rouge{n}"
    return _prf(_rouge(pred, ref, (key,), stemmer)[key])


def rouge_l(pred: str, ref: str, stemmer: bool = False) -> dict[str, float]:
    """Sentence-level ROUGE-L (LCS) of a prediction against one reference, by ``rouge_score``.

    With ``L = LCS(pred tokens, ref tokens)`` (longest common subsequence, not necessarily
    contiguous): precision = L / |pred|, recall = L / |ref|, F1 = 2PR / (P + R), i.e. Lin
    (2004)'s F_lcs with beta = 1 (``rouge_score``'s ``rougeL`` ``fmeasure``; the original
    ROUGE-1.5.5 script instead weights recall with a large beta). The whole text is one
    sequence (no sentence splitting, i.e. not ``rougeLsum``). Empty side → 0.
    """
    return _prf(_rouge(pred, ref, ("rougeL",), stemmer)["rougeL"])


def rouge_scores(pred: str, ref: str, stemmer: bool = False) -> dict[str, float]:
    """``{"rouge1", "rouge2", "rougeL"}`` F1 scores (see :func:`rouge_n`, :func:`rouge_l`)."""
    s = _rouge(pred, ref, ("rouge1", "rouge2", "rougeL"), stemmer)
    return {k: float(v.fmeasure) for k, v in s.items()}


def _bleu_stats(pred: str, ref: str, max_n: int) -> tuple[list[int], list[int], int, int]:
    """Clipped n-gram matches and pred n-gram totals for n = 1..max_n, and both lengths."""
    tp, tr = tokenize(pred), tokenize(ref)
    matches, totals = [], []
    for n in range(1, max_n + 1):
        p_ng, r_ng = ngrams(tp, n), ngrams(tr, n)
        matches.append(sum((p_ng & r_ng).values()))
        totals.append(sum(p_ng.values()))
    return matches, totals, len(tp), len(tr)


def _bleu_from_stats(
    matches: Sequence[int], totals: Sequence[int], c: int, r: int, smooth: bool
) -> float:
    if c == 0 or r == 0 or matches[0] == 0:
        return 0.0
    log_p = 0.0
    for n, (m, t) in enumerate(zip(matches, totals), 1):
        if smooth and n > 1:
            m, t = m + 1, t + 1
        if m == 0 or t == 0:
            return 0.0
        log_p += math.log(m / t)
    log_bp = 0.0 if c > r else 1.0 - r / c
    return math.exp(log_bp + log_p / len(matches))


def bleu(pred: str, ref: str, max_n: int = 4, smooth: bool = True) -> float:
    """Sentence BLEU (Papineni et al. 2002) of a prediction against one reference.

    ``BLEU = BP * exp(mean_{n=1..max_n} log p_n)`` (uniform weights 1/max_n) where
    ``p_n = m_n / l_n``: ``m_n`` the clipped n-gram matches (as in :func:`rouge_n`), ``l_n``
    the number of n-grams of the prediction; tokens from :func:`tokenize`.
    Brevity penalty with c = |pred|, r = |ref|: ``BP = 1`` if c > r else ``exp(1 - r / c)``.

    Smoothing (``smooth=True``): Lin & Och (2004) add-one on the orders n >= 2,
    ``p_n = (m_n + 1) / (l_n + 1)``; the unigram precision is never smoothed. This is
    NLTK's ``SmoothingFunction().method2`` (not ``method1``, which adds an epsilon to zero
    numerators only). Consequences: a prediction shorter than n tokens has p_n = 1/1 for
    that order (its shortness is charged by BP); no unigram match → 0.
    Without smoothing any p_n = 0 (or l_n = 0) gives 0. Empty pred or ref → 0.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    return _bleu_from_stats(*_bleu_stats(pred, ref, max_n), smooth=smooth)


def corpus_bleu(
    preds: Sequence[str], refs: Sequence[str], max_n: int = 4, smooth: bool = False
) -> float:
    """Corpus BLEU: the statistics of :func:`bleu` summed over the corpus, then combined once.

    ``m_n`` and ``l_n`` are summed over all (pred, ref) pairs, c and r are the summed lengths,
    and the formula of :func:`bleu` is applied to the sums (this is not the mean of sentence
    BLEUs). Default ``smooth=False`` (standard corpus BLEU); ``smooth=True`` applies the same
    Lin & Och add-one to the summed counts of orders n >= 2. Empty corpus → 0.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions vs {len(refs)} references")
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    m_tot, l_tot, c_tot, r_tot = [0] * max_n, [0] * max_n, 0, 0
    for p, r in zip(preds, refs):
        m, t, c, rl = _bleu_stats(p, r, max_n)
        m_tot = [a + b for a, b in zip(m_tot, m)]
        l_tot = [a + b for a, b in zip(l_tot, t)]
        c_tot, r_tot = c_tot + c, r_tot + rl
    return _bleu_from_stats(m_tot, l_tot, c_tot, r_tot, smooth=smooth)


def bleu_stats(pred: str, ref: str, max_n: int = 4) -> list[int]:
    """One pair's corpus-BLEU statistics as a flat list ``[m_1..m_max_n, l_1..l_max_n, c, r]``
    (clipped matches, prediction n-grams, both lengths; see :func:`bleu`): what
    :func:`corpus_bleu` sums. Kept per item so that a bootstrap can resample items and
    recompute the corpus score (:func:`corpus_bleu_from_stats`)."""
    m, t, c, r = _bleu_stats(pred, ref, max_n)
    return [*m, *t, c, r]


def corpus_bleu_from_stats(stats: Sequence[Sequence[int]], smooth: bool = False) -> float:
    """:func:`corpus_bleu` of the pairs whose :func:`bleu_stats` are ``stats`` (equal to
    ``corpus_bleu(preds, refs)`` on the same pairs). Empty → 0."""
    if len(stats) == 0:
        return 0.0
    tot = np.asarray(stats, dtype=np.int64).sum(axis=0)
    max_n = (len(tot) - 2) // 2
    return _bleu_from_stats(
        [int(x) for x in tot[:max_n]],
        [int(x) for x in tot[max_n : 2 * max_n]],
        int(tot[-2]),
        int(tot[-1]),
        smooth=smooth,
    )


def cloze_match(generated: str, ground_truth: str, whole_words: bool = False) -> bool:
    """MLLMU-Bench fill-in-the-blank rule: is the ground truth contained in the generation?

    ``normalize_text(ground_truth)`` must be a substring of ``normalize_text(generated)``
    (case-insensitive, punctuation and articles ignored; see :func:`normalize_text`). By
    default this is plain substring containment like the reference code's
    ``gt.lower() in generated.lower()``, so ``"art"`` is found in ``"party"``;
    ``whole_words=True`` requires the match to start and end at word boundaries.
    A ground truth that normalises to ``""`` never matches (returns ``False``) rather than
    matching everything.
    """
    gt, gen = normalize_text(ground_truth), normalize_text(generated)
    if not gt:
        return False
    return f" {gt} " in f" {gen} " if whole_words else gt in gen


def _letter_order(letters) -> list[str]:
    return sorted(letters, key=lambda k: (len(k), k))


def mcq_from_loglik(
    option_logliks: Mapping[str, float],
    length_normalized: bool = False,
    option_lengths: Mapping[str, int] | None = None,
) -> str:
    """Chosen option of a multiple-choice question from the options' answer log-likelihoods.

    The score of option ``k`` is ``option_logliks[k]`` (summed token log-probability), or with
    ``length_normalized=True`` ``option_logliks[k] / option_lengths[k]`` (mean per-token
    log-probability; ``option_lengths`` is then required, positive, and covers every option).
    Returns the argmax. Ties are broken by the first letter in alphabetical order
    (A before B before C before D), i.e. the earliest option wins. NaN scores count as
    ``-inf``. Raises ``ValueError`` on an empty dict.
    """
    if not option_logliks:
        raise ValueError("no options")
    if length_normalized and option_lengths is None:
        raise ValueError("length_normalized=True needs option_lengths")
    best, best_s = None, -math.inf
    for k in _letter_order(option_logliks):
        s = float(option_logliks[k])
        if length_normalized:
            n = option_lengths[k]
            if n <= 0:
                raise ValueError(f"option {k!r} has length {n}")
            s /= n
        if math.isnan(s):
            s = -math.inf
        if best is None or s > best_s:
            best, best_s = k, s
    return best


_ANSWER_RE = re.compile(r"\banswer\b(?:\s+is)?\s*[:\-]?\s*[\(\[\*\"']*([a-z])(?!\w)", re.I)
_LEAD_RE = re.compile(r"^[\s\*\(\[\"']*([A-Za-z])(?!\w)")
_PAREN_RE = re.compile(r"[\(\[]([A-Z])[\)\]]")


def _letter_ends(rest: str, option_text: str) -> bool:
    """Does a candidate letter end here? ``rest`` is the text right after the letter: empty,
    a closing/delimiting punctuation mark, a new line, or the letter's own option text."""
    if not rest.strip():
        return True
    if rest[0] in ").:]*,;\"'" or rest.lstrip(" \t").startswith("\n"):
        return True
    opt = normalize_text(option_text)
    return bool(opt) and normalize_text(rest).startswith(opt)


def mcq_letter_from_text(generated: str, options: Mapping[str, str]) -> str | None:
    """Letter of the option a generated answer picks, or ``None`` when nothing parses.

    ``options`` maps letters (``"A"``..``"D"``) to option texts; only those letters can be
    returned. Rules, first success wins:

    1. the whole answer is a letter, any case, ignoring surrounding punctuation/space:
       ``"B"``, ``"b"``, ``"(B)"``, ``"B."``, ``"**B**"``;
    2. ``answer`` [``is``] [``:`` or ``-``] followed by a letter (any case), e.g.
       ``"Answer: B"``, ``"The answer is (C)."``, ``"answer: d"``;
    3. the answer starts with a letter, e.g. ``"B. Paris"``, ``"(B) Paris"``, ``"C) ..."``;
       a lower-case one only when followed by ``"."`` or ``")"`` (``"b) Paris"``);
    4. exactly one distinct parenthesised letter, e.g. ``"I think (D) is right"``;
    5. the option text itself: the options whose normalised text occurs whole-word in the
       normalised answer, dropping any that is contained in another matching option's text
       (``"Paris"`` inside ``"Paris, Texas"``); accepted if exactly one remains.

    In rules 2 and 3 a letter that could be a word (any lower-case letter, ``"A"``, ``"I"``)
    must be followed by the end of the text, punctuation, a new line or its own option
    text, so ``"A man in a hat"`` or ``"The answer is a dog"`` are not read as letter A
    (unless option A's text is "man ..." / "dog ..."), while ``"B is correct"`` gives B. Returned
    letters are spelled as the keys of ``options``.
    """
    valid = {k.upper(): k for k in options}
    text = generated.strip()
    bare = text.strip(string.punctuation + string.whitespace)
    if len(bare) == 1 and bare.upper() in valid:
        return valid[bare.upper()]
    for rx in (_ANSWER_RE, _LEAD_RE):
        for m in rx.finditer(text):
            k, rest = m.group(1), text[m.end() :]
            if rx is _LEAD_RE and k.islower() and rest[:1] not in (".", ")"):
                continue  # a leading lower-case "a" is the article unless "a." / "a)"
            word_like = k.islower() or k in ("A", "I")  # could be the article / pronoun
            k = k.upper()
            if k in valid and (not word_like or _letter_ends(rest, options[valid[k]])):
                return valid[k]
    paren = {m.group(1) for m in _PAREN_RE.finditer(text)} & set(valid)
    if len(paren) == 1:
        return valid[paren.pop()]
    gen = f" {normalize_text(text)} "
    hits = {k: normalize_text(v) for k, v in options.items()}
    hits = {k: v for k, v in hits.items() if v and f" {v} " in gen}
    hits = {
        k: v
        for k, v in hits.items()
        if not any(v != w and f" {v} " in f" {w} " for w in hits.values())
    }
    if len(hits) == 1:
        return next(iter(hits))
    return None


def accuracy(preds: Sequence, golds: Sequence) -> float:
    """Fraction of positions where ``preds[i] == golds[i]``; a ``None`` prediction (nothing
    parsed) is simply wrong. Lengths must agree; an empty input gives ``nan``."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions vs {len(golds)} golds")
    if not golds:
        return float("nan")
    return sum(p is not None and p == g for p, g in zip(preds, golds)) / len(golds)


def mean_ci(
    values: Sequence[float], confidence: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval: ``(mean, low, high)``.

    :func:`mmunlearn.eval.bootstrap.bootstrap_ci` of the values with ``np.mean`` (``n_boot``
    resamples drawn from ``numpy.random.default_rng(seed)``; ``low``/``high`` the
    ``(1 ∓ confidence) / 2`` quantiles of the resample means), as a plain tuple. One value →
    ``(v, v, v)``; none → three ``nan``; a NaN value is a ValueError (since #26; it used to
    propagate into the interval).
    """
    from mmunlearn.eval.bootstrap import bootstrap_ci

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if len(values) == 0:
        return (math.nan, math.nan, math.nan)
    ci = bootstrap_ci(values, np.mean, n_boot, seed, confidence)
    return (ci.estimate, ci.lo, ci.hi)
