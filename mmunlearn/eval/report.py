"""Result files of a comparison run: ``results.json``, ``report.md`` and ``tradeoff.png``.

``results = {"methods": {name: {set_name: metrics}}, "config": {...}}`` where the metric keys
come from :func:`mmunlearn.eval.evaluate_set` (``vqa_mcq_acc``, ``qa_mcq_acc``, ...).
The table has the paper's shape: Forget VQA ↓, Forget text QA ↑, Retain VQA ↑, Retain QA ↑
(:data:`COLUMNS`, the demo's); :data:`EVAL_COLUMNS` adds the letter / cloze / ROUGE-L and
celebrity columns of ``mmunlearn eval`` and :data:`CLEAR_COLUMNS` holds the CLEAR keys of
:func:`mmunlearn.eval.evaluate_clear`. A column appears only when some method has its value.
"""

from __future__ import annotations

import json
import os

from mmunlearn.io import atomic_write, atomic_write_text

COLUMNS = [  # (header, set, metric, better)
    ("Forget VQA ↓", "forget", "vqa_mcq_acc", "low"),
    ("Forget QA ↑", "forget", "qa_mcq_acc", "high"),
    ("Forget VQA, new pictures ↓", "forget_test", "vqa_mcq_acc", "low"),
    ("Forget text-only facts from picture", "forget_link", "vqa_mcq_acc", "low"),
    ("Retain VQA ↑", "retain", "vqa_mcq_acc", "high"),
    ("Retain QA ↑", "retain", "qa_mcq_acc", "high"),
    ("Retain VQA, new pictures ↑", "retain_test", "vqa_mcq_acc", "high"),
]


# the demo's second table: cloze (exact answer in the greedy fill) and generation (ROUGE-L F1)
TEXT_TITLE = "Cloze and generation (greedy, 16 new tokens; ROUGE-L F1)"
TEXT_COLUMNS = [
    ("Forget VQA cloze ↓", "forget", "vqa_cloze_acc", "low"),
    ("Forget QA cloze ↑", "forget", "qa_cloze_acc", "high"),
    ("Forget VQA ROUGE-L ↓", "forget", "vqa_rougeL", "low"),
    ("Forget QA ROUGE-L ↑", "forget", "qa_rougeL", "high"),
    ("Retain VQA cloze ↑", "retain", "vqa_cloze_acc", "high"),
    ("Retain QA cloze ↑", "retain", "qa_cloze_acc", "high"),
    ("Retain VQA ROUGE-L ↑", "retain", "vqa_rougeL", "high"),
    ("Retain QA ROUGE-L ↑", "retain", "qa_rougeL", "high"),
]


# ``mmunlearn eval`` on the synthetic benchmark / MLLMU-Bench (MLLMU-style keys)
EVAL_COLUMNS = [
    ("Forget VQA ↓", "forget", "vqa_mcq_acc", "low"),
    ("Forget QA ↑", "forget", "qa_mcq_acc", "high"),
    ("Forget VQA letter ↓", "forget", "vqa_mcq_letter_acc", "low"),
    ("Forget VQA cloze ↓", "forget", "vqa_cloze_acc", "low"),
    ("Forget VQA ROUGE-L ↓", "forget", "vqa_rougeL", "low"),
    ("Forget VQA, new pictures ↓", "forget_test", "vqa_mcq_acc", "low"),
    ("Retain VQA ↑", "retain", "vqa_mcq_acc", "high"),
    ("Retain QA ↑", "retain", "qa_mcq_acc", "high"),
    ("Retain VQA cloze ↑", "retain", "vqa_cloze_acc", "high"),
    ("Retain VQA ROUGE-L ↑", "retain", "vqa_rougeL", "high"),
    ("Retain VQA, new pictures ↑", "retain_test", "vqa_mcq_acc", "high"),
    ("Celebrities VQA ↑", "retain_celebrity", "vqa_mcq_acc", "high"),
    ("Celebrities QA ↑", "retain_celebrity", "qa_mcq_acc", "high"),
]

# ``mmunlearn eval --clear`` (keys of mmunlearn.eval.evaluate_clear)
CLEAR_COLUMNS = [
    ("Forget face ↓", "forget", "face_acc", "low"),
    ("Forget caption ROUGE-L ↓", "forget", "caption_rougeL", "low"),
    ("Retain face ↑", "retain", "face_acc", "high"),
    ("Retain caption ROUGE-L ↑", "retain", "caption_rougeL", "high"),
    ("Real faces ↑", "real_faces", "mcq_acc", "high"),
    ("Real world ↑", "real_world", "mcq_acc", "high"),
]

# trade-off plot axes: x = (set, metric, label), panels = [(set, metric, label), ...]
DEFAULT_AXES = {
    "x": ("forget", "vqa_mcq_acc", "forget VQA acc ↓ (visual concept forgotten →  left)"),
    "panels": [
        ("forget", "qa_mcq_acc", "forget text-QA acc ↑"),
        ("retain", "vqa_mcq_acc", "retain VQA acc ↑"),
    ],
}
CLEAR_AXES = {
    "x": ("forget", "face_acc", "forget face-recognition acc ↓"),
    "panels": [
        ("retain", "face_acc", "retain face-recognition acc ↑"),
        ("retain", "caption_rougeL", "retain caption ROUGE-L ↑"),
    ],
}


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


def metrics_tables(results: dict) -> str:
    """Every metric of every set: one markdown table per set (rows = methods, columns = the
    metric keys in first-seen order, counts ``n_*`` last)."""
    set_names: list[str] = []
    for sets in results["methods"].values():
        set_names += [n for n in sets if n not in set_names and not n.startswith("_")]
    out = []
    for sn in set_names:
        keys: list[str] = []
        for sets in results["methods"].values():
            keys += [k for k in sets.get(sn, {}) if k not in keys]
        keys = [k for k in keys if not k.startswith("n_")] + [k for k in keys if k.startswith("n_")]
        if not keys:
            continue
        out += [f"### {sn}", "", "| method | " + " | ".join(keys) + " |"]
        out.append("|---|" + "---:|" * len(keys))
        for name, sets in results["methods"].items():
            vals = [sets.get(sn, {}).get(k) for k in keys]
            cells = [str(v) if isinstance(v, int) else _cell(v) for v in vals]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def tradeoff_plot(results: dict, path: str, axes: dict | None = None) -> bool:
    """Forget-VQA accuracy (x, lower is better) vs forget text-QA accuracy and retain VQA (y)
    (``axes``: other ``{"x": (set, metric, label), "panels": [(set, metric, label), ...]}``,
    e.g. :data:`CLEAR_AXES`); returns False when matplotlib is unavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    axes = axes or DEFAULT_AXES
    xset, xkey, xlabel = axes["x"]
    panels = axes["panels"]
    fig, axs = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (yset, ykey, ylabel) in zip(axs[0], panels):
        for name, sets in results["methods"].items():
            x = sets.get(xset, {}).get(xkey)
            y = sets.get(yset, {}).get(ykey)
            if x is None or y is None:
                continue
            ax.scatter([x], [y], s=60)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
        ref = results["methods"].get("reference", {}).get(xset, {}).get(xkey)
        if ref is not None:
            ax.axvline(ref, ls="--", lw=1, color="grey")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    if "reference" in results["methods"]:
        fig.suptitle(
            "Unlearning trade-off: best is at the top, on the dashed line (the reference: "
            "trained without the forgotten pictures)",
            fontsize=10,
        )
    else:
        fig.suptitle("Unlearning trade-off: best is top-left")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return True


def write_report(
    results: dict,
    out_dir: str,
    title: str = "mmunlearn results",
    *,
    columns=COLUMNS,
    plot: bool = True,
    axes: dict | None = None,
    details: bool = False,
    extra_tables: list | None = None,
) -> dict:
    """Write results.json, report.md and (``plot``) tradeoff.png atomically; returns their
    paths. ``columns``: the table's columns (:data:`COLUMNS`, :data:`EVAL_COLUMNS`,
    :data:`CLEAR_COLUMNS`); ``axes``: the plot's (:func:`tradeoff_plot`; default: the
    columns' benchmark); ``details``: also every metric of every set
    (:func:`metrics_tables`); ``extra_tables``: ``[(title, columns), ...]`` more tables of
    the same rows after the first (e.g. :data:`TEXT_COLUMNS`)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, "results.json"),
        "md": os.path.join(out_dir, "report.md"),
        "png": os.path.join(out_dir, "tradeoff.png"),
    }
    atomic_write_text(paths["json"], json.dumps(results, indent=1, default=str))
    cfg = results.get("config", {})
    md = [f"# {title}", "", markdown_table(results, columns), ""]
    for title_x, cols_x in extra_tables or ():
        md += [f"## {title_x}", "", markdown_table(results, cols_x), ""]
    md += [line + "\n" for line in results.get("notes", [])]
    proto = results.get("_protocol")
    if proto:
        md += ["Protocol:", "", "```json", json.dumps(proto, indent=1, default=str), "```", ""]
    if details:
        md += ["## Every metric", "", metrics_tables(results), ""]
    if cfg:
        md += ["Configuration:", "", "```json", json.dumps(cfg, indent=1, default=str), "```", ""]
    env = results.get("environment")
    if env:
        md += ["Environment:", "", "```json", json.dumps(env, indent=1, default=str), "```", ""]
    if axes is None and columns is CLEAR_COLUMNS:
        axes = CLEAR_AXES
    if plot and tradeoff_plot(results, paths["png"], axes):
        md += ["![trade-off](tradeoff.png)", ""]
    else:
        paths.pop("png")
    atomic_write_text(paths["md"], "\n".join(md))
    return paths
