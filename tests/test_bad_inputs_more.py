"""More bad input (#25): every numeric option out of range or non-finite, in every command;
weights, masks, checkpoints, configs, processors, images and data files broken in the ways
``test_bad_inputs.py`` does not cover (eval's data files included); the saliency run's partial
Fisher sums. Same contract: the exit code, one error line naming the input, no traceback, and a
previous run's files in ``--out`` untouched (hashed before and after)."""

# ruff: noqa: F811  (the fixture F is imported from test_bad_inputs and used as an argument)
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from realformat import SHARD, llava_checkpoint, write_parquet
from test_bad_inputs import F, _one_thread, copy_root, fails  # noqa: F401

# ------------------------------------------------------------------------------------------------
# numeric options: out of range, non-finite (usage errors, exit 2, before anything is read)
# ------------------------------------------------------------------------------------------------

RUN_OPTIONS = [
    ("lr inf", ["--lr", "inf"], ["--lr", "inf"]),
    ("lr overflow", ["--lr", "1e400"], ["--lr"]),
    ("steps zero", ["--steps", "0"], ["--steps"]),
    ("gamma inf", ["--gamma", "inf"], ["--gamma"]),
    ("gamma zero", ["--gamma", "0"], ["--gamma"]),
    ("fraction nan", ["--fraction", "nan"], ["--fraction"]),
    ("fraction negative", ["--fraction", "-0.1"], ["--fraction"]),
    ("fisher batch zero", ["--fisher-batch-size", "0"], ["--fisher-batch-size"]),
    ("grad accum zero", ["--grad-accum", "0"], ["--grad-accum"]),
    ("epochs zero", ["--epochs", "0"], ["--epochs"]),
    ("forget freq zero", ["--forget-freq", "0"], ["--forget-freq"]),
    ("weight decay negative", ["--weight-decay", "-1"], ["--weight-decay"]),
    ("weight decay nan", ["--weight-decay", "nan"], ["--weight-decay"]),
    ("eps zero", ["--eps", "0"], ["--eps"]),
    ("max grad norm nan", ["--max-grad-norm", "nan"], ["--max-grad-norm"]),
    ("alpha inf", ["--alpha", "inf"], ["--alpha"]),
    ("beta nan", ["--beta", "nan"], ["--beta"]),
    ("checkpoint every negative", ["--checkpoint-every", "-1"], ["--checkpoint-every"]),
    ("eval items zero", ["--eval-items", "0"], ["--eval-items"]),
    ("vanilla steps negative", ["--vanilla-steps", "-1"], ["--vanilla-steps"]),
    ("batch size not a number", ["--batch-size", "four"], ["--batch-size", "four"]),
    ("resume value", ["--resume", "later"], ["--resume", "later"]),
]


@pytest.mark.parametrize("name, extra, names", RUN_OPTIONS, ids=[c[0] for c in RUN_OPTIONS])
def test_bad_run_option(F, capsys, name, extra, names):
    argv = ["unlearn", "--model", F["llava"], "--mllmu", F["mllmu"], "--out", F["run"], *extra]
    fails(argv, 2, names, capsys, out=F["run"])


OTHER_OPTIONS = [
    ("saliency fisher batch", ["saliency", "--fisher-batch-size", "-2"], ["--fisher-batch-size"]),
    ("saliency gamma nan", ["saliency", "--gamma", "nan"], ["--gamma"]),
    ("eval batch zero", ["eval", "--batch-size", "0"], ["--batch-size"]),
    ("eval limit zero", ["eval", "--limit", "0"], ["--limit"]),
    ("eval n-boot zero", ["eval", "--n-boot", "0"], ["--n-boot"]),
    ("eval max new tokens", ["eval", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    ("eval people one", ["eval", "--people", "1"], ["--people"]),
    ("estimate world size", ["estimate", "--world-size", "0"], ["--world-size"]),
    ("estimate seq", ["estimate", "--seq", "0"], ["--seq"]),
    ("estimate gpu memory nan", ["estimate", "--gpu-memory", "nan"], ["--gpu-memory"]),
    ("estimate compact state", ["estimate", "--compact-state", "2"], ["--compact-state"]),
]


@pytest.mark.parametrize("name, argv, names", OTHER_OPTIONS, ids=[c[0] for c in OTHER_OPTIONS])
def test_bad_option_of_other_commands(F, capsys, name, argv, names):
    rest = ["--mllmu", F["mllmu"], "--out", F["run"]] if argv[0] != "estimate" else []
    fails([*argv, "--model", F["llava"], *rest], 2, names, capsys, out=F["run"])


CONFIG_FILES = [
    ("json syntax", "run.json", '{"lr": 0.1,', ["cannot read it"]),
    ("int expected", "run.yaml", "steps: 1.5\n", ["steps: 1.5 is not valid"]),
    ("nan in yaml", "run.yaml", "lr: .nan\n", ["lr"]),
    ("tab indented yaml", "run.yaml", "lr:\n\t- 1\n", ["cannot read it"]),
]


@pytest.mark.parametrize("name, file, text, names", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_bad_config_file_more(F, capsys, tmp_path, name, file, text, names):
    cfg = tmp_path / file
    cfg.write_text(text)
    argv = ["unlearn", "--model", F["llava"], "--mllmu", F["mllmu"], "--config", cfg]
    fails([*argv, "--out", F["run"]], 2, [str(cfg), *names], capsys, out=F["run"])


# ------------------------------------------------------------------------------------------------
# data files in every command (eval included)
# ------------------------------------------------------------------------------------------------


def _empty(root, split):
    shard = root / split / SHARD
    pq.write_table(pa.Table.from_pylist([], schema=pq.read_table(shard).schema), shard)
    return shard


def _truncate(root, split):
    shard = root / split / SHARD
    shard.write_bytes(shard.read_bytes()[:200])
    return shard


def _drop_column(root, split, column="metadata"):
    shard = root / split / SHARD
    write_parquet(shard, [{k: v for k, v in r.items() if k != column}
                          for r in pq.read_table(shard).to_pylist()])  # fmt: skip
    return shard


def _cut_png(root, split):
    shard = root / split / SHARD
    rows = pq.read_table(shard).to_pylist()
    rows[0]["image"] = {"bytes": rows[0]["image"]["bytes"][:60], "path": None}
    write_parquet(shard, rows)
    return shard


DATA_CASES = [
    ("unlearn empty retain", "unlearn", lambda r: _empty(r, "retain_95"), ["retain_95"]),
    ("unlearn truncated forget", "unlearn", lambda r: _truncate(r, "forget_5"), [SHARD]),
    ("unlearn cut png", "unlearn", lambda r: _cut_png(r, "forget_5"), ["row 0", "'image'"]),
    ("eval empty forget", "eval", lambda r: _empty(r, "forget_5"), ["forget_5", "no items"]),
    ("eval truncated test set", "eval", lambda r: _truncate(r, "Test_Set"), ["Test_Set"]),
    ("eval truncated forget", "eval", lambda r: _truncate(r, "forget_5"), ["forget_5"]),
    ("eval cut png", "eval", lambda r: _cut_png(r, "forget_5"), ["forget_5", "'image'"]),
    ("attack truncated forget", "attack", lambda r: _truncate(r, "forget_5"), ["forget_5"]),
    ("attack cut png", "attack", lambda r: _cut_png(r, "forget_5"), ["forget_5", "'image'"]),
    ("saliency truncated retain", "saliency", lambda r: _truncate(r, "retain_95"), ["retain_95"]),
    (
        "saliency retain no metadata",
        "saliency",
        lambda r: _drop_column(r, "retain_95"),
        ["retain_95", "'metadata'"],
    ),  # fmt: skip
]


@pytest.mark.parametrize("name, cmd, spoil, names", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file_in_every_command(F, capsys, tmp_path, name, cmd, spoil, names):
    root = copy_root(F, "mllmu", tmp_path)
    spoil(root)
    argv = [cmd, "--model", F["llava"], "--mllmu", root, "--out", F["run"]]
    # a file that is there but unreadable or empty is a runtime failure (1) in every command,
    # eval and attack included (2 is for a path that is not there: test_missing_data_paths)
    fails(argv, 1, names, capsys, out=F["run"])


@pytest.mark.parametrize("cmd", ["eval", "attack", "saliency", "unlearn"])
def test_missing_data_paths_are_usage_errors(F, capsys, tmp_path, cmd):
    """A benchmark folder, or a split folder in it, that is not there: exit 2 naming it, in
    every command that reads data (the counterpart of the exit-1 cases above)."""
    argv = [cmd, "--model", F["llava"], "--mllmu", tmp_path / "none", "--out", F["run"]]
    fails(argv, 2, ["none"], capsys, out=F["run"])
    root = copy_root(F, "mllmu", tmp_path)
    shutil.rmtree(root / "forget_5")
    argv = [cmd, "--model", F["llava"], "--mllmu", root, "--out", F["run"]]
    fails(argv, 2, ["forget_5"], capsys, out=F["run"])


def test_clear_empty_forget_split(F, capsys, tmp_path):
    root = copy_root(F, "clear", tmp_path)
    _empty(root, "forget05")
    argv = ["unlearn", "--model", F["llava"], "--clear", root, "--out", F["run"]]
    fails(argv, 1, ["forget05"], capsys, out=F["run"])


# ------------------------------------------------------------------------------------------------
# weights, configs, processors
# ------------------------------------------------------------------------------------------------


def _weights_other_shapes(ck, tmp_path):
    other = llava_checkpoint(tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    from transformers import AutoConfig, LlavaForConditionalGeneration

    m = LlavaForConditionalGeneration(AutoConfig.for_model(**cfg))
    from safetensors.torch import save_model

    save_model(m, str(ck / "model.safetensors"))


def _garbage_header(ck, tmp_path):
    w = ck / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[8:40] = b"\xff" * 32
    w.write_bytes(bytes(data))


MODEL_CASES = [
    ("weights of other shapes", _weights_other_shapes, ["cannot load the weights"]),
    ("weights header garbage", _garbage_header, ["cannot load the weights"]),
    ("config.json broken", lambda ck, t: (ck / "config.json").write_text("{ nope"), ["config"]),
    (
        "tokenizer_config broken",
        lambda ck, t: (ck / "tokenizer_config.json").write_text("[1, "),
        ["processor"],
    ),  # fmt: skip
    (
        "processor_config broken",
        lambda ck, t: (ck / "processor_config.json").write_text("{"),
        ["processor"],
    ),  # fmt: skip
    ("config.json a list", lambda ck, t: (ck / "config.json").write_text("[]"), ["config"]),
]


@pytest.mark.parametrize("name, spoil, names", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_folder(F, capsys, tmp_path, name, spoil, names):
    ck = copy_root(F, "llava", tmp_path)
    spoil(ck, tmp_path)
    argv = ["saliency", "--model", ck, "--mllmu", F["mllmu"], "--out", F["run"]]
    fails(argv, 1, [str(ck), *names], capsys, out=F["run"])


@pytest.mark.parametrize("cmd", ["eval", "attack"])
def test_bad_model_folder_in_eval(F, capsys, tmp_path, cmd):
    """A checkpoint folder that is there but cannot be loaded: exit 1 as in saliency / unlearn
    (test_bad_model_folder); one that is not there: exit 2 (test_model_folder_problems)."""
    ck = copy_root(F, "llava", tmp_path)
    (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:4000])
    argv = [cmd, "--model", ck, "--mllmu", F["mllmu"], "--out", F["run"]]
    argv += ["--probes", "text"] if cmd == "attack" else []  # (too few items to relearn)
    fails(argv, 1, [str(ck), "cannot load"], capsys, out=F["run"])
    argv[2] = tmp_path / "nope"
    fails(argv, 2, ["nope", "no such folder"], capsys, out=F["run"])


# ------------------------------------------------------------------------------------------------
# masks, Fishers
# ------------------------------------------------------------------------------------------------


def _rewrite_mask(src, dst, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors, meta = change(tensors, dict(meta))
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _drop_one(t, m):
    t.pop(next(iter(t)))
    return t, m


def _as_float(t, m):
    return {k: v.float() for k, v in t.items()}, m


def _short_bits(t, m):
    k = next(iter(t))
    t[k] = t[k][:1].clone()
    return t, m


def _newer_format(t, m):
    return t, {**m, "format_version": "99"}


def _foreign_names(t, m):
    return {f"visual.{k}": v for k, v in t.items()}, m


MASK_CASES = [
    ("missing tensor", _drop_one, []),
    ("float bits", _as_float, []),
    ("too few bits", _short_bits, []),
    ("newer format", _newer_format, ["newer"]),
    ("another model's names", _foreign_names, []),
]


@pytest.mark.parametrize("name, change, names", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_bad_mask_file(F, capsys, tmp_path, name, change, names):
    bad = _rewrite_mask(F["mask"], tmp_path / "bad.safetensors", change)
    argv = ["unlearn", "--model", F["llava"], "--mllmu", F["mllmu"], "--mask", bad]
    fails([*argv, "--out", F["run"]], 2, ["--mask", *names], capsys, out=F["run"])


def test_mask_of_another_model_for_llava(F, capsys, tmp_path):
    from mmunlearn.saliency import mask_from_dense

    other = {"encoder.layers.0.fc.weight": torch.ones(4, 3, dtype=torch.bool)}
    path = mask_from_dense(other).save(tmp_path / "other.safetensors")
    argv = ["unlearn", "--model", F["llava"], "--mllmu", F["mllmu"], "--mask", path]
    fails([*argv, "--out", F["run"]], 2, ["--mask"], capsys, out=F["run"])


@pytest.mark.parametrize("change", [_drop_one, _newer_format], ids=["names", "newer"])
def test_bad_fisher_file_api(F, tmp_path, change):
    from mmunlearn.fisher import load_fisher

    bad = _rewrite_mask(F["fisher"], tmp_path / "bad.safetensors", change)
    with pytest.raises(ValueError, match=str(bad)):
        load_fisher(bad)


# ------------------------------------------------------------------------------------------------
# checkpoints and the saliency run's partial sums
# ------------------------------------------------------------------------------------------------


def _resume_copy(F, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(F["run"], run)
    argv = [a if a != str(F["run"]) else str(run) for a in map(str, F["run_argv"])]
    return run, [*argv, "--resume"]


CKPT_CASES = [
    ("weights truncated", "model.safetensors", lambda b: b[:300], ["cannot resume"]),
    ("state without step", "state.json", lambda b: b'{"history": []}', ["state.json"]),
    ("trainer garbage", "trainer.safetensors", lambda b: b"\x00" * len(b), ["cannot resume"]),
]


@pytest.mark.parametrize("name, file, spoil, names", CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_bad_checkpoint(F, capsys, tmp_path, name, file, spoil, names):
    run, argv = _resume_copy(F, tmp_path)
    f = run / "run" / "checkpoint" / file
    f.write_bytes(spoil(f.read_bytes()))
    fails(argv, 1, names, capsys, out=run)


@pytest.fixture(scope="module")
def partial(F, tmp_path_factory):
    """A saliency --out holding partial Fisher sums (a stop after the first forget batch)."""
    from mmunlearn.fisher import FisherInterrupted

    out = tmp_path_factory.mktemp("partial") / "sal"
    argv = ["saliency", "--model", str(F["llava"]), "--mllmu", str(F["mllmu"]),
            "--fisher-batch-size", "1", "--resume", "--out", str(out)]  # fmt: skip
    import mmunlearn.cli.saliency as sal

    real = sal.run

    def stopping(args, distributed, preemption, prepare, make_masks):
        def once(*a, **kw):
            kw["stop"] = lambda: True
            return make_masks(*a, **kw)

        preemption.signal = "SIGTERM"
        return real(args, distributed, preemption, prepare, once)

    sal.run = stopping
    try:
        from mmunlearn.cli import main

        assert main(argv) == 75
    finally:
        sal.run = real
    assert (out / "fisher_partial" / "state.json").is_file()
    assert FisherInterrupted  # the stop above is the real one: collect_fisher raised it
    return out, argv


PARTIAL_CASES = [
    ("state.json broken", "state.json", lambda b: b"{", ["fisher_partial", "state.json"]),
    ("sums truncated", "sums.safetensors", lambda b: b[:100], ["sums.safetensors"]),
]


@pytest.mark.parametrize(
    "name, file, spoil, names", PARTIAL_CASES, ids=[c[0] for c in PARTIAL_CASES]
)
def test_bad_partial_fisher_sums(partial, capsys, tmp_path, name, file, spoil, names):
    src, argv = partial
    out = tmp_path / "sal"
    shutil.copytree(src, out)
    argv = [a if a != str(src) else str(out) for a in argv]
    f = out / "fisher_partial" / file
    f.write_bytes(spoil(f.read_bytes()))
    fails(argv, 1, names, capsys, out=out)
