"""``mmunlearn compare`` (mmunlearn.cli.compare): several methods, one model, one data set, one
evaluation.

- on the tiny world (three methods, MMUnlearner among them): a folder per method, the mask
  computed once and used, one report row per method + vanilla + reference;
- a rerun trains nothing (the weights' files untouched, a "skipped" line per method);
- a method folder deleted and then preempted half-way (exit 75) reruns only that method and
  resumes it from its checkpoint;
- a real-format LLaVA checkpoint (tests/realformat.py) on MLLMU-Bench-format files, two methods;
- bad inputs: one line naming the input, exit 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from realformat import llava_checkpoint, mllmu_root
from safetensors.torch import load_file

from mmunlearn.cli import main

SMALL = ["--synthetic", "--people", "6", "--steps", "2", "--lr", "1e-3", "--batch-size", "8"]
EVAL = ["--n-boot", "10", "--max-new-tokens", "2", "--no-progress"]
METHODS = ["ga", "ga_diff", "mmunlearner"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # restored by conftest


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny model fine-tuned without the forget set (a few steps: a row, not a result)."""
    out = tmp_path_factory.mktemp("ref") / "ref"
    argv = ["finetune", "--tiny", "--synthetic", "--people", "6", "--train-set", "reference"]
    assert (
        main([*argv, "--steps", "3", "--lr", "1e-3", "--batch-size", "16", "--out", str(out)]) == 0
    )
    return out / "model"


def _argv(out: Path, reference: Path) -> list[str]:
    return ["compare", "--tiny", "--vanilla-steps", "3", *SMALL, "--methods", ",".join(METHODS),
            "--reference", str(reference), *EVAL, "--out", str(out)]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    assert main(_argv(out, reference)) == 0
    return out


def _weights(out: Path) -> dict[str, int]:
    return {m: (out / m / "model" / "model.safetensors").stat().st_mtime_ns for m in METHODS}


def _trained(err_out: str) -> list[str]:
    return [m for m in METHODS if f"compare: {m} → " in err_out]


def test_three_methods_one_report(tiny_run):
    out = tiny_run
    for m in METHODS:
        rec = json.loads((out / m / "unlearn.json").read_text())
        assert rec["method"] == m and rec["steps"] == 2, m
        assert (out / m / "model" / "model.safetensors").is_file()
    # the mask was computed once, in --out/saliency, and is the one MMUnlearner used
    assert (out / "saliency" / "saliency.json").is_file()
    used = load_file(out / "mmunlearner" / "mask.safetensors")
    made = load_file(out / "saliency" / "mask_both.safetensors")
    assert used.keys() == made.keys() and all(torch.equal(used[k], made[k]) for k in used)
    assert not (out / "ga" / "mask.safetensors").exists()
    res = json.loads((out / "results.json").read_text())
    rows = ["vanilla", *METHODS, "reference"]
    assert list(res["methods"]) == rows
    assert res["models"]["vanilla"] == str(out / "vanilla" / "model")
    assert res["gap"]["reference"] == "reference" and set(res["gap"]["methods"]) == set(rows[:-1])
    report = (out / "report.md").read_text()
    for r in rows:
        assert sum(1 for ln in report.splitlines() if ln.startswith(f"| {r} |")) >= 1, r
    assert "[" in report  # intervals
    assert (out / "tradeoff.png").stat().st_size > 0
    assert json.loads((out / "compare.json").read_text())["methods"] == METHODS


def test_rerun_skips_finished_methods(tiny_run, reference, capsys):
    before = _weights(tiny_run)
    capsys.readouterr()
    assert main(_argv(tiny_run, reference)) == 0
    text = capsys.readouterr().out
    assert _trained(text) == [], text
    for m in METHODS:
        assert f"compare: {m}: {tiny_run / m} is finished (unlearn.json, model); skipped" in text
    assert "compare: saliency: " in text and "reused" in text
    assert _weights(tiny_run) == before


def test_deleted_then_preempted_method_reruns_alone_and_resumes(
    tiny_run, reference, capsys, monkeypatch
):
    from mmunlearn import runctl

    before = _weights(tiny_run)
    shutil.rmtree(tiny_run / "ga_diff")
    # a preemption request after its first step (as SIGTERM would make): exit 75, checkpoint
    monkeypatch.setattr(runctl.Preemption, "requested", lambda self, device=None: True)
    capsys.readouterr()
    assert main(_argv(tiny_run, reference)) == 75
    cap = capsys.readouterr()
    assert _trained(cap.out) == ["ga_diff"], cap.out
    assert "mmunlearn compare: " in cap.err and "--resume" in cap.err
    assert (tiny_run / "ga_diff" / "run" / "checkpoint").is_dir()
    assert not (tiny_run / "ga_diff" / "unlearn.json").exists()
    monkeypatch.undo()
    assert main(_argv(tiny_run, reference)) == 0
    text = capsys.readouterr().out
    assert _trained(text) == ["ga_diff"], text
    log = (tiny_run / "ga_diff" / "run" / "log.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in log if '"step"' in x]
    assert sorted(set(steps)) == [0, 1] and len(steps) == len(set(steps))  # resumed, not redone
    after = _weights(tiny_run)
    assert {m: after[m] for m in ("ga", "mmunlearner")} == {
        m: before[m] for m in ("ga", "mmunlearner")
    }
    assert json.loads((tiny_run / "ga_diff" / "unlearn.json").read_text())["steps"] == 2


def test_real_format_llava_on_mllmu_files(tmp_path):
    ckpt = llava_checkpoint(tmp_path / "llava")
    ref = llava_checkpoint(tmp_path / "ref", seed=1)
    data = mllmu_root(tmp_path / "MLLMU-Bench")
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(ckpt), "--mllmu", str(data), "--split", "5"]
    argv += ["--methods", "ga_diff,mmunlearner", "--reference", str(ref), "--steps", "2"]
    assert main([*argv, "--lr", "1e-3", "--batch-size", "2", *EVAL, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["vanilla", "ga_diff", "mmunlearner", "reference"]
    assert res["models"]["vanilla"] == str(ckpt) and res["_protocol"]["benchmark"] == "MLLMU-Bench"
    assert not (out / "vanilla").exists()  # the given checkpoint is the vanilla model
    for m in ("ga_diff", "mmunlearner"):
        assert (out / m / "model" / "tokenizer.json").is_file(), m
    assert "| reference |" in (out / "report.md").read_text()


def _fails(argv, capsys, *words) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("mmunlearn compare: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], err


def test_bad_inputs_are_one_line(tmp_path, capsys):
    base = ["compare", "--tiny", *SMALL, "--out", str(tmp_path / "o")]
    _fails([*base, "--methods", "ga,gd"], capsys, "--methods", "'gd'", "ga_diff")
    _fails([*base, "--methods", ""], capsys, "--methods", "at least one")
    _fails([*base, "--methods", " , "], capsys, "--methods", "at least one")
    _fails([*base, "--methods", "ga,ga"], capsys, "--methods", "twice")
    f = tmp_path / "file"
    f.write_text("x")
    _fails([*base[:-1], str(f), "--methods", "ga"], capsys, "--out", str(f), "file")
    _fails(["compare", "--tiny", "--mllmu", str(tmp_path), "--methods", "ga",
            "--out", str(tmp_path / "o")], capsys, "--tiny")  # fmt: skip
    _fails([*base, "--methods", "mmunlearner", "--mask", str(tmp_path / "no.safetensors")],
           capsys, "--mask")  # fmt: skip
    _fails([*base, "--methods", "ga", "--reference", str(tmp_path / "nope")], capsys,
           "--reference")  # fmt: skip
    _fails([*base, "--methods", "ga", "--protocol", "clear"], capsys, "--protocol clear")
    _fails([*base, "--methods", "ga", "--n-boot", "0"], capsys, "--n-boot")
    assert not (tmp_path / "o").exists()  # nothing was made


def test_compare_linked_world_reproduces_the_demo_table(tmp_path, monkeypatch, capsys):
    """`compare --world linked` is the demo's comparison kept one folder per method: run in two
    parts (two methods, then a third added: the two are read back, not rerun), its results and
    table are the demo's, number for number; options that do not apply are refused."""
    import mmunlearn.demo_linked as dl

    threads = torch.get_num_threads()
    common = ["--fast", "--world", "linked", "--threads", "1"]
    demo, cmp = tmp_path / "demo", tmp_path / "cmp"
    try:
        argv = ["demo", *common, "--methods", "ga,npo,mmunlearner", "--out", str(demo)]
        assert main(argv) == 0
        argv = ["compare", *common, "--methods", "npo,ga", "--out", str(cmp)]
        assert main(argv) == 0
        ran = []
        real = dl.unlearn_to_match
        monkeypatch.setattr(dl, "unlearn_to_match", lambda m, name, *a, **k: ran.append(name)
                            or real(m, name, *a, **k))  # fmt: skip
        argv = ["compare", *common, "--methods", "ga,npo,mmunlearner", "--out", str(cmp)]
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert ran == ["mmunlearner"]  # ga and npo: finished, read back
    a = json.loads((demo / "results.json").read_text())
    b = json.loads((cmp / "results.json").read_text())
    for key in ("methods", "matched", "gap", "intervals", "gates", "mask_coverage", "closest"):
        assert a[key] == b[key], key
    table = (demo / "report.md").read_text().split("\n\n")
    assert any("| mmunlearner |" in t for t in table)
    assert [t for t in table if "| ga |" in t] == [
        t for t in (cmp / "report.md").read_text().split("\n\n") if "| ga |" in t
    ]
    for name in ("vanilla", "reference", "ga", "npo", "mmunlearner"):
        assert (cmp / name / "model.safetensors").is_file(), name
    # no --methods: the demo's five (the two not run yet are the only ones trained)
    ran.clear()
    try:
        assert main(["compare", *common, "--out", str(cmp)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert sorted(ran) == ["ga_diff", "kl_min"]
    c = json.loads((cmp / "results.json").read_text())
    assert list(c["matched"]) == ["ga", "ga_diff", "kl_min", "npo", "mmunlearner"]
    assert c["matched"]["npo"] == a["matched"]["npo"]
    # another seed on the same folder, options that do not apply, linked-only options
    for argv, word in (
        (["--seed", "3", "--out", str(cmp)], "seed"),
        (["--lr", "1e-4", "--out", str(tmp_path / "x")], "--lr"),
        (["--synthetic", "--out", str(tmp_path / "x")], "--synthetic"),
    ):
        capsys.readouterr()
        assert main(["compare", *common, *argv]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
        assert len(err) == 1 and word in err[0], err
    capsys.readouterr()
    assert main(["compare", "--tiny", "--synthetic", "--fast", "--out", str(tmp_path / "y")]) == 2
    assert "--fast applies to --world linked only" in capsys.readouterr().err
