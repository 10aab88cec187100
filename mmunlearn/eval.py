"""Evaluation in the MLLMU-Bench protocol: MCQ (by option likelihood and by generated letter),
fill-in-the-blank and generation (ROUGE / BLEU), per evaluation set, seeded and batched.

Samples are :class:`mmunlearn.data.schema.Sample`; an MCQ sample carries
``meta = {"options": {"A": ..., "B": ..., ...}, "correct": "B"}``; a cloze sample carries
``meta = {"ground_truth": ...}``; every sample's ``answer`` is the reference for generation.
Image items are "VQA", text-only items "QA"; both are reported separately, as in the benchmark.

``collate(samples, ans_only=True, with_answer=True)`` is the model adapter's batch builder
(``with_answer=False`` gives left-padded prompts for ``generate``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from mmunlearn.data.schema import Sample
from mmunlearn.methods import per_sample_ce, sequence_logprob

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


def _batches(items: Sequence, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def option_scores(model, collate: Callable, samples: Sequence[Sample], cfg: EvalConfig):
    """Log-likelihood of every option of every MCQ sample as the answer: list of dicts."""
    cands = []
    for si, s in enumerate(samples):
        for letter, text in s.meta["options"].items():
            cands.append((si, letter, replace(s, answer=str(text))))
    scores: list[dict] = [{} for _ in samples]
    dev = _model_device(model)
    for chunk in _batches(cands, cfg.batch_size):
        batch = _to(collate([c[2] for c in chunk], ans_only=True, with_answer=True), dev)
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
def generate(model, collate: Callable, tokenizer, samples: Sequence[Sample], cfg: EvalConfig):
    """Greedy, batched generations for the samples' prompts (decoded, stripped)."""
    out: list[str] = []
    dev = _model_device(model)
    for chunk in _batches(list(samples), cfg.batch_size):
        batch = _to(collate(chunk, ans_only=True, with_answer=False), dev)
        batch.pop("labels", None)
        n_in = batch["input_ids"].shape[1]
        gen = model.generate(
            **batch,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += [t.strip() for t in tokenizer.batch_decode(gen[:, n_in:], skip_special_tokens=True)]
    return out


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
    from mmunlearn import metrics

    cfg = cfg or EvalConfig()
    rng = random.Random(cfg.seed)
    res: dict = {}

    def split(items):
        return {
            "vqa": [s for s in items if s.image is not None],
            "qa": [s for s in items if s.image is None],
        }

    # seeded option order: the correct letter is not always the same position
    shuffled = []
    for s in mcq:
        items = list(s.meta["options"].items())
        rng.shuffle(items)
        opts = {LETTERS[i]: v for i, (_, v) in enumerate(items)}
        correct_text = s.meta["options"][s.meta["correct"]]
        letter = next(k for k, v in opts.items() if v == correct_text)
        shuffled.append(replace(s, meta={**s.meta, "options": opts, "correct": letter}))
    for kind, items in split(shuffled).items():
        if not items:
            continue
        sc = option_scores(model, collate, items, cfg)
        picks = [metrics.mcq_from_loglik(d) for d in sc]
        res[f"{kind}_mcq_acc"] = metrics.accuracy(picks, [s.meta["correct"] for s in items])
        res[f"n_{kind}_mcq"] = len(items)
        if cfg.letter_mcq:
            texts = generate(model, collate, tokenizer, [_letter_prompt(s) for s in items], cfg)
            letters = [
                metrics.mcq_letter_from_text(t, s.meta["options"]) for t, s in zip(texts, items)
            ]
            res[f"{kind}_mcq_letter_acc"] = metrics.accuracy(
                letters, [s.meta["correct"] for s in items]
            )
    for kind, items in split(list(cloze)).items():
        if not items:
            continue
        texts = generate(model, collate, tokenizer, items, cfg)
        hits = [
            metrics.cloze_match(t, s.meta.get("ground_truth", s.answer))
            for t, s in zip(texts, items)
        ]
        res[f"{kind}_cloze_acc"] = sum(hits) / len(hits)
        res[f"n_{kind}_cloze"] = len(items)
    if cfg.generation:
        for kind, items in split(list(gen)).items():
            if not items:
                continue
            texts = generate(model, collate, tokenizer, items, cfg)
            rs = [metrics.rouge_scores(t, s.answer) for t, s in zip(texts, items)]
            for key in ("rouge1", "rouge2", "rougeL"):
                res[f"{kind}_{key}"] = sum(r[key] for r in rs) / len(rs)
            res[f"{kind}_bleu"] = metrics.corpus_bleu(texts, [s.answer for s in items])
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
    out["_protocol"] = {
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "shots": 0,
        "mcq": "option log-likelihood (length-normalised)"
        if cfg.length_normalized
        else "option log-likelihood (sum)",
        "letter_mcq": cfg.letter_mcq,
        "max_new_tokens": cfg.max_new_tokens,
        "decoding": "greedy",
    }
    return out
