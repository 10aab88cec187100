"""Soak test of kill-and-requeue: one unlearning run on the tiny model, killed again and again
(SIGKILL at random steps, SIGTERM at others), each time restarted with the same command
(``--resume auto``), must end with the weights and optimizer moments of an uninterrupted run,
bit for bit.

    python tests/soak.py                      # the full run: 1,000 steps, 10 SIGKILL + 5 SIGTERM
    python tests/soak.py --steps 200 --kills 2 --terms 1 --seed 3

The kill points are steps drawn at random (``--seed``); a process is signalled as soon as its
``log.jsonl`` shows that step, so a SIGKILL lands inside whatever comes next (a step, a
checkpoint write, a log row). Checkpoints every ``--checkpoint-every`` steps (default 10: a
SIGKILL loses at most 9 steps of ~25 ms). ``tests/test_soak.py`` runs a short variant in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import mmunlearn_pythonpath

EXIT_PREEMPTED = 75


def command(out: Path, steps: int, every: int) -> list[str]:
    """The unlearning run: the tiny model (no fine-tune), 2 synthetic people, GA_Diff (forget
    and retain steps, every step moves every weight and moment), batches of 1."""
    argv = ["--tiny", "--synthetic", "--people", "2", "--vanilla-steps", "0", "--method",
            "ga_diff", "--batch-size", "1", "--epochs", "1000", "--steps", str(steps),
            "--lr", "1e-4", "--checkpoint-every", str(every), "--resume", "auto"]  # fmt: skip
    return [sys.executable, "-m", "mmunlearn.cli", "unlearn", *argv, "--out", str(out)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": mmunlearn_pythonpath(), "OMP_NUM_THREADS": "1"}


def _log_size(out: Path) -> int:
    try:
        return (out / "run" / "log.jsonl").stat().st_size
    except OSError:
        return 0


def last_logged_step(out: Path, since: int = 0) -> int:
    """The step of the last complete row of ``out/run/log.jsonl`` written after byte ``since``
    (the log is appended to; a resumed run logs its steps again), -1 when none."""
    try:
        with open(out / "run" / "log.jsonl", "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return -1
    for line in reversed(text.splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return -1


def run_until(cmd: list[str], out: Path, step: int | None, sig, timeout: float = 600) -> int:
    """Start ``cmd``; once ``log.jsonl`` shows ``step`` (None: never) send ``sig``. Returns the
    exit status (negative: the signal that ended it)."""
    since = _log_size(out)
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        while p.poll() is None and time.time() - t0 < timeout:
            if step is not None and last_logged_step(out, since) >= step:
                p.send_signal(sig)
                break
            time.sleep(0.005)
        _, err = p.communicate(timeout=timeout)
    except BaseException:
        p.kill()
        p.wait()
        raise
    if p.returncode not in (0, EXIT_PREEMPTED, -signal.SIGKILL):
        raise RuntimeError(f"unexpected exit {p.returncode}: {err.decode()[-2000:]}")
    return p.returncode


def tensors(out: Path) -> dict:
    """The final weights and the final checkpoint's optimizer tensors (moments, step counts)."""
    from safetensors.torch import load_file

    model = load_file(out / "model" / "model.safetensors")
    trainer = load_file(out / "run" / "checkpoint" / "trainer.safetensors")
    optim = {k: v for k, v in trainer.items() if k.startswith("optim.")}
    return {**{f"model.{k}": v for k, v in model.items()}, **optim}


def soak(root: Path, steps: int, kills: int, terms: int, seed: int, every: int = 10) -> dict:
    """The reference run, then the killed-and-requeued one; returns the figures and whether
    every tensor matched."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    ref, cut = root / "reference", root / "soak"
    t0 = time.time()
    assert run_until(command(ref, steps, every), ref, None, None) == 0
    t_ref = time.time() - t0
    rng = random.Random(seed)
    points = sorted(rng.sample(range(1, steps - 1), kills + terms))
    sigs = [signal.SIGKILL] * kills + [signal.SIGTERM] * terms
    rng.shuffle(sigs)
    t0, record = time.time(), []
    for step, sig in zip(points, sigs):
        rc = run_until(command(cut, steps, every), cut, step, sig)
        ckpt = json.loads((cut / "run" / "checkpoint" / "state.json").read_text())["step"]
        record.append({"at step": step, "signal": sig.name, "exit": rc, "checkpoint": ckpt})
        if sig == signal.SIGTERM and rc != EXIT_PREEMPTED:
            raise RuntimeError(f"SIGTERM at step {step}: exit {rc}, expected 75")
    assert run_until(command(cut, steps, every), cut, None, None) == 0
    t_soak = time.time() - t0
    a, b = tensors(ref), tensors(cut)
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    n_moments = sum(1 for k in a if k.endswith(("exp_avg", "exp_avg_sq")))
    return {
        "steps": steps,
        "checkpoint every": every,
        "SIGKILL": kills,
        "SIGTERM": terms,
        "kills": record,
        "reference seconds": round(t_ref, 1),
        "soak seconds": round(t_soak, 1),
        "tensors compared": len(a),
        "moment tensors": n_moments,
        "bit-identical": same,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs (default 10)")
    ap.add_argument("--terms", type=int, default=5, help="SIGTERMs (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--dir", default="runs/soak", help="work folder (default runs/soak)")
    a = ap.parse_args(argv)
    import shutil

    shutil.rmtree(a.dir, ignore_errors=True)
    res = soak(Path(a.dir), a.steps, a.kills, a.terms, a.seed, a.checkpoint_every)
    print(json.dumps(res, indent=1))
    return 0 if res["bit-identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
