"""What a run reports while it runs: the JSON-lines log (``log.jsonl``), the reporters
(TensorBoard, W&B, MLflow: :mod:`mmunlearn.reporters`), and the two per-step numbers worth
watching besides the loss (the global gradient norm and the masked fraction of the weights a
masked step may move)."""

from __future__ import annotations

import json
import os

import torch

from mmunlearn.distributed import all_reduce_sum_, is_rank0, local, world_size
from mmunlearn.kernels import grad_sq_norm

LOG = "log.jsonl"


def scalars_of(row: dict) -> dict[str, float]:
    """The scalars of a ``log.jsonl`` row as reporters get them: every number but ``step`` and
    ``epoch``, tagged ``<phase>/<name>`` (``forget/loss``, ``eval/score``), ``lr`` as is."""
    out = {}
    for k, v in row.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
            out[f"{row.get('phase', 'eval')}/{k}" if k != "lr" else "lr"] = v
    return out


class RunLog:
    """The run's JSON-lines log (``output_dir/log.jsonl``, rank 0, appended: a resumed run
    continues it) and the reporters of ``report_to`` (:mod:`mmunlearn.reporters`: TensorBoard,
    W&B, MLflow; rank 0), which get ``config`` once, every row's scalars and the tables."""

    def __init__(self, output_dir: str | None, report_to: str | None, config: dict | None = None,
                 name: str | None = None):  # fmt: skip
        from mmunlearn.reporters import open_reporters

        self.path = os.path.join(output_dir, LOG) if (output_dir and is_rank0()) else None
        on = report_to if is_rank0() else None
        self.reporters = open_reporters(on, output_dir or ".", name)
        for r in self.reporters:
            r.log_config(config or {})

    def write(self, row: dict) -> None:
        if self.path is not None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        scalars = scalars_of(row)
        for r in self.reporters:
            r.log_scalars(scalars, row["step"])

    def table(self, name: str, rows: list[dict], step: int) -> None:
        """A table of ``rows`` (e.g. the evaluations) to every reporter."""
        for r in self.reporters:
            r.log_table(name, rows, step)

    def close(self) -> None:
        for r in self.reporters:
            r.close()
        self.reporters = []


def grad_norm(params) -> float:
    grads = [local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sq = grad_sq_norm([g.detach() for g in grads]).reshape(1)
    if world_size() > 1:
        all_reduce_sum_(sq)
    return float(sq.sqrt().item())


def mask_fraction(opt) -> float | None:
    """Selected elements over all elements of the masked parameters, over all ranks (None
    without masks)."""
    t = torch.tensor(opt.mask_counts(), dtype=torch.float64)
    if world_size() > 1:
        dev = next(local(p).device for g in opt.param_groups for p in g["params"])
        t = all_reduce_sum_(t.to(dev)).cpu()
    return float(t[0] / t[1]) if t[1] else None


__all__ = ["LOG", "RunLog", "grad_norm", "mask_fraction", "scalars_of"]
