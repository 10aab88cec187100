"""One evaluation run over a list of models (what ``mmunlearn eval`` does): a protocol's plan
on a benchmark, one model evaluated under it, and the assembled results of all models.

A :class:`Plan` holds, for ``--protocol mmunlearn | mllmu | clear`` on the synthetic benchmark,
MLLMU-Bench or CLEAR: the task sets (built per image token for ``mllmu``, whose prompts are
strings), the *likelihood items* of the unlearning metrics and their roles (which set is the
forget set, the retain side, the MIA's members and non-members), the table's columns, and the
metrics the average gap to the reference is taken over. Choices per benchmark
(docs/eval_protocols.md):

- truth ratio: CLEAR's paraphrased / perturbed captions under ``--protocol clear``; elsewhere
  the MCQ distractors are the perturbed answers and the correct option is its own paraphrase;
- forget items = the forget set's *image* questions (the visual concept MMUnlearner forgets);
- MIA non-members ("holdout"): synthetic -- the same questions on the forget people's held-out
  pictures; MLLMU-Bench -- ``Test_Set`` (other pictures, paraphrased questions of the forget
  people); CLEAR -- ``real_faces`` (CLEAR has no unseen fictitious person), against the forget
  people's face recognition under ``--protocol clear``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from mmunlearn.eval import clear_protocol, compare, mllmu_protocol, report, tasks
from mmunlearn.eval.likelihood import item_stats, mcq_items
from mmunlearn.eval.tasks import EvalConfig

PROTOCOLS = ("mmunlearn", "mllmu", "clear")
MAX_NEW_TOKENS = {
    "mmunlearn": 16,
    "mllmu": mllmu_protocol.MAX_NEW_TOKENS,
    "clear": clear_protocol.MAX_NEW_TOKENS,
}


@dataclass
class Plan:
    """What one run evaluates (:func:`make_plan`)."""

    protocol: str
    benchmark: str
    cfg: EvalConfig
    build: Callable[[str], dict]  # image token → task sets
    roles: dict
    columns: list
    extra_tables: list = field(default_factory=list)
    record: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)

    def task_sets(self, adapter) -> dict:
        """The task sets for a model (cached per image token)."""
        key = getattr(adapter, "image_token", "<image>") if self.protocol == "mllmu" else ""
        if key not in self._cache:
            self._cache[key] = self.build(key or "<image>")
        return self._cache[key]

    def tables(self) -> list:
        return [(None, self.columns), *self.extra_tables]


def _lik(samples, vqa_only: bool = False) -> list:
    """MCQ samples as likelihood items: the protocol prompt and few-shot images dropped (the
    answer is scored after the plain question), items whose correct key is not an option left
    out."""
    out = []
    for s in samples:
        m = dict(s.meta or {})
        if "options" in m and m.get("correct") not in m["options"]:
            continue
        m.pop("raw_prompt", None)
        img = s.image[-1] if isinstance(s.image, list) else s.image
        if vqa_only and img is None:
            continue
        out.append(replace(s, image=img, meta=m))
    return mcq_items(out)


def likelihood_sets(plan: Plan, task_sets: dict) -> dict:
    """The likelihood items of the unlearning metrics, by role name (see the module docstring);
    ``--protocol clear`` has none (its tasks are likelihood items)."""
    if plan.protocol == "clear":
        return {}
    out = {}
    if plan.benchmark == "CLEAR":
        for name, part in (("forget", "faces"), ("retain", "faces")):
            if part in task_sets.get(name, {}):
                out[name] = _lik(task_sets[name][part])
        for name in ("real_faces", "real_world"):
            if "mcq" in task_sets.get(name, {}):
                out[name] = _lik(task_sets[name]["mcq"])
        return out
    if "forget" in task_sets:
        out["forget"] = _lik(task_sets["forget"].get("mcq", ()), vqa_only=True)
    if "retain" in task_sets:
        out["retain"] = _lik(task_sets["retain"].get("mcq", ()))
    if "retain_celebrity" in task_sets:
        out["retain_celebrity"] = _lik(task_sets["retain_celebrity"].get("mcq", ()))
    if "forget_test" in task_sets:
        out["holdout"] = _lik(task_sets["forget_test"].get("mcq", ()), vqa_only=True)
    return {k: v for k, v in out.items() if v}


def _roles(protocol: str, benchmark: str) -> dict:
    if protocol == "clear":
        return {
            "forget": "forget",
            "retain": "retain",
            "real": ["real_faces", "real_world"],
            "members": "forget_facerec",
            "holdout": "real_faces",
        }
    if benchmark == "CLEAR":
        return {
            "forget": "forget",
            "retain": "retain",
            "real": ["real_faces", "real_world"],
            "holdout": "real_faces",
            "rouge": ["retain/caption_rougeL"],
        }
    rouge = ["retain/vqa_rougeL", "retain/qa_rougeL"]
    real = []
    if benchmark == "MLLMU-Bench":
        real = ["retain_celebrity"]
        rouge += ["retain_celebrity/vqa_rougeL", "retain_celebrity/qa_rougeL"]
    return {
        "forget": "forget",
        "retain": "retain",
        "real": real,
        "holdout": "holdout",
        "rouge": rouge,
    }


def make_plan(
    protocol: str,
    benchmark: str,
    cfg: EvalConfig,
    *,
    data=None,
    bench=None,
    split: int = 5,
    limit: int | None = None,
    shots: dict | None = None,
) -> Plan:
    """The plan of ``protocol`` on ``benchmark`` ("synthetic" with ``bench`` = a
    :class:`~mmunlearn.data.synthetic.SyntheticBenchmark`, "MLLMU-Bench" / "CLEAR" with
    ``data`` = the root folder, "custom" with ``data`` = ``{"forget": path[, "retain",
    "forget_test"]}``: own files, :func:`mmunlearn.data.custom.custom_eval_sets`). Reads the
    data now (errors name the missing folder or the bad file). ``shots``: ``--protocol
    mllmu``'s profiles per task (default the official 1 / 2)."""
    from mmunlearn.data import eval_sets

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    roles = _roles(protocol, benchmark)
    if protocol == "mllmu":
        if benchmark != "MLLMU-Bench":
            raise ValueError("--protocol mllmu evaluates MLLMU-Bench files (--mllmu DIR)")
        build, record = _mllmu_builder(data, split, cfg, shots, limit)
        cols, extra = report.MLLMU_VQA_COLUMNS, [("Text-only questions", report.MLLMU_QA_COLUMNS)]
        return Plan(protocol, benchmark, cfg, build, roles, cols, extra, record)
    if protocol == "clear":
        if benchmark != "CLEAR":
            raise ValueError("--protocol clear evaluates CLEAR files (--clear DIR)")
        n = eval_sets.CLEAR_DS_SIZE if limit is None else limit
        sets = eval_sets.clear_protocol_sets(data, split, cfg.seed, n)
        return Plan(
            protocol,
            benchmark,
            cfg,
            lambda _: sets,
            roles,
            report.CLEAR_PROTOCOL_COLUMNS,
            record={"ds_size": n},
        )
    if benchmark == "synthetic":
        sets = eval_sets.synthetic_eval_sets(bench, limit)
        cols, extra = report.EVAL_COLUMNS, []
    elif benchmark == "MLLMU-Bench":
        sets = eval_sets.mllmu_sets(data, split, cfg.seed, limit)
        cols, extra = report.EVAL_COLUMNS, []
    elif benchmark == "custom":
        from mmunlearn.data.custom import custom_eval_sets

        sets = custom_eval_sets(**data, limit=limit)
        cols, extra = report.EVAL_COLUMNS, []
    else:
        sets = eval_sets.clear_sets(data, split, cfg.seed, limit)
        cols, extra = report.CLEAR_COLUMNS, []
    return Plan(protocol, benchmark, cfg, lambda _: sets, roles, cols, extra)


def _mllmu_builder(root, split, cfg, shots, limit):
    from pathlib import Path

    from mmunlearn.data import eval_sets

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MLLMU-Bench root {root}: no such directory")
    forget_dir = root / f"forget_{split}"
    if not forget_dir.is_dir():
        raise FileNotFoundError(f"MLLMU-Bench root {root}: no forget split folder {forget_dir}")
    k = {**mllmu_protocol.SHOTS, **(shots or {})}
    full = root / "Full_Set"
    if any(k.values()) and not full.is_dir():
        raise FileNotFoundError(
            f"{full} not found: the few-shot exemplars (Full_Set); --shots 0 for zero-shot"
        )
    exemplars = eval_sets.mllmu_exemplars(full)
    forget = eval_sets.mllmu_rows(forget_dir)
    fids = eval_sets.unique_ids(forget)
    parts = {"forget": (forget, fids)}
    for name, folder in (
        ("forget_test", "Test_Set"),
        ("retain", f"retain_{100 - split}"),
        ("retain_celebrity", "Retain_Set"),
    ):
        if (root / folder).is_dir():
            rows = eval_sets.mllmu_rows(root / folder, ids=fids if name == "forget_test" else None)
            parts[name] = (rows, fids if name == "forget_test" else eval_sets.unique_ids(rows))
    drawn: dict = {}
    record = {"shots": k, "shot_ids": drawn}

    def build(image_token: str) -> dict:
        sets = {}
        for name, (rows, ids) in parts.items():
            items, drawn[name] = mllmu_protocol.build_set(
                name, rows, ids, exemplars, cfg.seed, k, image_token
            )
            if not cfg.generation:
                items["gen"] = []
            sets[name] = {t: v if limit is None else v[:limit] for t, v in items.items()}
        return sets

    return build, record


def evaluate_model(model, adapter, tokenizer, plan: Plan, unlearning: bool = True):
    """One model under the plan → ``(task results {set: metrics}, likelihood stats {role set:
    [ItemStats]}, protocol record)``; per-item scores kept (``keep_items``)."""
    cfg = replace(plan.cfg, keep_items=True)
    sets = plan.task_sets(adapter)
    model.eval()
    if plan.protocol == "clear":
        res, stats = clear_protocol.evaluate(model, adapter, tokenizer, sets, cfg)
        return res, (stats if unlearning else {}), {}
    if plan.protocol == "mllmu":
        res = mllmu_protocol.evaluate(model, adapter, tokenizer, sets, cfg)
        proto = {}
    elif plan.benchmark == "CLEAR":
        res = tasks.evaluate_clear(model, adapter.collate, tokenizer, sets, cfg)
        proto = res.pop("_protocol")
    else:
        res = tasks.evaluate(model, adapter.collate, tokenizer, sets, cfg)
        proto = res.pop("_protocol")
    stats = {}
    if unlearning:
        stats = {
            n: item_stats(model, adapter, items, cfg.batch_size, progress=cfg.progress)
            for n, items in likelihood_sets(plan, sets).items()
        }
    return res, stats, proto


def protocol_record(plan: Plan, adapter=None) -> dict:
    """The protocol record of a run (``results["_protocol"]``, before the CLI adds data paths
    and templates); ``adapter``: the (last) model's, for its image token and family."""
    family = getattr(adapter, "family", None)
    if plan.protocol == "mllmu":
        token = getattr(adapter, "image_token", "<image>")
        rec = mllmu_protocol.protocol_record(
            plan.cfg, plan.record["shots"], plan.record["shot_ids"], token, family
        )
    elif plan.protocol == "clear":
        rec = clear_protocol.protocol_record(plan.cfg, plan.record.get("ds_size"), family)
    else:
        rec = {"name": "mmunlearn", **tasks.protocol(plan.cfg)}
        if plan.benchmark == "CLEAR":
            rec["benchmark"] = "CLEAR"
    return rec


def gap_keys(plan: Plan, methods: dict) -> list[str]:
    """The metrics of the plan's tables with per-item scores for every model."""
    keys = []
    for _, cols in plan.tables():
        for _, sn, mk, _ in cols:
            if f"{sn}/{mk}" in keys:
                continue
            if all(compare.item_values(m.get(sn, {}), mk)[0] for m in methods.values()):
                keys.append(f"{sn}/{mk}")
    return keys


def assemble(
    results: dict,
    stats: dict,
    plan: Plan,
    reference: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "percentile",
) -> dict:
    """Add to ``results`` (``{"methods": {label: task results}}``): ``official`` (the protocol's
    own result block per model), ``unlearning`` (:func:`compare.unlearning_metrics`; under
    ``--protocol clear`` CLEAR's model utility and forget quality, plus the MIAs),
    ``unlearning_roles``, ``intervals``, ``gap`` (with a reference and another model) and
    ``bootstrap`` (n_boot, seed, level, method: every interval is
    :func:`mmunlearn.eval.bootstrap.bootstrap`); moves the generations (``_outputs``) to
    ``results["outputs"]``."""
    methods = results["methods"]
    boot = {"n_boot": n_boot, "seed": seed, "level": level, "method": method}
    ref = reference if reference in methods else None
    outputs, official = {}, {}
    for label, sets in methods.items():
        for sn, m in sets.items():
            if "_outputs" in m:
                outputs.setdefault(label, {})[sn] = m.pop("_outputs")
        if plan.protocol == "mllmu":
            official[label] = mllmu_protocol.official_results(sets)
            for m in sets.values():
                m.pop("_official", None)
    unl = {}
    if any(stats.values()):
        unl = compare.unlearning_metrics(stats, plan.roles, ref, methods, **boot)
    if plan.protocol == "clear":
        for label, sets in methods.items():
            keep = {k: v for k, v in unl.get(label, {}).items() if k.startswith(("mia_", "priv"))}
            mu = clear_protocol.model_utility(sets, **boot)
            fq = None
            if ref and label != ref:
                fq = clear_protocol.forget_quality(sets, methods[ref], **boot)
            if mu:
                keep["model_utility"] = mu
            if fq:
                keep["forget_quality"] = fq
            unl[label] = keep
            official[label] = clear_protocol.official_results(sets, mu, fq)
    if official:
        results["official"] = official
    unl = {k: v for k, v in unl.items() if v}
    if unl:
        results["unlearning"] = unl
        results["unlearning_roles"] = plan.roles
    results["intervals"] = compare.task_intervals(methods, **boot)
    if ref and len(methods) > 1:
        keys = gap_keys(plan, methods)
        if keys:
            results["gap"] = compare.gap_to_reference(methods, ref, keys, **boot)
    results["bootstrap"] = boot
    if outputs:
        results["outputs"] = outputs
    return results


__all__ = [
    "MAX_NEW_TOKENS",
    "PROTOCOLS",
    "Plan",
    "assemble",
    "evaluate_model",
    "gap_keys",
    "likelihood_sets",
    "make_plan",
    "protocol_record",
]
