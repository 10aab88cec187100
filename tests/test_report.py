"""Report files: JSON round-trip, the table's shape, a real PNG."""

from __future__ import annotations

import json

from mmunlearn.eval.report import markdown_table, write_report

RES = {
    "methods": {
        "vanilla": {
            "forget": {"vqa_mcq_acc": 1.0, "qa_mcq_acc": 1.0},
            "retain": {"vqa_mcq_acc": 0.95, "qa_mcq_acc": 1.0},
        },
        "mmunlearner": {
            "forget": {"vqa_mcq_acc": 0.1, "qa_mcq_acc": 0.9},
            "retain": {"vqa_mcq_acc": 0.85, "qa_mcq_acc": 0.97},
        },
    },
    "config": {"seed": 0},
}


def test_table_has_paper_shape():
    t = markdown_table(RES).splitlines()
    assert t[0] == "| method | Forget VQA ↓ | Forget QA ↑ | Retain VQA ↑ | Retain QA ↑ |"
    assert t[3] == "| mmunlearner | 0.100 | 0.900 | 0.850 | 0.970 |"


def test_write_report(tmp_path):
    paths = write_report(RES, str(tmp_path))
    assert (
        json.loads(open(paths["json"]).read())["methods"]["vanilla"]["forget"]["vqa_mcq_acc"] == 1.0
    )
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "![trade-off](tradeoff.png)" in open(paths["md"]).read()


def _with_intervals():
    import copy

    from mmunlearn.eval.compare import gap_to_reference, task_intervals

    res = copy.deepcopy(RES)
    items = {
        "vanilla": ([1, 1, 1, 1], [1, 1, 1, 1], [1, 1], [1, 1]),
        "mmunlearner": ([0, 0, 0, 1], [1, 1, 1, 0], [1, 0], [1, 1]),
        "reference": ([0, 1, 0, 0], [1, 1, 1, 1], [1, 1], [1, 0]),
    }
    for name, (fv, fq, rv, rq) in items.items():
        res["methods"][name] = {
            "forget": {"vqa_mcq_acc": sum(fv) / 4, "qa_mcq_acc": sum(fq) / 4},
            "retain": {"vqa_mcq_acc": sum(rv) / 2, "qa_mcq_acc": sum(rq) / 2},
        }
        for sn, key, v in (
            ("forget", "vqa_mcq_acc", fv),
            ("forget", "qa_mcq_acc", fq),
            ("retain", "vqa_mcq_acc", rv),
            ("retain", "qa_mcq_acc", rq),
        ):
            res["methods"][name][sn].setdefault("_items", {})[key] = v
    res["intervals"] = task_intervals(res["methods"], n_boot=50, seed=0)
    res["gap"] = gap_to_reference(res["methods"], n_boot=50)
    res["unlearning"] = {
        "mmunlearner": {"forget_quality": {"estimate": 0.5, "lo": 0.1, "hi": 0.9, "n": 4}}
    }
    return res


def test_table_with_intervals_and_unlearning_metrics(tmp_path):
    from mmunlearn.eval.report import metrics_tables, unlearning_table

    res = _with_intervals()
    t = markdown_table(res).splitlines()
    assert t[0].startswith("| method | Forget VQA ↓ (n=4) | Forget QA ↑ (n=4) | Retain VQA ↑ (n=2)")
    row = res["intervals"]["mmunlearner"]["forget"]["vqa_mcq_acc"]
    assert f"| mmunlearner | 0.250 [{row['lo']:.3f}, {row['hi']:.3f}] |" in t[3]
    u = unlearning_table(res).splitlines()
    assert u[0] == "| method | Forget quality ↑ (n=4) | Avg. gap to reference ↓ |"
    assert u[3].startswith("| mmunlearner | 0.500 [0.100, 0.900] | ")
    assert "_items" not in metrics_tables(res)
    paths = write_report(res, str(tmp_path))
    md = open(paths["md"]).read()
    assert "Closest to the reference: **" in md and "## Unlearning metrics" in md
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    back = json.loads(open(paths["json"]).read())
    assert back["gap"]["closest"] == res["gap"]["closest"]
