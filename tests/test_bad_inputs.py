"""Bad input through the CLI and the Python API: every file kind the product reads (parquet,
images, model weights, configs, processors / tokenizers, masks, Fisher files, checkpoints, YAML)
and every option. Each case asserts the exit code (2: usage, 1: runtime failure), one error line
naming the input, no traceback, and that the existing outputs in ``--out`` are untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from realformat import SHARD, clear_root, llava_checkpoint, mllmu_root, write_parquet

from mmunlearn.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def F(tmp_path_factory):
    """Good inputs, built once: a checkpoint, both benchmarks, a mask, a Fisher file, a
    finished run, and an ``out`` directory holding a previous run's files."""
    root = tmp_path_factory.mktemp("bad")
    f = {
        "root": root,
        "llava": llava_checkpoint(root / "llava"),
        "mllmu": mllmu_root(root / "MLLMU-Bench"),
        "clear": clear_root(root / "CLEAR"),
    }
    sal = root / "sal"
    base = ["--model", str(f["llava"]), "--mllmu", str(f["mllmu"])]
    assert main(["saliency", *base, "--save-fisher", "--out", str(sal)]) == 0
    f["mask"] = sal / "mask_both.safetensors"
    f["fisher"] = sal / "fisher" / "forget.safetensors"
    run = root / "run"
    argv = ["unlearn", *base, "--mask", str(f["mask"]), "--lr", "1e-3", "--out", str(run)]
    assert main([*argv, "--steps", "2", "--checkpoint-every", "1"]) == 0
    f["run"] = run
    f["run_argv"] = [*argv, "--steps", "2", "--checkpoint-every", "1"]
    return f


def snapshot(d: Path) -> dict:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def fails(argv, code: int, names, capsys, out: Path | None = None) -> str:
    before = snapshot(out) if out is not None and out.exists() else None
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    if before is not None:
        assert snapshot(out) == before, "an existing output was changed"
    return lines[0]


def copy_root(F, key, tmp_path) -> Path:
    dst = tmp_path / key
    shutil.copytree(F[key], dst)
    return dst


# ------------------------------------------------------------------------------------------------
# options and config files (usage errors: exit 2)
# ------------------------------------------------------------------------------------------------

OPTION_CASES = [
    ("fraction above 1", ["--fraction", "1.5"], ["--fraction", "(0, 1]"]),
    ("fraction zero", ["--fraction", "0"], ["--fraction"]),
    ("gamma negative", ["--gamma", "-1"], ["--gamma"]),
    ("gamma nan", ["--gamma", "nan"], ["--gamma"]),
    ("lr nan", ["--lr", "nan"], ["--lr", "nan"]),
    ("lr zero", ["--lr", "0"], ["--lr"]),
    ("batch size zero", ["--batch-size", "0"], ["--batch-size"]),
    ("steps negative", ["--steps", "-3"], ["--steps"]),
    ("split not offered", ["--split", "7"], ["--split 7", "5|10|15"]),
    ("unknown method", ["--method", "gd"], ["--method", "gd"]),
    ("unknown flag", ["--lrr", "0.1"], ["--lrr"]),
    ("workers negative", ["--workers", "-1"], ["--workers"]),
    ("log every zero", ["--log-every", "0"], ["--log-every"]),
    ("eval every negative", ["--eval-every", "-2"], ["--eval-every"]),
    ("two benchmarks", ["--clear", "CLEAR"], ["exactly one of"]),
    ("cuda without a gpu", ["--device", "cuda:3"], ["--device cuda:3", "CUDA device"]),
    ("loss tokens", ["--loss-tokens", "prompt"], ["--loss-tokens"]),
    ("recipe typo", ["--recipe", "offical"], ["--recipe", "offical"]),
]


@pytest.mark.parametrize("name, extra, names", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_bad_option(F, capsys, name, extra, names):
    if torch.cuda.is_available() and name == "cuda without a gpu":
        pytest.skip("this machine has CUDA devices")
    argv = ["unlearn", "--model", F["llava"], "--mllmu", F["mllmu"], "--out", F["run"], *extra]
    fails(argv, 2, names, capsys, out=F["run"])


def test_tiny_needs_synthetic_and_people(F, capsys, tmp_path):
    fails(
        ["unlearn", "--tiny", "--mllmu", F["mllmu"]],
        2,
        ["--tiny", "--synthetic"],
        capsys,
        out=F["run"],
    )
    fails(
        ["saliency", "--tiny", "--synthetic", "--people", "1"],
        2,
        ["--people 1"],
        capsys,
        out=F["run"],
    )


def test_out_is_an_existing_file_or_unwritable(F, capsys, tmp_path):
    f = tmp_path / "taken"
    f.write_text("keep me")
    argv = ["saliency", "--model", F["llava"], "--mllmu", F["mllmu"], "--out", f]
    fails(argv, 2, [str(f), "existing file"], capsys, out=F["run"])
    assert f.read_text() == "keep me"
    argv[-1] = f / "sub"
    fails(argv, 2, [str(f), "is a file"], capsys, out=F["run"])


CONFIG_CASES = [
    ("typo key", "lrr: 0.1\n", ["unknown option 'lrr'", "did you mean 'lr'"]),
    ("bad number", "lr: fast\n", ["lr: 'fast' is not valid"]),
    ("bad choice", "method: gd\n", ["method: 'gd' is not one of"]),
    ("bool expected", "fisher_offload: 3\n", ["fisher_offload: 3 is not true or false"]),
    ("resume value", "resume: later\n", ["resume: 'later' is not valid"]),
    ("list for a scalar", "lr: [1, 2]\n", ["is a list"]),
    ("not a mapping", "- a\n- b\n", ["expected a mapping"]),
    ("broken yaml", "lr: [1, 2\n", ["cannot read it"]),
    ("negative lr", "lr: -1\n", ["lr: -1 is not valid"]),
]


@pytest.mark.parametrize("name, text, names", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_file(F, capsys, tmp_path, name, text, names):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    argv = ["unlearn", "--model", F["llava"], "--mllmu", F["mllmu"], "--config", cfg]
    fails([*argv, "--out", F["run"]], 2, [str(cfg), *names], capsys, out=F["run"])


def test_missing_config_file(F, capsys, tmp_path):
    argv = ["unlearn", "--tiny", "--synthetic", "--config", tmp_path / "nope.yaml"]
    fails(argv, 2, ["nope.yaml", "no such file"], capsys, out=F["run"])


# ------------------------------------------------------------------------------------------------
# benchmark files
# ------------------------------------------------------------------------------------------------


def test_missing_benchmark_folders(F, capsys, tmp_path):
    base = ["saliency", "--model", F["llava"], "--out", F["run"]]
    fails(
        [*base, "--mllmu", tmp_path / "none"], 2, ["none", "no such folder"], capsys, out=F["run"]
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    fails([*base, "--mllmu", empty], 2, ["forget_5"], capsys, out=F["run"])
    c = copy_root(F, "clear", tmp_path)
    shutil.rmtree(c / "full+tofu")
    fails([*base, "--clear", c], 2, ["full+tofu"], capsys, out=F["run"])


def test_truncated_parquet(F, capsys, tmp_path):
    root = copy_root(F, "mllmu", tmp_path)
    shard = root / "forget_5" / SHARD
    shard.write_bytes(shard.read_bytes()[:100])
    argv = ["saliency", "--model", F["llava"], "--mllmu", root, "--out", F["run"]]
    fails(argv, 1, [str(shard)], capsys, out=F["run"])


def test_undecodable_image_names_row_and_column(F, capsys, tmp_path):
    root = copy_root(F, "mllmu", tmp_path)
    shard = root / "retain_95" / SHARD
    rows = pq.read_table(shard).to_pylist()
    rows[2]["image"] = {"bytes": b"not an image", "path": None}
    write_parquet(shard, rows)
    argv = ["saliency", "--model", F["llava"], "--mllmu", root, "--out", F["run"]]
    fails(argv, 1, [str(shard), "row 2", "'image'", "cannot decode"], capsys, out=F["run"])


def test_missing_column_and_bad_json(F, capsys, tmp_path):
    root = copy_root(F, "mllmu", tmp_path)
    shard = root / "forget_5" / SHARD
    rows = pq.read_table(shard).to_pylist()
    write_parquet(shard, [{k: v for k, v in r.items() if k != "metadata"} for r in rows])
    argv = ["saliency", "--model", F["llava"], "--mllmu", root, "--out", F["run"]]
    fails(argv, 1, [str(shard), "'metadata'"], capsys, out=F["run"])
    rows[1]["metadata"] = "[{not json"
    write_parquet(shard, rows)
    fails(argv, 1, [str(shard), "row 1", "bad JSON"], capsys, out=F["run"])


def test_empty_forget_split(F, capsys, tmp_path):
    root = copy_root(F, "mllmu", tmp_path)
    shard = root / "forget_5" / SHARD
    schema = pq.read_table(shard).schema
    pq.write_table(pa.Table.from_pylist([], schema=schema), shard)
    argv = ["saliency", "--model", F["llava"], "--mllmu", root, "--out", F["run"]]
    fails(argv, 1, ["forget_5", "no training QA pairs"], capsys, out=F["run"])


def test_clear_null_caption(F, capsys, tmp_path):
    root = copy_root(F, "clear", tmp_path)
    shard = root / "forget05" / SHARD
    rows = pq.read_table(shard).to_pylist()
    rows[1]["caption"] = None
    write_parquet(shard, rows)
    argv = ["saliency", "--model", F["llava"], "--clear", root, "--out", F["run"]]
    fails(argv, 1, [str(shard), "row 1", "'caption'"], capsys, out=F["run"])


def test_image_path_cell_that_does_not_exist(F, capsys, tmp_path):
    root = copy_root(F, "mllmu", tmp_path)
    shard = root / "forget_5" / SHARD
    rows = pq.read_table(shard).to_pylist()
    rows[0]["image"] = {"bytes": None, "path": "pictures/missing.png"}
    write_parquet(shard, rows)
    argv = ["saliency", "--model", F["llava"], "--mllmu", root, "--out", F["run"]]
    fails(argv, 1, [str(shard), "row 0", "cannot read image path"], capsys, out=F["run"])


# ------------------------------------------------------------------------------------------------
# checkpoints, processors, tokenizers, weights
# ------------------------------------------------------------------------------------------------


def test_model_folder_problems(F, capsys, tmp_path):
    base = ["saliency", "--mllmu", F["mllmu"], "--out", F["run"], "--model"]
    fails([*base, tmp_path / "nope"], 2, ["nope", "no such folder"], capsys, out=F["run"])
    (tmp_path / "noconfig").mkdir()
    fails([*base, tmp_path / "noconfig"], 1, ["noconfig", "config.json"], capsys, out=F["run"])
    cfg = tmp_path / "cfg.json"
    cfg.write_text("{}")
    fails([*base, cfg], 2, ["cfg.json", "a file, not a checkpoint folder"], capsys, out=F["run"])


def test_truncated_weights(F, capsys, tmp_path):
    ck = copy_root(F, "llava", tmp_path)
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[:5000])
    argv = ["saliency", "--model", ck, "--mllmu", F["mllmu"], "--out", F["run"]]
    fails(argv, 1, [str(ck), "cannot load the weights"], capsys, out=F["run"])


def test_processor_problems(F, capsys, tmp_path):
    bare = llava_checkpoint(tmp_path / "bare", with_processor=False)
    base = ["saliency", "--model", bare, "--mllmu", F["mllmu"], "--out", F["run"]]
    fails(base, 1, [str(bare), "no tokenizer", "--processor"], capsys, out=F["run"])
    fails(
        [*base, "--processor", tmp_path / "nope"], 2, ["--processor", "nope"], capsys, out=F["run"]
    )
    empty = tmp_path / "empty-proc"
    empty.mkdir()
    fails([*base, "--processor", empty], 1, [str(empty), "no tokenizer"], capsys, out=F["run"])
    broken = copy_root(F, "llava", tmp_path)
    (broken / "tokenizer.json").write_text("{ not json")
    argv = ["saliency", "--model", broken, "--mllmu", F["mllmu"], "--out", F["run"]]
    fails(argv, 1, [str(broken), "cannot load the processor"], capsys, out=F["run"])
    notemplate = copy_root(F, "llava", tmp_path / "nt")
    (notemplate / "chat_template.jinja").unlink()
    proc_cfg = notemplate / "processor_config.json"
    proc_cfg.write_text(
        json.dumps({k: v for k, v in json.loads(proc_cfg.read_text()).items() if "chat" not in k})
    )
    argv = ["saliency", "--model", notemplate, "--mllmu", F["mllmu"], "--out", F["run"]]
    fails(argv, 1, [str(notemplate), "no chat template"], capsys, out=F["run"])


# ------------------------------------------------------------------------------------------------
# masks and Fisher files
# ------------------------------------------------------------------------------------------------


def test_mask_problems(F, capsys, tmp_path):
    base = ["unlearn", "--model", F["llava"], "--mllmu", F["mllmu"], "--out", F["run"]]
    fails([*base, "--mask", tmp_path / "none.safetensors"], 2, ["--mask", "none.safetensors"],
          capsys, out=F["run"])  # fmt: skip
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    fails(
        [*base, "--mask", junk], 2, [str(junk), "not a readable safetensors"], capsys, out=F["run"]
    )
    fails([*base, "--mask", F["fisher"]], 2, ["mmunlearn.fisher", "expected"], capsys, out=F["run"])
    other = llava_checkpoint(tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96  # same names, other shapes
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from mmunlearn.masks import build_masks

    m = LlavaForConditionalGeneration(AutoConfig.for_model(**cfg))
    batch = {
        "input_ids": torch.tensor([[1, 5, 6, 7]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "labels": torch.tensor([[-100, 5, 6, 7]]),
    }
    bad = build_masks(m, [batch], [batch], [batch], progress=False)["both"]
    path = bad.save(tmp_path / "other-mask.safetensors")
    fails([*base, "--mask", path], 2, ["mlp", "mask shape", "model shape"], capsys, out=F["run"])


def test_fisher_file_api_errors(F, tmp_path):
    from mmunlearn.fisher import load_fisher
    from mmunlearn.saliency import SaliencyMask

    with pytest.raises(ValueError, match="no such file"):
        load_fisher(tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="expected 'mmunlearn.fisher'"):
        load_fisher(F["mask"])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(F["fisher"].read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_fisher(cut)
    with pytest.raises(ValueError, match=str(cut)):
        SaliencyMask.load(cut)


# ------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------


def _resume(F, tmp_path, *extra):
    run = tmp_path / "run"
    shutil.copytree(F["run"], run)
    argv = [a if a != str(F["run"]) else str(run) for a in map(str, F["run_argv"])]
    return run, [*argv, "--resume", *extra]


@pytest.mark.parametrize(
    "extra, names",
    [
        (["--lr", "2e-3"], ["lr", "0.001", "0.002"]),
        (["--steps", "3"], ["max_steps"]),
        (["--method", "ga_diff"], ["method"]),
        (["--seed", "5"], ["seed"]),
    ],
    ids=["lr", "steps", "method", "seed"],
)
def test_resume_with_changed_settings_is_refused(F, capsys, tmp_path, extra, names):
    run, argv = _resume(F, tmp_path, *extra)
    fails(argv, 1, ["cannot resume", "different run", *names], capsys, out=run)


def test_resume_with_another_mask_or_data_is_refused(F, capsys, tmp_path):
    from mmunlearn.saliency import SaliencyMask

    m = SaliencyMask.load(F["mask"])
    flipped = {n: ~m.dense(n) for n in m.names}
    from mmunlearn.saliency import mask_from_dense

    other = mask_from_dense(flipped).save(tmp_path / "flipped.safetensors")
    run, argv = _resume(F, tmp_path, "--mask", other)
    fails(argv, 1, ["different run", "mask"], capsys, out=run)
    root = copy_root(F, "mllmu", tmp_path)
    shard = root / "retain_95" / SHARD
    rows = pq.read_table(shard).to_pylist()
    rows[0]["metadata"] = json.dumps([{"Question": "Who?", "Answer": "Someone else"}])
    write_parquet(shard, rows)
    run2, argv = _resume(F, tmp_path / "b")
    argv[argv.index(str(F["mllmu"]))] = str(root)
    fails(argv, 1, ["different run", "retain"], capsys, out=run2)


def test_resume_of_a_finished_run_says_so(F, capsys, tmp_path):
    run, argv = _resume(F, tmp_path)
    before = snapshot(run)
    assert main(argv) == 0
    assert "already finished" in capsys.readouterr().out
    assert snapshot(run) == before


def test_corrupt_checkpoint_state(F, capsys, tmp_path):
    run, argv = _resume(F, tmp_path)
    (run / "run" / "checkpoint" / "state.json").write_text("{broken")
    fails(argv, 1, ["cannot resume", "state.json"], capsys, out=run)
    run, argv = _resume(F, tmp_path / "t")
    t = run / "run" / "checkpoint" / "trainer.safetensors"
    t.write_bytes(t.read_bytes()[:300])
    fails(argv, 1, ["cannot resume", "trainer.safetensors"], capsys, out=run)


def test_a_crafted_pickle_in_a_checkpoint_runs_no_code(F, tmp_path):
    """Resuming never unpickles: a trainer.pt left in a checkpoint is ignored, and a crafted
    DCP .metadata is refused before DCP reads it."""
    import os
    import pickle

    from mmunlearn.fsdp import _dcp_allowed
    from mmunlearn.io import check_pickle

    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    run, argv = _resume(F, tmp_path)
    (run / "run" / "checkpoint" / "trainer.pt").write_bytes(pickle.dumps(Evil()))
    main(argv)
    assert not sentinel.exists()
    meta = tmp_path / ".metadata"
    meta.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="posix.system|os.system"):
        check_pickle(meta, _dcp_allowed)
    assert not sentinel.exists()


def test_real_dcp_metadata_passes_the_allow_list(tmp_path):
    import torch.distributed.checkpoint as dcp

    from mmunlearn.fsdp import _dcp_allowed
    from mmunlearn.io import check_pickle

    state = {"model": {"w": torch.randn(3, 4), "b": torch.randn(4).bfloat16()}, "step": 3}
    with pytest.warns(UserWarning):
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    check_pickle(tmp_path / "dcp" / ".metadata", _dcp_allowed)
