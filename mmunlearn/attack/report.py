"""Result files of ``mmunlearn attack``: ``attack.json`` (every number with its interval and
``n``), ``attack.md`` (one table per probe, cells ``0.512 [0.431, 0.602]`` as the eval's
tables) and, when matplotlib is there, ``attack.png`` (CKA per layer; accuracy per picture
transform). Written atomically (:mod:`mmunlearn.io`)."""

from __future__ import annotations

import json
import math
import os

from mmunlearn.io import atomic_write, atomic_write_text

NAMES = {"vqa_mcq_acc": "picture questions", "qa_mcq_acc": "questions by name"}


def cell(d: dict | None) -> str:
    """``0.512 [0.431, 0.602]`` of ``{"estimate", "lo", "hi"}``; ``—`` for none / NaN."""
    if not d or d.get("estimate") is None or math.isnan(d["estimate"]):
        return "—"
    return f"{d['estimate']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def _n(*ds) -> str:
    ns = {str(d["n"]) for d in ds if d}
    return f" (n={ns.pop()})" if len(ns) == 1 else ""


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def relearn_md(r: dict) -> list[str]:
    on = "forget" if r["on"] == "forget" else "retain"
    lines = [
        "## Relearning attack",
        "",
        f"Fine-tuned {r['steps']} steps (lr {r['lr']:g}, batch {r['batch_size']}) on {r['k']} "
        f"{on} training items, then scored on the forget items that share no fact with them "
        f"({r['excluded']} left out). Δ = after − before, paired over the same items.",
        "",
    ]
    rows = []
    for key, m in r["metrics"].items():
        rows.append([
            f"forget {NAMES.get(key, key)}{_n(m['before'])}", cell(m.get("vanilla")),
            cell(m["before"]), cell(m["after"]), cell(m["delta"]),
            cell(m.get("after_minus_vanilla")),
        ])  # fmt: skip
    head = ["held-out items", "vanilla", "unlearned", "after relearning", "Δ ↓",
            "after − vanilla"]  # fmt: skip
    return lines + _table(head, rows) + [""]


def images_md(r: dict) -> list[str]:
    lines = [
        "## Rephrased pictures",
        "",
        "Picture questions (MCQ by option likelihood) with the pictures transformed; Δ = "
        "transformed − original for the unlearned model, paired. Forget: the forgetting should "
        "hold (no rise); retain: the control (how much the transform alone costs).",
        "",
    ]
    for side, rows in r.items():
        body = []
        for t, row in rows.items():
            body.append([t, cell(row.get("vanilla")), cell(row["unlearned"]),
                         cell(row.get("delta_vs_original"))])  # fmt: skip
        n = _n(*(row["unlearned"] for row in rows.values()))
        lines += [f"{side.capitalize()} pictures{n}:", ""]
        lines += _table(["picture", "vanilla", "unlearned", "Δ vs original"], body) + [""]
    return lines


def text_md(r: dict) -> list[str]:
    lines = [
        "## Text-only probes",
        "",
        "The people's questions asked by name, no picture (MCQ by option likelihood). For "
        "MMUnlearner's goal (forget the visual concept, keep the facts) the forget row should "
        "stay near the vanilla model's; as a leakage probe it is what is still answered about "
        "a forgotten entity without its picture.",
        "",
    ]
    rows = [[f"{side}{_n(row['unlearned'])}", cell(row.get("vanilla")), cell(row["unlearned"]),
             cell(row.get("delta"))] for side, row in r.items()]  # fmt: skip
    return lines + _table(["people", "vanilla", "unlearned", "unlearned − vanilla"], rows) + [""]


def cka_md(r: dict) -> list[str]:
    n = r.get("n", {})
    lines = [
        "## Per-layer CKA (vanilla vs unlearned)",
        "",
        "Linear CKA (Kornblith et al. 2019) of the two models' block outputs, mean-pooled per "
        f"input, on {n.get('forget', 0)} forget and {n.get('retain', 0)} retain picture "
        "questions; 1 = the same representation up to rotation and scale. Intervals resample "
        "the inputs.",
        "",
    ]
    rows = []
    for layer in r["layers"]:
        f, t = layer.get("forget"), layer.get("retain")
        diff = "—"
        if f and t and not (math.isnan(f["estimate"]) or math.isnan(t["estimate"])):
            diff = f"{f['estimate'] - t['estimate']:+.3f}"
        rows.append([f"`{layer['layer']}`", cell(f), cell(t), diff])
    lines += _table(["layer", "forget", "retain", "forget − retain"], rows) + [""]
    if r.get("skipped"):
        lines += [f"Left out (output not per input): {', '.join(r['skipped'])}.", ""]
    return lines


def markdown(results: dict, title: str = "mmunlearn attack") -> str:
    """The report of :func:`mmunlearn.attack.probes.assemble`'s results (+ ``models``,
    ``config``)."""
    md = [f"# {title}", ""]
    models = results.get("models") or {}
    if models:
        md += [", ".join(f"{k}: `{v}`" for k, v in models.items()), ""]
    for key, fn in (("relearn", relearn_md), ("images", images_md), ("text", text_md),
                    ("cka", cka_md)):  # fmt: skip
        if results.get(key):
            md += fn(results[key])
    boot = results.get("bootstrap") or {}
    if boot:
        md += [
            f"Intervals: {100 * boot['level']:.0f} % {boot['method']} bootstrap "
            f"({boot['n_boot']} draws, seed {boot['seed']}; mmunlearn.eval.bootstrap).",
            "",
        ]
    for note in results.get("notes", []):
        md += [note, ""]
    if results.get("config"):
        md += ["Configuration:", "", "```json", json.dumps(results["config"], indent=1,
               default=str), "```", ""]  # fmt: skip
    return "\n".join(md)


def plot(results: dict, path: str) -> bool:
    """CKA per layer (forget, retain, with interval bands) and forget / retain picture
    accuracy per transform; False when matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cka, images = results.get("cka"), results.get("images")
    panels = [p for p in (cka and cka["layers"] and "cka", images and "images") if p]
    if not panels:
        return False
    fig, axs = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, p in zip(axs[0], panels):
        if p == "cka":
            for side in ("forget", "retain"):
                pts = [(i, lay[side]) for i, lay in enumerate(cka["layers"]) if side in lay]
                xs = [i for i, _ in pts]
                ax.plot(xs, [d["estimate"] for _, d in pts], marker="o", label=side)
                ax.fill_between(xs, [d["lo"] for _, d in pts], [d["hi"] for _, d in pts],
                                alpha=0.2)  # fmt: skip
            ax.set_xlabel("block (vision layers, then decoder layers)")
            ax.set_ylabel("linear CKA, vanilla vs unlearned")
            ax.set_ylim(-0.05, 1.05)
        else:
            for k, (side, rows) in enumerate(images.items()):
                ts = list(rows)
                est = [rows[t]["unlearned"]["estimate"] for t in ts]
                err = [[e - rows[t]["unlearned"]["lo"] for t, e in zip(ts, est)],
                       [rows[t]["unlearned"]["hi"] - e for t, e in zip(ts, est)]]  # fmt: skip
                xs = [i + 0.4 * k for i in range(len(ts))]
                ax.bar(xs, est, width=0.4, yerr=err, capsize=3, label=f"{side} (unlearned)")
                ax.set_xticks([i + 0.2 for i in range(len(ts))], ts, rotation=20)
            ax.set_ylabel("picture-question accuracy")
            ax.set_ylim(0, 1.05)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return True


def write(results: dict, out_dir: str, title: str = "mmunlearn attack") -> dict:
    """``attack.json``, ``attack.md`` (and ``attack.png``) under ``out_dir``; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"attack.{k}") for k in ("json", "md", "png")}
    atomic_write_text(paths["json"], json.dumps(results, indent=1, default=str))
    md = markdown(results, title)
    if plot(results, paths["png"]):
        md += "\n![attack](attack.png)\n"
    else:
        paths.pop("png")
    atomic_write_text(paths["md"], md)
    return paths


__all__ = ["cell", "markdown", "plot", "write"]
