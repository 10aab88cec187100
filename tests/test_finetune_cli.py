"""``mmunlearn finetune``: the vanilla and reference models from the command line, on inputs in
the real formats (tests/realformat.py) and on the built-in tiny world.

- the training sets: vanilla = every person, reference = without the forget set, per benchmark;
- a real-format LLaVA fine-tuned from the CLI learns its training set (its loss there, measured
  here independently of the run, falls) and the saved folder loads in ``eval``;
- the chain finetune (vanilla) → finetune (reference) → saliency → unlearn → eval --reference;
- preemption + ``--resume auto`` = the uninterrupted run, bit for bit; a resume of another
  training set is refused; the run lock; config typos and bad values as one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from realformat import clear_root, llava_checkpoint, mllmu_root
from safetensors.torch import load_file

from mmunlearn.cli import main

from helpers import mmunlearn_pythonpath

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--tiny", "--synthetic", "--people", "6", "--batch-size", "16", "--lr", "1e-3"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # restored by conftest


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    return {"llava": llava_checkpoint(root / "llava"), "mllmu": mllmu_root(root / "MLLMU-Bench")}


# ------------------------------------------------------------------------------ training sets


def test_the_training_sets_of_each_benchmark(tmp_path):
    from mmunlearn.data.recipe import training_set
    from mmunlearn.data.synthetic import make_benchmark

    m = mllmu_root(tmp_path / "m", n_forget=2, n_people=6)
    van, src = training_set("vanilla", mllmu=m, split=5)
    ref, rsrc = training_set("reference", mllmu=m, split=5)
    assert {s.entity for s in van} == {f"P{i}" for i in range(6)} and len(van) == 12
    assert {s.entity for s in ref} == {f"P{i}" for i in range(2, 6)} and len(ref) == 8
    assert "forget_5 + retain_95" in src and "retain_95" in rsrc
    (m / "ft_Data").mkdir()  # the official fine-tune split, when the root has it, wins
    (m / "ft_Data" / "x.parquet").write_bytes((m / "Full_Set").joinpath(
        "train-00000-of-00001.parquet").read_bytes())  # fmt: skip
    assert training_set("vanilla", mllmu=m)[1] == "MLLMU-Bench ft_Data"

    c = clear_root(tmp_path / "c", n_forget=2, n_people=6)
    van, _ = training_set("vanilla", clear=c, split=5)
    ref, _ = training_set("reference", clear=c, split=5)
    from mmunlearn.data.clear import read_clear

    gone = {s.entity for s in read_clear(c / "forget05")}
    pics = lambda items: {s.entity for s in items if s.image is not None}  # noqa: E731
    texts = lambda items: {s.entity for s in items if s.image is None}  # noqa: E731
    assert len(pics(van)) == 6 and texts(van) == pics(van)
    assert pics(ref) == pics(van) - gone and len(pics(ref)) == 4
    assert texts(ref) == texts(van)  # the forget persons' TOFU text stays

    b = make_benchmark(n_people=6, seed=0)
    van, _ = training_set("vanilla", bench=b)
    ref, _ = training_set("reference", bench=b)
    assert van == b.train
    assert len(ref) == len(van) - len(b.forget_vqa) and not {id(s) for s in b.forget_vqa} & {
        id(s) for s in ref
    }
    with pytest.raises(ValueError, match="vanilla, reference"):
        training_set("everything", bench=b)


# ---------------------------------------------------------------- the real format, end to end


def _answer_ce(model_dir, samples) -> float:
    """Mean answer-token CE of ``samples`` under the checkpoint in ``model_dir`` (the oracle:
    its own forward passes, nothing from the run's log)."""
    from mmunlearn.models import load_checkpoint

    model, ad = load_checkpoint(model_dir)
    with torch.no_grad():
        return float(model(**ad.collate(samples)).loss)


@pytest.fixture(scope="module")
def vanilla(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("vanilla") / "v"
    argv = ["finetune", "--model", str(files["llava"]), "--mllmu", str(files["mllmu"])]
    argv += ["--lr", "5e-3", "--epochs", "12", "--batch-size", "4", "--out", str(out)]
    assert main(argv) == 0
    return out


def test_finetune_learns_its_set_and_the_folder_loads_in_eval(files, vanilla, tmp_path):
    from mmunlearn.data.recipe import training_set

    items, _ = training_set("vanilla", mllmu=files["mllmu"])
    before, after = _answer_ce(files["llava"], items), _answer_ce(vanilla / "model", items)
    assert after < 0.6 * before, (before, after)
    rec = json.loads((vanilla / "finetune.json").read_text())
    assert rec["train_set"] == "vanilla" and rec["data"]["items"] == 12
    assert rec["steps"] == 12 * 3 and rec["config"]["lr"] == 5e-3
    assert "alpha" not in rec["config"] and rec["config"]["recipe"] == "mmunlearn"
    log = [json.loads(x) for x in (vanilla / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(36)) and {r["phase"] for r in log} == {"train"}
    card = (vanilla / "model" / "README.md").read_text()
    assert f'base_model: "{files["llava"]}"' in card and "fine-tuned (vanilla)" in card
    assert rec["data"]["fingerprint"] in card
    for f in ("model.safetensors", "tokenizer.json", "chat_template.jinja", "config.json"):
        assert any(p.name == f for p in (vanilla / "model").iterdir()), f
    ev = tmp_path / "ev"
    argv = ["eval", "--model", str(vanilla / "model"), "--mllmu", str(files["mllmu"])]
    assert main([*argv, "--max-new-tokens", "2", "--n-boot", "10", "--out", str(ev)]) == 0
    assert "Not evaluated yet" not in (vanilla / "model" / "README.md").read_text()


@pytest.mark.slow
def test_vanilla_reference_saliency_unlearn_eval(files, vanilla, tmp_path):
    data = ["--mllmu", str(files["mllmu"]), "--split", "5"]
    ref = tmp_path / "ref"
    argv = ["finetune", "--model", str(files["llava"]), *data, "--train-set", "reference"]
    assert main([*argv, "--lr", "5e-3", "--epochs", "12", "--out", str(ref)]) == 0
    rec = json.loads((ref / "finetune.json").read_text())
    assert rec["train_set"] == "reference" and rec["data"]["items"] == 8
    assert rec["source"] == "MLLMU-Bench retain_95" and rec["split"] == 5
    # the reference never saw the forget people: their answers cost it more than the vanilla
    from mmunlearn.data.mllmu import read_mllmu_split

    forget = read_mllmu_split(files["mllmu"] / "forget_5")
    assert _answer_ce(ref / "model", forget) > _answer_ce(vanilla / "model", forget) + 0.5

    model = ["--model", str(vanilla / "model")]
    sal = tmp_path / "sal"
    assert main(["saliency", *model, *data, "--out", str(sal)]) == 0
    u = tmp_path / "u"
    mask = str(sal / "mask_both.safetensors")
    assert main(["unlearn", *model, *data, "--mask", mask, "--lr", "1e-3", "--out", str(u)]) == 0
    ev = tmp_path / "ev"
    argv = ["eval", *model, "--model", str(u / "model"), "--reference", str(ref / "model")]
    assert main([*argv, *data, "--max-new-tokens", "2", "--n-boot", "20", "--out", str(ev)]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert len(res["methods"]) == 3 and "reference" in res["methods"]
    assert res["gap"]["reference"] == "reference" and len(res["gap"]["methods"]) == 2
    assert {"forget_quality", "privleak"} <= set(next(iter(res["unlearning"].values())))


# -------------------------------------------------------------------- preemption and resume


def _cmd(out: Path, *extra) -> list[str]:
    argv = [*TINY, "--log-every", "1", "--resume", "auto", *extra]
    return [sys.executable, "-m", "mmunlearn.cli", "finetune", *argv, "--out", str(out)]


def _steps_logged(out: Path) -> int:
    log = out / "run" / "log.jsonl"
    return sum(1 for _ in log.open()) if log.exists() else 0


@pytest.mark.slow
def test_sigterm_then_resume_auto_gives_the_uninterrupted_weights(tmp_path):
    env = {**os.environ, "PYTHONPATH": mmunlearn_pythonpath(), "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    r = subprocess.run(_cmd(full), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    total = json.loads((full / "finetune.json").read_text())["steps"]
    assert total == 48  # 768 items, batches of 16, one epoch

    cut = tmp_path / "cut"
    p = subprocess.Popen(_cmd(cut), env=env, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while _steps_logged(cut) < 5 and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 75, err[-2000:]
    line = [x for x in err.splitlines() if "stopped on SIGTERM" in x]
    assert len(line) == 1 and "rerun the same command with --resume" in line[0], err[-2000:]
    state = json.loads((cut / "run" / "checkpoint" / "state.json").read_text())
    assert 5 <= state["step"] < total and not (cut / "model").exists()

    other = subprocess.run(_cmd(cut, "--train-set", "reference"), env=env, capture_output=True,
                           text=True)  # fmt: skip
    errs = [x for x in other.stderr.splitlines() if "error" in x]
    assert other.returncode == 1 and len(errs) == 1 and "train_set" in errs[0], other.stderr

    again = subprocess.run(_cmd(cut), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    a = load_file(full / "model" / "model.safetensors")
    b = load_file(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (cut / "run" / "log.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == list(range(total))


# --------------------------------------------------------------------- the lock, bad inputs


def test_a_live_run_holds_its_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code = (
        "import sys, time; from mmunlearn.runctl import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        rc = main(["finetune", *TINY, "--steps", "1", "--out", str(out)])
        err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
        assert rc == 1 and len(err) == 1, err
        assert err[0].startswith("mmunlearn finetune: error: --out ")
        assert f"another run is using it (pid {holder.pid} on " in err[0]
        assert not (out / "model").exists()
    finally:
        holder.kill()
        holder.wait()


def _fails(argv, capsys, rc: int, *words) -> None:
    assert main(argv) == rc
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x]
    assert len(err) == 1, err
    for w in words:
        assert w in err[0], (w, err[0])


def test_config_typos_and_bad_values_are_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("synthetic: true\ntiny: true\nlearning_rate: 1.0e-3\n")
    _fails(["finetune", "--config", str(cfg), *out], capsys, 2, "learning_rate", "unknown")
    cfg.write_text("synthetic: true\ntiny: true\nlr: -1\n")
    _fails(["finetune", "--config", str(cfg), *out], capsys, 2, str(cfg), "lr", "-1")
    cfg.write_text("synthetic: true\ntiny: true\ntrain_set: everyone\n")
    _fails(["finetune", "--config", str(cfg), *out], capsys, 2, "train_set", "vanilla, reference")
    cfg.write_text("synthetic: true\ntiny: true\nepochs: 1.5\n")
    _fails(["finetune", "--config", str(cfg), *out], capsys, 2, "epochs", "1.5")
    _fails(["finetune", *TINY, "--alpha", "0.5", *out], capsys, 2, "--alpha")  # unlearn's only
    _fails(["finetune", *TINY, "--train-set", "all", *out], capsys, 2, "--train-set")
    _fails(["finetune", "--tiny", "--mllmu", str(tmp_path / "nope"), *out], capsys, 2, "--tiny")
    argv = ["finetune", "--model", "m", "--mllmu", str(tmp_path / "nope"), *out]
    _fails(argv, capsys, 2, "nope")
    _fails(["finetune", *TINY, "--split", "7", "--clear", "x", *out], capsys, 2, "exactly one")
    assert not (tmp_path / "o").exists()


def test_the_shipped_finetune_configs_parse():
    from mmunlearn.cli import _build
    from mmunlearn.cli.common import load_config

    _, commands = _build()
    files = sorted((ROOT / "mmunlearn" / "configs" / "finetune").rglob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        values = load_config(str(f), commands["finetune"])
        assert values["train_set"] in ("vanilla", "reference") and values["model"], f
        assert values.get("mllmu") or values.get("clear"), f


# ------------------------------------------------------------------------------ torchrun


def _launch(out: Path, nproc: int) -> str:
    import socket

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=mmunlearn_pythonpath())
    env.pop("WORLD_SIZE", None)
    cli = ["-m", "mmunlearn.cli", "finetune", *TINY, "--people", "8", "--steps", "2"]
    cli += ["--checkpoint-every", "2", "--out", str(out)]
    cmd = [sys.executable, *cli]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        cmd += ["--master-port", str(port), *cli, "--fsdp"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_torchrun_fsdp2_matches_one_process(tmp_path):
    """2 gloo ranks (FSDP2, each its rows of every global batch) end where 1 process does; the
    model folder is world-size independent, the checkpoint is DCP shards, rank 0 alone writes."""
    stdout = _launch(tmp_path / "two", 2)
    _launch(tmp_path / "one", 1)
    assert stdout.count("wrote") == 1
    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert one.keys() == two.keys()
    # The ranks sum the gradient in another order than one process. Adam divides by
    # sqrt(v) + eps, so an element whose gradient is at rounding-noise size can take a step of
    # a different size (up to lr = 1e-3 per step) from a last-bit difference: allow a few such
    # elements (1 of 451,712 on an AVX-512 Xeon, 0 on an AVX2 EPYC) within 0.1 · lr · steps; a
    # real divergence (a batch row twice, a shard not reduced) moves most elements by ~lr.
    loose, total = 0, 0
    for k in one:
        diff = (two[k] - one[k]).abs()
        assert diff.max() <= 0.1 * 1e-3 * 2, (k, float(diff.max()))
        loose += int((diff > 2e-5 + 1e-4 * one[k].abs()).sum())
        total += diff.numel()
    assert loose <= 1e-4 * total, (loose, total)
    ckpt = tmp_path / "two" / "run" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    assert json.loads((tmp_path / "two" / "finetune.json").read_text())["steps"] == 2
