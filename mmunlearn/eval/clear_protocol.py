"""``--protocol clear``: CLEAR's own evaluation reproduced (somvy/multimodal_unlearning @bb14c96:
``mm/eval.py``, ``mm/calculate_metrics.py``, ``config/mm/eval.yaml``; docs/reference/
eval_protocols.md §2.2, docs/eval_protocols.md for the line map).

Six tasks (:func:`mmunlearn.data.eval_sets.clear_protocol_sets`): Real Faces, Real World,
Forget and Retain captions (``eval_log_forget``, ``eval_log``), Forget / Retain face recognition.
Per item, likelihoods of the answer, its paraphrase and its perturbed answers
(:func:`mmunlearn.eval.likelihood.item_stats`; answer tokens only, mean per token), and a greedy
generation of up to 300 new tokens from the decoded *text* of the prompt -- CLEAR re-tokenises
the question without its image (``mm/eval.py:120-133``), which we reproduce. Per task:

- ``prob``: captions (``eval_log*``) mean ``exp(−avg_gt_loss)``; the other tasks mean
  ``p_true / (p_true + Σ p_perturbed)`` (``calculate_metrics.py:94-104``);
- ``rougeL_recall``: mean ROUGE-L recall (rouge_score, stemmed) of the generation against the
  answer (``:106-111``);
- ``truth_ratio``: ``R_i = exp(mean_all(perturbed loss) − paraphrased loss_i)`` with **one
  scalar** perturbed mean over all items (``:113-121``); forget tasks ``mean(min(R, 1/R))``,
  the others ``mean(max(0, 1 − 1/R))``;

and per model ``model_utility`` = harmonic mean of every non-forget task's three numbers
(``:126``), and with a reference model (CLEAR's "gold" retain model) ``forget_quality`` = KS
p-value of the Forget captions' ``R`` against the reference's (``:51-72``), with its JS
distance. CLEAR's own names are kept in :func:`official_results`.

Differences (recorded): prompts are the model adapter's chat format (CLEAR: the processor's
chat template; the same once the adapter is the checkpoint's own); the caption prompt is drawn
once per row, seeded (CLEAR draws it anew, unseeded, for the answer, paraphrase and perturbed
loaders); answer tokens end with the adapter's end token; batches are right-padded with exact
answer masks (CLEAR masks ``len(tokenize(question))`` tokens after left padding); bf16 /
flash-attention are the caller's choice.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from mmunlearn.data.schema import Sample
from mmunlearn.eval import unlearning
from mmunlearn.eval.bootstrap import bootstrap, rowwise
from mmunlearn.eval.compare import clear_truth_ratios, hmean_interval
from mmunlearn.eval.likelihood import item_stats
from mmunlearn.eval.tasks import EvalConfig, generate

SOURCE = (
    "somvy/multimodal_unlearning mm/eval.py, mm/calculate_metrics.py, config/mm/eval.yaml @bb14c967"
)
MAX_NEW_TOKENS = 300  # eval.yaml generation.max_new_tokens
# our task names → CLEAR's result names (calculate_metrics.py FILE_TO_TASK)
TASKS = {
    "real_faces": "Real Faces",
    "real_world": "Real World",
    "retain": "Retain",
    "retain_facerec": "Retain FaceRec",
    "forget": "Forget",
    "forget_facerec": "Forget FaceRec",
}
CAPTION_TASKS = ("forget", "retain")  # eval_log*: Prob. without the perturbed answers


def generation_samples(adapter, tokenizer, samples) -> list[Sample]:
    """The generation prompts of ``mm/eval.py:120-133``: the formatted prompt + answer decoded
    with special tokens skipped (image tokens and chat markers vanish), cut before the answer,
    and re-tokenised without the image (``meta["raw_prompt"]``, ``image=None``)."""
    collator = getattr(adapter, "collator", None)  # a checkpoint's own chat template
    out = []
    for s in samples:
        full = collator.full(s) if collator is not None else adapter.format(s, with_answer=True)
        text = tokenizer.decode(
            tokenizer(full, add_special_tokens=False)["input_ids"], skip_special_tokens=True
        )
        ans = tokenizer.decode(
            tokenizer(s.answer, add_special_tokens=False)["input_ids"], skip_special_tokens=True
        )
        cut = text.rfind(ans) if ans else -1
        q = (text if cut < 0 else text[:cut]).replace(adapter.image_token, "")
        out.append(replace(s, image=None, meta={**s.meta, "raw_prompt": q}))
    return out


def _scores(stats, caption: bool) -> dict:
    """Per-item Prob. and CLEAR truth-ratio rows of one task."""
    if caption:
        prob = [math.exp(s.avg) for s in stats]
    else:
        prob = [unlearning.normalised_answer_prob(s.avg, s.pert or []) for s in stats]
    rows = [[-s.para_avg, -math.fsum(s.pert or []), len(s.pert or [])] for s in stats]
    return {"prob": prob, "tr_rows": rows}


def evaluate_task(model, adapter, tokenizer, name: str, samples, cfg: EvalConfig) -> tuple:
    """One task → ``(metrics, item stats)``: ``prob``, ``rougeL_recall`` (with
    ``cfg.generation``), ``truth_ratio``, ``n``, and ``_items`` / ``_clear_tr`` (per item),
    ``_outputs`` (the generations)."""
    stats = item_stats(model, adapter, samples, cfg.batch_size, progress=cfg.progress)
    sc = _scores(stats, name in CAPTION_TASKS)
    split = "forget" if name.startswith("forget") else "retain"
    res: dict = {"prob": float(np.mean(sc["prob"])), "n": len(samples)}
    res["_items"] = {"prob": sc["prob"]}
    if cfg.generation:
        gen = generation_samples(adapter, tokenizer, samples)
        texts = generate(model, adapter.collate, tokenizer, gen, cfg, strip=False)
        rec = [unlearning.rouge_l_recall(t, s.answer) for t, s in zip(texts, samples)]
        res["rougeL_recall"] = float(np.mean(rec))
        res["_items"]["rougeL_recall"] = rec
        res["_outputs"] = [
            {"question": g.meta["raw_prompt"], "generated": t, "answer": s.answer}
            for g, t, s in zip(gen, texts, samples)
        ]
    if all(r[2] for r in sc["tr_rows"]):
        r = clear_truth_ratios(sc["tr_rows"])
        tr = np.minimum(r, 1 / r) if split == "forget" else np.maximum(0.0, 1 - 1 / r)
        res["truth_ratio"] = float(np.mean(tr))
        res["_clear_tr"] = {"truth_ratio": {"split": split, "rows": sc["tr_rows"]}}
    return res, stats


def evaluate(model, adapter, tokenizer, sets: dict, cfg: EvalConfig) -> tuple[dict, dict]:
    """Every task of ``sets`` (``{task: [likelihood items]}``) → ``({task: metrics},
    {task: [ItemStats]})``; greedy generation with ``cfg.max_new_tokens`` (CLEAR's 300 unless
    overridden)."""
    model.eval()
    res, stats = {}, {}
    for name, samples in sets.items():
        res[name], stats[name] = evaluate_task(model, adapter, tokenizer, name, samples, cfg)
    return res, stats


def _components(task_results: dict) -> list[dict]:
    """Model-utility inputs: every non-forget task's prob, ROUGE and truth ratio, grouped by
    task (one group = the same items)."""
    groups = []
    for name, r in task_results.items():
        if name.startswith("forget") or name not in TASKS:
            continue
        g = {f"{name}/prob": ("mean", r["_items"]["prob"])}
        if "rougeL_recall" in r.get("_items", {}):
            g[f"{name}/rougeL_recall"] = ("mean", r["_items"]["rougeL_recall"])
        if "truth_ratio" in r.get("_clear_tr", {}):
            g[f"{name}/truth_ratio"] = ("clear_tr_retain", r["_clear_tr"]["truth_ratio"]["rows"])
        groups.append(g)
    return groups


def model_utility(
    task_results: dict, n_boot=1000, seed=0, level=0.95, method="percentile"
) -> dict | None:
    """``calculate_metrics.py:126``: harmonic mean of the non-forget tasks' Prob., ROUGE and
    Truth Ratio, with a bootstrap interval over items (``n`` names the inputs)."""
    groups = _components(task_results)
    return hmean_interval(groups, n_boot, seed, level, method) if groups else None


def forget_quality(
    model_res: dict, reference_res: dict, n_boot=1000, seed=0, level=0.95, method="percentile"
):
    """``calculate_metrics.py:51-72``: ``ks_2samp(R_model, R_reference).pvalue`` of CLEAR's
    truth ratios on the Forget captions, and ``scipy.spatial.distance.jensenshannon`` of the two
    arrays (CLEAR's "JS metric"); the interval resamples items jointly for both models (the
    scalar perturbed means recomputed per draw). ``None`` without truth ratios."""
    try:
        a = model_res["forget"]["_clear_tr"]["truth_ratio"]["rows"]
        b = reference_res["forget"]["_clear_tr"]["truth_ratio"]["rows"]
    except KeyError:
        return None
    if len(a) != len(b):
        raise ValueError(f"forget task: {len(a)} items vs the reference's {len(b)}")
    ra, rb = clear_truth_ratios(a), clear_truth_ratios(b)
    ks = unlearning.forget_quality(ra, rb)
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    pvalue = rowwise(
        lambda i: (
            unlearning.forget_quality(clear_truth_ratios(xa[i]), clear_truth_ratios(xb[i])).pvalue
        )
    )
    boot = bootstrap(
        [np.arange(len(a))], pvalue, n_boot=n_boot, seed=seed, level=level, method=method
    )
    from scipy.spatial.distance import jensenshannon

    return {
        "estimate": ks.pvalue,
        "lo": float(boot.lo),
        "hi": float(boot.hi),
        "n": len(a),
        "ks_statistic": ks.statistic,
        "js": float(jensenshannon(ra, rb)),
    }


def official_results(task_results: dict, utility=None, fq=None) -> dict:
    """CLEAR's result names (``calculate_metrics.py``): ``"Prob. Real Faces"``, ``"ROUGE
    Retain"``, ``"Truth Ratio Forget"``, ..., ``"Model Utility"``, ``"KS test p-value"``,
    ``"JS metric"``."""
    out = {}
    for name, label in TASKS.items():
        r = task_results.get(name)
        if r is None:
            continue
        out[f"Prob. {label}"] = r["prob"]
        if "rougeL_recall" in r:
            out[f"ROUGE {label}"] = r["rougeL_recall"]
        if "truth_ratio" in r:
            out[f"Truth Ratio {label}"] = r["truth_ratio"]
    if utility is not None:
        out["Model Utility"] = utility["estimate"]
    if fq is not None:
        out["KS test p-value"] = fq["estimate"]
        out["JS metric"] = fq["js"]
    return out


def protocol_record(cfg: EvalConfig, limit, family: str | None = None) -> dict:
    """The ``_protocol`` record of a ``--protocol clear`` run."""
    return {
        "name": "clear",
        "source": SOURCE,
        "seed": cfg.seed,
        "tasks": {k: v for k, v in TASKS.items()},
        "ds_size": limit,
        "prompts": "the model adapter's chat format" + (f" ({family})" if family else ""),
        "caption_prompt": "one of CLEAR's nine, drawn per row with random.Random(seed) "
        "(CLEAR: unseeded, per loader)",
        "likelihood": "answer tokens only, mean token loss (mm/eval.py:46-92)",
        "generation": "greedy from the decoded text prompt, no image (mm/eval.py:120-133)",
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size,
        "rouge": "rouge_score rougeL recall, use_stemmer=True",
        "truth_ratio": "exp(mean_all(perturbed loss) - paraphrased loss), one scalar mean "
        "(calculate_metrics.py:113-116)",
        "model_utility": "scipy.stats.hmean of the non-forget Prob./ROUGE/Truth Ratio",
        "forget_quality": "ks_2samp of the Forget captions' truth ratios vs the reference's",
    }


__all__ = [
    "CAPTION_TASKS",
    "MAX_NEW_TOKENS",
    "SOURCE",
    "TASKS",
    "evaluate",
    "evaluate_task",
    "forget_quality",
    "generation_samples",
    "model_utility",
    "official_results",
    "protocol_record",
]
