"""``mmunlearn eval`` (mmunlearn.cli.evaluate): a tiny saved model on the synthetic benchmark and on
CLEAR-format files, determinism for a seed, several models, and the errors."""

from __future__ import annotations

import json

import pytest
import torch

from mmunlearn.cli import main
from mmunlearn.data.synthetic import make_benchmark
from mmunlearn.models import build_tokenizer, save_model, tiny_llava

PEOPLE = 4  # 1 forget + 3 retain people: a few dozen items per set


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and two processes with a thread per core each
    slow down many-fold on a 2-core machine (method.md §8); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(argv) -> int:
    return main(argv)


def _fails(argv, capsys, *names, code: int = 2) -> str:
    """``argv`` exits with ``code`` and one error line on stderr naming every one of ``names``
    (other stderr lines are progress bars, e.g. of weight loading), no traceback."""
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("mmunlearn eval: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in names:
        assert n in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Two tiny LLaVAs (different seeds, small hidden sizes) saved with a tokenizer that knows
    the synthetic benchmark's words."""
    bench = make_benchmark(n_people=PEOPLE, seed=0)
    texts = [s.question + " " + s.answer for s in bench.train]
    for v in bench.eval_sets().values():
        for s in v["mcq"]:
            texts += [s.question] + [str(o) for o in s.meta["options"].values()]
    tok = build_tokenizer(texts + ["options answer with the letter"])
    root = tmp_path_factory.mktemp("models")
    dirs = []
    for seed, name in ((0, "vanilla"), (1, "other")):
        m = tiny_llava(tok, seed=seed, hidden=32, intermediate=64, vision_hidden=16, heads=2)
        dirs.append(str(save_model(m, tok, root / name)))
    return dirs


def _argv(model_dir, out, *extra):
    return [
        "eval",
        "--model",
        model_dir,
        "--synthetic",
        "--people",
        str(PEOPLE),
        "--batch-size",
        "8",
        "--max-new-tokens",
        "3",
        "--seed",
        "3",
        "--out",
        str(out),
        *extra,
    ]


def test_eval_synthetic_keys_and_determinism(model_dirs, tmp_path):
    assert _run(_argv(model_dirs[0], tmp_path / "a")) == 0
    assert _run(_argv(model_dirs[0], tmp_path / "b")) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["methods"] == b["methods"] and a["_protocol"] == b["_protocol"]
    assert list(a["methods"]) == ["vanilla"]
    sets = a["methods"]["vanilla"]
    assert set(sets) == {
        "forget",
        "forget_test",
        "forget_link",
        "retain",
        "retain_test",
        "retain_link",
    }
    f = sets["forget"]
    for key in (
        "vqa_mcq_acc",
        "qa_mcq_acc",
        "vqa_mcq_letter_acc",
        "qa_mcq_letter_acc",
        "vqa_cloze_acc",
        "qa_cloze_acc",
        "vqa_rouge1",
        "vqa_rouge2",
        "vqa_rougeL",
        "vqa_bleu",
        "qa_rougeL",
    ):
        assert key in f, key
        assert 0.0 <= f[key] <= 1.0, (key, f[key])
    # 1 forget person: 4 picture MCQs (3 attributes + name), 4 by-name MCQs
    assert f["n_vqa_mcq"] == 4 and f["n_qa_mcq"] == 4
    proto = a["_protocol"]
    assert proto["seed"] == 3 and proto["shots"] == 0 and proto["benchmark"] == "synthetic"
    tpl = proto["template"]["vanilla"]
    assert tpl["family"] == "llava" and "{question}" in tpl["vqa"] and "<image>×17" in tpl["vqa"]
    assert "<image>" not in tpl["qa"]
    md = (tmp_path / "a" / "report.md").read_text()
    assert md.startswith("# mmunlearn eval: synthetic") and "| vanilla |" in md
    assert not (tmp_path / "a" / "tradeoff.png").exists()  # one model: no plot


def test_eval_options_change_what_is_computed(model_dirs, tmp_path):
    out = tmp_path / "o"
    argv = _argv(model_dirs[0], out, "--no-generation", "--no-letter-mcq", "--limit", "2")
    assert _run(argv) == 0
    f = json.loads((out / "results.json").read_text())["methods"]["vanilla"]["forget"]
    assert "vqa_mcq_acc" in f and "vqa_mcq_letter_acc" not in f and "vqa_rougeL" not in f
    assert f["n_vqa_mcq"] == 2 and "n_qa_mcq" not in f  # the first 2 items are picture MCQs
    assert "vqa_cloze_acc" in f  # cloze is scored on generations still (MLLMU's fill-in)


def test_eval_several_models_labels_and_plot(model_dirs, tmp_path, capsys):
    out = tmp_path / "two"
    argv = _argv(model_dirs[0], out, "--model", model_dirs[1], "--no-generation")
    argv += ["--no-letter-mcq", "--label", "A", "--label", "B"]
    assert _run(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["A", "B"] and res["models"]["B"] == model_dirs[1]
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    _fails(
        _argv(model_dirs[0], out, "--model", model_dirs[1], "--label", "only-one"),
        capsys,
        "--label",
    )


def test_eval_errors_name_the_path(model_dirs, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    _fails(_argv(str(missing), tmp_path / "x"), capsys, "no-such-model")
    empty = tmp_path / "empty-model"
    empty.mkdir()  # there, but not a checkpoint: 1, as in saliency / unlearn
    _fails(_argv(str(empty), tmp_path / "x"), capsys, "empty-model", "config.json", code=1)
    for flag in ("--mllmu", "--clear"):
        argv = ["eval", "--model", model_dirs[0], flag, str(tmp_path / "no-such-data")]
        _fails(argv, capsys, "no-such-data")
    (tmp_path / "mllmu").mkdir()
    _fails(
        ["eval", "--model", model_dirs[0], "--mllmu", str(tmp_path / "mllmu")], capsys, "forget_5"
    )
    _fails(["eval", "--synthetic"], capsys, "--tiny")
    assert _run(["eval", "--model", model_dirs[0]]) == 2  # argparse: a data flag is required


def test_eval_clear_files(model_dirs, tmp_path, capsys):
    from test_clear_eval import write_clear_root

    root = write_clear_root(tmp_path / "CLEAR")
    out = tmp_path / "c"
    argv = ["eval", "--model", model_dirs[0], "--clear", str(root), "--max-new-tokens", "3"]
    assert _run(argv + ["--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    sets = res["methods"]["vanilla"]
    assert set(sets) == {"forget", "retain", "real_faces"}
    for key in ("face_acc", "face_letter_acc", "caption_rougeL", "caption_bleu"):
        assert 0.0 <= sets["forget"][key] <= 1.0
    assert res["_protocol"]["benchmark"] == "CLEAR"
    assert "Forget face ↓" in (out / "report.md").read_text()
    # a corrupt file: the message names it; exit 1 (there but unreadable), as in every command
    bad = root / "forget05" / "train-00000-of-00001.parquet"
    bad.write_bytes(b"not parquet")
    _fails(argv + ["--out", str(tmp_path / "d")], capsys, "forget05", code=1)


def test_help_reads_well():
    from mmunlearn.cli import _build

    text = _build()[1]["eval"].format_help()
    for flag in ("--model", "--tiny", "--synthetic", "--mllmu", "--clear", "--out", "--seed"):
        assert flag in text
    for flag in ("--protocol", "--reference", "--processor", "--shots", "--n-boot"):
        assert flag in text
    assert "mmunlearn eval --protocol mllmu" in text and "mmunlearn[eval]" in text
    assert "examples:" in text


def test_eval_mllmu_files(model_dirs, tmp_path):
    """An MLLMU-Bench root (forget_5, retain_95, Test_Set; no Retain_Set): the test set keeps
    the forget profiles only."""
    from test_data import CLASSIFY, COLOURS, GEN, MASK, img_cell, mllmu_row, write

    tasks = dict(
        Classification_Task=json.dumps(CLASSIFY),
        Mask_Task=json.dumps(MASK),
        Generation_Task=json.dumps(GEN),
    )
    root = tmp_path / "MLLMU"
    shard = "train-00000-of-00001.parquet"
    write(root / "forget_5" / shard, [mllmu_row(0, **tasks)])
    write(root / "retain_95" / shard, [mllmu_row(1, **tasks), mllmu_row(2, **tasks)])
    test_rows = [
        {"ID": f"P{i}", "images": [img_cell(c) for c in COLOURS[:2]], **tasks} for i in range(3)
    ]
    write(root / "Test_Set" / shard, test_rows)
    out = tmp_path / "m"
    argv = ["eval", "--model", model_dirs[0], "--mllmu", str(root), "--max-new-tokens", "3"]
    assert _run(argv + ["--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    sets = res["methods"]["vanilla"]
    assert set(sets) == {"forget", "forget_test", "retain"}
    assert sets["forget"]["n_vqa_mcq"] == 1 and sets["forget"]["n_qa_mcq"] == 2
    assert sets["forget_test"]["n_qa_mcq"] == 2  # only P0's rows of Test_Set
    assert sets["retain"]["n_qa_mcq"] == 4
    for key in ("vqa_mcq_acc", "qa_cloze_acc", "vqa_rougeL", "qa_bleu"):
        assert 0.0 <= sets["forget"][key] <= 1.0
    assert res["_protocol"]["benchmark"] == "MLLMU-Bench" and res["_protocol"]["split"] == 5


def test_protocol_options_and_their_errors(model_dirs, tmp_path, capsys, monkeypatch):
    _fails(_argv(model_dirs[0], tmp_path / "x", "--protocol", "mllmu"), capsys, "--mllmu")
    _fails(_argv(model_dirs[0], tmp_path / "x", "--protocol", "clear"), capsys, "--clear")
    _fails(_argv(model_dirs[0], tmp_path / "x", "--n-boot", "0"), capsys, "--n-boot")
    argv = _argv(
        model_dirs[0], tmp_path / "x", "--reference", model_dirs[1], "--label", "reference"
    )
    _fails(argv, capsys, "--label reference")
    _fails(
        _argv(model_dirs[0], tmp_path / "x", "--reference", str(tmp_path / "nope")), capsys, "nope"
    )
    (tmp_path / "mllmu" / "forget_5").mkdir(parents=True)
    argv = ["eval", "--model", model_dirs[0], "--mllmu", str(tmp_path / "mllmu")]
    _fails(argv + ["--protocol", "mllmu", "--shots", "two"], capsys, "--shots")
    # --processor reaches load_checkpoint
    import mmunlearn.models as models

    seen = []
    real = models.load_checkpoint

    def spy(path, *, processor=None, dtype=None, device=None):
        seen.append(processor)  # (a tiny tokenizer-only folder is no processor: load without)
        return real(path, dtype=dtype, device=device)

    monkeypatch.setattr(models, "load_checkpoint", spy)
    argv = _argv(model_dirs[0], tmp_path / "p", "--processor", model_dirs[0], "--limit", "1")
    argv += ["--no-generation", "--no-letter-mcq", "--no-unlearning-metrics", "--n-boot", "10"]
    assert _run(argv) == 0
    assert seen == [model_dirs[0]]
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert "unlearning" not in res and res["_protocol"]["name"] == "mmunlearn"


def test_eval_with_reference_reports_the_gap(model_dirs, tmp_path):
    out = tmp_path / "g"
    argv = _argv(model_dirs[0], out, "--reference", model_dirs[1], "--no-generation")
    assert _run(argv + ["--no-letter-mcq", "--n-boot", "100"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["vanilla", "reference"]
    assert res["models"]["reference"] == model_dirs[1]
    gap = res["gap"]
    assert gap["closest"] == "vanilla" and gap["reference"] == "reference"
    assert "forget/vqa_mcq_acc" in gap["keys"] and gap["n_boot"] == 100
    unl = res["unlearning"]["vanilla"]
    for key in (
        "forget_truth_ratio",
        "forget_quality",
        "model_utility",
        "mia_loss_auc",
        "privleak",
    ):
        d = unl[key]
        assert {"estimate", "lo", "hi", "n"} <= set(d), key
    iv = res["intervals"]["vanilla"]["forget"]["vqa_mcq_acc"]
    assert iv["estimate"] == res["methods"]["vanilla"]["forget"]["vqa_mcq_acc"] and iv["n"] == 4
    md = (out / "report.md").read_text()
    assert "(n=4)" in md and "Closest to the reference: **vanilla**" in md
    assert "Model utility = harmonic mean of" in md


# ----------------------------------------------------------------------------- issue #26
QUICK = ["--limit", "2", "--no-generation", "--no-letter-mcq", "--n-boot", "20"]


def test_eval_config_file_and_its_errors(model_dirs, tmp_path, capsys):
    """--config as unlearn's: values checked against the options' types and choices, a typo
    named with a suggestion (one line, exit 2), command-line flags win."""
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        "synthetic: true\npeople: 4\nbatch-size: 8\nseed: 5\nlimit: 2\nno_generation: true\n"
        "no_letter_mcq: true\nn_boot: 20\nci_method: BCa\nno_unlearning_metrics: true\n"
    )
    out = tmp_path / "c"
    argv = ["eval", "--config", str(cfg), "--model", model_dirs[0], "--seed", "3"]
    assert _run(argv + ["--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["seed"] == 3 and res["config"]["people"] == 4  # flag wins over file
    assert res["bootstrap"] == {"n_boot": 20, "seed": 3, "level": 0.95, "method": "BCa"}
    f = res["methods"]["vanilla"]["forget"]
    assert f["n_vqa_mcq"] == 2 and "vqa_rougeL" not in f
    iv = res["intervals"]["vanilla"]["forget"]["vqa_mcq_acc"]
    assert iv["lo"] <= iv["hi"] or iv["lo"] != iv["lo"]  # BCa: NaN when degenerate
    assert "BCa bootstrap" in (out / "report.md").read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text("synthetic: true\nn_bot: 10\n")
    line = _fails(["eval", "--config", str(typo), "--model", model_dirs[0]], capsys, "'n_bot'")
    assert "did you mean 'n-boot'?" in line and str(typo) in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("synthetic: true\ndtype: float64\n")
    line = _fails(["eval", "--config", str(bad), "--model", model_dirs[0]], capsys, "dtype")
    assert "float64" in line and "bfloat16" in line
    argv = ["eval", "--config", str(cfg), "--model", model_dirs[0], "--mllmu", str(tmp_path)]
    _fails(argv, capsys, "--synthetic", "--mllmu", "not together")


def test_eval_dtype_bfloat16(model_dirs, tmp_path, monkeypatch):
    """--dtype bfloat16 loads the evaluated models in bfloat16 (the likelihoods are read in
    float32); the run completes with numbers in range and records the dtype."""
    import mmunlearn.eval.suite as suite

    seen = []
    real = suite.evaluate_model

    def spy(model, *a, **kw):
        seen.append(next(model.parameters()).dtype)
        return real(model, *a, **kw)

    monkeypatch.setattr(suite, "evaluate_model", spy)
    out = tmp_path / "bf16"
    argv = _argv(model_dirs[0], out, *QUICK, "--dtype", "bfloat16", "--reference", model_dirs[1])
    assert _run(argv) == 0
    assert seen == [torch.bfloat16, torch.bfloat16]
    res = json.loads((out / "results.json").read_text())
    assert res["_protocol"]["dtype"] == "bfloat16"
    assert 0.0 <= res["methods"]["vanilla"]["forget"]["vqa_mcq_acc"] <= 1.0
    assert 0.0 <= res["unlearning"]["vanilla"]["forget_prob"]["estimate"] <= 1.0


def test_eval_hub_id_from_the_local_cache(model_dirs, tmp_path, monkeypatch, capsys):
    """--model takes a Hub id already in the local Hugging Face cache, as unlearn --model;
    an uncached id is one error line saying nothing is downloaded."""
    import shutil

    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--acme--tiny-eval"
    shutil.copytree(model_dirs[0], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    out = tmp_path / "h"
    assert _run(_argv("acme/tiny-eval", out, *QUICK, "--no-unlearning-metrics")) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["tiny-eval"] and res["models"]["tiny-eval"] == "acme/tiny-eval"
    line = _fails(_argv("acme/not-cached", tmp_path / "x"), capsys, "acme/not-cached")
    assert "not in the local Hugging Face cache" in line


def test_eval_progress_bars_on_the_long_loops(model_dirs, tmp_path, monkeypatch):
    """Generation, MCQ-option and likelihood passes go through tqdm (shown on a terminal:
    disable=None); --no-progress turns them off."""
    import mmunlearn.eval.tasks as tasks

    bars = []
    real = tasks.tqdm

    def spy(items, **kw):
        bars.append((kw.get("desc"), kw.get("disable")))
        return real(items, **kw)

    monkeypatch.setattr(tasks, "tqdm", spy)
    argv = _argv(model_dirs[0], tmp_path / "p", "--limit", "2", "--n-boot", "20")
    assert _run(argv) == 0
    descs = {d for d, off in bars if off is None}
    assert {"generate", "MCQ options", "likelihood"} <= descs
    bars.clear()
    assert _run(argv + ["--no-progress", "--out", str(tmp_path / "q")]) == 0
    assert bars and all(off is True for d, off in bars if d != "eval")


def test_eval_on_an_empty_forget_split_is_an_error_naming_it(model_dirs, tmp_path, capsys):
    """An MLLMU-Bench folder whose forget split holds no rows: one line naming the split, exit
    1 (not a table without the forget columns)."""
    from realformat import mllmu_root

    root = mllmu_root(tmp_path / "MLLMU", n_forget=0, n_people=3)
    rc = main(["eval", "--model", model_dirs[0], "--mllmu", str(root),
               "--out", str(tmp_path / "ev")])  # fmt: skip
    err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert rc == 1 and len(err) == 1, err
    assert "forget_5" in err[0] and "forget split has no items" in err[0]
    assert not (tmp_path / "ev" / "results.json").exists()


def test_truncated_weights_of_a_tiny_format_model_are_one_line(model_dirs, tmp_path, capsys):
    import shutil
    from pathlib import Path

    bad = tmp_path / "bad"
    shutil.copytree(model_dirs[0], bad)
    f = next(Path(bad).glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rc = main(_argv(str(bad), tmp_path / "ev"))
    err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    # a folder that is there but cannot be loaded: a runtime failure (1), as in every command
    assert rc == 1 and len(err) == 1 and "Traceback" not in err[0], err
    assert str(bad) in err[0] and "cannot load the weights" in err[0]
