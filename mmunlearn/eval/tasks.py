"""Evaluation in the MLLMU-Bench protocol: MCQ (by option likelihood and by generated letter),
fill-in-the-blank and generation (ROUGE / BLEU), per evaluation set, seeded and batched.

Samples are :class:`mmunlearn.data.schema.Sample`; an MCQ sample carries
``meta = {"options": {"A": ..., "B": ..., ...}, "correct": "B"}``; a cloze sample carries
``meta = {"ground_truth": ...}``; every sample's ``answer`` is the reference for generation.
Image items are "VQA", text-only items "QA"; both are reported separately, as in the benchmark.

``collate(samples, ans_only=True, with_answer=True)`` is the model adapter's batch builder
(``with_answer=False`` gives left-padded prompts for ``generate``).

CLEAR (:func:`evaluate_clear`): face recognition as a name MCQ given the image (likelihood
and letter), caption ROUGE / BLEU, and the real-faces / real-world MCQs; keys in
:func:`evaluate_clear_set`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from mmunlearn.data.batching import to_device
from mmunlearn.data.schema import Sample
from mmunlearn.eval import metrics
from mmunlearn.losses import per_sample_ce, sequence_logprob

LETTERS = "ABCDEFGH"


@dataclass
class EvalConfig:
    batch_size: int = 16
    seed: int = 0
    max_new_tokens: int = 16
    length_normalized: bool = True  # MCQ likelihood: mean token log-prob (else the sum)
    letter_mcq: bool = True  # also ask for the letter and parse the generation
    generation: bool = True
    progress: bool = True
    rouge_stemmer: bool = False  # ROUGE with Porter stemming (rouge_score use_stemmer)
    # keep every item's score under ``metrics["_items"]`` (and corpus-BLEU statistics under
    # ``metrics["_bleu_stats"]``) for bootstrap intervals and the gap to a reference; changes no
    # number and is not part of the protocol record
    keep_items: bool = False


def _batches(items: Sequence, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def progress_bar(items: Sequence, desc: str, enabled: bool):
    """``items`` with a tqdm bar (on stderr, removed when done) when ``enabled`` and stderr is a
    terminal (tqdm's ``disable=None``); the long loops of an evaluation (generation, option and
    answer likelihoods) go through it."""
    return tqdm(items, desc=desc, disable=None if enabled else True, leave=False, unit="batch")


@torch.no_grad()
def option_scores(model, collate: Callable, samples: Sequence[Sample], cfg: EvalConfig):
    """Log-likelihood of every option of every MCQ sample as the answer: list of dicts."""
    cands = []
    for si, s in enumerate(samples):
        for letter, text in s.meta["options"].items():
            cands.append((si, letter, replace(s, answer=str(text))))
    scores: list[dict] = [{} for _ in samples]
    dev = _model_device(model)
    for chunk in progress_bar(list(_batches(cands, cfg.batch_size)), "MCQ options", cfg.progress):
        batch = to_device(collate([c[2] for c in chunk], ans_only=True, with_answer=True), dev)
        logits = model(**batch).logits
        if cfg.length_normalized:
            val = -per_sample_ce(logits, batch["labels"])
        else:
            val = sequence_logprob(logits, batch["labels"])
        for (si, letter, _), v in zip(chunk, val.tolist()):
            scores[si][letter] = v
    return scores


def _letter_prompt(s: Sample) -> Sample:
    opts = " ".join(f"{k}. {v}" for k, v in s.meta["options"].items())
    return replace(
        s,
        question=f"{s.question} options: {opts}. answer with the letter.",
        answer=s.meta["correct"],
    )


@torch.no_grad()
def generate(
    model,
    collate: Callable,
    tokenizer,
    samples: Sequence[Sample],
    cfg: EvalConfig,
    strip: bool = True,
):
    """Greedy, batched generations for the samples' prompts: the new tokens decoded with special
    tokens skipped (stripped of surrounding white space unless ``strip=False``)."""
    out: list[str] = []
    dev = _model_device(model)
    chunks = list(_batches(list(samples), cfg.batch_size))
    for chunk in progress_bar(chunks, "generate", cfg.progress):
        batch = to_device(collate(chunk, ans_only=True, with_answer=False), dev)
        batch.pop("labels", None)
        n_in = batch["input_ids"].shape[1]
        gen = model.generate(
            **batch,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(gen[:, n_in:], skip_special_tokens=True)
        out += [t.strip() for t in texts] if strip else list(texts)
    return out


def shuffle_options(mcq: Sequence[Sample], rng: random.Random) -> list[Sample]:
    """Copies of MCQ samples with their options in a seeded random order, re-lettered
    ``A, B, ...`` (so the correct letter is not always the same position); ``meta["correct"]``
    follows the correct option's text. Draws one shuffle per sample from ``rng``, in order."""
    out = []
    for s in mcq:
        items = list(s.meta["options"].items())
        rng.shuffle(items)
        opts = {LETTERS[i]: v for i, (_, v) in enumerate(items)}
        correct_text = s.meta["options"][s.meta["correct"]]
        letter = next(k for k, v in opts.items() if v == correct_text)
        out.append(replace(s, meta={**s.meta, "options": opts, "correct": letter}))
    return out


def _hits(preds, golds) -> list[float]:
    return [float(p is not None and p == g) for p, g in zip(preds, golds)]


def _keep(res: dict, cfg: EvalConfig, key: str, values) -> None:
    """Record the per-item scores of ``key`` (``cfg.keep_items``)."""
    if cfg.keep_items:
        res.setdefault("_items", {})[key] = [float(v) for v in values]


def _mcq_metrics(model, collate, tokenizer, items, cfg: EvalConfig, prefix: str) -> dict:
    """``{prefix}_mcq_acc`` (option likelihood) and, with ``cfg.letter_mcq``,
    ``{prefix}_mcq_letter_acc`` (generated letter) of already shuffled MCQ samples."""
    golds = [s.meta["correct"] for s in items]
    sc = option_scores(model, collate, items, cfg)
    preds = [metrics.mcq_from_loglik(d) for d in sc]
    res = {f"{prefix}_mcq_acc": metrics.accuracy(preds, golds)}
    _keep(res, cfg, f"{prefix}_mcq_acc", _hits(preds, golds))
    if cfg.letter_mcq:
        texts = generate(model, collate, tokenizer, [_letter_prompt(s) for s in items], cfg)
        letters = [metrics.mcq_letter_from_text(t, s.meta["options"]) for t, s in zip(texts, items)]
        res[f"{prefix}_mcq_letter_acc"] = metrics.accuracy(letters, golds)
        _keep(res, cfg, f"{prefix}_mcq_letter_acc", _hits(letters, golds))
    return res


def _update(res: dict, part: dict) -> None:
    """``res.update(part)`` merging the ``_items`` / ``_bleu_stats`` sub-dicts."""
    for k, v in part.items():
        if k.startswith("_") and isinstance(v, dict):
            res.setdefault(k, {}).update(v)
        else:
            res[k] = v


def evaluate_set(
    model,
    collate,
    tokenizer,
    mcq: Sequence[Sample] = (),
    cloze: Sequence[Sample] = (),
    gen: Sequence[Sample] = (),
    cfg: EvalConfig | None = None,
) -> dict:
    """Metrics of one evaluation set. Keys: ``{vqa,qa}_mcq_acc`` (likelihood),
    ``{vqa,qa}_mcq_letter_acc`` (generated letter), ``{vqa,qa}_cloze_acc``,
    ``{vqa,qa}_rouge1|rouge2|rougeL|bleu``, and ``n_*`` counts."""
    cfg = cfg or EvalConfig()
    rng = random.Random(cfg.seed)
    res: dict = {}

    def split(items):
        return {
            "vqa": [s for s in items if s.image is not None],
            "qa": [s for s in items if s.image is None],
        }

    shuffled = shuffle_options(mcq, rng)
    for kind, items in split(shuffled).items():
        if not items:
            continue
        _update(res, _mcq_metrics(model, collate, tokenizer, items, cfg, kind))
        res[f"n_{kind}_mcq"] = len(items)
    for kind, items in split(list(cloze)).items():
        if not items:
            continue
        texts = generate(model, collate, tokenizer, items, cfg)
        hits = [
            metrics.cloze_match(t, s.meta.get("ground_truth", s.answer))
            for t, s in zip(texts, items)
        ]
        res[f"{kind}_cloze_acc"] = sum(hits) / len(hits)
        _keep(res, cfg, f"{kind}_cloze_acc", hits)
        res[f"n_{kind}_cloze"] = len(items)
    if cfg.generation:
        for kind, items in split(list(gen)).items():
            if not items:
                continue
            texts = generate(model, collate, tokenizer, items, cfg)
            rs = [
                metrics.rouge_scores(t, s.answer, cfg.rouge_stemmer) for t, s in zip(texts, items)
            ]
            for key in ("rouge1", "rouge2", "rougeL"):
                res[f"{kind}_{key}"] = sum(r[key] for r in rs) / len(rs)
                _keep(res, cfg, f"{kind}_{key}", [r[key] for r in rs])
            res[f"{kind}_bleu"] = metrics.corpus_bleu(texts, [s.answer for s in items])
            if cfg.keep_items:
                stats = [metrics.bleu_stats(t, s.answer) for t, s in zip(texts, items)]
                res.setdefault("_bleu_stats", {})[f"{kind}_bleu"] = stats
            res[f"n_{kind}_gen"] = len(items)
    return res


def evaluate(model, collate, tokenizer, sets: dict, cfg: EvalConfig | None = None) -> dict:
    """``sets = {name: {"mcq": [...], "cloze": [...], "gen": [...]}}`` → ``{name: metrics}``
    plus ``"_protocol"`` (seed, batch size, MCQ scoring, shots = 0)."""
    cfg = cfg or EvalConfig()
    model.eval()
    out = {}
    for name in tqdm(list(sets), desc="eval", disable=not cfg.progress):
        s = sets[name]
        out[name] = evaluate_set(
            model, collate, tokenizer, s.get("mcq", ()), s.get("cloze", ()), s.get("gen", ()), cfg
        )
    out["_protocol"] = protocol(cfg)
    return out


def protocol(cfg: EvalConfig) -> dict:
    """The evaluation protocol record (``"_protocol"`` of the results): seed, batch size,
    shots (always 0), MCQ scoring, letter MCQ, max new tokens, decoding."""
    return {
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "shots": 0,
        "mcq": "option log-likelihood (length-normalised)"
        if cfg.length_normalized
        else "option log-likelihood (sum)",
        "letter_mcq": cfg.letter_mcq,
        "max_new_tokens": cfg.max_new_tokens,
        "decoding": "greedy",
        "rouge": "rouge_score F1, " + ("Porter stemming" if cfg.rouge_stemmer else "no stemming"),
    }


def evaluate_clear_set(
    model,
    collate,
    tokenizer,
    faces: Sequence[Sample] = (),
    captions: Sequence[Sample] = (),
    mcq: Sequence[Sample] = (),
    cfg: EvalConfig | None = None,
) -> dict:
    """CLEAR metrics of one evaluation set (method.md §6, CLEAR). Keys, each present only when
    its items are given:

    - ``face_acc``: face recognition, the name MCQ (samples of
      :func:`mmunlearn.data.clear.read_clear_name_mcq`: the image, options = the true name and
      its ``perturbed_names``) scored by option likelihood; ``face_letter_acc``: the same
      questions answered by a generated letter (with ``cfg.letter_mcq``); ``n_face``;
    - ``caption_rouge1`` / ``caption_rouge2`` / ``caption_rougeL``: mean F1 of the greedy
      caption (``cfg.max_new_tokens``) against the sample's caption
      (:func:`mmunlearn.eval.metrics.rouge_scores`, stemmed with ``cfg.rouge_stemmer``);
      ``caption_rougeL_recall``: mean ROUGE-L recall (the TOFU / CLEAR convention);
      ``caption_bleu``: corpus BLEU (:func:`mmunlearn.eval.metrics.corpus_bleu`);
      ``n_caption`` (with ``cfg.generation``);
    - ``mcq_acc`` / ``mcq_letter_acc`` / ``n_mcq``: ``real_faces`` / ``real_world`` MCQs
      (:func:`mmunlearn.data.clear.read_clear_real`), likelihood / generated letter.

    Options are re-shuffled with ``cfg.seed`` as in :func:`evaluate_set` (faces first, then
    the MCQs, from one ``random.Random(cfg.seed)``). Accuracies are in [0, 1]."""
    cfg = cfg or EvalConfig()
    rng = random.Random(cfg.seed)
    res: dict = {}
    faces, mcq = shuffle_options(faces, rng), shuffle_options(mcq, rng)

    def renamed(r: dict, p: str) -> None:  # {p}_mcq_acc → {p}_acc, {p}_mcq_letter_acc → ...
        for k in ("acc", "letter_acc"):
            if f"{p}_mcq_{k}" in r:
                res[f"{p}_{k}"] = r[f"{p}_mcq_{k}"]
                if cfg.keep_items:
                    res.setdefault("_items", {})[f"{p}_{k}"] = r["_items"][f"{p}_mcq_{k}"]

    if faces:
        renamed(_mcq_metrics(model, collate, tokenizer, faces, cfg, "face"), "face")
        res["n_face"] = len(faces)
    if captions and cfg.generation:
        texts = generate(model, collate, tokenizer, list(captions), cfg)
        refs = [s.answer for s in captions]
        rs = [metrics.rouge_scores(t, r, cfg.rouge_stemmer) for t, r in zip(texts, refs)]
        for key in ("rouge1", "rouge2", "rougeL"):
            res[f"caption_{key}"] = sum(r[key] for r in rs) / len(rs)
            _keep(res, cfg, f"caption_{key}", [r[key] for r in rs])
        rec = [metrics.rouge_l(t, r, cfg.rouge_stemmer)["recall"] for t, r in zip(texts, refs)]
        res["caption_rougeL_recall"] = sum(rec) / len(rec)
        _keep(res, cfg, "caption_rougeL_recall", rec)
        res["caption_bleu"] = metrics.corpus_bleu(texts, refs)
        if cfg.keep_items:
            stats = [metrics.bleu_stats(t, r) for t, r in zip(texts, refs)]
            res.setdefault("_bleu_stats", {})["caption_bleu"] = stats
        res["n_caption"] = len(captions)
    if mcq:
        renamed(_mcq_metrics(model, collate, tokenizer, mcq, cfg, "mcq"), "mcq")
        res["n_mcq"] = len(mcq)
    return res


def evaluate_clear(model, collate, tokenizer, sets: dict, cfg: EvalConfig | None = None) -> dict:
    """CLEAR evaluation. ``sets = {name: {"faces": [...], "captions": [...], "mcq": [...]}}``
    (any part may be absent; usual names: ``forget``, ``retain``, ``real_faces``,
    ``real_world``) → ``{name: metrics}`` with the keys of :func:`evaluate_clear_set`
    (``face_acc``, ``face_letter_acc``, ``caption_rougeL``, ``caption_rougeL_recall``,
    ``caption_rouge1``, ``caption_rouge2``, ``caption_bleu``, ``mcq_acc``, ``mcq_letter_acc``,
    ``n_*``) plus ``"_protocol"`` (as :func:`evaluate`, with ``benchmark = "CLEAR"``).
    Forget: lower face accuracy / caption ROUGE = more forgotten; retain and real: higher is
    better."""
    cfg = cfg or EvalConfig()
    model.eval()
    out = {}
    for name in tqdm(list(sets), desc="eval CLEAR", disable=not cfg.progress):
        s = sets[name]
        out[name] = evaluate_clear_set(
            model,
            collate,
            tokenizer,
            s.get("faces", ()),
            s.get("captions", ()),
            s.get("mcq", ()),
            cfg,
        )
    out["_protocol"] = {**protocol(cfg), "benchmark": "CLEAR"}
    return out
