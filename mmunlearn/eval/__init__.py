"""Evaluation: the benchmarks' tasks (MCQ, cloze, generation; CLEAR faces and captions), the
metrics they are scored with, and the result files (results.json, report.md, tradeoff.png)."""

from mmunlearn.eval.report import markdown_table, write_report
from mmunlearn.eval.tasks import (
    EvalConfig,
    evaluate,
    evaluate_clear,
    evaluate_clear_set,
    evaluate_set,
    generate,
    option_scores,
    protocol,
    shuffle_options,
)

__all__ = [
    "EvalConfig",
    "evaluate",
    "evaluate_clear",
    "evaluate_clear_set",
    "evaluate_set",
    "generate",
    "markdown_table",
    "option_scores",
    "protocol",
    "shuffle_options",
    "write_report",
]
