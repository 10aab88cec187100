"""``mmunlearn eval --lmms-tasks`` (mmunlearn.eval.lmms): lmms-eval's tasks on our loaded model.

A local lmms-eval task folder is built here (two task YAMLs over a parquet file written with
``datasets``: a generation task scored by exact match and a multiple-choice task scored by
accuracy); nothing is downloaded (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). The real-format LLaVA
and Qwen2-VL checkpoints of tests/realformat.py go through the same loading as ``mmunlearn
eval``; the wrapper's answers are checked against our own generation and option likelihood.

lmms_eval is installed by the Makefile (lmms-requirements.txt); on a machine without it the
tests that need it are skipped with that reason, except under CI (``CI`` set), where its absence
is a failure, so CI always runs them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from realformat import llava_checkpoint, mllmu_root, qwen2vl_checkpoint

from mmunlearn.cli import main

HAVE_LMMS = importlib.util.find_spec("lmms_eval") is not None
if not HAVE_LMMS and os.environ.get("CI"):
    raise RuntimeError("CI: lmms_eval is not installed (make installs lmms-requirements.txt)")
needs_lmms = pytest.mark.skipif(
    not HAVE_LMMS, reason="lmms_eval is not installed (pip install 'mmunlearn[lmms]')"
)

GEN, MC = "mmu_colour_gen", "mmu_colour_mc"
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf"))
    yield
    # importing lmms_eval sets PIL's LOAD_TRUNCATED_IMAGES for the process (and ignores every
    # warning): mmunlearn.eval.lmms puts both back, or a truncated picture in our data would
    # decode silently (here and in every test after this file)
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert ("ignore", None, Warning, None, 0) not in warnings.filters


def write_tasks(folder: Path) -> Path:
    """A folder lmms-eval reads with ``--include_path``: a parquet file of four picture
    questions and two task YAMLs over it (``dataset_path: parquet``, ``data_files``)."""
    import datasets
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    rows = [names[i % 3] for i in range(4)]
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.Image(),
            "choices": datasets.Sequence(datasets.Value("string")),
            "gold": datasets.Value("int64"),
        }
    )
    data = {
        "question": ["What colour is the picture?"] * len(rows),
        "answer": rows,
        "image": [Image.new("RGB", (28, 20), COLOURS[c]) for c in rows],
        "choices": [names] * len(rows),
        "gold": [names.index(c) for c in rows],
    }
    parquet = folder / "colours.parquet"
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(parquet))
    common = (
        f"dataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: {parquet}\n"
        "test_split: test\ndoc_to_visual: image\ndoc_to_text: question\n"
    )
    (folder / "gen.yaml").write_text(
        f"task: {GEN}\n{common}output_type: generate_until\ndoc_to_target: answer\n"
        'generation_kwargs:\n  max_new_tokens: 3\n  until: ["\\n"]\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    (folder / "mc.yaml").write_text(
        f"task: {MC}\n{common}output_type: multiple_choice\ndoc_to_choice: choices\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    return folder


@pytest.fixture(scope="module")
def F(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    f = {
        "llava": llava_checkpoint(root / "llava"),
        "qwen": qwen2vl_checkpoint(root / "qwen"),
        "mllmu": mllmu_root(root / "MLLMU-Bench"),
        "root": root,
    }
    if HAVE_LMMS:
        f["tasks"] = write_tasks(root / "tasks")
    return f


def snapshot(d: Path) -> dict:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def eval_argv(F, model, out, *extra):
    return ["eval", "--model", str(F[model]), "--mllmu", str(F["mllmu"]), "--limit", "2",
            "--no-unlearning-metrics", "--max-new-tokens", "3", "--out", str(out),
            *extra]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# without lmms_eval, and bad options (no lmms_eval needed)
# ------------------------------------------------------------------------------------------------


def test_without_lmms_eval_one_line_names_the_extra(F, capsys, monkeypatch, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"previous": true}')
    before = snapshot(out)
    for name in [m for m in sys.modules if m == "lmms_eval" or m.startswith("lmms_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # import lmms_eval → ImportError
    rc = main(eval_argv(F, "llava", out, "--lmms-tasks", "mme"))
    line = one_error(capsys)
    assert rc == 2, line
    assert "--lmms-tasks" in line and "pip install 'mmunlearn[lmms]'" in line
    assert snapshot(out) == before


def test_bad_lmms_options_are_usage_errors(F, capsys, tmp_path):
    out = tmp_path / "out"
    rc = main(eval_argv(F, "llava", out, "--lmms-include", str(tmp_path / "none")))
    assert rc == 2 and "--lmms-include" in one_error(capsys) and not out.exists()
    rc = main(eval_argv(F, "llava", out, "--lmms-tasks", "x", "--lmms-include",
                        str(tmp_path / "none")))  # fmt: skip
    assert rc == 2 and "none: no such folder" in one_error(capsys) and not out.exists()
    rc = main(eval_argv(F, "llava", out, "--lmms-tasks", ","))
    assert rc == 2 and "no task name" in one_error(capsys) and not out.exists()


# ------------------------------------------------------------------------------------------------
# with lmms_eval
# ------------------------------------------------------------------------------------------------


@needs_lmms
def test_the_model_class_is_registered_at_run_time(F):
    from mmunlearn.eval import lmms

    lmms.register()  # imports lmms_eval (first: then its globals are put back)
    from lmms_eval import models
    from lmms_eval.api.model import lmms as base

    cls = models.get_model(lmms.MODEL_NAME)
    assert issubclass(cls, base) and cls is lmms.model_class()
    assert cls.__module__ == "mmunlearn.eval.lmms"  # nothing written into lmms_eval's package
    assert lmms.MODEL_NAME in models.list_available_models()
    # as lmms-eval's own CLI would build it: from --model_args
    lm = cls.create_from_arg_string(f"pretrained={F['llava']}", {"batch_size": 2})
    assert lm.batch_size == 2 and type(lm.model).__name__ == "LlavaForConditionalGeneration"


def _requests(kind, gen_kwargs=None):
    """lmms-eval Instances as its ConfigurableTask builds them, for doc 0 and 1."""
    from lmms_eval.api.instance import Instance

    def visual(doc):
        return [doc["image"]]

    out = []
    for doc_id in (0, 1):
        if kind == "generate_until":
            args = ("What colour is the picture?", dict(gen_kwargs), visual, doc_id, "t", "test")
        else:
            args = ("What colour is the picture?", " green", visual, doc_id, "t", "test")
        meta = {"task": "t", "doc_id": doc_id, "repeats": 1}
        out.append(Instance(request_type=kind, arguments=args, idx=0, metadata=meta))
    return out


@needs_lmms
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_wrapper_answers_as_our_own_evaluation(F, family):
    """generate_until = our greedy generation (cut at ``until``); loglikelihood = our mean
    token cross-entropy of the answer (the option score of our MCQ), per request."""
    from PIL import Image

    from mmunlearn.data.schema import Sample
    from mmunlearn.eval import lmms
    from mmunlearn.eval.tasks import EvalConfig, generate
    from mmunlearn.losses import per_sample_ce
    from mmunlearn.models import load_checkpoint

    model, adapter = load_checkpoint(str(F[family]))
    docs = [{"image": Image.new("RGB", (28, 20), c)} for c in COLOURS.values()]
    lm = lmms.model_class()(model=model, adapter=adapter, batch_size=2)
    lm.task_dict = {"t": {"test": docs}}
    samples = [Sample("What colour is the picture?", "", image=d["image"]) for d in docs[:2]]

    got = lm.generate_until(_requests("generate_until", {"max_new_tokens": 4}))
    ours = generate(model, adapter.collate, adapter.tokenizer, samples,
                    EvalConfig(batch_size=2, max_new_tokens=4, progress=False))  # fmt: skip
    assert got == ours
    stop = ours[0][:1] or "x"
    cut = lm.generate_until(_requests("generate_until", {"max_new_tokens": 4, "until": [stop]}))
    assert cut[0] == ours[0].split(stop)[0].strip()

    from lmms_eval.api.instance import unwrap_generation_output

    pairs = [unwrap_generation_output(r)[0] for r in lm.loglikelihood(_requests("ll"))]
    with torch.no_grad():
        batch = adapter.collate([Sample(s.question, "green", image=s.image) for s in samples])
        ce = per_sample_ce(model(**batch).logits.float(), batch["labels"]).tolist()
    assert [p[0] for p in pairs] == pytest.approx(ce, rel=1e-5)
    assert all(isinstance(p[1], bool) for p in pairs)


@needs_lmms
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_eval_runs_local_lmms_tasks_and_merges_them(F, tmp_path, capsys, family):
    out = tmp_path / "ev"
    argv = eval_argv(F, family, out, "--lmms-tasks", f"{GEN},{MC}",
                     "--lmms-include", str(F["tasks"]))  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {family}  # our protocol's rows are there as before
    lm = res["lmms"]
    assert lm["tasks"] == [GEN, MC] and lm["limit"] == 2 and lm["lmms_eval"]
    assert lm["include"] == [str(F["tasks"].resolve())]
    got = lm["methods"][family]
    assert got["n"] == {GEN: 2, MC: 2}
    assert 0.0 <= got["results"][GEN]["exact_match"] <= 1.0
    assert 0.0 <= got["results"][MC]["acc"] <= 1.0
    assert got["higher_is_better"][MC] == {"acc": True}
    md = (out / "report.md").read_text()
    assert "## lmms-eval tasks" in md and f"| {family} |" in md and f"{MC} acc" in md
    assert "lmms-eval tasks:" in capsys.readouterr().out


@needs_lmms
def test_unknown_task_is_one_line_and_nothing_is_written(F, tmp_path, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "report.md").write_text("previous run")
    before = snapshot(out)
    argv = eval_argv(F, "llava", out, "--lmms-tasks", f"{GEN},mmu_colour_gem",
                     "--lmms-include", str(F["tasks"]))  # fmt: skip
    assert main(argv) == 2
    line = one_error(capsys)
    assert "--lmms-tasks mmu_colour_gem: not a task of lmms-eval" in line
    assert GEN in line  # the nearest names
    assert snapshot(out) == before


@needs_lmms
def test_our_data_checks_hold_with_lmms_tasks(F, tmp_path, capsys):
    """A cut PNG in the benchmark is still refused (exit 1, naming file, row and column) when
    lmms-eval is loaded for --lmms-tasks, which otherwise makes PIL decode truncated images."""
    import pyarrow.parquet as pq
    from realformat import SHARD, write_parquet

    root = tmp_path / "MLLMU"
    shutil.copytree(F["mllmu"], root)
    shard = root / "forget_5" / SHARD
    rows = pq.read_table(shard).to_pylist()
    rows[0]["image"] = {"bytes": rows[0]["image"]["bytes"][:60], "path": None}
    write_parquet(shard, rows)
    argv = ["eval", "--model", str(F["llava"]), "--mllmu", str(root), "--out", str(tmp_path / "o"),
            "--lmms-tasks", GEN, "--lmms-include", str(F["tasks"])]  # fmt: skip
    assert main(argv) == 1
    line = one_error(capsys)
    assert "forget_5" in line and "'image'" in line and "row 0" in line
