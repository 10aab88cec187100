"""Result files of a comparison run: ``results.json``, ``report.md`` and ``tradeoff.png``.

``results = {"methods": {name: {set_name: metrics}}, "config": {...}}`` where the metric keys
come from :func:`mmunlearn.eval.evaluate_set` (``vqa_mcq_acc``, ``qa_mcq_acc``, ...).
The table has the paper's shape: Forget VQA ↓, Forget text QA ↑, Retain VQA ↑, Retain QA ↑.
"""

from __future__ import annotations

import json
import os

COLUMNS = [  # (header, set, metric, better)
    ("Forget VQA ↓", "forget", "vqa_mcq_acc", "low"),
    ("Forget QA ↑", "forget", "qa_mcq_acc", "high"),
    ("Forget VQA, new pictures ↓", "forget_test", "vqa_mcq_acc", "low"),
    ("Forget text-only facts from picture", "forget_link", "vqa_mcq_acc", "low"),
    ("Retain VQA ↑", "retain", "vqa_mcq_acc", "high"),
    ("Retain QA ↑", "retain", "qa_mcq_acc", "high"),
    ("Retain VQA, new pictures ↑", "retain_test", "vqa_mcq_acc", "high"),
]


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _cell(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def markdown_table(results: dict, columns=COLUMNS) -> str:
    """The comparison table (one row per method, in insertion order)."""
    cols = [
        c
        for c in columns
        if any(c[1] in m and c[2] in m[c[1]] for m in results["methods"].values())
    ]
    lines = ["| method | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, sets in results["methods"].items():
        vals = [sets.get(c[1], {}).get(c[2]) for c in cols]
        lines.append(f"| {name} | " + " | ".join(_cell(v) for v in vals) + " |")
    return "\n".join(lines)


def tradeoff_plot(results: dict, path: str) -> bool:
    """Forget-VQA accuracy (x, lower is better) vs forget text-QA accuracy and retain VQA (y);
    returns False when matplotlib is unavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (ykey, yset, ylabel) in zip(
        axes,
        [
            ("qa_mcq_acc", "forget", "forget text-QA acc ↑"),
            ("vqa_mcq_acc", "retain", "retain VQA acc ↑"),
        ],
    ):
        for name, sets in results["methods"].items():
            x = sets.get("forget", {}).get("vqa_mcq_acc")
            y = sets.get(yset, {}).get(ykey)
            if x is None or y is None:
                continue
            ax.scatter([x], [y], s=60)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
        ax.set_xlabel("forget VQA acc ↓ (visual concept forgotten →  left)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    fig.suptitle("Unlearning trade-off: best is top-left")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_report(results: dict, out_dir: str, title: str = "mmunlearn results") -> dict:
    """Write results.json, report.md and tradeoff.png (atomically); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, "results.json"),
        "md": os.path.join(out_dir, "report.md"),
        "png": os.path.join(out_dir, "tradeoff.png"),
    }
    _atomic_write(paths["json"], json.dumps(results, indent=1, default=str))
    cfg = results.get("config", {})
    md = [f"# {title}", "", markdown_table(results), ""]
    if cfg:
        md += ["Configuration:", "", "```json", json.dumps(cfg, indent=1, default=str), "```", ""]
    if tradeoff_plot(results, paths["png"]):
        md += ["![trade-off](tradeoff.png)", ""]
    else:
        paths.pop("png")
    _atomic_write(paths["md"], "\n".join(md))
    return paths
