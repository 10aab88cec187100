"""Saliency on a shared cluster: a SIGTERM lets the current Fisher batch finish, the partial
sums are written and the run exits 75; the same command with --resume continues to the masks
and Fishers of an uninterrupted run, bit for bit; a changed setting is refused in one line; a
non-finite Fisher value names its batch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmunlearn.cli import main
from mmunlearn.fisher import FisherInterrupted, NonFiniteFisherError, collect_fisher
from mmunlearn.runctl import EXIT_PREEMPTED

from helpers import mmunlearn_pythonpath

SMALL = ["--tiny", "--synthetic", "--people", "6", "--vanilla-steps", "3"]
ARGS = [*SMALL, "--fisher-batch-size", "6", "--save-fisher", "--resume"]
FILES = [
    "mask_vision.safetensors",
    "mask_language.safetensors",
    "mask_both.safetensors",
    "fisher/forget.safetensors",
    "fisher/vision_preserve.safetensors",
    "fisher/language_preserve.safetensors",
]


def _cmd(out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "mmunlearn.cli", "saliency", *ARGS, *extra, "--out", str(out)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": mmunlearn_pythonpath(), "OMP_NUM_THREADS": "1"}


def _term_during(out: Path, fisher_set: str, batches: int) -> str:
    """Run the command, SIGTERM it once the ``fisher_set`` pass has done ``batches`` batches;
    returns its stderr (the exit status must be 75)."""
    p = subprocess.Popen(_cmd(out), env=_env(), stderr=subprocess.PIPE)
    buf = bytearray()
    reader = threading.Thread(target=lambda: [buf.extend(c) for c in iter(
        lambda: p.stderr.read1(4096), b"")], daemon=True)  # fmt: skip
    reader.start()
    pat = re.compile(rf"fisher\[{fisher_set}\]:[^\r\n]*?\| *(\d+)/".encode())
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 240:
        done = [int(m.group(1)) for m in pat.finditer(bytes(buf))]
        if done and max(done) >= batches:
            p.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    p.wait(timeout=240)
    reader.join(timeout=10)
    err = bytes(buf).decode(errors="replace")
    assert p.returncode == EXIT_PREEMPTED, err[-3000:]
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and a run stopped by SIGTERM in its second Fisher pass (a copy is
    kept before anything resumes it)."""
    root = tmp_path_factory.mktemp("sal")
    full = root / "full"
    r = subprocess.run(_cmd(full), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cut = root / "cut"
    err = _term_during(cut, "vision_preserve", 3)
    import shutil

    shutil.copytree(cut, root / "cut-copy")
    return {"full": full, "cut": cut, "copy": root / "cut-copy", "err": err}


def test_sigterm_then_resume_gives_the_uninterrupted_masks_and_fishers(runs):
    cut, err = runs["cut"], runs["err"]
    line = [x for x in err.splitlines() if "stopped on SIGTERM" in x]
    assert len(line) == 1 and "vision_preserve Fisher batch" in line[0], err[-2000:]
    assert "--resume" in line[0] and "Traceback" not in err
    assert (cut / "fisher_partial" / "state.json").is_file()
    assert not (cut / "mask_both.safetensors").exists()

    again = subprocess.run(_cmd(cut), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "fisher[forget]" not in again.stderr  # resumed: the finished pass is not redone
    assert not (cut / "fisher_partial").exists()
    for name in FILES:
        a, b = load_file(runs["full"] / name), load_file(cut / name)
        assert a.keys() == b.keys() and a, name
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize(
    "extra, word",
    [
        (["--fisher-batch-size", "5"], "fisher_batch_size"),
        (["--seed", "4"], "seed"),
        (["--people", "7"], "people"),
        (["--fisher-loss-tokens", "all"], "fisher_loss_tokens"),
    ],
    ids=["fisher-batch-size", "seed", "people", "fisher-loss-tokens"],
)
def test_resume_with_changed_settings_is_refused_in_one_line(runs, tmp_path, capsys, extra, word):
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(runs["copy"], cut)
    before = {p: p.read_bytes() for p in (cut / "fisher_partial").iterdir()}
    rc = main(["saliency", *ARGS, *extra, "--out", str(cut)])  # the last value wins
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if ": error: " in x]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "cannot resume" in lines[0] and word in lines[0], lines[0]
    assert {p: p.read_bytes() for p in (cut / "fisher_partial").iterdir()} == before


# ------------------------------------------------------------------------------------------------
# the Python API: stop / resume bit for bit, a non-finite value names its batch
# ------------------------------------------------------------------------------------------------


def _tiny_fisher_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    batches = [{"x": torch.randn(4, 6), "y": torch.randint(0, 3, (4,))} for _ in range(7)]

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b["x"]), b["y"])

    return model, batches, loss_fn


@pytest.mark.parametrize("stop_after", [1, 3, 6])
def test_collect_fisher_stops_and_resumes_bit_for_bit(stop_after):
    model, batches, loss_fn = _tiny_fisher_setup()
    full = collect_fisher(model, batches, loss_fn=loss_fn, progress=False)
    seen = [0]

    def stop():
        seen[0] += 1
        return seen[0] == stop_after

    with pytest.raises(FisherInterrupted) as e:
        collect_fisher(model, batches, loss_fn=loss_fn, progress=False, stop=stop)
    assert e.value.done == stop_after and e.value.total == len(batches)
    sums = {k: v.clone() for k, v in e.value.sums.items()}
    got = collect_fisher(model, batches, loss_fn=loss_fn, progress=False, start=stop_after,
                         sums=sums)  # fmt: skip
    assert full.keys() == got.keys() and all(torch.equal(full[k], got[k]) for k in full)


def test_resume_sums_of_the_wrong_shape_are_refused():
    model, batches, loss_fn = _tiny_fisher_setup()
    sums = {n: torch.zeros(2) for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="partial sums of '0.weight'"):
        collect_fisher(model, batches, loss_fn=loss_fn, progress=False, start=2, sums=sums)


def test_a_non_finite_fisher_value_names_its_batch():
    model, batches, loss_fn = _tiny_fisher_setup()

    def bad(m, b):
        loss = loss_fn(m, b)
        return loss * float("inf") if b is batches[4] else loss

    with pytest.raises(NonFiniteFisherError, match=r"forget Fisher batch 4 \(0-based\) of 7"):
        collect_fisher(model, batches, loss_fn=bad, progress=False, name="forget")
