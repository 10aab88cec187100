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
