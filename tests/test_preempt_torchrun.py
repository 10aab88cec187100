"""Preemption under real torchrun (2 gloo ranks, FSDP2), a SIGTERM sent to *one* worker only.
Saliency: every rank stops after the same Fisher batch (the request is all-reduced), each rank
writes its shard's partial sums, and ``--resume`` under torchrun gives the uninterrupted run's
masks and Fishers bit for bit; a resume at another world size is refused in one line. Unlearn:
every rank stops at the same step, the sharded checkpoint is written, and the same command
ends on the uninterrupted run's weights bit for bit."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import mmunlearn_pythonpath

ARGS = ["--tiny", "--synthetic", "--people", "6", "--vanilla-steps", "3",
        "--fisher-batch-size", "6", "--save-fisher", "--resume"]  # fmt: skip
FILES = ["mask_vision.safetensors", "mask_language.safetensors", "mask_both.safetensors",
         "fisher/forget.safetensors", "fisher/vision_preserve.safetensors",
         "fisher/language_preserve.safetensors"]  # fmt: skip

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(out: Path, nproc: int = 2) -> list[str]:
    cli = ["-m", "mmunlearn.cli", "saliency", *ARGS, "--out", str(out)]
    if nproc == 1:
        return [sys.executable, *cli]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    return [*run, "--master-port", str(_port()), *cli, "--fsdp"]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": mmunlearn_pythonpath(), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def _worker(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with ``RANK=rank`` among ``parent``'s children."""
    try:
        kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    for pid in map(int, kids):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def _term_rank1_during(out: Path, fisher_set: str, batches: int) -> str:
    """Run under torchrun; SIGTERM rank 1's worker (only) once rank 0's ``fisher_set`` pass
    shows ``batches`` batches. Returns stdout + stderr."""
    p = subprocess.Popen(_cmd(out), env=_env(), stderr=subprocess.STDOUT, stdout=subprocess.PIPE)
    buf = bytearray()
    reader = threading.Thread(target=lambda: [buf.extend(c) for c in iter(
        lambda: p.stdout.read1(4096), b"")], daemon=True)  # fmt: skip
    reader.start()
    pat = re.compile(rf"fisher\[{fisher_set}\]:[^\r\n]*?\| *(\d+)/".encode())
    t0, sent = time.time(), False
    while p.poll() is None and time.time() - t0 < 300:
        done = [int(m.group(1)) for m in pat.finditer(bytes(buf))]
        pid = _worker(p.pid, 1)
        if done and max(done) >= batches and pid is not None:
            os.kill(pid, signal.SIGTERM)
            sent = True
            break
        time.sleep(0.01)
    p.wait(timeout=300)
    reader.join(timeout=10)
    out_ = bytes(buf).decode(errors="replace")
    assert sent, out_[-3000:]
    return out_


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not sys.platform.startswith("linux"):
        pytest.skip("finds torchrun's workers through /proc")
    root = tmp_path_factory.mktemp("saltr")
    full = root / "full"
    r = subprocess.run(_cmd(full), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    cut = root / "cut"
    log = _term_rank1_during(cut, "vision_preserve", 3)
    import shutil

    shutil.copytree(cut, root / "cut-copy")
    return {"full": full, "cut": cut, "copy": root / "cut-copy", "log": log}


def test_sigterm_to_one_rank_stops_every_rank_and_resume_is_bit_identical(runs):
    cut, log = runs["cut"], runs["log"]
    assert "stopped on SIGTERM after vision_preserve Fisher batch" in log, log[-3000:]
    part = cut / "fisher_partial"
    assert sorted(p.name for p in part.iterdir()) == [
        "state.json", "sums-rank0.safetensors", "sums-rank1.safetensors"]  # fmt: skip
    assert not (cut / "mask_both.safetensors").exists()
    assert not (cut / "fisher_partial.tmp").exists()

    again = subprocess.run(_cmd(cut), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "fisher[forget]" not in again.stderr  # the finished pass is not redone
    assert not part.exists()
    for name in FILES:
        a, b = load_file(runs["full"] / name), load_file(cut / name)
        assert a.keys() == b.keys() and a, name
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_at_another_world_size_is_refused_in_one_line(runs, tmp_path):
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(runs["copy"], cut)
    before = {p.name: p.read_bytes() for p in (cut / "fisher_partial").iterdir()}
    r = subprocess.run(_cmd(cut, nproc=1), env=_env(), capture_output=True, text=True)
    lines = [x for x in r.stderr.splitlines() if ": error: " in x]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "cannot resume" in lines[0] and "world_size" in lines[0], lines[0]
    assert {p.name: p.read_bytes() for p in (cut / "fisher_partial").iterdir()} == before


# ------------------------------------------------------------------------------------------------
# unlearn: the ranks agree on the step (at log points), the sharded checkpoint resumes bit for bit
# ------------------------------------------------------------------------------------------------

UNLEARN = ["--tiny", "--synthetic", "--people", "8", "--vanilla-steps", "3", "--method", "ga_diff",
           "--steps", "24", "--lr", "1e-3", "--log-every", "1", "--resume"]  # fmt: skip


def _unlearn_cmd(out: Path) -> list[str]:
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cli = ["-m", "mmunlearn.cli", "unlearn", *UNLEARN, "--out", str(out), "--fsdp"]
    return [*run, "--master-port", str(_port()), *cli]


def _logged(out: Path) -> int:
    log = out / "run" / "log.jsonl"
    return sum(1 for _ in log.open()) if log.exists() else 0


def test_unlearn_sigterm_to_one_rank_then_the_same_command_gives_the_uninterrupted_weights(
    tmp_path,
):
    env = {**_env(), "TQDM_DISABLE": "1"}
    full = tmp_path / "full"
    r = subprocess.run(_unlearn_cmd(full), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    cut = tmp_path / "cut"
    p = subprocess.Popen(_unlearn_cmd(cut), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)  # fmt: skip
    t0, sent = time.time(), False
    while p.poll() is None and time.time() - t0 < 300:
        pid = _worker(p.pid, 1)
        if _logged(cut) >= 5 and pid is not None:
            os.kill(pid, signal.SIGTERM)
            sent = True
            break
        time.sleep(0.02)
    log, _ = p.communicate(timeout=300)
    assert sent and "stopped on SIGTERM" in log, log[-3000:]
    state = json.loads((cut / "run" / "checkpoint" / "state.json").read_text())
    assert 5 <= state["step"] < 48 and state["world_size"] == 2
    assert not (cut / "model").exists()

    again = subprocess.run(_unlearn_cmd(cut), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    a = load_file(full / "model" / "model.safetensors")
    b = load_file(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
