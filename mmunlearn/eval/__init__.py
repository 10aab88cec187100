"""Evaluation: the benchmarks' tasks (MCQ, cloze, generation; CLEAR faces and captions), the
metrics they are scored with, the benchmarks' own protocols (``mllmu_protocol``,
``clear_protocol``), the unlearning metrics of a list of models against a reference
(``likelihood``, ``unlearning``, ``compare``: intervals, :func:`gap_to_reference`), one run's
plan (``suite``) and the result files (results.json, report.md, tradeoff.png)."""

from mmunlearn.eval.compare import gap_to_reference, task_intervals, unlearning_metrics
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
    "gap_to_reference",
    "generate",
    "markdown_table",
    "option_scores",
    "protocol",
    "shuffle_options",
    "task_intervals",
    "unlearning_metrics",
    "write_report",
]
