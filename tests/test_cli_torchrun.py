"""The CLI launched by real torchrun on 2 gloo ranks (FSDP2) against the same command in one
process: the model directory, the mask file and the checkpoint are world-size independent."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import needs_cpu_fsdp

ARGS = ["--tiny", "--synthetic", "--people", "8", "--vanilla-steps", "5", "--steps", "2"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out, nproc: int, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env.pop("WORLD_SIZE", None)
    cli = ["-m", "mmunlearn.cli", "unlearn", *ARGS, "--checkpoint-every", "2", "--out", str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        cmd += ["--master-port", str(_port()), *cli, "--fsdp", *extra]
    else:
        cmd = [sys.executable, *cli, *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    out2 = _run(tmp / "two", 2)
    _run(tmp / "one", 1)
    return tmp, out2


@needs_cpu_fsdp
def test_torchrun_writes_world_size_independent_files(runs):
    tmp, stdout = runs
    assert stdout.count("wrote") == 1, "only rank 0 reports"
    one = load_file(tmp / "one" / "model" / "model.safetensors")
    two = load_file(tmp / "two" / "model" / "model.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-5, msg=k)
    m1 = load_file(tmp / "one" / "mask.safetensors")
    m2 = load_file(tmp / "two" / "mask.safetensors")
    differing = sum(int((m1[k] != m2[k]).sum()) for k in m1)  # bytes with a flipped bit
    total = sum(m.numel() for m in m1.values())
    assert differing <= total * 1e-4, (differing, total)
    import json

    cfg = json.loads((tmp / "two" / "model" / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    ckpt = tmp / "two" / "run" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2


@needs_cpu_fsdp
def test_torchrun_resume_of_a_finished_run_changes_nothing(runs):
    tmp, _ = runs
    before = load_file(tmp / "two" / "model" / "model.safetensors")
    _run(tmp / "two", 2, "--resume", "--mask", str(tmp / "two" / "mask.safetensors"))
    after = load_file(tmp / "two" / "model" / "model.safetensors")
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_fsdp_flag_without_torchrun_is_a_clear_error(tmp_path):
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmunlearn.cli",
            "saliency",
            *ARGS[:-2],
            "--fsdp",
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "torchrun" in r.stderr


def _demo(out, nproc: int):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env.pop("WORLD_SIZE", None)
    cli = ["-m", "mmunlearn.cli", "demo", "--fast", "--threads", "1", "--out", str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        cmd += ["--master-port", str(_port()), *cli, "--fsdp"]
    else:
        cmd = [sys.executable, *cli]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@needs_cpu_fsdp
def test_demo_under_torchrun_matches_one_process(tmp_path):
    """`mmunlearn demo` on 2 FSDP2 ranks: every model (vanilla fine-tune, five methods, the
    reference) trained sharded on the same global batches ends within float-reduction-order
    tolerance of the 1-process demo; rank 0 alone evaluates and writes."""
    import json

    from mmunlearn.methods import PAPER_METHODS as METHODS

    stdout = _demo(tmp_path / "two", 2)
    _demo(tmp_path / "one", 1)
    assert stdout.count("wrote") == 1, "only rank 0 reports"
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert r2["environment"]["world_size"] == 2 and r1["environment"]["world_size"] == 1
    assert r2["methods"].keys() == r1["methods"].keys() == {"vanilla", *METHODS, "reference"}
    m1 = load_file(tmp_path / "one" / "mask_both.safetensors")
    m2 = load_file(tmp_path / "two" / "mask_both.safetensors")
    differing = sum(int((m1[k] != m2[k]).sum()) for k in m1)  # packed bytes
    assert differing <= sum(m.numel() for m in m1.values()) * 1e-3, differing
    for name in r1["methods"]:
        one = load_file(tmp_path / "one" / name / "model.safetensors")
        two = load_file(tmp_path / "two" / name / "model.safetensors")
        assert one.keys() == two.keys()
        beyond = {k: int(((two[k] - one[k]).abs() > 1e-4 + 1e-3 * one[k].abs()).sum()) for k in one}
        # a Fisher ratio within reduction-order noise of γ flips its mask bit between the runs
        # (one bit of 50,912 on an AVX2 EPYC): MMUnlearner may then move that element, and only
        # such elements, differently; every other model and element stays within tolerance
        allowed = 8 * differing if name == "mmunlearner" else 0
        assert sum(beyond.values()) <= allowed, (name, {k: v for k, v in beyond.items() if v})
