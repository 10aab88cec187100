"""Out of memory → one line: a real allocation failure under a real address-space limit
(``RLIMIT_AS`` set in the child before it execs Python, so every allocation of the run counts)
in the saliency and unlearning phases exits 1 with one line naming the phase, this run's
estimate and the flags that lower it, no traceback, and the previous files in ``--out`` as
they were. The limit (1.8 GiB) sits between the address-space peak of the whole run with
batches of 6 (1.32 GB measured: imports, 40 people's data, tiny model, Fisher passes) and that
of batches of 2,000 (3.29 GB). The eval phase's forward-only peak is too close to its set-up's
for a limit set before the start, so there the limit is lowered on the running process
(``prlimit``) to its address space at the moment the eval progress bar appears: the next
allocation fails. On the CPU that failure surfaces as oneDNN's "could not create a primitive";
the guard tells it from a shape error by a test allocation. The message's last checkpoint is
tested in-process."""

from __future__ import annotations

import hashlib
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mmunlearn.cli import oom

from helpers import mmunlearn_pythonpath

LIMIT = int(1.8 * 1024**3)
SMALL = ["--tiny", "--synthetic", "--people", "40", "--vanilla-steps", "3"]


def _limited():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}  # fmt: skip


CASES = [
    ("saliency", ["saliency", *SMALL, "--fisher-batch-size", "2000"], "--fisher-batch-size"),
    (
        "unlearning",
        ["unlearn", *SMALL, "--method", "ga_diff", "--batch-size", "2000", "--steps", "2"],
        "--state-dtype bf16",
    ),  # fmt: skip
]


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS as Linux counts it")
@pytest.mark.skipif(
    torch.version.cuda is not None,
    reason="the limit is set for torch's CPU build (a CUDA build maps GBs of libraries at import)",
)
@pytest.mark.parametrize("phase, argv, flag", CASES, ids=[c[0] for c in CASES])
def test_out_of_memory_is_one_line_naming_phase_estimate_and_flags(tmp_path, phase, argv, flag):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.json").write_text('{"a previous run": true}\n')
    before = _snapshot(out)
    env = dict(os.environ, PYTHONPATH=mmunlearn_pythonpath(), OMP_NUM_THREADS="1",
               MALLOC_ARENA_MAX="2")  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "mmunlearn.cli", *argv, "--out", str(out)],
                       env=env, capture_output=True, text=True, preexec_fn=_limited)  # fmt: skip
    lines = [x for x in r.stderr.splitlines() if ": error: " in x]
    assert r.returncode == 1, r.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"out of memory in the {phase} phase" in lines[0], lines[0]
    assert "GiB per rank (mmunlearn estimate" in lines[0] and flag in lines[0], lines[0]
    after = _snapshot(out)  # the previous run's files as they were; at most this run's log
    assert {k: after.get(k) for k in before} == before
    assert set(after) - set(before) <= {"run/log.jsonl"}, sorted(after)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="prlimit and /proc are Linux's")
def test_eval_out_of_memory_under_a_real_limit_is_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.json").write_text('{"a previous run": true}\n')
    before = _snapshot(out)
    env = dict(os.environ, PYTHONPATH=mmunlearn_pythonpath(), OMP_NUM_THREADS="1",
               MALLOC_ARENA_MAX="2")  # fmt: skip
    argv = ["eval", "--tiny", "--synthetic", "--people", "8", "--batch-size", "64"]
    p = subprocess.Popen([sys.executable, "-m", "mmunlearn.cli", *argv, "--out", str(out)],
                         env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)  # fmt: skip
    buf = bytearray()
    reader = threading.Thread(target=lambda: [buf.extend(c) for c in iter(
        lambda: p.stderr.read1(4096), b"")], daemon=True)  # fmt: skip
    reader.start()
    limited, t0 = False, time.time()
    while p.poll() is None and time.time() - t0 < 300:
        if b"eval:   0%" in buf:  # the eval phase has begun: no room left from here on
            status = open(f"/proc/{p.pid}/status").read()
            vm = int(re.search(r"VmSize:\s+(\d+)", status).group(1)) * 1024
            resource.prlimit(p.pid, resource.RLIMIT_AS, (vm, vm))
            limited = True
            break
        time.sleep(0.005)
    p.wait(timeout=300)
    reader.join(timeout=10)
    err = bytes(buf).decode(errors="replace")
    lines = [x for x in err.splitlines() if ": error: " in x]
    assert limited and p.returncode == 1, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "out of memory in the eval phase" in lines[0], lines[0]
    assert "GiB per rank (mmunlearn estimate" in lines[0] and "--batch-size" in lines[0]
    assert _snapshot(out) == before


def test_a_onednn_failure_with_memory_to_spare_is_not_called_out_of_memory():
    with pytest.raises(RuntimeError, match="primitive"), oom.guard("eval", lambda: "x"):
        raise RuntimeError("could not create a primitive")
    assert not oom.starved(RuntimeError("could not create a primitive"))
    assert not oom.starved(ValueError("could not create a primitive"))


def test_guard_passes_other_errors_and_names_the_kept_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not memory"), oom.guard("eval", lambda: "x"):
        raise ValueError("not memory")
    with oom.guard("eval", lambda: "x"):
        pass
    run = tmp_path / "run" / "checkpoint"
    run.mkdir(parents=True)
    (run / "state.json").write_text('{"step": 7}')
    kept = lambda: oom.last_checkpoint(str(tmp_path))  # noqa: E731
    for err in (MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: 9 GB")):
        with pytest.raises(oom.OutOfMemory) as e, oom.guard("unlearning", lambda: "3 GiB", kept):
            raise err
        msg = str(e.value)
        assert "out of memory in the unlearning phase" in msg and "3 GiB" in msg
        assert f"{run} (step 7), is kept" in msg and "--grad-accum" in msg
    assert not oom.is_oom(RuntimeError("shape mismatch"))
