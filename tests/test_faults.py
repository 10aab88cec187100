"""Faults: a process killed (SIGKILL) at every point of a checkpoint write and of the final
model save leaves the last complete checkpoint / model loadable; a full disk (RLIMIT_FSIZE in a
child process) fails the write with a clear error and leaves the previous checkpoint intact;
under torchrun a rank that dies makes the run end with an error in bounded time, not hang.

"Every point": the child process counts the lines it executes in the write path's modules
(mmunlearn/io.py, checkpoint.py, models/loading.py) and kills itself with SIGKILL at line k,
for every k of a full save. Everything else a save runs (safetensors, save_pretrained) writes
into a temporary directory, so the renames — our lines — are the only points where what is on
disk changes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import needs_cpu_fsdp

WATCHED = ("mmunlearn/io.py", "mmunlearn/checkpoint.py", "mmunlearn/models/loading.py")


def _forked(fn, kill_at: int | None, timeout: float = 60.0) -> tuple[int, str]:
    """Run ``fn()`` in a forked child; with ``kill_at`` the child SIGKILLs itself at its
    ``kill_at``-th executed line of :data:`WATCHED`. Returns (how it ended, what it printed):
    ("killed", ""), ("ok", lines counted) or ("error", message)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        count = [0]

        def tracer(frame, event, arg):
            if not frame.f_code.co_filename.endswith(WATCHED):
                return None

            def local(frame, event, arg):
                if event == "line":
                    count[0] += 1
                    if kill_at is not None and count[0] >= kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                return local

            return local

        try:
            sys.settrace(tracer)
            fn()
            sys.settrace(None)
            msg = f"ok {count[0]}"
        except BaseException as e:  # reported to the parent
            sys.settrace(None)
            msg = f"error {type(e).__name__}: {e}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child process hung")
        time.sleep(0.005)
    with os.fdopen(r) as f:
        out = f.read()
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed", out
    kind, _, rest = out.partition(" ")
    return kind, rest


def _trainer(seed: int):
    from mmunlearn.optim import MaskedAdamW

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    opt = MaskedAdamW(model.parameters(), lr=1e-2, backend="torch")
    opt.set_masks({p: torch.rand(p.shape) < 0.5 for p in model.parameters()})
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step(masked=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def test_kill_at_every_point_of_a_checkpoint_write(tmp_path):
    from mmunlearn.checkpoint import Checkpoints
    from mmunlearn.config import RunConfig

    cfg = RunConfig(progress=False)
    out = tmp_path / "run"
    old_model, old_opt, old_sched = _trainer(0)
    Checkpoints(str(out), old_model).save(old_opt, old_sched, 1, [], cfg)
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    new_model, new_opt, new_sched = _trainer(1)

    def save():
        Checkpoints(str(out), new_model).save(new_opt, new_sched, 2, [], cfg)

    kind, n = _forked(save, None)
    assert kind == "ok", n
    total = int(n)
    assert total > 20
    seen = {1: 0, 2: 0}
    for k in range(1, total + 1):
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        for leftover in tmp_path.glob(".run*"):
            shutil.rmtree(leftover, ignore_errors=True)
        kind, msg = _forked(save, k)
        assert kind == "killed", (k, kind, msg)
        model, opt, sched = _trainer(2)
        ckpts = Checkpoints(str(out), model)
        found = ckpts.latest()
        assert found is not None, f"no complete checkpoint after a kill at line {k}"
        step, _ = ckpts.restore(found, opt, sched)
        want = old_model if step == 1 else new_model
        for a, b in zip(model.parameters(), want.parameters()):
            assert torch.equal(a, b), (k, step)
        seen[step] += 1
    assert seen[1] and seen[2], seen  # killed before and after the new one was in place


def test_kill_at_every_point_of_the_final_model_save(tmp_path):
    from realformat import llava_checkpoint

    from mmunlearn.models import load_checkpoint, save_model

    src = llava_checkpoint(tmp_path / "src")
    from mmunlearn.models import load_checkpoint as lc

    model, adapter = lc(src)
    final = tmp_path / "model"
    save_model(model, adapter.processor, final)
    pristine = tmp_path / "pristine"
    shutil.copytree(final, pristine)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def save():
        save_model(model, adapter.processor, final)

    kind, n = _forked(save, None)
    assert kind == "ok", n
    total = int(n)
    for k in range(1, total + 1):
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(pristine, final)
        kind, msg = _forked(save, k)
        assert kind == "killed", (k, kind, msg)
        where = final if (final / "config.json").exists() else final.with_name("model.old")
        m, _ = load_checkpoint(where)  # the old or the new model, whole
        diff = (m.lm_head.weight - model.lm_head.weight).abs().max().item()
        assert diff in (0.0, 1.0) or abs(diff - 1.0) < 1e-6, (k, diff)


def _full_disk(limit: int, fn) -> tuple[str, str]:
    def run():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        fn()

    return _forked(run, None)


def test_full_disk_fails_the_write_clearly_and_keeps_the_previous_checkpoint(tmp_path):
    from mmunlearn.checkpoint import Checkpoints
    from mmunlearn.config import RunConfig

    cfg = RunConfig(progress=False)
    out = tmp_path / "run"
    model, opt, sched = _trainer(0)
    Checkpoints(str(out), model).save(opt, sched, 1, [], cfg)
    before = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    new_model, new_opt, new_sched = _trainer(1)
    kind, msg = _full_disk(
        1000, lambda: Checkpoints(str(out), new_model).save(new_opt, new_sched, 2, [], cfg)
    )
    assert kind == "error" and msg.startswith("OSError"), msg
    assert "File too large" in msg and "checkpoint" in msg, msg
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint")]  # no leftovers
    m, o, s = _trainer(2)
    ckpts = Checkpoints(str(out), m)
    assert ckpts.restore(ckpts.latest(), o, s)[0] == 1


def test_full_disk_through_the_cli_is_one_line_and_keeps_outputs(tmp_path):
    from realformat import llava_checkpoint, mllmu_root

    ck, data = llava_checkpoint(tmp_path / "ck"), mllmu_root(tmp_path / "mllmu")
    out = tmp_path / "sal"
    cmd = [sys.executable, "-m", "mmunlearn.cli", "saliency", "--model", str(ck)]
    cmd += ["--mllmu", str(data), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    probe = [sys.executable, "-c", "import transformers.modeling_utils"]
    if subprocess.run(probe, env=env, capture_output=True, preexec_fn=limit).returncode:
        pytest.skip("this torch writes a file at import (2.6: torch.distributed.nn's template)")
    r = subprocess.run(
        [*cmd, "--gamma", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert r.returncode == 1, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "File too large" in errors[0] and str(out) in errors[0], errors
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


@needs_cpu_fsdp
def test_a_rank_that_dies_ends_the_torchrun_run_in_bounded_time(tmp_path):
    out = tmp_path / "u"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(29500 + os.getpid() % 1000)]
    cmd += ["-m", "mmunlearn.cli", "unlearn", "--tiny", "--synthetic", "--people", "8"]
    cmd += ["--vanilla-steps", "2", "--method", "ga_diff", "--lr", "1e-4", "--fsdp"]
    cmd += ["--batch-size", "2", "--out", str(out)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = out / "run" / "log.jsonl"
        t0 = time.time()
        while not (log.exists() and log.read_text().count("\n") >= 2):
            assert p.poll() is None, p.communicate()[1][-2000:]
            assert time.time() - t0 < 240, "the run did not start"
            time.sleep(0.2)
        ranks = sorted(_children(p.pid))
        assert len(ranks) == 2, ranks
        os.kill(ranks[-1], signal.SIGKILL)
        t_kill = time.time()
        p.wait(timeout=120)
        assert p.returncode != 0
        assert time.time() - t_kill < 120
        state = out / "run" / "checkpoint" / "state.json"
        assert not state.exists() or json.loads(state.read_text())["step"] >= 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
