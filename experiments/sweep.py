"""The demo's unlearning phase over a grid of lr × steps × seeds (research, not the product).

Run from a source checkout: ``python experiments/sweep.py --seeds 0 1 --out runs/sweep``.

method.md §8: the comparison of methods moves with the learning rate and the step count, so it
is reported over a small grid and several seeds, never at one hand-picked setting. Per seed this
builds exactly the demo's pieces (:mod:`mmunlearn.demo`): the synthetic benchmark, the tiny
LLaVA fine-tuned into the vanilla model (the expensive part, done once per seed), the MMUnlearner
masks, and the forget / retain batches; then every (lr, steps, method) cell starts from a copy
of that vanilla model. The batches are drawn as the demo draws them (``steps`` = the largest
step count; a cell with fewer steps uses the first batches of those lists, which is what
``make_batches`` gives for a smaller count), so the cell (lr, steps) of a seed is the demo run
with ``--seed``, ``unlearn.lr = lr``, ``unlearn_steps = steps``. Both pin torch to 2 CPU threads
by default: the vanilla model (and so every cell) depends on the thread count.

Methods are :data:`mmunlearn.methods.PAPER_METHODS` plus three MMUnlearner variants for the
investigation of what the mask does:

- ``mmunlearner:vision`` / ``mmunlearner:language``: only the vision (resp. language) mask;
- ``mmunlearner:random``: a random mask with the same number of selected elements in every
  parameter as the ``both`` mask (seeded), i.e. the same coverage without the saliency.

Per cell the six MCQ accuracies of the demo table are recorded, plus diagnostics: the L2
distance from the vanilla weights by group (``delta_vision`` / ``delta_language``) and the
answer cross-entropy on the first forget / retain training batches (``forget_ce`` /
``retain_ce``). Per seed (``probe``, on by default) also :func:`mask_probe` (where the mask
sits, by component, and which share of the forget gradient it leaves to the ascent) and
:func:`ascent_only` (forget steps without retain steps: no mask / mask / random mask, at every
lr, evaluated at every step count). Writes ``grid.json`` (after every seed, atomically),
``grid.md`` (means over seeds ± the sample standard deviation, every cell, the probes) and
``grid.png`` (if matplotlib is there).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from mmunlearn.io import atomic_write_text

if TYPE_CHECKING:
    from mmunlearn.tinyrun import TinyRunConfig

# torch and the demo's pieces are imported inside the functions: --help stays instant.
METHODS = ("ga", "ga_diff", "kl_min", "npo", "mmunlearner")  # = mmunlearn.methods.PAPER_METHODS
VANILLA_STEPS = 2500  # = TinyRunConfig.vanilla_steps (both checked by tests/test_sweep.py)

VARIANTS = ("mmunlearner:vision", "mmunlearner:language", "mmunlearner:random")

# (short key, set, metric, header) of the recorded accuracies, in the demo table's order
METRICS = (
    ("forget_vqa", "forget", "vqa_mcq_acc", "Forget VQA ↓"),
    ("forget_qa", "forget", "qa_mcq_acc", "Forget QA ↑"),
    ("forget_test_vqa", "forget_test", "vqa_mcq_acc", "Forget VQA new pics ↓"),
    ("retain_vqa", "retain", "vqa_mcq_acc", "Retain VQA ↑"),
    ("retain_qa", "retain", "qa_mcq_acc", "Retain QA ↑"),
    ("retain_test_vqa", "retain_test", "vqa_mcq_acc", "Retain VQA new pics ↑"),
)
DIAGNOSTICS = ("forget_ce", "retain_ce", "delta_vision", "delta_language")


@dataclass
class SweepConfig:
    """The grid (``seeds`` × ``lrs`` × ``steps`` × ``methods``) and the demo settings it runs
    with (``demo``: benchmark size, vanilla fine-tune, model size, batch size, γ; its
    ``seed``, ``unlearn.lr``, ``unlearn_steps`` and ``methods`` are replaced by the grid's).
    ``fraction``: exact top-k mask fraction instead of γ. ``threads``: torch CPU threads
    (``None`` leaves torch's default)."""

    seeds: list = field(default_factory=lambda: [0, 1])
    lrs: list = field(default_factory=lambda: [5e-4, 1e-3, 2e-3])
    steps: list = field(default_factory=lambda: [25, 50])
    methods: list = field(default_factory=lambda: list(METHODS))
    demo: TinyRunConfig = field(default_factory=lambda: _demo_config(save_models=False))
    fraction: float | None = None
    threads: int | None = 2  # as the demo (TinyRunConfig.threads): results depend on it
    probe_batches: int = 4  # forget / retain batches the CE diagnostics are measured on
    probe: bool = True  # per seed: mask_probe + ascent_only (see their docstrings)
    progress: bool = True


def _demo_config(**kw) -> TinyRunConfig:
    from mmunlearn.tinyrun import TinyRunConfig

    return TinyRunConfig(**kw)


def _check(cfg: SweepConfig) -> None:
    bad = [m for m in cfg.methods if m not in METHODS and m not in VARIANTS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {list(METHODS) + list(VARIANTS)}")
    if not cfg.seeds or not cfg.lrs or not cfg.steps or not (cfg.methods or cfg.probe):
        raise ValueError("seeds, lrs, steps and methods (or probe) must each hold a value")
    if min(cfg.steps) < 1 or min(cfg.lrs) <= 0:
        raise ValueError("steps must be >= 1 and lrs > 0")


def _metrics(res: dict) -> dict:
    return {k: res.get(s, {}).get(m) for k, s, m, _ in METRICS}


def _random_mask(mask, model, seed: int) -> dict:
    """``{param: bool mask}`` with, per parameter, as many randomly placed selected elements
    as ``mask`` has there (seeded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in mask.check_model(model).items():
        k = int(mask.dense(name).sum())
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.randperm(p.numel(), generator=g)[:k]] = True
        out[p] = flat.view(p.shape).to(p.device)
    return out


def _mask_kw(method: str, masks: dict, model, seed: int) -> dict:
    if method == "mmunlearner":
        return {"masks": masks["both"].for_model(model)}
    if method in ("mmunlearner:vision", "mmunlearner:language"):
        return {"masks": masks[method.split(":")[1]].for_model(model)}
    if method == "mmunlearner:random":
        return {"masks": _random_mask(masks["both"], model, seed)}
    return {}


def _diagnostics(model, theta0: dict, groups: dict, probe_f: list, probe_r: list) -> dict:
    import torch

    with torch.no_grad():
        return _diagnostics_nograd(model, theta0, groups, probe_f, probe_r)


def _diagnostics_nograd(model, theta0: dict, groups: dict, probe_f: list, probe_r: list) -> dict:
    model.eval()
    out = {
        "forget_ce": sum(model(**b).loss.item() for b in probe_f) / len(probe_f),
        "retain_ce": sum(model(**b).loss.item() for b in probe_r) / len(probe_r),
    }
    params = dict(model.named_parameters())
    for g in ("vision", "language"):
        sq = sum(float(((params[n] - theta0[n]) ** 2).sum()) for n in groups.get(g, []))
        out[f"delta_{g}"] = math.sqrt(sq)
    return out


# the parameter components a mask is broken down by (first matching substring wins)
COMPONENTS = (
    ("vision tower", "vision_tower."),
    ("projector", "multi_modal_projector."),
    ("token embeddings", "embed_tokens"),
    ("lm_head", "lm_head"),
    ("LM attention", "self_attn"),
    ("LM MLP", "mlp."),
    ("LM norms", "norm"),
)


def _component(name: str) -> str:
    return next((c for c, key in COMPONENTS if key in name), "other")


def mask_probe(model, masks: dict, forget_batches: list, seed: int) -> dict:
    """Where the ``both`` mask sits and how much of the forget gradient it can use.

    ``ḡ`` = the gradient of the mean forget-VQA CE over ``forget_batches`` at ``model``.
    Per component (:data:`COMPONENTS`) and in total: ``coverage`` (selected / elements),
    ``l1_share`` = Σ_mask |ḡ| / Σ |ḡ| — the share of the first-order loss increase of a sign-like
    (Adam) ascent step that the masked step keeps — and ``l2_share`` = Σ_mask ḡ² / Σ ḡ²; the
    same shares for the seeded random mask of ``mmunlearner:random`` (``random_l1_share``)."""
    import torch

    model.eval()
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = None
    with torch.enable_grad():
        for b in forget_batches:
            (model(**b).loss / len(forget_batches)).backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    both = masks["both"]
    rand = {id(p): m for p, m in _random_mask(both, model, seed).items()}
    acc: dict = {}
    for n, p in both.check_model(model).items():
        g = grads.get(n, torch.zeros_like(p))
        m, r = both.dense(n).to(g.device), rand[id(p)]
        for key in (_component(n), "total"):
            a = acc.setdefault(
                key, dict.fromkeys(("sel", "tot", "l1m", "l1", "l2m", "l2", "l1r"), 0.0)
            )
            a["sel"] += float(m.sum())
            a["tot"] += m.numel()
            a["l1m"] += float(g.abs()[m].sum())
            a["l1"] += float(g.abs().sum())
            a["l2m"] += float((g * g)[m].sum())
            a["l2"] += float((g * g).sum())
            a["l1r"] += float(g.abs()[r].sum())
    order = [c for c, _ in COMPONENTS] + ["other", "total"]
    return {
        k: {
            "coverage": a["sel"] / a["tot"],
            "elements": int(a["tot"]),
            "grad_l1_fraction": a["l1"] / max(acc["total"]["l1"], 1e-30),
            "l1_share": a["l1m"] / max(a["l1"], 1e-30),
            "l2_share": a["l2m"] / max(a["l2"], 1e-30),
            "random_l1_share": a["l1r"] / max(a["l1"], 1e-30),
        }
        for k, a in sorted(acc.items(), key=lambda kv: order.index(kv[0]))
    }


def ascent_only(model, masks: dict, forget: list, lr: float, checkpoints, evalfn, seed: int):
    """Forget steps alone (no retain steps): ``−CE`` on the forget batches in order, AdamW at
    ``lr``, grad-norm clip 1.0, for ``max(checkpoints)`` steps, with the ``both`` mask
    (``"mask"``), the random mask of equal coverage (``"random"``) and no mask (``"none"``,
    plain GA). Returns ``{variant: {steps: evalfn(model)}}``: the raw ascent power of each."""
    from mmunlearn.optim import MaskedAdamW

    out = {}
    for variant, method in (
        ("none", "ga"),
        ("mask", "mmunlearner"),
        ("random", "mmunlearner:random"),
    ):
        m = copy.deepcopy(model)
        kw = _mask_kw(method, masks, m, seed)
        opt = MaskedAdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        if kw:
            opt.set_masks(kw["masks"])
        res = {}
        m.train()
        for i, b in enumerate(forget[: max(checkpoints)], 1):
            (-m(**b).loss).backward()
            opt.step(max_grad_norm=1.0, masked=bool(kw))
            opt.zero_grad(set_to_none=True)
            if i in checkpoints:
                res[i] = evalfn(m)
                m.train()
        out[variant] = res
        del m
    return out


def run_sweep(out: str = "runs/sweep", cfg: SweepConfig | None = None) -> dict:
    """Run the grid; writes ``grid.json`` (after each seed), ``grid.md`` and ``grid.png`` under
    ``out`` and returns the grid dict: ``{"config", "vanilla": {seed: {metrics, diagnostics}},
    "mask_coverage": {seed: {group: fraction}}, "rows": [{"seed", "lr", "steps", "method",
    <metrics>, <diagnostics>, "seconds"}...], "summary": [...], "seconds"}``. The torch
    thread count is set to ``cfg.threads`` for the run and restored afterwards."""

    cfg = cfg or SweepConfig()
    _check(cfg)
    from mmunlearn.tinyrun import pinned_threads

    return pinned_threads(_run_sweep, out, cfg, threads=cfg.threads)


def _run_sweep(out: str, cfg: SweepConfig) -> dict:
    import torch

    from mmunlearn.data.batching import make_batches, to_device
    from mmunlearn.data.recipe import synthetic_sets
    from mmunlearn.data.synthetic import make_benchmark
    from mmunlearn.eval import EvalConfig, evaluate
    from mmunlearn.loop import unlearn
    from mmunlearn.masks import build_masks
    from mmunlearn.tinyrun import build_tiny, demo_eval_sets, public
    from mmunlearn.train import finetune

    os.makedirs(out, exist_ok=True)
    t_all = time.time()
    grid = {
        "config": {**asdict(cfg), "torch_threads": torch.get_num_threads()},
        "vanilla": {},
        "mask_coverage": {},
        "rows": [],
    }
    n_max = max(cfg.steps)
    for seed in cfg.seeds:
        d = replace(cfg.demo, seed=seed, unlearn_steps=n_max)
        dev = torch.device(d.device)
        t0 = time.time()
        torch.manual_seed(seed)
        bench = make_benchmark(n_people=d.n_people, forget_ratio=d.forget_ratio, seed=seed)
        sets = demo_eval_sets(bench)
        model, tok, adapter = build_tiny(bench, d, dev)
        finetune(
            model,
            adapter,
            bench.train,
            d.vanilla_steps,
            d.vanilla_lr,
            d.batch_size,
            seed,
            dev,
            cfg.progress,
        )
        ecfg = EvalConfig(
            batch_size=32, seed=seed, letter_mcq=False, generation=False, progress=False
        )
        # the demo's draws, in the demo's order (run_demo), with the largest step count
        rng = random.Random(seed)
        bs = d.batch_size
        data = synthetic_sets(bench)
        forget = to_device(make_batches(adapter, data.forget, bs, rng, n_max), dev)
        retain = to_device(make_batches(adapter, data.retain, bs, rng, n_max), dev)
        f_b = to_device(make_batches(adapter, data.forget, bs, rng), dev)
        v_pres = to_device(make_batches(adapter, data.vision_preserve, bs, rng), dev)
        l_pres = to_device(make_batches(adapter, data.language_preserve, bs, rng), dev)
        masks = build_masks(
            model, f_b, v_pres, l_pres, gamma=d.gamma, fraction=cfg.fraction, progress=False
        )
        grid["mask_coverage"][str(seed)] = {
            k: m.coverage()["total"]["fraction"] for k, m in masks.items()
        }
        groups = adapter.param_groups()
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        probe_f, probe_r = forget[: cfg.probe_batches], retain[: cfg.probe_batches]
        van = public(evaluate(model, adapter.collate, tok, sets, ecfg))
        grid["vanilla"][str(seed)] = {
            **_metrics(van),
            **_diagnostics(model, theta0, groups, probe_f, probe_r),
            "seconds": round(time.time() - t0, 1),
        }
        if cfg.progress:
            print(f"seed {seed}: vanilla {grid['vanilla'][str(seed)]}", flush=True)
        if cfg.probe:
            grid.setdefault("mask_probe", {})[str(seed)] = mask_probe(model, masks, f_b, seed)

            def evalfn(m, collate=adapter.collate, tok=tok, sets=sets, ecfg=ecfg):
                return _metrics(public(evaluate(m, collate, tok, sets, ecfg)))

            grid.setdefault("ascent_only", {})[str(seed)] = {
                str(lr): ascent_only(model, masks, forget, lr, set(cfg.steps), evalfn, seed)
                for lr in cfg.lrs
            }
            if cfg.progress:
                print(f"seed {seed}: probe done", flush=True)
        for lr in cfg.lrs:
            for steps in cfg.steps:
                ucfg = d.run_config(lr=lr, progress=False)  # the demo's run at this lr
                for method in cfg.methods:
                    t1 = time.time()
                    m = copy.deepcopy(model)
                    kw = _mask_kw(method, masks, m, seed)
                    unlearn(
                        m, method.split(":")[0], forget[:steps], retain[:steps], config=ucfg, **kw
                    )
                    res = public(evaluate(m, adapter.collate, tok, sets, ecfg))
                    row = {
                        "seed": seed,
                        "lr": lr,
                        "steps": steps,
                        "method": method,
                        **_metrics(res),
                        **_diagnostics(m, theta0, groups, probe_f, probe_r),
                        "seconds": round(time.time() - t1, 1),
                    }
                    grid["rows"].append(row)
                    if cfg.progress:
                        print(_row_line(row), flush=True)
                    del m
        grid["summary"] = summarize(grid["rows"])
        grid["seconds"] = round(time.time() - t_all, 1)
        atomic_write_text(os.path.join(out, "grid.json"), json.dumps(grid, indent=1, default=str))
    md = grid_markdown(grid)
    if grid_plot(grid, os.path.join(out, "grid.png")):
        md += "\n![grid](grid.png)\n"
    atomic_write_text(os.path.join(out, "grid.md"), md)
    if cfg.progress:
        print(summary_table(grid["summary"]))
        print(f"wrote {out}/grid.json, grid.md in {grid['seconds']} s")
    return grid


def _row_line(row: dict) -> str:
    vals = " ".join(f"{k}={row[k]:.3f}" for k, *_ in METRICS if row.get(k) is not None)
    return (
        f"seed={row['seed']} lr={row['lr']:g} steps={row['steps']} {row['method']}: {vals} "
        f"forget_ce={row['forget_ce']:.2f} ({row['seconds']} s)"
    )


def _mean_sd(xs: list) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    mu = sum(xs) / len(xs)
    if len(xs) < 2:
        return mu, 0.0
    return mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def summarize(rows: list) -> list:
    """Per (lr, steps, method), in grid order: the mean and sample standard deviation over
    seeds of every metric and diagnostic (``<key>`` and ``<key>_sd``) and ``n_seeds``."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["lr"], r["steps"], r["method"]), []).append(r)
    out = []
    for (lr, steps, method), rs in cells.items():
        s = {"lr": lr, "steps": steps, "method": method, "n_seeds": len(rs)}
        for k in [m[0] for m in METRICS] + list(DIAGNOSTICS):
            s[k], s[k + "_sd"] = _mean_sd([r.get(k) for r in rs])
        out.append(s)
    return out


def summary_table(summary: list, keys=None) -> str:
    """Markdown: one row per (lr, steps, method), cells ``mean ± sd`` over seeds."""
    keys = keys or [m[0] for m in METRICS]
    head = {m[0]: m[3] for m in METRICS} | {k: k for k in DIAGNOSTICS}
    lines = [
        "| lr | steps | method | " + " | ".join(head[k] for k in keys) + " |",
        "|---:|---:|---|" + "---:|" * len(keys),
    ]
    for s in summary:
        cells = [f"{s[k]:.3f} ± {s[k + '_sd']:.3f}" for k in keys]
        lines.append(f"| {s['lr']:g} | {s['steps']} | {s['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_markdown(grid: dict) -> str:
    """``grid.md``: configuration, vanilla rows, mask coverage, the mean table and every cell."""
    keys = [m[0] for m in METRICS]
    head = [m[3] for m in METRICS]
    seeds = list(grid["vanilla"])
    md = [
        "# mmunlearn sweep: the demo's unlearning phase over lr × steps × seeds",
        "",
        f"Seeds {seeds}; every cell starts from the seed's vanilla model. "
        "Accuracies are MCQ by option likelihood (the demo's protocol).",
        "",
        "## Vanilla models and mask coverage",
        "",
        "| seed | " + " | ".join(head) + " | mask vision | mask language | mask both |",
        "|---:|" + "---:|" * (len(keys) + 3),
    ]
    for seed, v in grid["vanilla"].items():
        cov = grid["mask_coverage"].get(seed, {})
        vals = [f"{v[k]:.3f}" for k in keys] + [
            f"{100 * cov.get(g, float('nan')):.1f} %" for g in ("vision", "language", "both")
        ]
        md.append(f"| {seed} | " + " | ".join(vals) + " |")
    md += [
        "",
        "## Mean ± sample standard deviation over seeds",
        "",
        summary_table(grid["summary"]),
        "",
        "Diagnostics (mean ± sd): answer CE on the first forget / retain training batches, "
        "L2 distance from the vanilla weights per group.",
        "",
        summary_table(grid["summary"], list(DIAGNOSTICS)),
        "",
        "## Every cell",
        "",
        "| seed | lr | steps | method | " + " | ".join(head) + " | forget CE | s |",
        "|---:|---:|---:|---|" + "---:|" * (len(keys) + 2),
    ]
    for r in grid["rows"]:
        vals = [f"{r[k]:.3f}" for k in keys] + [f"{r['forget_ce']:.2f}", f"{r['seconds']}"]
        md.append(
            f"| {r['seed']} | {r['lr']:g} | {r['steps']} | {r['method']} | "
            + " | ".join(vals)
            + " |"
        )
    md += _probe_markdown(grid)
    md += ["", "Configuration:", "", "```json", json.dumps(grid["config"], indent=1), "```", ""]
    return "\n".join(md)


def _probe_markdown(grid: dict) -> list:
    md = []
    if grid.get("mask_probe"):
        md += [
            "",
            "## Mask probe (vanilla model, `both` mask, gradient ḡ of the forget-VQA CE)",
            "",
            "coverage = selected / elements; ḡ share = the component's part of Σ|ḡ|; "
            "L1 in mask = Σ_mask|ḡ| / Σ|ḡ| within the component (random: the equal-coverage "
            "random mask); L2 in mask = Σ_mask ḡ² / Σ ḡ².",
            "",
            "| seed | component | elements | coverage | ḡ share | L1 in mask | L1 in random "
            "| L2 in mask |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for seed, comps in grid["mask_probe"].items():
            for c, v in comps.items():
                md.append(
                    f"| {seed} | {c} | {v['elements']:,} | {v['coverage']:.3f} | "
                    f"{v['grad_l1_fraction']:.3f} | {v['l1_share']:.3f} | "
                    f"{v['random_l1_share']:.3f} | {v['l2_share']:.3f} |"
                )
    if grid.get("ascent_only"):
        md += [
            "",
            "## Forget steps alone (no retain steps): none = GA, mask = masked GA, "
            "random = equal-coverage random mask",
            "",
            "| seed | lr | steps | variant | Forget VQA ↓ | Forget QA ↑ | Retain VQA ↑ "
            "| Retain QA ↑ |",
            "|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for seed, by_lr in grid["ascent_only"].items():
            for lr, variants in by_lr.items():
                for variant, by_steps in variants.items():
                    for steps, r in by_steps.items():
                        vals = [
                            r[k] for k in ("forget_vqa", "forget_qa", "retain_vqa", "retain_qa")
                        ]
                        md.append(
                            f"| {seed} | {float(lr):g} | {steps} | {variant} | "
                            + " | ".join(f"{v:.3f}" for v in vals)
                            + " |"
                        )
    return md


def grid_plot(grid: dict, path: str) -> bool:
    """Forget VQA (x) vs forget QA and retain VQA (y), one point per (lr, steps, method) (means
    over seeds); returns False when matplotlib is unavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not grid["summary"]:
        return False
    methods = list(dict.fromkeys(s["method"] for s in grid["summary"]))
    steps = sorted({s["steps"] for s in grid["summary"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (ykey, ylabel) in zip(
        axes, [("forget_qa", "forget text-QA acc ↑"), ("retain_vqa", "retain VQA acc ↑")]
    ):
        for i, meth in enumerate(methods):
            pts = [s for s in grid["summary"] if s["method"] == meth]
            ax.scatter(
                [s["forget_vqa"] for s in pts],
                [s[ykey] for s in pts],
                s=[25 + 35 * steps.index(s["steps"]) for s in pts],
                color=f"C{i}",
                alpha=0.75,
                label=meth,
            )
        ax.set_xlabel("forget VQA acc ↓")
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("lr × steps grid (means over seeds; larger marker = more steps); best top-left")
    fig.tight_layout()
    tmp = path + ".tmp.png"  # (a research script: a plain rename is enough)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The script's argument parser."""
    s = argparse.ArgumentParser(
        prog="experiments/sweep.py",
        description="Per seed: build the demo's benchmark and tiny LLaVA, fine-tune the vanilla "
        "model once, compute the MMUnlearner masks, then run every method at every (lr, steps) "
        "from that vanilla model and evaluate it. Writes grid.json, grid.md and grid.png "
        "under --out. Default grid (2 seeds × 3 lr × 2 steps × 5 methods) ≈ 15 min on one "
        "CPU core.",
    )
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="default: 0 1")
    s.add_argument(
        "--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3], help="default: 5e-4 1e-3 2e-3"
    )
    s.add_argument(
        "--steps", type=int, nargs="+", default=[25, 50], help="forget steps (default: 25 50)"
    )
    s.add_argument(
        "--methods",
        nargs="*",
        default=list(METHODS),
        choices=list(METHODS) + list(VARIANTS),
        metavar="METHOD",
        help=f"default: all of {', '.join(METHODS)}; variants: {', '.join(VARIANTS)}",
    )
    s.add_argument("--gamma", type=float, default=1.0, help="mask threshold γ (default 1.0)")
    s.add_argument(
        "--fraction", type=float, default=None, help="exact top-k mask fraction instead of γ"
    )
    s.add_argument("--people", type=int, default=40, help="synthetic people (default 40)")
    s.add_argument(
        "--vanilla-steps",
        type=int,
        default=VANILLA_STEPS,
        help=f"vanilla fine-tune steps per seed (default {VANILLA_STEPS})",
    )
    s.add_argument(
        "--fast",
        action="store_true",
        help="a seconds-long smoke configuration (6 people, tiny model): not a result",
    )
    s.add_argument(
        "--no-probe",
        action="store_true",
        help="skip the per-seed mask probe and forget-steps-only runs (see mmunlearn.sweep)",
    )
    s.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads (default 2, as the demo: the vanilla model depends on it; "
        "0 = torch's default)",
    )
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", default="runs/sweep", help="output directory (default runs/sweep)")
    return s


def main(argv=None) -> int:
    """Run the sweep from command-line arguments; returns the exit status."""
    from mmunlearn.cli.demo import FAST
    from mmunlearn.tinyrun import TinyRunConfig

    args = build_parser().parse_args(argv)

    demo = TinyRunConfig(
        device=args.device,
        n_people=args.people,
        vanilla_steps=args.vanilla_steps,
        gamma=args.gamma,
        save_models=False,
    )
    if args.fast:
        fast = {k: v for k, v in FAST.items() if k not in ("unlearn_steps", "vanilla_steps")}
        demo = replace(demo, **fast, vanilla_steps=min(args.vanilla_steps, FAST["vanilla_steps"]))
    cfg = SweepConfig(
        seeds=args.seeds,
        lrs=args.lrs,
        steps=args.steps,
        methods=args.methods,
        demo=demo,
        fraction=args.fraction,
        threads=args.threads,
        probe=not args.no_probe,
    )
    try:
        _check(cfg)
    except ValueError as e:
        raise SystemExit(f"sweep: {e}") from e
    run_sweep(args.out, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
