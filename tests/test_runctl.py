"""Shared clusters: one run per output folder (a live run's lock refuses a second run, a dead
run's lock is taken), and preemption (SIGTERM / SIGUSR1 finish the step, write a checkpoint,
exit 75; the same command with --resume continues to the weights of an uninterrupted run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmunlearn.cli import main
from mmunlearn.runctl import EXIT_PREEMPTED, LOCK_NAME, Preemption, RunLock, RunLockedError

from helpers import mmunlearn_pythonpath

SMALL = ["--tiny", "--synthetic", "--people", "6", "--vanilla-steps", "3"]


def _hold(folder: Path) -> subprocess.Popen:
    """A process holding ``folder``'s lock until killed."""
    code = (
        "import sys, time; from mmunlearn.runctl import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"held"
    return p


def test_a_live_run_holds_its_folder_and_a_dead_one_does_not(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} on "):
            RunLock(out).__enter__()
        rc = main(["unlearn", *SMALL, "--method", "ga", "--steps", "1", "--out", str(out)])
        err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
        assert rc == 1 and len(err) == 1, err
        assert f"another run is using it (pid {holder.pid} on " in err[0] and "started" in err[0]
        assert not (out / "model").exists()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, the kernel drops the lock
        holder.wait()
    assert (out / LOCK_NAME).exists()
    assert main(["unlearn", *SMALL, "--method", "ga", "--steps", "1", "--out", str(out)]) == 0
    assert (out / "model").is_dir() and not (out / LOCK_NAME).exists()


def test_a_failed_run_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "never"
    rc = main(["unlearn", "--tiny", "--mllmu", str(tmp_path / "missing"), "--out", str(out)])
    assert rc == 2 and not out.exists()


def test_preemption_signal_is_a_request_not_a_kill():
    with Preemption() as p:
        assert not p.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.requested() and p.signal == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):  # a second signal means it
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _cmd(out: Path) -> list[str]:
    argv = [*SMALL, "--method", "ga_diff", "--epochs", "30", "--lr", "1e-3", "--log-every", "1"]
    return [sys.executable, "-m", "mmunlearn.cli", "unlearn", *argv, "--resume", "--out", str(out)]


def _steps_logged(out: Path) -> int:
    log = out / "run" / "log.jsonl"
    return sum(1 for _ in log.open()) if log.exists() else 0


def test_sigterm_then_the_same_command_gives_the_uninterrupted_weights(tmp_path):
    env = {**os.environ, "PYTHONPATH": mmunlearn_pythonpath()}
    full = tmp_path / "full"
    assert subprocess.run(_cmd(full), env=env, capture_output=True).returncode == 0
    total = json.loads((full / "unlearn.json").read_text())["steps"]
    assert total >= 30

    cut = tmp_path / "cut"
    p = subprocess.Popen(_cmd(cut), env=env, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while _steps_logged(cut) < 5 and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_PREEMPTED, err[-2000:]
    line = [x for x in err.splitlines() if "stopped on SIGTERM" in x]
    assert len(line) == 1 and "rerun the same command with --resume" in line[0], err[-2000:]
    state = json.loads((cut / "run" / "checkpoint" / "state.json").read_text())
    assert 5 <= state["step"] < total and not (cut / "model").exists()

    again = subprocess.run(_cmd(cut), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    a = load_file(full / "model" / "model.safetensors")
    b = load_file(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
