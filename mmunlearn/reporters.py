"""Where a run's numbers go besides ``log.jsonl``: TensorBoard, Weights & Biases and MLflow,
each through the library's own API behind one small interface (:class:`Reporter`).

Every reporter gets the run's configuration once (:meth:`Reporter.log_config`), every scalar
the loop logs with its step (:meth:`Reporter.log_scalars`; tags as ``forget/loss``,
``retain/grad_norm``, ``eval/score``, ``lr``) and the final table of evaluations if there is
one (:meth:`Reporter.log_table`). Nothing here reaches the network by default: W&B runs in
offline mode unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads the folder later);
MLflow writes a local file store under the run folder unless ``MLFLOW_TRACKING_URI`` is set.
The libraries are optional (``pip install 'mmunlearn[track]'``) and imported only when used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

from mmunlearn.config import report_targets

# reporter → (import name, pip extra that provides it)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
EXTRA = "track"


def check_installed(report_to) -> None:
    """ImportError (one line naming the extra) when a reporter's library is missing."""
    for name in report_targets(report_to):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ImportError(
                f"--report-to {name} needs the {PACKAGES[name]} package: "
                f"pip install 'mmunlearn[{EXTRA}]'"
            )


class Reporter:
    """One destination of a run's numbers."""

    def log_config(self, config: dict) -> None:
        """The run's settings (params / config), once at the start."""

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Scalars of one log point, ``{tag: value}``, at ``step``."""

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        """A table (rows of ``{column: value}``), e.g. the run's evaluations."""

    def close(self) -> None:
        """Flush and finish."""


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def markdown_table(rows: list[dict]) -> str:
    """``rows`` as a Markdown table (numbers as they are)."""
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


class TensorBoard(Reporter):
    """``SummaryWriter`` scalars in ``<dir>/tensorboard``; config and tables as text."""

    def __init__(self, directory: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(directory, "tensorboard"))

    def log_config(self, config: dict) -> None:
        rows = [{"setting": k, "value": json.dumps(v)} for k, v in config.items()]
        self.writer.add_text("config", markdown_table(rows), 0)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        self.writer.add_text(name, markdown_table(rows), step)

    def close(self) -> None:
        self.writer.close()


class WandB(Reporter):
    """A W&B run under ``<dir>/wandb`` (offline unless ``WANDB_MODE`` is set; project from
    ``WANDB_PROJECT``, default ``mmunlearn``)."""

    def __init__(self, directory: str, name: str | None = None):
        import wandb

        os.makedirs(directory, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "mmunlearn"),
            dir=directory,
            name=name,
            mode=None if os.environ.get("WANDB_MODE") else "offline",
            settings=settings,
        )

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        import wandb

        cols = _columns(rows)
        table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
        self.run.log({name: table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow(Reporter):
    """An MLflow run through ``MlflowClient``: ``MLFLOW_TRACKING_URI``, else a file store at
    ``<dir>/mlruns``; experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``mmunlearn``)."""

    def __init__(self, directory: str, name: str | None = None):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = "file:" + os.path.abspath(os.path.join(directory, "mlruns"))
            # MLflow ≥ 3.7 refuses a file store unless asked for one: this is that ask
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mmunlearn")
        exp = self.client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(exp_name)
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
        params = [Param(k, v) for k, v in text.items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        self.client.log_dict(self.run_id, {"columns": _columns(rows), "rows": rows}, f"{name}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_reporters(report_to, directory: str, name: str | None = None) -> list[Reporter]:
    """The reporters named by ``report_to`` (see :func:`mmunlearn.config.report_targets`),
    writing under ``directory``; ImportError naming the extra when a library is missing."""
    check_installed(report_to)
    make = {
        "tensorboard": lambda: TensorBoard(directory),
        "wandb": lambda: WandB(directory, name),
        "mlflow": lambda: MLflow(directory, name),
    }
    out: list[Reporter] = []
    try:
        for n in report_targets(report_to):
            out.append(make[n]())
    except BaseException:
        for r in out:
            r.close()
        raise
    return out


__all__ = ["EXTRA", "MLflow", "Reporter", "TensorBoard", "WandB", "check_installed"]
__all__ += ["markdown_table", "open_reporters"]
