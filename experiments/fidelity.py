"""Issue #15: does the paper's claim hold in the linked world? (research, not the product)

Run from a source checkout: ``python experiments/fidelity.py --out runs/fidelity`` (seeds 0-4,
two worker processes of one torch thread each; 1,069 s measured on 2 cores shared with other
jobs). Resumable: every
finished piece is a file under ``--out``; a rerun skips it. The criteria and how to read the
output are in docs/fidelity.md (fixed before the study was run).

Phase A, per seed: the linked world (:mod:`mmunlearn.data.linked`), the vanilla and reference
models (:func:`mmunlearn.demo_linked.train_linked`, the demo's recipe), the gates on the
vanilla model
(:func:`mmunlearn.data.linked_probes.gates`). If any seed fails its gates the study prints
"not testable" and stops (exit status 2). Then the Fishers and every mask from them.

Phase B, per (seed, run): a copy of the vanilla model unlearned with the demo's settings (AdamW
lr 1e-3, no weight decay, clip 1.0, constant lr, batch 16, one forget step then one retain
step) until it has forgotten as much as the reference
(:func:`mmunlearn.demo_linked.unlearn_to_match`:
forget name and facts from held-out pictures ≤ the reference's + 0.05, checked after every step
pair; at most 200 forget steps), then scored on every probe. Runs (:data:`RUNS`): GA, GA_Diff,
KL_Min, NPO, MMUnlearner (γ = 1 masks, ``both``) and its controls — random masks with the
saliency mask's count per tensor / per group, the vision mask alone, exact top-k 5 / 10 / 35 %
per group, and the official recipe's masking (the mask restricted to Linear weights by
``SaliencyMask.official_filter``; ``official``: gradients zeroed outside it, then a plain AdamW
step, so momentum still moves masked-out weights and unlisted tensors get the full ascent;
``official_masked``: ``MaskedAdamW(unmasked="update")`` masked steps, only the second quirk).

Summary: means over seeds with percentile bootstrap intervals over seeds
(:func:`~mmunlearn.eval.unlearning.bootstrap_ci`, paired differences with
:func:`~mmunlearn.eval.unlearning.paired_bootstrap_ci`), the criteria of docs/fidelity.md and
the verdict: ``summary.json`` and ``fidelity.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context

from mmunlearn.io import atomic_write_text

SEEDS = (0, 1, 2, 3, 4)
FRACTIONS = (0.05, 0.10, 0.35)
# label -> (method, mask, loop options)
RUNS: dict[str, tuple[str, str | None, dict]] = {
    "ga": ("ga", None, {}),
    "ga_diff": ("ga_diff", None, {}),
    "kl_min": ("kl_min", None, {}),
    "npo": ("npo", None, {}),
    "mmunlearner": ("mmunlearner", "both", {}),
    "random_tensor": ("mmunlearner", "random_tensor", {}),
    "random_group": ("mmunlearner", "random_group", {}),
    "vision_only": ("mmunlearner", "vision", {}),
    **{f"topk_{round(100 * f)}": ("mmunlearner", f"topk_{round(100 * f)}", {}) for f in FRACTIONS},
    "official": ("mmunlearner", "official", {"mask_mode": "zero_grad", "unmasked": "update"}),
    "official_masked": ("mmunlearner", "official", {"unmasked": "update"}),
}
LR, MAX_STEPS, BATCH = 1e-3, 200, 16
N_BOOT, LEVEL = 10_000, 0.95
# the pre-registered criteria (docs/fidelity.md)
PREMISE_DROP, KEEP_TOL, BEAT_GA_DIFF, MIN_SEEDS = 0.15, 0.05, 0.15, 3


# ---------------------------------------------------------------------------------------------
# phase A: models, gates, masks
# ---------------------------------------------------------------------------------------------


def _setup(seed: int, fast: bool = False):
    import torch

    from mmunlearn.data.linked import make_linked_world
    from mmunlearn.tinyrun import TinyRunConfig

    torch.set_num_threads(1)
    cfg = TinyRunConfig(seed=seed, threads=None, progress=False, save_models=False)
    if fast:  # the demo's smoke configuration: seconds, not a result
        from mmunlearn.cli.demo import FAST

        cfg = replace(cfg, **FAST)  # asdict() would turn cfg.unlearn into a dict
    world = make_linked_world(n_people=cfg.n_people, forget_ratio=cfg.forget_ratio, seed=seed)
    return cfg, world, torch.device("cpu")


def phase_a(out: str, seed: int, fast: bool = False) -> dict:
    """Train (or load) the seed's vanilla and reference models, score both, check the gates;
    if they pass, compute the Fishers and save every mask. Returns the seed's record."""
    import torch

    from mmunlearn.data import linked_probes as lp
    from mmunlearn.demo_linked import train_linked

    d = os.path.join(out, f"seed{seed}")
    rec_path = os.path.join(d, "seed.json")
    if os.path.exists(rec_path):
        return json.loads(open(rec_path).read())
    os.makedirs(d, exist_ok=True)
    t0 = time.time()
    cfg, world, dev = _setup(seed, fast)
    vanilla, ref, tok, adapter = train_linked(world, cfg, dev)
    torch.save({"vanilla": vanilla.state_dict(), "reference": ref.state_dict()}, d + "/models.pt")
    t_train = time.time() - t0
    van = lp.score(vanilla, adapter.collate, tok, world)
    refs = lp.score(ref, adapter.collate, tok, world)
    rec = {
        "seed": seed,
        "gates": lp.gates(van),
        "vanilla": lp.accuracies(van, retain_mean=True),
        "reference": lp.accuracies(refs, retain_mean=True),
        "train_seconds": round(t_train, 1),
    }
    rec["enforced"] = cfg.enforce_gates
    if rec["gates"]["passed"] or not cfg.enforce_gates:
        rec["coverage"] = _masks(d, vanilla, world, adapter, seed)
    rec["seconds"] = round(time.time() - t0, 1)
    atomic_write_text(rec_path, json.dumps(rec, indent=1))
    return rec


def _masks(d: str, model, world, adapter, seed: int) -> dict:
    """The Fishers (one pass over each set, as the demo) and every mask of :data:`RUNS`,
    saved under ``d/masks``; returns their coverage."""
    import random

    import torch

    from mmunlearn.data.batching import make_batches
    from mmunlearn.fisher import load_fisher
    from mmunlearn.masks import build_masks, masks_from_fishers
    from mmunlearn.saliency import mask_from_dense

    rng = random.Random(seed)
    data = world.unlearning_sets()
    fdir = os.path.join(d, "fisher")
    batches = [
        make_batches(adapter, s, BATCH, rng)
        for s in (data.forget, data.vision_preserve, data.language_preserve)
    ]
    masks = build_masks(model, *batches, gamma=1.0, progress=False, fisher_dir=fdir)
    out = {"both": masks["both"], "vision": masks["vision"]}
    fs = [
        load_fisher(os.path.join(fdir, f"{n}.safetensors"))[0]
        for n in ("forget", "vision_preserve", "language_preserve")
    ]
    groups = adapter.param_groups()
    for f in FRACTIONS:
        out[f"topk_{round(100 * f)}"] = masks_from_fishers(*fs, groups, fraction=f)["both"]
    out["official"] = masks["both"].official_filter()
    g = torch.Generator().manual_seed(seed)
    both = masks["both"]
    params = both.check_model(model)
    per_tensor = {}
    for n, p in params.items():  # the same count in every tensor, placed at random
        k = int(both.dense(n).sum())
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.randperm(p.numel(), generator=g)[:k]] = True
        per_tensor[n] = flat.view(p.shape)
    out["random_tensor"] = mask_from_dense(per_tensor, groups=both.groups)
    per_group = {}
    for names in groups.values():  # the same count in every group, placed at random in it
        names = [n for n in names if n in params]
        sizes = [params[n].numel() for n in names]
        k = sum(int(both.dense(n).sum()) for n in names)
        flat = torch.zeros(sum(sizes), dtype=torch.bool)
        flat[torch.randperm(sum(sizes), generator=g)[:k]] = True
        for n, part in zip(names, torch.split(flat, sizes)):
            per_group[n] = part.view(params[n].shape)
    out["random_group"] = mask_from_dense(per_group, groups=both.groups)
    os.makedirs(os.path.join(d, "masks"), exist_ok=True)
    for k, m in out.items():
        m.save(os.path.join(d, "masks", f"{k}.safetensors"))
    return {k: m.coverage()["total"]["fraction"] for k, m in out.items()}


# ---------------------------------------------------------------------------------------------
# phase B: one unlearning run to matched forgetting
# ---------------------------------------------------------------------------------------------


def phase_b(out: str, seed: int, label: str, fast: bool = False) -> dict:
    """Run ``label`` of :data:`RUNS` on the seed's vanilla model to matched forgetting; score
    it; save and return the record (read back if already there)."""
    import random

    import torch

    from mmunlearn.data import linked_probes as lp
    from mmunlearn.data.batching import make_batches
    from mmunlearn.demo_linked import unlearn_to_match
    from mmunlearn.models import adapter_for, build_tokenizer
    from mmunlearn.saliency import SaliencyMask
    from mmunlearn.tinyrun import tiny_model

    d = os.path.join(out, f"seed{seed}")
    path = os.path.join(d, "runs", f"{label}.json")
    if os.path.exists(path):
        return json.loads(open(path).read())
    t0 = time.time()
    cfg, world, dev = _setup(seed, fast)
    tok = build_tokenizer(world.vocabulary_text(), vocab_size=4096)
    model = tiny_model(tok, cfg, dev)
    model.load_state_dict(torch.load(d + "/models.pt")["vanilla"])
    adapter = adapter_for(model, tok)
    ref_acc = json.loads(open(os.path.join(d, "seed.json")).read())["reference"]["forget"]
    rng = random.Random(seed)  # the same batches for every run of the seed
    data = world.unlearning_sets()
    n = cfg.max_unlearn_steps if fast else MAX_STEPS
    forget = make_batches(adapter, data.forget, BATCH, rng, n)
    retain = make_batches(adapter, data.retain, BATCH, rng, n)
    method, mask, opts = RUNS[label]
    kw = {}
    if mask is not None:
        m = SaliencyMask.load(os.path.join(d, "masks", f"{mask}.safetensors"), model=model)
        kw["masks"] = m.for_model(model)
    ucfg = cfg.run_config(lr=LR, progress=False, **opts)

    def check(m):
        sc = lp.score(m, adapter.collate, tok, world, splits=("forget",), kinds=lp.MATCH_KINDS)
        return lp.forgetting_matched(lp.accuracies(sc)["forget"], ref_acc)["reached"]

    run = unlearn_to_match(model, method, forget, retain, check, ucfg, **kw)
    acc = lp.accuracies(lp.score(model, adapter.collate, tok, world), retain_mean=True)
    rec = {
        "seed": seed,
        "label": label,
        **lp.forgetting_matched(acc["forget"], ref_acc),
        **run,
        "acc": acc,
        "seconds": round(time.time() - t0, 1),
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(rec, indent=1))
    return rec


# ---------------------------------------------------------------------------------------------
# summary and verdict
# ---------------------------------------------------------------------------------------------


def _F(a):  # the forget people's facts by name
    return a["forget"]["facts_name"]


def _R(a):  # the retain people: mean of the four probes
    return a["retain"]["mean"]


def _K(a):  # knowledge kept: mean of F and R
    return (_F(a) + _R(a)) / 2


def summarize(seeds: dict, runs: list) -> dict:
    """Per label: means over seeds with intervals; the pre-registered criteria; the verdict."""
    from mmunlearn.eval.unlearning import bootstrap_ci, paired_bootstrap_ci

    def ci(xs):
        c = bootstrap_ci(xs, n_boot=N_BOOT, seed=0, level=LEVEL)
        return {"mean": c.estimate, "lo": c.lo, "hi": c.hi, "n": c.n}

    def pci(a, b):
        c = paired_bootstrap_ci(a, b, n_boot=N_BOOT, seed=0, level=LEVEL)
        return {"mean": c.estimate, "lo": c.lo, "hi": c.hi, "n": c.n}

    by = {(r["seed"], r["label"]): r for r in runs}
    van = {s: rec["vanilla"] for s, rec in seeds.items()}
    table = {}
    for label in RUNS:
        rs = [by[(s, label)] for s in seeds if (s, label) in by]
        ok = [r for r in rs if r["reached"]]
        row = {"runs": len(rs), "reached": len(ok), "within": sum(r["within"] for r in rs)}
        if rs:
            row["steps"] = ci([r["forget_steps"] for r in rs])
            for key, f in (("F", _F), ("R", _R), ("K", _K)):
                row[key] = ci([f(r["acc"]) for r in ok]) if ok else None
                row[key + "_all"] = ci([f(r["acc"]) for r in rs])
            for kind in ("name_pic", "facts_pic", "link_pic"):
                row[f"forget_{kind}"] = ci([r["acc"]["forget"][kind] for r in rs])
            row["drop_F"] = ci([_F(van[r["seed"]]) - _F(r["acc"]) for r in ok]) if ok else None
            row["drop_R"] = ci([_R(van[r["seed"]]) - _R(r["acc"]) for r in ok]) if ok else None
        table[label] = row

    def paired(a, b, f):
        common = [
            s
            for s in seeds
            if by.get((s, a), {}).get("reached") and by.get((s, b), {}).get("reached")
        ]
        if len(common) < MIN_SEEDS:
            return None
        return pci([f(by[(s, a)]["acc"]) for s in common], [f(by[(s, b)]["acc"]) for s in common])

    crit: dict = {"premise": {}}
    for b in ("ga", "ga_diff", "npo"):
        t = table[b]
        ok = t["reached"] >= MIN_SEEDS and t["drop_F"]["mean"] >= PREMISE_DROP
        crit["premise"][b] = {"drop_F": t.get("drop_F"), "reached": t["reached"], "holds": ok}
    premise = all(v["holds"] for v in crit["premise"].values())
    none = not any(v["holds"] for v in crit["premise"].values())
    mmu = table["mmunlearner"]
    a_ok = (
        mmu["reached"] >= MIN_SEEDS
        and mmu["drop_F"]["mean"] <= KEEP_TOL
        and mmu["drop_R"]["mean"] <= KEEP_TOL
    )
    crit["A"] = {
        "drop_F": mmu.get("drop_F"),
        "drop_R": mmu.get("drop_R"),
        "reached": mmu["reached"],
        "holds": bool(a_ok),
    }
    b_diff = paired("mmunlearner", "ga_diff", _F)
    crit["B"] = {
        "F_minus_ga_diff": b_diff,
        "holds": bool(b_diff and b_diff["mean"] >= BEAT_GA_DIFF and b_diff["lo"] > 0),
    }
    crit["C"] = {}
    for r in ("random_tensor", "random_group"):
        c = paired("mmunlearner", r, _K)
        crit["C"][r] = {"K_minus_random": c, "holds": bool(c and c["lo"] > 0)}
    c_ok = all(v["holds"] for v in crit["C"].values())
    if none:
        verdict = (
            "The premise fails: at matched forgetting none of GA, GA_Diff, NPO loses "
            f"≥ {PREMISE_DROP} of the forget people's facts by name; the method has "
            "nothing to fix on this model."
        )
    elif premise and a_ok and crit["B"]["holds"] and c_ok:
        verdict = "The paper's claim holds here: premise, A, B and C all hold."
    else:
        held = [
            k
            for k, v in (("premise", premise), ("A", a_ok), ("B", crit["B"]["holds"]), ("C", c_ok))
            if v
        ]
        failed = [k for k in ("premise", "A", "B", "C") if k not in held]
        verdict = f"The paper's claim does not hold here: {', '.join(failed)} failed" + (
            f" ({', '.join(held)} held)." if held else "."
        )
    return {"table": table, "criteria": crit, "verdict": verdict, "premise_holds": premise}


def _fmt(c, pct=False) -> str:
    if c is None:
        return "—"
    return f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"


def markdown(seeds: dict, summary: dict, seconds: float) -> str:
    """``fidelity.md``: gates per seed, the table, the criteria and the verdict."""
    md = ["# Issue #15 study: the linked world, every method at matched forgetting", ""]
    md += [
        "## Gates per seed (vanilla model, held-out pictures)",
        "",
        "| seed | passed | "
        + " | ".join(
            f"{s} {k}"
            for s in ("forget", "retain")
            for k in ("name_pic", "facts_name", "link_pic", "swap")
        )
        + " |",
        "|---:|---|" + "---:|" * 8,
    ]
    for s, rec in seeds.items():
        ch = {(c["split"], c["kind"]): c["accuracy"] for c in rec["gates"]["checks"]}
        cells = [
            f"{ch[(sp, k)]:.3f}"
            for sp in ("forget", "retain")
            for k in ("name_pic", "facts_name", "link_pic", "swap")
        ]
        md.append(f"| {s} | {rec['gates']['passed']} | " + " | ".join(cells) + " |")
    md += [
        "",
        "Reference (forget split, mean over seeds): "
        + ", ".join(
            f"{k} {sum(r['reference']['forget'][k] for r in seeds.values()) / len(seeds):.3f}"
            for k in ("name_pic", "facts_pic", "link_pic", "facts_name")
        ),
        "",
    ]
    md += [
        "## At matched forgetting (mean over seeds [95 % bootstrap interval over seeds])",
        "",
        "F = forget people's facts by name; R = retain people, mean of four probes; K = "
        "(F + R) / 2; drop = vanilla − run. F, R, K, drops: seeds where the run reached "
        "matched forgetting.",
        "",
        "| run | reached / within / runs | forget steps | forget name pic | forget facts pic "
        "| forget link pic | F | R | K | drop F | drop R |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, t in summary["table"].items():
        if not t["runs"]:
            continue
        md.append(
            f"| {label} | {t['reached']} / {t['within']} / {t['runs']} | {_fmt(t['steps'])} | "
            + " | ".join(
                _fmt(t[k])
                for k in (
                    "forget_name_pic",
                    "forget_facts_pic",
                    "forget_link_pic",
                    "F",
                    "R",
                    "K",
                    "drop_F",
                    "drop_R",
                )
            )
            + " |"
        )
    c = summary["criteria"]
    md += ["", "## Criteria (docs/fidelity.md)", ""]
    for b, v in c["premise"].items():
        md.append(
            f"- premise, {b}: drop F {_fmt(v['drop_F'])} (≥ {PREMISE_DROP}?) → "
            f"{'holds' if v['holds'] else 'fails'}"
        )
    md.append(
        f"- A: MMUnlearner drop F {_fmt(c['A']['drop_F'])}, drop R {_fmt(c['A']['drop_R'])}"
        f" (both ≤ {KEEP_TOL}?) → {'holds' if c['A']['holds'] else 'fails'}"
    )
    md.append(
        f"- B: F(MMUnlearner) − F(GA_Diff) {_fmt(c['B']['F_minus_ga_diff'])} (≥ "
        f"{BEAT_GA_DIFF}, interval above 0?) → {'holds' if c['B']['holds'] else 'fails'}"
    )
    for r, v in c["C"].items():
        md.append(
            f"- C: K(MMUnlearner) − K({r}) {_fmt(v['K_minus_random'])} (interval above 0?)"
            f" → {'holds' if v['holds'] else 'fails'}"
        )
    md += ["", f"**Verdict.** {summary['verdict']}", "", f"Wall time {seconds:.0f} s.", ""]
    return "\n".join(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="experiments/fidelity.py", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    ap.add_argument("--out", default="runs/fidelity")
    ap.add_argument(
        "--fast", action="store_true", help="smoke configuration (gates not enforced): no result"
    )
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        seeds = dict(
            zip(
                args.seeds,
                pool.map(
                    phase_a, [args.out] * len(args.seeds), args.seeds, [args.fast] * len(args.seeds)
                ),
            )
        )
        for s, rec in seeds.items():
            print(
                f"seed {s}: gates {'passed' if rec['gates']['passed'] else 'FAILED'} "
                f"({rec['seconds']} s)",
                flush=True,
            )
        if not all(r["gates"]["passed"] or not r["enforced"] for r in seeds.values()):
            bad = [s for s, r in seeds.items() if not r["gates"]["passed"]]
            print(f"not testable: seeds {bad} fail the gates; nothing was unlearned")
            atomic_write_text(
                os.path.join(args.out, "summary.json"),
                json.dumps({"testable": False, "seeds": seeds}, indent=1),
            )
            return 2
        jobs = [(s, lab) for lab in args.runs for s in args.seeds]
        futs = [pool.submit(phase_b, args.out, s, lab, args.fast) for s, lab in jobs]
        runs = []
        for f in futs:
            r = f.result()
            runs.append(r)
            print(
                f"seed {r['seed']} {r['label']}: reached={r['reached']} steps="
                f"{r['forget_steps']} F={_F(r['acc']):.3f} R={_R(r['acc']):.3f} "
                f"({r['seconds']} s)",
                flush=True,
            )
    summary = summarize(seeds, runs)
    seconds = time.time() - t0
    atomic_write_text(
        os.path.join(args.out, "summary.json"),
        json.dumps(
            {"testable": True, "seeds": seeds, "runs": runs, **summary, "seconds": seconds},
            indent=1,
        ),
    )
    md = markdown(seeds, summary, seconds)
    atomic_write_text(os.path.join(args.out, "fidelity.md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
