"""The linked world's demo (the default of ``mmunlearn demo``): staged training of the vanilla
model and the reference, the gates, the masks, every method run to *matched forgetting*
(:func:`unlearn_to_match`), the gap to the reference with a bootstrap interval (:func:`gaps`),
and the report. One process; :mod:`mmunlearn.tinyrun` holds the shared configuration and
:mod:`mmunlearn.demo` the basic world's demo."""

from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from mmunlearn.config import RunConfig
from mmunlearn.data import linked_probes as lp
from mmunlearn.data.batching import make_batches
from mmunlearn.data.linked import make_linked_world
from mmunlearn.distributed import world_size
from mmunlearn.eval.compare import gap_to_reference
from mmunlearn.eval.report import tradeoff_plot
from mmunlearn.eval.unlearning import bootstrap_ci
from mmunlearn.io import atomic_write_json, atomic_write_text
from mmunlearn.loop import unlearn
from mmunlearn.masks import build_masks
from mmunlearn.models import adapter_for, build_tokenizer, save_model
from mmunlearn.tinyrun import (
    TinyRunConfig,
    depth_settings,
    environment,
    pinned_threads,
    tiny_model,
)
from mmunlearn.train import finetune_twins

LINKED_AXES = {
    "x": ("forget", "facts_pic", "forget facts from held-out pictures ↓ (matched: near ---)"),
    "panels": [
        ("forget", "facts_name", "forget people's facts by name ↑"),
        ("retain", "mean", "retain people, mean of the four probes ↑"),
    ],
}


class _Reached(Exception):
    """Raised by the matched-forgetting check to end an unlearning run."""


def unlearn_to_match(model, method, forget, retain, check, config: RunConfig, **kw) -> dict:
    """Run :func:`mmunlearn.loop.unlearn` until ``check(model)`` (called, in eval mode and
    without gradients, after every forget step of a method without retain steps and after
    every retain step of the others) returns True, or the batches run out. ``kw``: ``masks``,
    ``ref_model``. Returns ``{"reached": bool, "forget_steps": n}``; the model is left in
    eval mode where it stopped. SMFA, whose model exists only after its merge, is run by
    :func:`_phased_to_match` instead."""
    m = config.method_for(method) if isinstance(method, str) else method  # config's options
    if m.phased:
        return _phased_to_match(model, m, forget, retain, check, config, **kw)
    state = {"reached": False, "forget_steps": 0}

    def callback(step, kind, loss):
        state["forget_steps"] += kind == "forget"
        if kind == "forget" and m.has_retain:
            return
        model.eval()
        with torch.no_grad():
            hit = check(model)
        model.train()
        if hit:
            state["reached"] = True
            raise _Reached

    try:
        unlearn(
            model, m, forget, retain, config=replace(config, log_every=1), callback=callback, **kw
        )
    except _Reached:
        pass
    model.eval()
    return state


def _phased_to_match(model, method, forget, retain, check, config: RunConfig, **kw) -> dict:
    """SMFA at matched forgetting: its whole run (three updates, then the merge) from the start
    weights with each update capped at n refusal steps (and as many retain steps), for
    n = 8, 16, 32, … up to the forget batches given, until ``check`` holds for the merged
    model. ``forget_steps``: n, the refusal steps of each forget update."""
    start = copy.deepcopy(model.state_dict())
    cap = len(forget) // config.grad_accum
    n = min(8, cap)
    while True:
        model.load_state_dict(start)
        res = unlearn(model, method, forget, retain, config=replace(config, max_steps=2 * n),
                      **kw)  # fmt: skip
        steps = sum(h["kind"] == "multi:refusal" for h in res["history"])
        model.eval()
        with torch.no_grad():
            hit = bool(check(model))
        if hit or n >= cap:
            return {"reached": hit, "forget_steps": steps}
        n = min(2 * n, cap)


def gaps(all_scores: dict, seed: int = 0, n_boot: int = 1000) -> dict:
    """Average absolute gap of every model to ``all_scores["reference"]`` over the forget and
    retain probes (8 columns): :func:`mmunlearn.eval.gap_to_reference` (paired bootstrap over
    each column's items). Returns ``{name: {"avg_gap", "lo", "hi", "n"}}`` (the reference: 0)
    plus ``"closest"`` / ``"closest_share"``."""
    keys = [f"{s}/{k}" for s in lp.SPLITS for k in lp.KINDS]
    items = {
        name: {s: {"_items": {k: list(map(float, v)) for k, v in d.items()}} for s, d in sc.items()}
        for name, sc in all_scores.items()
    }
    g = gap_to_reference(items, "reference", keys, n_boot=n_boot, seed=seed)
    out = {}
    for name, r in g["methods"].items():
        a = r["avg_gap"]
        out[name] = {"avg_gap": a["estimate"], "lo": a["lo"], "hi": a["hi"], "n": a["n"]}
    n = sum(g["n"].values())
    out["reference"] = {"avg_gap": 0.0, "lo": 0.0, "hi": 0.0, "n": n}
    return {"gap": out, "closest": g["closest"], "closest_share": g["closest_share"]}


def train_linked(world, cfg: TinyRunConfig, dev, progress: bool = False):
    """The vanilla and reference models of a linked world (one tokenizer, one init; the shared
    text stage trained once): ``(vanilla, reference, tokenizer, adapter)``, in eval mode."""
    tok = build_tokenizer(world.vocabulary_text(), vocab_size=4096)
    model, ref = tiny_model(tok, cfg, dev), tiny_model(tok, cfg, dev)
    adapter = adapter_for(model, tok)
    stages = (world.stages(), world.stages(without_forget_pictures=True))
    args = (cfg.stage_steps, cfg.vanilla_lr, cfg.batch_size, cfg.seed, dev, progress)
    finetune_twins(model, ref, adapter, *stages, *args, decay=True)  # lr → 0 in each stage
    return model, ref, tok, adapter


def run_linked_demo(
    out: str = "runs/demo", cfg: TinyRunConfig | None = None, resume: bool = False
) -> dict:
    """The linked world's comparison (module docstring) in one process; writes
    ``results.json``, ``report.md``, ``tradeoff.png`` and the mask under ``out``. Returns the
    results; ``results["testable"]`` is False (and nothing is unlearned) when the vanilla
    model fails the gates and ``cfg.enforce_gates``. Threads pinned as :func:`run_demo`.

    ``resume`` (``mmunlearn compare --world linked``): every finished part is kept under
    ``out`` and reused by a rerun — the vanilla and reference models, the mask, each method's
    model and per-item scores (:class:`Resume`) — so an interrupted comparison continues where
    it stopped and a rerun with more ``cfg.methods`` runs only the new ones. The table is the
    one an uninterrupted run writes (every method's run is seeded on its own)."""
    if world_size() > 1:
        raise ValueError("the linked demo runs in one process (the basic demo runs sharded)")
    cfg = cfg or TinyRunConfig()
    if resume and not cfg.save_models:
        raise ValueError("resume keeps the models under out: it needs cfg.save_models")
    store = Resume(out, cfg) if resume else None
    return pinned_threads(_run_linked, out, cfg, store, threads=cfg.threads)


class Resume:
    """What a resumable linked comparison keeps under ``out``: ``compare.json`` (the
    configuration; a rerun with another one is refused), ``vanilla/`` and ``reference/`` (the
    models, saved once both are trained: ``models.json`` marks them complete), the mask
    (``mask_both.safetensors``, its coverage in ``models.json``), and per method its model
    (``out/<method>/``) and ``scores/<method>.json`` (per-item scores and the matched-forgetting
    run), written last: a method with its scores file is finished."""

    # configuration fields that do not change what is computed
    FREE = ("methods", "progress", "save_models")

    def __init__(self, out: str, cfg: TinyRunConfig):
        self.out = out
        path = os.path.join(out, "compare.json")
        ident = json.loads(json.dumps(
            {k: v for k, v in asdict(cfg).items() if k not in self.FREE}, default=str))  # fmt: skip
        if os.path.isfile(path):
            with open(path) as f:
                old = json.load(f).get("config", {})
            diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
            if diff:
                raise ResumeMismatch(
                    f"{out}: holds a linked comparison made with other settings "
                    f"({', '.join(diff)}); use another --out or the same settings"
                )
        os.makedirs(out, exist_ok=True)
        atomic_write_json(path, {"world": "linked", "config": ident, "methods": cfg.methods})

    def _json(self, *parts):
        path = os.path.join(self.out, *parts)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def models(self, tok, cfg: TinyRunConfig, dev):
        """``(vanilla, reference)`` read back (eval mode), or None when not both saved."""
        if self._json("models.json") is None:
            return None
        return tuple(
            _load_tiny(os.path.join(self.out, n), tok, cfg, dev) for n in ("vanilla", "reference")
        )

    def save_models(self, vanilla, ref, tok) -> None:
        for name, m in (("vanilla", vanilla), ("reference", ref)):
            save_model(m, tok, os.path.join(self.out, name))
        atomic_write_json(os.path.join(self.out, "models.json"), {"trained": True})

    def mask(self):
        path = os.path.join(self.out, "mask_both.safetensors")
        rec = self._json("models.json") or {}
        if not os.path.isfile(path) or "mask_coverage" not in rec:
            return None, None
        from mmunlearn.saliency import SaliencyMask

        return SaliencyMask.load(path), rec["mask_coverage"]

    def save_mask(self, mask, coverage: dict) -> None:
        mask.save(os.path.join(self.out, "mask_both.safetensors"))
        rec = self._json("models.json")
        atomic_write_json(os.path.join(self.out, "models.json"), {**rec, "mask_coverage": coverage})

    def method(self, name: str, tok, cfg: TinyRunConfig, dev):
        """``(model, scores, run)`` of a finished method, or None."""
        rec = self._json("scores", f"{name}.json")
        if rec is None:
            return None
        return _load_tiny(os.path.join(self.out, name), tok, cfg, dev), rec["scores"], rec["run"]

    def save_method(self, name: str, model, tok, scores: dict, run: dict) -> None:
        save_model(model, tok, os.path.join(self.out, name))
        atomic_write_json(os.path.join(self.out, "scores", f"{name}.json"),
                          {"scores": scores, "run": run})  # fmt: skip


class ResumeMismatch(ValueError):
    """A resumable comparison's ``out`` holds one made with other settings."""


def _load_tiny(directory: str, tok, cfg: TinyRunConfig, dev):
    """A tiny model saved by :func:`save_model`, its weights (read by ``from_pretrained``, which
    maps the saved key names) copied into the recipe's own model (same class, config and init)
    in eval mode: bit-identical to the one saved."""
    from mmunlearn.models.loading import load_model

    saved, _ = load_model(directory, tokenizer=False)
    model = tiny_model(tok, cfg, dev)
    try:
        model.load_state_dict(saved.state_dict())
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ValueError(f"{directory}: not this comparison's model ({first})") from None
    return model.eval()


def _models(world, cfg: TinyRunConfig, dev, store: Resume | None):
    """``(vanilla, reference, tokenizer, adapter)``: read back from ``store`` when it holds
    them, else trained (:func:`train_linked`) and, with a store, saved there."""
    if store is not None:
        tok = build_tokenizer(world.vocabulary_text(), vocab_size=4096)
        back = store.models(tok, cfg, dev)
        if back is not None:
            vanilla, ref = back
            return vanilla, ref, tok, adapter_for(vanilla, tok)
    vanilla, ref, tok, adapter = train_linked(world, cfg, dev, cfg.progress)
    if store is not None:
        store.save_models(vanilla, ref, tok)
    return vanilla, ref, tok, adapter


def _mask(out, vanilla, adapter, data, rng, cfg: TinyRunConfig, store: Resume | None):
    """MMUnlearner's mask (``both``) and every mask's coverage: read back from ``store``, or
    built from the Fisher batches drawn from ``rng`` (and saved)."""
    mask, coverage = store.mask() if store is not None else (None, None)
    if mask is not None:
        return mask, coverage
    bs = cfg.batch_size
    masks = build_masks(
        vanilla,
        make_batches(adapter, data.forget, bs, rng),
        make_batches(adapter, data.vision_preserve, bs, rng),
        make_batches(adapter, data.language_preserve, bs, rng),
        gamma=cfg.gamma,
        fraction=cfg.fraction,
        progress=False,
    )
    coverage = {k: m.coverage()["total"]["fraction"] for k, m in masks.items()}
    if store is not None:
        store.save_mask(masks["both"], coverage)
    elif cfg.save_models:
        os.makedirs(out, exist_ok=True)
        masks["both"].save(os.path.join(out, "mask_both.safetensors"))
    return masks["both"], coverage


def _summarize(results: dict, all_scores: dict, seed: int) -> None:
    """The gap to the reference (with its interval), every model's accuracies and the per-probe
    bootstrap intervals, into ``results``."""
    if len(all_scores) > 1:
        g = gaps(all_scores, seed=seed)
        results["gap"] = g["gap"]
        results["closest"], results["closest_share"] = g["closest"], g["closest_share"]
    for name, sc in all_scores.items():
        results["methods"][name] = lp.accuracies(sc, retain_mean=True)
        ci = {
            s: {k: bootstrap_ci(np.array(v, float), seed=seed) for k, v in d.items()}
            for s, d in sc.items()
        }
        results["intervals"][name] = {
            s: {k: c._asdict() for k, c in d.items()} for s, d in ci.items()
        }


def _run_linked(out: str, cfg: TinyRunConfig, store: Resume | None = None) -> dict:
    t0 = time.time()
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    world = make_linked_world(n_people=cfg.n_people, forget_ratio=cfg.forget_ratio, seed=cfg.seed)
    vanilla, ref, tok, adapter = _models(world, cfg, dev, store)

    def score(m, **kw):
        return lp.score(m, adapter.collate, tok, world, **kw)

    results = {"world": "linked", "config": asdict(cfg), "environment": environment(dev, 1)}
    results.update(methods={}, matched={}, gap={}, intervals={})
    van_scores = score(vanilla)
    results["gates"] = gates = lp.gates(van_scores)
    results["testable"] = gates["passed"] or not cfg.enforce_gates
    ref_scores = score(ref)
    ref_acc = lp.accuracies(ref_scores)["forget"]
    all_scores, models = {"vanilla": van_scores}, {"vanilla": vanilla}
    if results["testable"]:
        rng = random.Random(cfg.seed)
        bs, n = cfg.batch_size, cfg.max_unlearn_steps
        data = world.unlearning_sets()
        forget = make_batches(adapter, data.forget, bs, rng, n)
        retain = make_batches(adapter, data.retain, bs, rng, n)
        mask, results["mask_coverage"] = _mask(out, vanilla, adapter, data, rng, cfg, store)
        ucfg = cfg.run_config(progress=False, **depth_settings(vanilla))

        def check(m):
            acc = lp.accuracies(score(m, splits=("forget",), kinds=lp.MATCH_KINDS))["forget"]
            return lp.forgetting_matched(acc, ref_acc)["reached"]

        for name in cfg.methods:
            done = store.method(name, tok, cfg, dev) if store is not None else None
            if done is not None:
                if cfg.progress:
                    print(f"{name}: {out}/scores/{name}.json is finished; reused")
                m, all_scores[name], run = done
            else:
                m = copy.deepcopy(vanilla)
                kw = {"masks": mask.for_model(m)} if name == "mmunlearner" else {}
                run = unlearn_to_match(m, name, forget, retain, check, ucfg, **kw)
                all_scores[name] = score(m)
                if store is not None:
                    store.save_method(name, m, tok, all_scores[name], run)
            acc = lp.accuracies(all_scores[name])["forget"]
            results["matched"][name] = {**lp.forgetting_matched(acc, ref_acc), **run}
            models[name] = m
    else:
        print("not testable: the vanilla model fails the gates; nothing was unlearned")
    all_scores["reference"] = ref_scores
    _summarize(results, all_scores, cfg.seed)
    for name, m in {**models, "reference": ref}.items() if cfg.save_models and not store else ():
        save_model(m, tok, os.path.join(out, name))
    results["seconds"] = round(time.time() - t0, 1)
    write_linked_report(results, out)
    if cfg.progress:
        print(lp.report(results))
    return results


def write_linked_report(results: dict, out: str) -> None:
    """``results.json``, ``report.md`` (:func:`~mmunlearn.data.linked_probes.report`) and
    ``tradeoff.png`` of a linked run."""
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(results, indent=1, default=str))
    atomic_write_text(os.path.join(out, "report.md"), lp.report(results))
    tradeoff_plot(results, os.path.join(out, "tradeoff.png"), LINKED_AXES)
