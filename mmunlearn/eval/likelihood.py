"""Per-item likelihood statistics of a model: what truth ratio, forget quality, "Prob." and the
membership-inference attacks are computed from (:mod:`mmunlearn.eval.unlearning`).

A *likelihood item* is a :class:`~mmunlearn.data.schema.Sample` whose ``answer`` is the target
text, with optional ``meta["paraphrased"]`` (a paraphrase of the answer; TOFU / CLEAR
``paraphrased_caption``) and ``meta["perturbed"]`` (wrong answers; TOFU / CLEAR
``perturbed_*``, or an MCQ's other options: :func:`mcq_items`). Every text is scored as the
answer of the item's prompt, batched through ``adapter.collate(..., ans_only=True)``: the
log-probabilities of the answer tokens (and the adapter's end token), the prompt and image
tokens excluded -- TOFU / open-unlearning / CLEAR's "answer tokens only" (``labels = -100`` on
the question), with the answer tokens as *this* adapter formats them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from mmunlearn.data.batching import to_device
from mmunlearn.data.schema import Sample
from mmunlearn.losses import token_logprobs


@dataclass
class ItemStats:
    """Likelihood statistics of one item under one model.

    ``logprobs``: token log-probabilities of the answer (the MIA scores' input); ``text``: the
    answer; ``para``: mean token log-probability of the paraphrased answer (``None`` when the
    item has none; the truth ratio then uses the answer itself); ``pert``: mean token
    log-probability of every perturbed answer (``None`` when the item has none)."""

    logprobs: list[float]
    text: str
    para: float | None = None
    pert: list[float] | None = None

    @property
    def avg(self) -> float:
        """Mean token log-probability of the answer (``-`` TOFU's ``avg_gt_loss``)."""
        return math.fsum(self.logprobs) / max(1, len(self.logprobs))

    @property
    def para_avg(self) -> float:
        """Mean token log-probability of the paraphrase, or of the answer when there is none."""
        return self.avg if self.para is None else self.para


def mcq_items(samples: Sequence[Sample]) -> list[Sample]:
    """MCQ samples (``meta = {"options", "correct"}``) as likelihood items: the answer is the
    correct option's text, ``meta["perturbed"]`` the other options' texts in letter order
    (the distractors serve as TOFU's perturbed answers; there is no paraphrase). Samples that
    already carry ``meta["perturbed"]`` pass unchanged."""
    out = []
    for s in samples:
        m = s.meta or {}
        if "perturbed" in m or "options" not in m:
            out.append(s)
            continue
        opts = m["options"]
        truth = str(opts[m["correct"]])
        wrong = [str(v) for k, v in opts.items() if k != m["correct"] and str(v) != truth]
        out.append(replace(s, answer=truth, meta={**m, "perturbed": wrong}))
    return out


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_scores(
    model, adapter, samples: Sequence[Sample], batch_size: int = 16, progress: bool = False
) -> list[list]:
    """Log-probabilities of every sample's answer tokens (a list of floats per sample), from
    ``model(**adapter.collate(chunk, ans_only=True, with_answer=True))`` in chunks of
    ``batch_size``; in float32 whatever the model's dtype. ``progress``: a bar on a terminal."""
    from mmunlearn.eval.tasks import progress_bar

    out: list[list[float]] = []
    dev = _model_device(model)
    for i in progress_bar(range(0, len(samples), batch_size), "likelihood", progress):
        chunk = list(samples[i : i + batch_size])
        batch = to_device(adapter.collate(chunk, ans_only=True, with_answer=True), dev)
        lp, valid = token_logprobs(model(**batch).logits, batch["labels"])
        for row, ok in zip(lp, valid):
            out.append(row[ok].float().tolist())
    return out


def item_stats(
    model, adapter, samples: Sequence[Sample], batch_size: int = 16, progress: bool = False
) -> list[ItemStats]:
    """:class:`ItemStats` of every likelihood item (the answer, its paraphrase and perturbed
    answers all scored in one batched pass; the model must be in eval mode)."""
    texts: list[Sample] = []
    where: list[tuple[int, str, int]] = []  # (item, "gt" | "para" | "pert", position)
    for i, s in enumerate(samples):
        m = s.meta or {}
        texts.append(s)
        where.append((i, "gt", 0))
        para = m.get("paraphrased")
        if para is not None and str(para) != s.answer:
            texts.append(replace(s, answer=str(para)))
            where.append((i, "para", 0))
        for j, p in enumerate(m.get("perturbed") or ()):
            texts.append(replace(s, answer=str(p)))
            where.append((i, "pert", j))
    scores = token_scores(model, adapter, texts, batch_size, progress)
    out = [ItemStats([], s.answer) for s in samples]
    for (i, what, _), lps in zip(where, scores):
        if what == "gt":
            out[i].logprobs = lps
            continue
        mean = math.fsum(lps) / max(1, len(lps))
        if what == "para":
            out[i].para = mean
        else:
            out[i].pert = [*(out[i].pert or []), mean]
    return out


__all__ = ["ItemStats", "item_stats", "mcq_items", "token_scores"]
