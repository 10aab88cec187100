"""``--report-to tensorboard,wandb,mlflow``: a short unlearning run through the CLI, then every
destination read back with its own library's reader and compared with the loop's own
``log.jsonl`` (the oracle): every scalar at its step, the run config, the evaluations' table."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mmunlearn.cli import main

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def expected_scalars(rows: list[dict]) -> dict:
    """``{(tag, step): value}`` the reporters must hold: every number of every ``log.jsonl``
    row but step and epoch, tagged ``<phase>/<name>`` (``lr`` alone)."""
    out = {}
    for r in rows:
        for k, v in r.items():
            if k in ("step", "epoch", "phase") or v is None or isinstance(v, bool):
                continue
            out[(k if k == "lr" else f"{r['phase']}/{k}", r["step"])] = v
    return out


def wandb_records(path: Path):
    """The protobuf records of a W&B ``.wandb`` file (LevelDB log format: a 7-byte file header,
    32 KiB blocks of chunks with a 7-byte header: crc32, length, type 1 full / 2 first /
    3 middle / 4 last), parsed with W&B's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block = path.read_bytes(), 7, b"", 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def read_wandb(run_dir: Path) -> tuple[dict, dict, list]:
    """(scalars {(tag, step): value}, config, table files) of the one offline run there."""
    (run,) = list((run_dir / "wandb").glob("offline-run-*"))
    (store,) = list(run.glob("run-*.wandb"))
    scalars, config = {}, {}
    for rec in wandb_records(store):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                     for i in rec.history.item}  # fmt: skip
            step = items["_step"]
            for k, v in items.items():
                table = k.startswith("evals/")  # the table's own entry (its size, path)
                if not k.startswith("_") and not table and isinstance(v, (int, float)):
                    scalars[(k, step)] = v
        elif kind in ("config", "run"):
            cfg = rec.config if kind == "config" else rec.run.config
            for i in cfg.update:
                config["/".join(i.nested_key) or i.key] = json.loads(i.value_json)
    return scalars, config, list(run.glob("files/media/table/evals_*.table.json"))


def read_tensorboard(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    return {(t, e.step): e.value for t in ea.Tags()["scalars"] for e in ea.Scalars(t)}


def read_mlflow(run_dir: Path) -> tuple[dict, dict, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{run_dir / 'mlruns'}")
    exp = client.get_experiment_by_name("mmunlearn")
    (run,) = client.search_runs([exp.experiment_id])
    scalars = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            scalars[(key, m.step)] = m.value
    arts = [a.path for a in client.list_artifacts(run.info.run_id)]
    return scalars, run.data.params, arts


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for k in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "WANDB_PROJECT",
              "MLFLOW_EXPERIMENT_NAME"):  # fmt: skip
        monkeypatch.delenv(k, raising=False)
    for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(k, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_every_reporter_holds_what_the_loop_logged(tmp_path, offline):
    out = tmp_path / "u"
    argv = ["unlearn", "--tiny", "--synthetic", "--people", "8", "--vanilla-steps", "0"]
    argv += ["--method", "ga_diff", "--steps", "4", "--eval-every", "2", "--eval-items", "2"]
    argv += ["--report-to", "tensorboard,wandb", "--report-to", "mlflow", "--out", str(out)]
    assert main(argv) == 0
    run = out / "run"
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    want = expected_scalars(rows)
    assert {t.split("/")[0] for t, _ in want} >= {"forget", "retain", "eval", "lr"}
    config = json.loads((out / "unlearn.json").read_text())["config"]

    tb = read_tensorboard(run)
    assert set(tb) == set(want)
    assert all(tb[k] == pytest.approx(v, rel=1e-6) for k, v in want.items())  # float32

    wb, wb_config, tables = read_wandb(run)
    assert wb == pytest.approx(want)
    assert {k: wb_config[k] for k in config} == config
    assert wb_config["method"] == "ga_diff"
    (table,) = tables
    data = json.loads(table.read_text())
    evals = [r for r in rows if r["phase"] == "eval"]
    assert [r[data["columns"].index("score")] for r in data["data"]] == [r["score"] for r in evals]

    ml, params, arts = read_mlflow(run)
    assert ml == pytest.approx(want)
    assert params["lr"] == json.dumps(config["lr"]) and params["report_to"] == config["report_to"]
    assert config["report_to"] == "tensorboard,wandb,mlflow"
    assert "evals.json" in arts


def test_report_to_in_a_config_file_as_a_list(tmp_path):
    from mmunlearn.cli import build_parser
    from mmunlearn.cli.common import load_config

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["unlearn"]
    f = tmp_path / "c.yaml"
    f.write_text("report_to: [mlflow, tensorboard]\n")
    assert load_config(str(f), sub)["report_to"] == "mlflow,tensorboard"
    f.write_text("report_to: [mlflow, nowhere]\n")
    with pytest.raises(Exception, match="nowhere"):
        load_config(str(f), sub)


@pytest.mark.parametrize(
    "value, message",
    [("wandbx", "got 'wandbx'"), ("none,wandb", "none together with wandb")],
)
def test_bad_report_to_is_one_line(tmp_path, capsys, value, message):
    argv = ["unlearn", "--tiny", "--synthetic", "--report-to", value, "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--report-to" in err and message in err


def test_missing_library_names_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    argv = ["unlearn", "--tiny", "--synthetic", "--report-to", "wandb", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'mmunlearn[track]'" in err
