"""What a run reports while it runs: the JSON-lines log (``log.jsonl``), TensorBoard scalars,
and the two per-step numbers worth watching besides the loss (the global gradient norm and the
masked fraction of the weights a masked step may move)."""

from __future__ import annotations

import json
import os

import torch

from mmunlearn.distributed import all_reduce_sum_, is_rank0, local, world_size
from mmunlearn.kernels import grad_sq_norm

LOG = "log.jsonl"


class RunLog:
    """The run's JSON-lines log (``output_dir/log.jsonl``, rank 0, appended: a resumed run
    continues it) and, with ``report_to="tensorboard"``, TensorBoard scalars."""

    def __init__(self, output_dir: str | None, report_to: str | None):
        self.path = os.path.join(output_dir, LOG) if (output_dir and is_rank0()) else None
        self.tb = None
        if report_to == "tensorboard" and is_rank0():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(
                    "report_to='tensorboard' needs the tensorboard package "
                    "(pip install tensorboard)"
                ) from e
            self.tb = SummaryWriter(os.path.join(output_dir or ".", "tensorboard"))

    def write(self, row: dict) -> None:
        if self.path is not None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    tag = f"{row.get('phase', 'eval')}/{k}" if k != "lr" else "lr"
                    self.tb.add_scalar(tag, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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


__all__ = ["LOG", "RunLog", "grad_norm", "mask_fraction"]
