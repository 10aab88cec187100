"""Result files of a comparison run: ``results.json``, ``report.md`` and ``tradeoff.png``.

``results = {"methods": {name: {set_name: metrics}}, "config": {...}}`` where the metric keys
come from :func:`mmunlearn.eval.evaluate_set` (``vqa_mcq_acc``, ``qa_mcq_acc``, ...).
The table has the paper's shape: Forget VQA ↓, Forget text QA ↑, Retain VQA ↑, Retain QA ↑
(:data:`COLUMNS`, the demo's); :data:`EVAL_COLUMNS` adds the letter / cloze / ROUGE-L and
celebrity columns of ``mmunlearn eval`` and :data:`CLEAR_COLUMNS` holds the CLEAR keys of
:func:`mmunlearn.eval.evaluate_clear`; :data:`MLLMU_VQA_COLUMNS` / :data:`MLLMU_QA_COLUMNS` and
:data:`CLEAR_PROTOCOL_COLUMNS` are the layouts of the benchmarks' own protocols
(``--protocol mllmu|clear``). A column appears only when some method has its value.

With ``results["intervals"]`` (:func:`mmunlearn.eval.compare.task_intervals`) every cell shows its
bootstrap interval and every header its ``n``; ``results["unlearning"]`` and ``results["gap"]``
add the unlearning-metrics table (:data:`UNLEARNING_COLUMNS`) and the average gap to the
reference; the plot draws the intervals as error bars and marks the reference.
"""

from __future__ import annotations

import json
import math
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


# ``--protocol mllmu``: the MMUnlearner paper's main-table layout, one table per question kind:
# Forget / Test (forget people, other pictures) / Retain / Real celebrity × classification
# (generated letter), generation ROUGE-L, cloze
def _mllmu_columns(kind: str, forget_better: str) -> list:
    cols = []
    for title, sn, better in (
        ("Forget", "forget", forget_better),
        ("Test", "forget_test", forget_better),
        ("Retain", "retain", "high"),
        ("Celebrity", "retain_celebrity", "high"),
    ):
        arrow = "↓" if better == "low" else "↑"
        cols += [
            (f"{title} cls {arrow}", sn, f"{kind}_mcq_letter_acc", better),
            (f"{title} ROUGE-L {arrow}", sn, f"{kind}_rougeL", better),
            (f"{title} cloze {arrow}", sn, f"{kind}_cloze_acc", better),
        ]
    return cols


MLLMU_VQA_COLUMNS = _mllmu_columns("vqa", "low")
# text QA of the forget people: MMUnlearner keeps it (↑); the MLLMU paper reports it ↓
MLLMU_QA_COLUMNS = _mllmu_columns("qa", "high")

# ``--protocol clear``: CLEAR's own table (calculate_metrics.py names), per task
CLEAR_PROTOCOL_COLUMNS = [
    ("Forget ROUGE ↓", "forget", "rougeL_recall", "low"),
    ("Forget Prob. ↓", "forget", "prob", "low"),
    ("Forget TR ↑", "forget", "truth_ratio", "high"),
    ("Forget FaceRec Prob. ↓", "forget_facerec", "prob", "low"),
    ("Retain ROUGE ↑", "retain", "rougeL_recall", "high"),
    ("Retain Prob. ↑", "retain", "prob", "high"),
    ("Retain TR ↑", "retain", "truth_ratio", "high"),
    ("Retain FaceRec Prob. ↑", "retain_facerec", "prob", "high"),
    ("Real Faces Prob. ↑", "real_faces", "prob", "high"),
    ("Real World Prob. ↑", "real_world", "prob", "high"),
]

# the unlearning metrics (mmunlearn.eval.compare.unlearning_metrics): (header, key)
UNLEARNING_COLUMNS = [
    ("Forget TR ↑", "forget_truth_ratio"),
    ("Forget quality ↑", "forget_quality"),
    ("Model utility ↑", "model_utility"),
    ("Retain TR ↑", "retain_truth_ratio"),
    ("MIA loss AUC", "mia_loss_auc"),
    ("MIA zlib AUC", "mia_zlib_auc"),
    ("MIA min-k AUC", "mia_min_k_auc"),
    ("PrivLeak % (→0)", "privleak"),
]

# trade-off plot axes: x = (set, metric, label), panels = [(set, metric, label), ...]
DEFAULT_AXES = {
    "x": ("forget", "vqa_mcq_acc", "forget VQA acc ↓ (visual concept forgotten →  left)"),
    "panels": [
        ("forget", "qa_mcq_acc", "forget text-QA acc ↑"),
        ("retain", "vqa_mcq_acc", "retain VQA acc ↑"),
    ],
}
MLLMU_AXES = {
    "x": ("forget", "vqa_mcq_letter_acc", "forget VQA accuracy (generated letter) ↓"),
    "panels": [
        ("forget", "qa_mcq_letter_acc", "forget text-QA accuracy ↑"),
        ("retain", "vqa_mcq_letter_acc", "retain VQA accuracy ↑"),
    ],
}
CLEAR_PROTOCOL_AXES = {
    "x": ("forget_facerec", "prob", "forget face recognition Prob. ↓"),
    "panels": [
        ("retain_facerec", "prob", "retain face recognition Prob. ↑"),
        ("real_faces", "prob", "real faces Prob. ↑"),
    ],
}
CLEAR_AXES = {
    "x": ("forget", "face_acc", "forget face-recognition acc ↓"),
    "panels": [
        ("retain", "face_acc", "retain face-recognition acc ↑"),
        ("retain", "caption_rougeL", "retain caption ROUGE-L ↑"),
    ],
}


def _num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.3f}"


def _cell(v, ci: dict | None = None) -> str:
    """``0.512`` or, with an interval, ``0.512 [0.431, 0.602]``."""
    if v is None:
        return "—"
    if not ci:
        return _num(v)
    return f"{_num(v)} [{_num(ci['lo'])}, {_num(ci['hi'])}]"


def _n_text(n) -> str:
    if isinstance(n, (list, tuple)):
        return "/".join(str(x) for x in n)
    if isinstance(n, dict):
        return f"{len(n)} inputs"
    return str(n)


def _with_n(header: str, cis: list) -> str:
    """``header (n=25)`` when every method's interval has the same ``n``."""
    ns = {_n_text(c["n"]) for c in cis if c}
    return f"{header} (n={ns.pop()})" if len(ns) == 1 else header


def markdown_table(results: dict, columns=COLUMNS) -> str:
    """The comparison table (one row per method, in insertion order); with
    ``results["intervals"]`` each cell carries its interval and each header its ``n``."""
    cols = [
        c
        for c in columns
        if any(c[1] in m and c[2] in m[c[1]] for m in results["methods"].values())
    ]
    iv = results.get("intervals") or {}

    def ci(name, c):
        return iv.get(name, {}).get(c[1], {}).get(c[2])

    heads = [_with_n(c[0], [ci(n, c) for n in results["methods"]]) if iv else c[0] for c in cols]
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(cols)]
    for name, sets in results["methods"].items():
        cells = [_cell(sets.get(c[1], {}).get(c[2]), ci(name, c)) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unlearning_table(results: dict) -> str:
    """The unlearning metrics of every model (``results["unlearning"]``), each with its
    interval, and the average gap to the reference (``results["gap"]``) as the last column;
    ``""`` when there are none."""
    unl = results.get("unlearning") or {}
    gap = (results.get("gap") or {}).get("methods", {})
    names = list(results.get("methods") or unl)
    cols = [c for c in UNLEARNING_COLUMNS if any(c[1] in unl.get(n, {}) for n in names)]
    if not cols and not gap:
        return ""
    heads = [_with_n(h, [unl.get(n, {}).get(k) for n in names]) for h, k in cols]
    if gap:
        heads.append("Avg. gap to reference ↓")
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for n in names:
        cells = []
        for _, k in cols:
            d = unl.get(n, {}).get(k)
            cells.append(_cell(d["estimate"], d) if d else "—")
        if gap:
            d = gap.get(n, {}).get("avg_gap")
            cells.append(_cell(d["estimate"], d) if d else "—")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_lines(gap: dict) -> list[str]:
    """Markdown lines naming the gap's metrics, reference, interval level and the closest
    method (with the share of bootstrap draws in which it is closest)."""
    if not gap:
        return []
    best = gap["closest"]
    share = gap.get("closest_share", {}).get(best)
    d = gap["methods"][best]["avg_gap"]
    keys = ", ".join(f"{k} (n={gap['n'][k]})" for k in gap["keys"])
    return [
        f"Avg. gap = mean |method − {gap['reference']}| over {keys}; "
        f"{100 * gap['level']:.0f} % bootstrap intervals, {gap['n_boot']} draws, seed "
        f"{gap['seed']}.",
        "",
        f"Closest to the reference: **{best}** ({_cell(d['estimate'], d)}"
        + (f"; closest in {100 * share:.0f} % of the draws" if share is not None else "")
        + ").",
        "",
    ]


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
        keys = [k for k in keys if not k.startswith("_")]
        keys = [k for k in keys if not k.startswith("n_")] + [k for k in keys if k.startswith("n_")]
        if not keys:
            continue
        out += [f"### {sn}", "", "| method | " + " | ".join(keys) + " |"]
        out.append("|---|" + "---:|" * len(keys))
        for name, sets in results["methods"].items():
            vals = [sets.get(sn, {}).get(k) for k in keys]
            cells = [
                str(v) if isinstance(v, int) else _cell(v) if not isinstance(v, dict) else "…"
                for v in vals
            ]
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
    iv = results.get("intervals") or {}

    def err(name, sn, key, v):
        d = iv.get(name, {}).get(sn, {}).get(key)
        return None if not d else [[max(0.0, v - d["lo"])], [max(0.0, d["hi"] - v)]]

    for ax, (yset, ykey, ylabel) in zip(axs[0], panels):
        for name, sets in results["methods"].items():
            x = sets.get(xset, {}).get(xkey)
            y = sets.get(yset, {}).get(ykey)
            if x is None or y is None:
                continue
            is_ref = name == "reference"
            ax.errorbar(
                [x],
                [y],
                xerr=err(name, xset, xkey, x),
                yerr=err(name, yset, ykey, y),
                fmt="*" if is_ref else "o",
                ms=14 if is_ref else 7,
                color="black" if is_ref else None,
                elinewidth=1,
                capsize=3,
            )
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
        refs = results["methods"].get("reference", {})
        ref = refs.get(xset, {}).get(xkey)
        if ref is not None:
            ax.axvline(ref, ls="--", lw=1, color="grey")
        ref_y = refs.get(yset, {}).get(ykey)
        if ref_y is not None:
            ax.axhline(ref_y, ls=":", lw=1, color="grey")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    if "reference" in results["methods"]:
        fig.suptitle(
            "Unlearning trade-off: best is at the top, on the dashed line\n(the reference ★: "
            "trained without the forgotten pictures; bars: bootstrap 95 % intervals)"
            if iv
            else "Unlearning trade-off: best is at the top, on the dashed line (the reference: "
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
    unl = unlearning_table(results)
    if unl:
        md += ["## Unlearning metrics", "", unl, ""]
        mu = next(
            (u["model_utility"] for u in results["unlearning"].values() if "model_utility" in u),
            None,
        )
        if mu and isinstance(mu.get("n"), dict):
            parts = ", ".join(f"{k} (n={v})" for k, v in mu["n"].items())
            md += [f"Model utility = harmonic mean of {parts}.", ""]
    if results.get("lmms"):
        from mmunlearn.eval.lmms import lmms_table

        lm = results["lmms"]
        md += ["## lmms-eval tasks", "", lmms_table(results), "",
               f"lmms-eval {lm.get('lmms_eval')}; {lm.get('generation')}; loglikelihood: "
               f"{lm.get('loglikelihood')}.", ""]  # fmt: skip
    md += gap_lines(results.get("gap") or {})
    if results.get("intervals") or unl:
        boot = results.get("bootstrap") or {}
        md += [
            f"Intervals: {boot.get('method', 'percentile')} bootstrap over items"
            + (f" ({boot.get('n_boot')} draws, seed {boot.get('seed')})" if boot else "")
            + "; n = items per column (MIA: forget/holdout).",
            "",
        ]
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
    if axes is None:
        axes = {
            id(CLEAR_COLUMNS): CLEAR_AXES,
            id(MLLMU_VQA_COLUMNS): MLLMU_AXES,
            id(CLEAR_PROTOCOL_COLUMNS): CLEAR_PROTOCOL_AXES,
        }.get(id(columns))
    if plot and tradeoff_plot(results, paths["png"], axes):
        md += ["![trade-off](tradeoff.png)", ""]
    else:
        paths.pop("png")
    atomic_write_text(paths["md"], "\n".join(md))
    return paths
