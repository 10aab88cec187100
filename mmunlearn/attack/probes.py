"""The four probes of ``mmunlearn attack`` -- does the forgetting hold? -- as a plan built once
from the data (:class:`AttackPlan`), what each model answers under it (:func:`run_model`,
:func:`relearn`) and the result with intervals (:func:`assemble`).

- **relearn**: fine-tune the unlearned model for a few steps on ``k`` forget training items (or
  ``k`` retain items) with :func:`mmunlearn.train.finetune`, then score the forget items that
  do not share a fact with the ``k`` (same entity, and one correct answer contains the other);
- **images**: the forget (and, as a control, retain) picture questions with the pictures
  rephrased (:mod:`mmunlearn.attack.transforms`);
- **text**: the forget (and retain) people's questions asked by name, with no picture;
- **cka**: per-layer linear CKA between the vanilla and the unlearned model's hidden states on
  forget and on retain picture questions (:mod:`mmunlearn.attack.cka`).

Every accuracy is MCQ by option likelihood (:func:`mmunlearn.eval.tasks.evaluate_set`, the
eval suite's, options shuffled by the seed, so two models are scored on the same items in the
same order); every interval is :mod:`mmunlearn.eval.bootstrap`'s: ``bootstrap_ci`` over items,
``paired_bootstrap_ci`` for a difference on the same items.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from mmunlearn.attack.cka import cka_interval, hidden_states
from mmunlearn.attack.transforms import TRANSFORMS, rephrased_items
from mmunlearn.eval.bootstrap import bootstrap_ci, paired_bootstrap_ci
from mmunlearn.eval.tasks import EvalConfig, evaluate_set

PROBES = ("relearn", "images", "text", "cka")
VQA, QA = "vqa_mcq_acc", "qa_mcq_acc"


@dataclass
class AttackOptions:
    """Every setting of an attack run (the CLI's flags)."""

    probes: tuple = PROBES
    relearn_on: str = "forget"  # or "retain"
    relearn_k: int = 8
    relearn_steps: int = 20
    relearn_lr: float = 1e-5
    relearn_batch_size: int = 4
    transforms: tuple = TRANSFORMS
    cka_items: int = 64
    batch_size: int = 16
    seed: int = 0
    n_boot: int = 1000
    level: float = 0.95
    ci_method: str = "percentile"
    progress: bool = False

    def boot(self) -> dict:
        return {"n_boot": self.n_boot, "seed": self.seed, "level": self.level,
                "method": self.ci_method}  # fmt: skip


@dataclass
class AttackData:
    """The items of one benchmark an attack reads: evaluation MCQs of the forget and retain
    people (pictures and by-name questions, every set of the eval's forget / retain side), and
    the training items the relearning draws from."""

    benchmark: str
    forget_mcq: list
    retain_mcq: list
    forget_train: list
    retain_train: list


def synthetic_data(bench, limit: int | None = None) -> AttackData:
    """:class:`AttackData` of the built-in synthetic benchmark (its eval sets as ``mmunlearn
    eval`` builds them, forget / forget_test / forget_link and the same for retain)."""
    from mmunlearn.data.eval_sets import synthetic_eval_sets
    from mmunlearn.data.recipe import synthetic_sets

    sets, train = synthetic_eval_sets(bench, limit), synthetic_sets(bench)
    f = [s for n in ("forget", "forget_test", "forget_link") for s in sets[n]["mcq"]]
    r = [s for n in ("retain", "retain_test", "retain_link") for s in sets[n]["mcq"]]
    return AttackData("synthetic", f, r, list(train.forget), list(train.retain))


def mllmu_data(root, split: int = 5, seed: int = 0, limit: int | None = None) -> AttackData:
    """:class:`AttackData` of an MLLMU-Bench root: forget = ``forget_{split}`` + the forget
    profiles' ``Test_Set`` rows, retain = ``retain_{100-split}`` (the eval's sets); training
    items from :func:`mmunlearn.data.recipe.mllmu_sets`."""
    from mmunlearn.data.eval_sets import mllmu_sets
    from mmunlearn.data.recipe import mllmu_sets as train_sets

    sets = mllmu_sets(root, split, seed, limit)
    train = train_sets(root, split)
    f = [s for n in ("forget", "forget_test") for s in sets.get(n, {}).get("mcq", ())]
    r = list(sets.get("retain", {}).get("mcq", ()))
    return AttackData("MLLMU-Bench", f, r, list(train.forget), list(train.retain))


def _norm(text) -> str:
    return " ".join(str(text).lower().split())


def _correct(s) -> str:
    m = s.meta or {}
    return _norm(m["options"][m["correct"]] if "options" in m else s.answer)


def held_out(items, seen) -> tuple[list, int]:
    """``(items sharing no fact with seen, how many were left out)``: an item is left out when
    some ``seen`` item is about the same entity and one's correct answer contains the other's
    (case and spacing ignored)."""
    facts: dict = {}
    for s in seen:
        facts.setdefault(s.entity, []).append(_norm(s.answer))

    def shown(s) -> bool:
        a = _correct(s)
        return any(a and f and (a in f or f in a) for f in facts.get(s.entity, ()))

    kept = [s for s in items if not shown(s)]
    return kept, len(items) - len(kept)


def _vqa(items) -> list:
    return [s for s in items if s.image is not None]


def _qa(items) -> list:
    return [s for s in items if s.image is None]


@dataclass
class AttackPlan:
    """What every model is scored on (``sets``: name → items) and the relearning and CKA
    inputs, drawn once from the data and the seed (:meth:`build`)."""

    sets: dict = field(default_factory=dict)
    relearn_items: list = field(default_factory=list)
    excluded: int = 0
    cka_forget: list = field(default_factory=list)
    cka_retain: list = field(default_factory=list)

    @classmethod
    def build(cls, data: AttackData, opts: AttackOptions) -> AttackPlan:
        """The plan; ValueError naming the probe when its items are missing."""
        plan = cls()
        fv, rv = _vqa(data.forget_mcq), _vqa(data.retain_mcq)
        if "images" in opts.probes:
            if not fv:
                raise ValueError("images: the forget set has no picture questions")
            for side, items in (("forget", fv), ("retain", rv)):
                if items:
                    plan.sets[f"images/{side}/original"] = items
                    for t in opts.transforms:
                        plan.sets[f"images/{side}/{t}"] = rephrased_items(items, t, opts.seed)
        if "text" in opts.probes:
            if not _qa(data.forget_mcq):
                raise ValueError("text: the forget set has no questions asked by name")
            plan.sets["text/forget"] = _qa(data.forget_mcq)
            if _qa(data.retain_mcq):
                plan.sets["text/retain"] = _qa(data.retain_mcq)
        if "relearn" in opts.probes:
            plan._relearn(data, opts)
        if "cka" in opts.probes:
            rng = random.Random(f"{opts.seed}:cka")
            plan.cka_forget = _draw(fv, opts.cka_items, rng)
            plan.cka_retain = _draw(rv, opts.cka_items, rng)
            if len(plan.cka_forget) < 3:
                raise ValueError(f"cka: {len(fv)} forget picture questions; CKA needs >= 3")
        return plan

    def _relearn(self, data: AttackData, opts: AttackOptions) -> None:
        pool = data.forget_train if opts.relearn_on == "forget" else data.retain_train
        if not pool:
            raise ValueError(f"relearn: no {opts.relearn_on} training items to relearn on")
        rng = random.Random(f"{opts.seed}:relearn")
        self.relearn_items = rng.sample(pool, min(opts.relearn_k, len(pool)))
        items = data.forget_mcq
        if opts.relearn_on == "forget":
            items, self.excluded = held_out(items, self.relearn_items)
        if not items:
            raise ValueError(
                f"relearn: every forget item shares a fact with the {len(self.relearn_items)} "
                "relearning items; lower --relearn-k"
            )
        self.sets["relearn/heldout"] = items


def _draw(items, n: int, rng: random.Random) -> list:
    """``n`` of ``items`` drawn without replacement, kept in their order."""
    idx = sorted(rng.sample(range(len(items)), min(n, len(items))))
    return [items[i] for i in idx]


def _eval_cfg(opts: AttackOptions) -> EvalConfig:
    return EvalConfig(batch_size=opts.batch_size, seed=opts.seed, letter_mcq=False,
                      generation=False, progress=opts.progress, keep_items=True)  # fmt: skip


def score(model, adapter, items, opts: AttackOptions) -> dict:
    """Per-item MCQ hits (option likelihood) of ``items``: ``{"vqa_mcq_acc": [...],
    "qa_mcq_acc": [...]}`` (the kinds present)."""
    res = evaluate_set(model, adapter.collate, adapter.tokenizer, mcq=items, cfg=_eval_cfg(opts))
    return {k: v for k, v in res.get("_items", {}).items() if k in (VQA, QA)}


def run_model(model, adapter, plan: AttackPlan, opts: AttackOptions) -> dict:
    """One model under the plan: ``{"scores": {set: per-item hits}, "features": {"forget" |
    "retain": (hidden states, skipped blocks)}}`` (features only with the CKA probe)."""
    scores = {name: score(model, adapter, items, opts) for name, items in plan.sets.items()}
    feats = {}
    if plan.cka_forget:
        feats["forget"] = hidden_states(model, adapter, plan.cka_forget, opts.batch_size)
        if plan.cka_retain:
            feats["retain"] = hidden_states(model, adapter, plan.cka_retain, opts.batch_size)
    return {"scores": scores, "features": feats}


def relearn(model, adapter, plan: AttackPlan, opts: AttackOptions, dev) -> dict:
    """Fine-tune ``model`` in place on the plan's relearning items, then score the held-out
    forget items: ``{"relearn/heldout": per-item hits}``."""
    from mmunlearn.train import finetune

    bs = max(1, min(opts.relearn_batch_size, len(plan.relearn_items)))
    finetune(model, adapter, plan.relearn_items, opts.relearn_steps, opts.relearn_lr, bs,
             opts.seed, dev, progress=opts.progress)  # fmt: skip
    return {"relearn/heldout": score(model, adapter, plan.sets["relearn/heldout"], opts)}


def _ci(values, boot: dict) -> dict:
    c = bootstrap_ci(values, **boot)
    return {"estimate": c.estimate, "lo": c.lo, "hi": c.hi, "n": c.n}


def _diff(a, b, boot: dict) -> dict:
    c = paired_bootstrap_ci(a, b, **boot)
    return {"estimate": c.estimate, "lo": c.lo, "hi": c.hi, "n": c.n}


def _relearn_result(plan, opts, unl, van, after, boot) -> dict:
    out = {
        "on": opts.relearn_on,
        "k": len(plan.relearn_items),
        "steps": opts.relearn_steps,
        "lr": opts.relearn_lr,
        "batch_size": max(1, min(opts.relearn_batch_size, len(plan.relearn_items))),
        "excluded": plan.excluded,
        "items": [f"{s.entity}: {s.question} → {s.answer}" for s in plan.relearn_items],
        "metrics": {},
    }
    for key, before in unl["relearn/heldout"].items():
        a = after["relearn/heldout"][key]
        m = {"before": _ci(before, boot), "after": _ci(a, boot), "delta": _diff(a, before, boot)}
        if van:
            v = van["relearn/heldout"][key]
            m["vanilla"] = _ci(v, boot)
            m["after_minus_vanilla"] = _diff(a, v, boot)
        out["metrics"][key] = m
    return out


def _images_result(opts, unl, van, boot) -> dict:
    out: dict = {}
    for side in ("forget", "retain"):
        base = unl.get(f"images/{side}/original", {}).get(VQA)
        if base is None:
            continue
        rows = {}
        for t in ("original", *opts.transforms):
            u = unl[f"images/{side}/{t}"][VQA]
            row = {"unlearned": _ci(u, boot)}
            if t != "original":
                row["delta_vs_original"] = _diff(u, base, boot)
            if van:
                row["vanilla"] = _ci(van[f"images/{side}/{t}"][VQA], boot)
            rows[t] = row
        out[side] = rows
    return out


def _text_result(unl, van, boot) -> dict:
    out = {}
    for side in ("forget", "retain"):
        u = unl.get(f"text/{side}", {}).get(QA)
        if u is None:
            continue
        row = {"unlearned": _ci(u, boot)}
        if van:
            v = van[f"text/{side}"][QA]
            row["vanilla"] = _ci(v, boot)
            row["delta"] = _diff(u, v, boot)
        out[side] = row
    return out


def _cka_result(unl_feats, van_feats, boot) -> dict:
    layers, skipped, n = {}, set(), {}
    for side in ("forget", "retain"):
        if side not in unl_feats:
            continue
        (fu, su), (fv, sv) = unl_feats[side], van_feats[side]
        skipped |= set(su) | set(sv)
        for name in [x for x in fu if x in fv]:
            layers.setdefault(name, {"layer": name})[side] = cka_interval(fu[name], fv[name],
                                                                         **boot)  # fmt: skip
            n[side] = fu[name].shape[0]
    return {"layers": list(layers.values()), "skipped": sorted(skipped), "n": n}


def assemble(plan: AttackPlan, opts: AttackOptions, unlearned: dict, vanilla: dict | None,
             relearned: dict | None) -> dict:  # fmt: skip
    """The probes' results with intervals (``unlearned`` / ``vanilla``: :func:`run_model`'s
    output; ``relearned``: :func:`relearn`'s)."""
    boot = opts.boot()
    unl, van = unlearned["scores"], (vanilla or {}).get("scores")
    out: dict = {"bootstrap": boot}
    if "relearn" in opts.probes and relearned is not None:
        out["relearn"] = _relearn_result(plan, opts, unl, van, relearned, boot)
    if "images" in opts.probes:
        out["images"] = _images_result(opts, unl, van, boot)
    if "text" in opts.probes:
        out["text"] = _text_result(unl, van, boot)
    if "cka" in opts.probes and vanilla is not None:
        out["cka"] = _cka_result(unlearned["features"], vanilla["features"], boot)
    return out


def options(**kw) -> AttackOptions:
    """:class:`AttackOptions` with ``kw`` (ValueError naming a bad probe or transform)."""
    opts = replace(AttackOptions(), **kw)
    for p in opts.probes:
        if p not in PROBES:
            raise ValueError(f"unknown probe {p!r}; choose from {', '.join(PROBES)}")
    for t in opts.transforms:
        if t not in TRANSFORMS:
            raise ValueError(f"unknown image transform {t!r}; choose from {', '.join(TRANSFORMS)}")
    if opts.relearn_on not in ("forget", "retain"):
        raise ValueError(f"relearn_on must be forget or retain, got {opts.relearn_on!r}")
    return opts


__all__ = [
    "PROBES",
    "AttackData",
    "AttackOptions",
    "AttackPlan",
    "assemble",
    "held_out",
    "mllmu_data",
    "options",
    "relearn",
    "run_model",
    "score",
    "synthetic_data",
]
