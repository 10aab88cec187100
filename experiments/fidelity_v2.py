"""Issue #22: the v2 linked-world study (research, not the product). The design and criteria were
pre-registered in docs/fidelity.md ("v2 criteria") before this file existed.

Run from a source checkout::

    python experiments/fidelity_v2.py --seeds 200 201 202          # validation
    python experiments/fidelity_v2.py --select --seeds 200 201 202
    python experiments/fidelity_v2.py --seeds 100                   # one test seed

Records go to ``experiments/results/fidelity_v2`` (``--out`` to change), where they are
committed; models, Fishers and masks are not, and a seed whose record is there but whose
models are not is rebuilt and checked against its record (``phase_a``).

Every cell is one file, skipped when present (resumable; a rerun of one seed or one
configuration re-does only what is missing): ``seed{S}/seed.json`` (the vanilla and reference
models of the v2 world, their scores, the gates, every mask) and
``seed{S}/runs/{config}@{setting}.json`` (one unlearning run to matched forgetting).
``--configs`` and ``--settings`` filter the cells. Validation seeds (200-202) run every
setting of the baselines and saliency configurations (amendment 1: the random controls are not
tuned; they run at their saliency configuration's frozen setting); other seeds run the
setting frozen by ``--select`` (``frozen.json``), or
``--settings`` when given (a pilot). ``--summary`` writes ``summary.json`` / ``summary.md``
(means over seeds, Student t and BCa intervals, the mask-vs-random classification).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from mmunlearn.io import atomic_write_text

# the study's records live in the repository (models, Fishers and masks are not committed:
# phase_a rebuilds them from the seed and checks them against the record)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fidelity_v2")
TEST_SEEDS = tuple(range(100, 120))
VAL_SEEDS = (200, 201, 202)
LRS, FREQS = (1e-4, 3e-4, 1e-3), (1, 4)
MAX_FORGET, BATCH, TOL = 300, 16, 0.05
FRACTION = 0.10  # amendment 1: top-10 % of each group (docs/fidelity.md), replacing γ = 1
MASK_SETS, SEMANTICS = ("vision", "language", "both"), ("ours", "official")
CONTROLS = ("saliency", "random_tensor", "random_group")
# label -> (method, mask file stem or None, semantics or None)
CONFIGS: dict[str, tuple[str, str | None, str | None]] = {
    **{m: (m, None, None) for m in ("ga", "ga_diff", "kl_min", "npo")},
    **{
        f"{ms}_{sem}_{c}": ("mmunlearner", f"{ms}_{sem}_{c}", sem)
        for ms in MASK_SETS
        for sem in SEMANTICS
        for c in CONTROLS
    },
}
NO_RETAIN = ("ga", "npo")  # no retain steps: the frequency does not apply
MARGIN, N_BOOT = 0.03, 10_000  # the pre-registered equivalence margin on K
# the pre-registered criteria (docs/fidelity.md, "v2 criteria")
PREMISE_DROP, KEEP_TOL, BEAT_GA_DIFF, MIN_SEEDS = 0.15, 0.05, 0.15, 15
PRIMARY = "language_official_saliency"  # what the official MMUnlearner runs
FISHERS = ("forget", "vision_preserve", "language_preserve")


def tuned(label: str) -> str:
    """The configuration whose validated setting ``label`` runs at (amendment 1: a random
    control runs at its saliency configuration's setting; everything else at its own)."""
    for c in CONTROLS[1:]:
        if label.endswith("_" + c):
            return label[: -len(c)] + "saliency"
    return label


TUNED = tuple(lab for lab in CONFIGS if tuned(lab) == lab)  # the 4 baselines + 6 saliency


def setting_name(lr: float, freq: int) -> str:
    return f"lr{lr:.0e}_f{freq}"


def settings_for(label: str) -> list[str]:
    """Every (lr, frequency) setting of a configuration (GA, NPO: frequency 1 only)."""
    freqs = (1,) if label in NO_RETAIN else FREQS
    return [setting_name(lr, f) for lr in LRS for f in freqs]


def parse_setting(name: str) -> tuple[float, int]:
    lr, f = name.split("_f")
    return float(lr[2:]), int(f)


# ---------------------------------------------------------------------------------------------
# phase A: the seed's models, gates and masks
# ---------------------------------------------------------------------------------------------


# the scale check (issue #22 item 3, docs/fidelity.md): 11.4x the parameters (5.28 M vs
# 0.46 M: widths 448 / 224 instead of 128 / 64, same depth), 5x the people, 5x the training
# steps of every stage (the same passes over 5x the data); everything else as the study
SCALE = {
    "n_people": 200,
    "hidden": 448,
    "vision_hidden": 224,
    "stage_steps": {"text": 2500, "identity": 4000, "grounding": 4000},
}


def _setup(seed: int, fast: bool = False, scale: bool = False, device: str = "cpu"):
    from dataclasses import replace

    import torch

    from mmunlearn.data.linked import make_linked_world
    from mmunlearn.tinyrun import TinyRunConfig

    torch.set_num_threads(1)
    cfg = TinyRunConfig(seed=seed, threads=None, progress=False, save_models=False)
    if scale:
        cfg = replace(cfg, **SCALE)
    if fast:  # the demo's smoke configuration: seconds, not a result
        from mmunlearn.cli.demo import FAST

        wide = {k: v for k, v in FAST.items() if k not in ("hidden", "vision_hidden")}
        cfg = replace(cfg, **({**wide, "n_people": 3 * FAST["n_people"]} if scale else FAST))
    world = make_linked_world(
        n_people=cfg.n_people, forget_ratio=cfg.forget_ratio, seed=seed, variant="v2"
    )
    return replace(cfg, device=device), world, torch.device(device)


def _acc(world, scores) -> dict:
    from mmunlearn.data import linked_probes as lp

    return lp.accuracies(lp.split_facts_name(world, scores), retain_mean=True)


def phase_a(
    out: str, seed: int, fast: bool = False, scale: bool = False, device: str = "cpu"
) -> dict:
    """Train (or read back) the seed's v2 vanilla and reference models, score both, check the
    gates; if they pass, the Fishers and every mask. Returns the seed's record."""
    import torch

    from mmunlearn.data import linked_probes as lp
    from mmunlearn.demo_linked import train_linked

    d = os.path.join(out, f"seed{seed}")
    rec_path = os.path.join(d, "seed.json")
    recorded = json.loads(open(rec_path).read()) if os.path.exists(rec_path) else None
    if recorded is not None and _artifacts_present(d, recorded):
        return recorded
    # no record, or a record whose models / masks are gone (the records are committed under
    # experiments/results/, the models and masks are not): (re)build them; a rebuild must
    # reproduce the record, or the runs recorded against it would be mixed with other models
    os.makedirs(d, exist_ok=True)
    t0 = time.time()
    cfg, world, dev = _setup(seed, fast, scale, device)
    vanilla, ref, tok, adapter = train_linked(world, cfg, dev)
    torch.save({"vanilla": vanilla.state_dict(), "reference": ref.state_dict()}, d + "/models.pt")
    t_train = time.time() - t0
    van = lp.score(vanilla, adapter.collate, tok, world)
    rec = {
        "seed": seed,
        "variant": "v2",
        "gates": lp.gates(van),
        "vanilla": _acc(world, van),
        "reference": _acc(world, lp.score(ref, adapter.collate, tok, world)),
        "train_seconds": round(t_train, 1),
        "enforced": cfg.enforce_gates,
        "profile": {
            "scale": scale,
            "fast": fast,
            "device": device,
            "people": cfg.n_people,
            "parameters": sum(p.numel() for p in vanilla.parameters()),
        },  # fmt: skip
    }
    if rec["gates"]["passed"] or not cfg.enforce_gates:
        rec["coverage"] = _masks(d, vanilla, world, adapter, seed)
    rec["seconds"] = round(time.time() - t0, 1)
    if recorded is not None:
        _check_rebuild(rec_path, recorded, rec)
        return recorded
    atomic_write_text(rec_path, json.dumps(rec, indent=1))
    return rec


# what a rebuilt seed must reproduce exactly (the scores are counts over fixed probe sets; the
# mask coverages are counts over the model's parameters)
REBUILT = ("gates", "vanilla", "reference", "coverage")


def _artifacts_present(d: str, rec: dict) -> bool:
    """The models and (for a seed past its gates) every mask file ``rec`` was recorded with."""
    if not os.path.exists(os.path.join(d, "models.pt")):
        return False
    stems = {mask for _, mask, _ in CONFIGS.values() if mask is not None}
    return "coverage" not in rec or all(
        os.path.exists(os.path.join(d, "masks", f"{s}.safetensors")) for s in stems
    )


def _check_rebuild(rec_path: str, recorded: dict, rebuilt: dict) -> None:
    """Refuse (naming the seed and what differs) a rebuild that does not reproduce ``seed.json``."""
    differ = [k for k in REBUILT if recorded.get(k) != rebuilt.get(k)]
    if differ:
        raise SystemExit(
            f"{rec_path}: the rebuilt models/masks differ from the record in {', '.join(differ)} "
            "(other torch version or thread count?); the runs recorded under this seed were made "
            "with the recorded ones — use another --out to start this seed afresh"
        )


def random_like(mask, params: dict, groups: dict, per: str, generator):
    """A random mask with ``mask``'s count of selected entries in every tensor (``per =
    "tensor"``) or in every group (``"group"``: placed anywhere in the group's tensors of
    ``mask``)."""
    import torch

    from mmunlearn.saliency import mask_from_dense

    listed = {n: p for n, p in params.items() if n in mask.names}
    if per == "tensor":
        parts = [[n] for n in listed]
    else:
        parts = [[n for n in names if n in listed] for names in groups.values()]
    dense = {}
    for names in parts:
        sizes = [listed[n].numel() for n in names]
        k = sum(int(mask.dense(n).sum()) for n in names)
        flat = torch.zeros(sum(sizes), dtype=torch.bool)
        flat[torch.randperm(sum(sizes), generator=generator)[:k]] = True
        for n, part in zip(names, torch.split(flat, sizes)):
            dense[n] = part.view(listed[n].shape)
    return mask_from_dense(dense, groups=mask.groups)


def _masks(d: str, model, world, adapter, seed: int) -> dict:
    """The Fishers (one pass over each v2 set) and every mask of :data:`CONFIGS`, saved under
    ``d/masks``; returns their coverage."""
    import random

    import torch

    from mmunlearn.data.batching import make_batches
    from mmunlearn.fisher import load_fisher
    from mmunlearn.masks import build_masks, masks_from_fishers, module_groups

    rng = random.Random(seed)
    data = world.unlearning_sets()
    batches = [
        make_batches(adapter, s, BATCH, rng)
        for s in (data.forget, data.vision_preserve, data.language_preserve)
    ]
    fdir = os.path.join(d, "fishers")
    gamma1 = build_masks(model, *batches, gamma=1.0, progress=False, fisher_dir=fdir)
    # amendment 1: the masks are the top FRACTION of each group; γ = 1 is kept as a record
    built = masks_from_fishers(
        *(load_fisher(os.path.join(fdir, f"{k}.safetensors"))[0] for k in FISHERS),
        module_groups(model),
        fraction=FRACTION,
        scope="global",
    )
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    groups = adapter.param_groups()
    out = {}
    for ms in MASK_SETS:
        for sem in SEMANTICS:
            sal = built[ms] if sem == "ours" else built[ms].official_filter()
            out[f"{ms}_{sem}_saliency"] = sal
            for per in ("tensor", "group"):
                out[f"{ms}_{sem}_random_{per}"] = random_like(sal, params, groups, per, g)
    os.makedirs(os.path.join(d, "masks"), exist_ok=True)
    for k, m in out.items():
        m.save(os.path.join(d, "masks", f"{k}.safetensors"))
    cov = {k: m.coverage()["total"]["fraction"] for k, m in out.items()}
    for ms in MASK_SETS:
        cov[f"{ms}_ours_gamma1"] = gamma1[ms].coverage()["total"]["fraction"]
        cov[f"{ms}_official_gamma1"] = gamma1[ms].official_filter().coverage()["total"]["fraction"]
    return cov


# ---------------------------------------------------------------------------------------------
# phase B: one unlearning run to matched forgetting, checked after every step, interpolated
# ---------------------------------------------------------------------------------------------


class _Reached(Exception):
    pass


def interpolate(g_prev: float, g_at: float, a_prev: dict, a_at: dict, tol: float = TOL) -> dict:
    """The quantities at the exact crossing of the match gap ``g`` through ``tol``, linearly
    between the last check above it (``g_prev``, ``a_prev``) and the first at or below it
    (``g_at``, ``a_at``); ``a_*``: ``{name: value}``. Returns ``{name: value, "w": w}``."""
    w = 1.0 if g_prev <= g_at else (g_prev - tol) / (g_prev - g_at)
    w = min(1.0, max(0.0, w))
    return {**{k: a_prev[k] + w * (a_at[k] - a_prev[k]) for k in a_at}, "w": w}


def quantities(acc: dict) -> dict:
    """F, F_img, F_link, R, K of one model's accuracies (``_acc``)."""
    f, r = acc["forget"], acc["retain"]["mean"]
    q = {"F": f["facts_name"], "F_img": f["facts_name_img"], "F_link": f["facts_name_link"]}
    return {**q, "R": r, "K": (q["F"] + r) / 2}


def run_to_match(model, method: str, forget, retain, gap, ucfg, **kw) -> dict:
    """Unlearn until ``gap(model) <= TOL`` (checked after every optimizer step) or the batches
    run out. Returns ``{"reached", "steps", "forget_steps", "g_prev", "g_at", "prev"}``
    (``prev``: the state dict one check before the end, the vanilla one at the start)."""
    from dataclasses import replace

    import torch

    from mmunlearn.loop import unlearn

    def snap():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    with torch.no_grad():
        g0 = gap(model)
    st = {"reached": g0 <= TOL + 1e-9, "steps": 0, "forget_steps": 0}
    st.update(g_prev=g0, g_at=g0, prev=snap())
    if st["reached"]:
        return st

    def callback(step, kind, loss):
        st["steps"] += 1
        st["forget_steps"] += kind == "forget"
        model.eval()
        with torch.no_grad():
            g = gap(model)
        model.train()
        if g <= TOL + 1e-9:
            st["reached"], st["g_at"] = True, g
            raise _Reached
        st["g_prev"], st["g_at"], st["prev"] = g, g, snap()

    try:
        unlearn(
            model,
            method,
            forget,
            retain,
            config=replace(ucfg, log_every=1),
            callback=callback,
            **kw,
        )
    except _Reached:
        pass
    model.eval()
    return st


def phase_b(
    out: str,
    seed: int,
    label: str,
    setting: str,
    fast: bool = False,
    scale: bool = False,
    device: str = "cpu",
) -> dict:
    """Run configuration ``label`` with ``setting`` on the seed's vanilla model to matched
    forgetting; score it (at the end and interpolated); save and return the record (read back
    if already there)."""
    import random

    import torch

    from mmunlearn.data import linked_probes as lp
    from mmunlearn.data.batching import make_batches
    from mmunlearn.models import adapter_for, build_tokenizer
    from mmunlearn.saliency import SaliencyMask
    from mmunlearn.tinyrun import tiny_model

    d = os.path.join(out, f"seed{seed}")
    path = os.path.join(d, "runs", f"{label}@{setting}.json")
    if os.path.exists(path):
        return json.loads(open(path).read())
    t0 = time.time()
    cfg, world, dev = _setup(seed, fast, scale, device)
    tok = build_tokenizer(world.vocabulary_text(), vocab_size=4096)
    model = tiny_model(tok, cfg, dev)
    model.load_state_dict(torch.load(d + "/models.pt", map_location=dev)["vanilla"])
    adapter = adapter_for(model, tok)
    ref = json.loads(open(os.path.join(d, "seed.json")).read())["reference"]["forget"]
    lr, freq = parse_setting(setting)
    rng = random.Random(seed)  # the same batches for every run of the seed
    data = world.unlearning_sets()
    n = min(cfg.max_unlearn_steps, MAX_FORGET) if fast else MAX_FORGET
    forget = make_batches(adapter, data.forget, BATCH, rng, n)
    method, mask, sem = CONFIGS[label]
    retain = [] if label in NO_RETAIN else make_batches(adapter, data.retain, BATCH, rng, n * freq)
    kw, opts = {}, {}
    if mask is not None:
        m = SaliencyMask.load(os.path.join(d, "masks", f"{mask}.safetensors"), model=model)
        kw["masks"] = m.for_model(model)
    if sem == "official":
        opts = {"mask_mode": "zero_grad", "unmasked": "update"}
    ucfg = cfg.run_config(lr=lr, forget_freq=freq, progress=False, **opts)

    def gap(mdl):
        sc = lp.score(mdl, adapter.collate, tok, world, splits=("forget",), kinds=lp.MATCH_KINDS)
        acc = lp.accuracies(sc)["forget"]
        return max(acc[k] - ref[k] for k in lp.MATCH_KINDS)

    run = run_to_match(model, method, forget, retain, gap, ucfg, **kw)
    acc = _acc(world, lp.score(model, adapter.collate, tok, world))
    prev = copy.deepcopy(model)
    prev.load_state_dict(run.pop("prev"))
    acc_prev = _acc(world, lp.score(prev, adapter.collate, tok, world))
    at = quantities(acc)
    rec = {"seed": seed, "label": label, "setting": setting, **run, "acc": acc, "at": at}
    rec["interp"] = interpolate(run["g_prev"], run["g_at"], quantities(acc_prev), at)
    rec["within"] = lp.forgetting_matched(acc["forget"], ref)["within"]
    rec["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(rec, indent=1))
    return rec


# ---------------------------------------------------------------------------------------------
# selection on the validation seeds, summary over the test seeds
# ---------------------------------------------------------------------------------------------


def _runs(out: str, seeds) -> list[dict]:
    recs = []
    for s in seeds:
        d = os.path.join(out, f"seed{s}", "runs")
        for f in sorted(os.listdir(d)) if os.path.isdir(d) else ():
            recs.append(json.loads(open(os.path.join(d, f)).read()))
    return recs


def select(runs: list[dict], labels=tuple(CONFIGS)) -> dict:
    """Per tuned configuration (:data:`TUNED`), the pre-registered choice: the setting reaching
    matched forgetting on the most seeds, then the highest mean interpolated K (over the seeds
    reached); ties → the smaller lr, then frequency 1. Each random control in ``labels`` takes
    its saliency configuration's setting (amendment 1). Returns ``{label: setting}``."""
    frozen = {}
    for label in dict.fromkeys(tuned(lab) for lab in labels):
        cands = []
        for setting in settings_for(label):
            rs = [r for r in runs if r["label"] == label and r["setting"] == setting]
            ok = [r["interp"]["K"] for r in rs if r["reached"]]
            if not rs:
                continue
            lr, f = parse_setting(setting)
            cands.append((-len(ok), -(sum(ok) / len(ok) if ok else -1.0), lr, f, setting))
        if cands:
            frozen[label] = min(cands)[-1]
    for label in labels:
        if tuned(label) in frozen:
            frozen[label] = frozen[tuned(label)]
    return {k: frozen[k] for k in labels if k in frozen}


def t_ci(xs, level: float = 0.95) -> dict:
    """Mean and Student t interval of ``xs`` (a point interval for fewer than two values)."""
    import numpy as np
    from scipy import stats

    x = np.asarray(xs, float)
    m = float(x.mean())
    if x.size < 2:
        return {"mean": m, "lo": m, "hi": m, "n": int(x.size)}
    h = float(stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return {"mean": m, "lo": m - h, "hi": m + h, "n": int(x.size)}


def bca(xs) -> dict:
    from mmunlearn.eval.bootstrap import bootstrap_ci

    c = bootstrap_ci(xs, n_boot=N_BOOT, seed=0, method="BCa")
    return {"mean": c.estimate, "lo": c.lo, "hi": c.hi, "n": c.n}


def versus_random(diffs) -> str:
    """The pre-registered classification of paired K differences (saliency − random)."""
    if len(diffs) < 2:
        return "too few seeds"
    if t_ci(diffs, 0.95)["lo"] > 0:
        return "better than random"
    c90 = t_ci(diffs, 0.90)
    if -MARGIN <= c90["lo"] and c90["hi"] <= MARGIN:
        return "no better than random (equivalent)"
    return "inconclusive"


def summarize(runs: list[dict], vanilla: dict | None = None) -> dict:
    """Per configuration: interpolated F, F_img, F_link, R, K over the seeds where it reached
    matched forgetting (t and BCa intervals); per mask configuration, K − each random control,
    paired by seed, classified by :func:`versus_random`."""
    table = {}
    by = {(r["label"], r["seed"]): r for r in runs if r["reached"]}
    for label in CONFIGS:
        ok = [r for r in runs if r["label"] == label and r["reached"]]
        if not ok:
            continue
        row = {"reached": len(ok), "runs": sum(r["label"] == label for r in runs)}
        for q in ("F", "F_img", "F_link", "R", "K"):
            xs = [r["interp"][q] for r in ok]
            row[q] = {"t": t_ci(xs), "bca": bca(xs) if len(xs) > 1 else None}
        table[label] = row
    versus = {}
    for ms in MASK_SETS:
        for sem in SEMANTICS:
            for ctrl in ("random_tensor", "random_group"):
                a, b = f"{ms}_{sem}_saliency", f"{ms}_{sem}_{ctrl}"
                seeds = sorted(
                    {s for (lab, s) in by if lab == a} & {s for (lab, s) in by if lab == b}
                )
                d = [by[(a, s)]["interp"]["K"] - by[(b, s)]["interp"]["K"] for s in seeds]
                if d:
                    versus[f"{a} vs {ctrl}"] = {"t": t_ci(d), "verdict": versus_random(d)}
    out = {"table": table, "versus_random": versus}
    if vanilla is not None:
        out["criteria"] = criteria(runs, vanilla, versus)
    return out


def _paired(by: dict, a: str, b: str, q: str) -> list[float]:
    seeds = sorted({s for (lab, s) in by if lab == a} & {s for (lab, s) in by if lab == b})
    return [by[(a, s)]["interp"][q] - by[(b, s)]["interp"][q] for s in seeds]


def criteria(runs: list[dict], vanilla: dict, versus: dict) -> dict:
    """The pre-registered criteria (docs/fidelity.md, v2) for every saliency configuration;
    ``vanilla``: ``{seed: quantities}``; ``versus``: :func:`summarize`'s random comparisons.
    A criterion with fewer than :data:`MIN_SEEDS` seeds does not hold."""
    by = {(r["label"], r["seed"]): r for r in runs if r["reached"]}

    def drops(label, q):
        return [vanilla[s][q] - r["interp"][q] for (lab, s), r in by.items() if lab == label]

    premise = {}
    for b in ("ga", "ga_diff", "npo"):
        d = drops(b, "F")
        premise[b] = {"drop_F": t_ci(d) if d else None, "holds": len(d) >= MIN_SEEDS}
        premise[b]["holds"] &= bool(d) and t_ci(d)["mean"] >= PREMISE_DROP
    out = {"premise": premise, "premise_holds": all(v["holds"] for v in premise.values())}
    for ms in MASK_SETS:
        for sem in SEMANTICS:
            x = f"{ms}_{sem}_saliency"
            dF, dR, vs = drops(x, "F"), drops(x, "R"), _paired(by, x, "ga_diff", "F")
            a_ok = len(dF) >= MIN_SEEDS and max(t_ci(dF)["mean"], t_ci(dR)["mean"]) <= KEEP_TOL
            b_ci = t_ci(vs) if vs else None
            b_ok = len(vs) >= MIN_SEEDS and b_ci["mean"] >= BEAT_GA_DIFF and b_ci["lo"] > 0
            c = [versus.get(f"{x} vs {r}", {}) for r in ("random_tensor", "random_group")]
            c_ok = all(v.get("verdict") == "better than random" for v in c)
            c_ok &= all(v.get("t", {}).get("n", 0) >= MIN_SEEDS for v in c)
            out[x] = {
                "A": {"drop_F": t_ci(dF) if dF else None, "drop_R": t_ci(dR) if dR else None},
                "B": {"F_minus_ga_diff": b_ci},
                "holds": {"A": bool(a_ok), "B": bool(b_ok), "C": bool(c_ok)},
            }
    out["D"] = {}
    for other in ("both_ours_saliency", "language_official_saliency"):
        d = _paired(by, "vision_ours_saliency", other, "F")
        ci = t_ci(d) if d else None
        out["D"][other] = {"F_vision_minus": ci, "vision_keeps_more": bool(ci and ci["lo"] > 0)}
    prim = out[PRIMARY]["holds"]
    failed = [k for k, ok in (("premise", out["premise_holds"]), *prim.items()) if not ok]
    if len({r["seed"] for r in runs}) < MIN_SEEDS:  # else a criterion short of seeds fails
        out["verdict"] = f"No verdict: fewer than {MIN_SEEDS} seeds were run."
    elif not any(v["holds"] for v in premise.values()):
        out["verdict"] = "The premise fails for all three baselines: nothing to fix on this model."
    elif not failed:
        out["verdict"] = f"The paper's claim holds here ({PRIMARY}: premise, A, B, C hold)."
    else:
        out["verdict"] = (
            f"The paper's claim does not hold here ({PRIMARY}): {', '.join(failed)} failed."
        )
    return out


def markdown(summary: dict) -> str:
    md = [
        "| config | reached / runs | F | F_img | F_link | R | K |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, t in summary["table"].items():
        cells = [
            f"{t[q]['t']['mean']:.3f} [{t[q]['t']['lo']:.3f}, {t[q]['t']['hi']:.3f}]"
            for q in ("F", "F_img", "F_link", "R", "K")
        ]
        md.append(f"| {label} | {t['reached']} / {t['runs']} | " + " | ".join(cells) + " |")
    md += ["", "Saliency mask vs random (K, paired by seed, 95 % t interval):", ""]
    for k, v in summary["versus_random"].items():
        c = v["t"]
        md.append(f"- {k}: {c['mean']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] → {v['verdict']}")
    crit = summary.get("criteria")
    if crit:
        md += ["", "Criteria (saliency configurations; A, B, C hold?):", ""]
        md += [f"- premise, {b}: {v['holds']}" for b, v in crit["premise"].items()]
        md += [f"- {x}: {crit[x]['holds']}" for x in crit if x.endswith("_saliency")]
        md += ["", f"**Verdict.** {crit['verdict']}"]
    return "\n".join(md) + "\n"


def _vanilla(out: str, seeds) -> dict:
    """``{seed: quantities of the vanilla model}`` of the seeds with a ``seed.json``."""
    out_ = {}
    for s in seeds:
        p = os.path.join(out, f"seed{s}", "seed.json")
        if os.path.exists(p):
            out_[s] = quantities(json.loads(open(p).read())["vanilla"])
    return out_


def cells(args, seeds_ok) -> list[tuple[int, str, str]]:
    """The (seed, config, setting) cells asked for (module docstring)."""
    frozen_path = os.path.join(args.out, "frozen.json")
    frozen = json.loads(open(frozen_path).read()) if os.path.exists(frozen_path) else None
    out = []
    for s in seeds_ok:
        for label in args.configs:
            if args.settings:
                sets = [x for x in args.settings if x in settings_for(label)]
            elif s in VAL_SEEDS:  # amendment 1: the controls are not tuned
                sets = settings_for(label) if label in TUNED else []
            elif frozen is None:
                raise SystemExit(f"seed {s}: no frozen.json under {args.out} (run --select)")
            else:
                sets = [frozen.get(label, frozen.get(tuned(label)))]
            out += [(s, label, x) for x in sets]
    return out


def status(args) -> str:
    """Per seed: phase A done or not (and its seconds), run cells done of those asked for, and
    the seconds they took — what is left of the study, without running anything."""
    lines = []
    for s in args.seeds:
        d = os.path.join(args.out, f"seed{s}")
        rec_path = os.path.join(d, "seed.json")
        if not os.path.exists(rec_path):
            lines.append(f"seed {s}: phase A not done")
            continue
        rec = json.loads(open(rec_path).read())
        gates = "passed" if rec["gates"]["passed"] else "FAILED"
        if not rec["gates"]["passed"] and not rec.get("enforced", True):
            gates = "failed, not enforced"
        head = f"seed {s}: phase A done ({rec['seconds']:.0f} s, gates {gates})"
        try:
            want = cells(args, [s])
        except SystemExit as e:  # a test seed before --select
            lines.append(f"{head}; {e}")
            continue
        done = [os.path.join(d, "runs", f"{lab}@{x}.json") for _, lab, x in want]
        done = [json.loads(open(p).read()) for p in done if os.path.exists(p)]
        secs = sum(r["seconds"] for r in done)
        lines.append(f"{head}; runs {len(done)}/{len(want)} ({secs:.0f} s)")
    return "\n".join(lines)


def _check_profiles(args, recs: dict) -> None:
    """Refuse to mix the study's and the scale check's seeds in one ``--out``."""
    for s, rec in recs.items():
        prof = rec.get("profile", {"scale": False, "fast": False})
        if bool(prof.get("scale")) != args.scale or bool(prof.get("fast")) != args.fast:
            raise SystemExit(
                f"{args.out}/seed{s}: made with scale={prof.get('scale')} "
                f"fast={prof.get('fast')}; this run asks scale={args.scale} fast={args.fast} "
                "(use another --out)"
            )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="experiments/fidelity_v2.py", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=list(TEST_SEEDS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--settings", nargs="+", help="e.g. lr1e-03_f1 (default: module docstring)")
    ap.add_argument("--workers", type=int, default=1, help="processes (one torch thread each)")
    ap.add_argument(
        "--out", help=f"results folder (default {RESULTS}, with --scale {RESULTS}_scale)"
    )
    ap.add_argument("--fast", action="store_true", help="smoke configuration: no result")
    ap.add_argument(
        "--scale", action="store_true", help="the scale check's world and model (SCALE); own --out"
    )
    ap.add_argument("--device", default="cpu", help="torch device of every run (e.g. cuda)")
    ap.add_argument("--select", action="store_true", help="write frozen.json from --seeds")
    ap.add_argument("--summary", action="store_true", help="write summary.{json,md} of --seeds")
    ap.add_argument("--status", action="store_true", help="what is done per seed (runs nothing)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = RESULTS + ("_scale" if args.scale else "")
    os.makedirs(args.out, exist_ok=True)
    if args.select:
        frozen = select(_runs(args.out, args.seeds), args.configs)
        atomic_write_text(os.path.join(args.out, "frozen.json"), json.dumps(frozen, indent=1))
        print(json.dumps(frozen, indent=1))
        return 0
    if args.status:
        print(status(args))
        return 0
    if args.summary:
        summary = summarize(_runs(args.out, args.seeds), _vanilla(args.out, args.seeds))
        atomic_write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1))
        atomic_write_text(os.path.join(args.out, "summary.md"), markdown(summary))
        print(markdown(summary))
        return 0
    t0 = time.time()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        n = len(args.seeds)
        same = [[x] * n for x in (args.fast, args.scale, args.device)]
        recs = dict(zip(args.seeds, pool.map(phase_a, [args.out] * n, args.seeds, *same)))
        _check_profiles(args, recs)
        ok = []
        for s, rec in recs.items():
            passed = rec["gates"]["passed"]
            print(
                f"seed {s}: gates {'passed' if passed else 'FAILED'} ({rec['seconds']} s)",
                flush=True,
            )
            if passed or not rec["enforced"]:
                ok.append(s)
        jobs = cells(args, ok)
        more = (args.fast, args.scale, args.device)
        futs = [pool.submit(phase_b, args.out, s, lab, x, *more) for s, lab, x in jobs]
        for f in futs:
            r = f.result()
            q = r["interp"]
            print(
                f"seed {r['seed']} {r['label']}@{r['setting']}: reached={r['reached']} "
                f"steps={r['steps']} (forget {r['forget_steps']}) F={q['F']:.3f} "
                f"F_img={q['F_img']:.3f} F_link={q['F_link']:.3f} R={q['R']:.3f} "
                f"({r['seconds']} s)",
                flush=True,
            )
    print(f"{time.time() - t0:.0f} s")
    return 0 if len(ok) == len(args.seeds) else 2


if __name__ == "__main__":
    sys.exit(main())
