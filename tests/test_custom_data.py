"""Own data (docs/data.md, mmunlearn/data/custom.py): JSON Lines, parquet and save_to_disk
files the tests write, read back to the rows written (texts, options, the pictures' pixels);
bad rows and bad flag combinations through the CLI (exit code, one line naming file, row and
column, no traceback, nothing written); the pixel limit and the data root on every reader;
saliency → unlearn → eval on a real-format LLaVA checkpoint with own JSONL files; no code from
a checkpoint folder is run; the Python example of docs/data.md runs as written."""

from __future__ import annotations

import ast
import base64
import builtins
import io
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from realformat import llava_checkpoint, mllmu_root

from mmunlearn.cli import main
from mmunlearn.data.custom import custom_eval_sets, custom_sets, file_fingerprint, read_custom
from mmunlearn.data.parquet import DataFormatError, image_policy

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def png(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pictures(folder: Path) -> list[Path]:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    out = []
    for i, c in enumerate(COLOURS):
        p = folder / "img" / f"p{i}.png"
        p.write_bytes(png(c))
        out.append(p)
    return out


def rows_of(n: int, start: int = 0, mcq: bool = True) -> list[dict]:
    """Forget / retain rows: image by relative path, some MCQ, one text-only."""
    out = []
    for i in range(start, start + n):
        r = {"id": f"r{i}", "image": f"img/p{i % 5}.png", "question": f"Who is person {i}?"}
        if mcq and i % 2:
            r.update(options=["Rome", "Oslo", "Lima"], correct=i % 3)
        else:
            r["answer"] = f"This is person {i}; born in Rome."
        out.append(r)
    out.append({"id": f"t{start}", "question": "Where was Ann Bell born?", "answer": "In Rome."})
    return out


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return llava_checkpoint(tmp_path_factory.mktemp("ck") / "llava")


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    pictures(d)
    return {
        "dir": d,
        "forget": write_jsonl(d / "forget.jsonl", rows_of(2)),
        "retain": write_jsonl(d / "retain.jsonl", rows_of(4, start=2)),
        "text": write_jsonl(d / "text.jsonl", [{"question": "Ann's job?", "answer": "Pilot."}]),
    }


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------


def check_against(samples, rows, folder: Path):
    """Each sample is its row: texts, options, correct letter, kind, and the picture's pixels."""
    assert len(samples) == len(rows)
    for s, r in zip(samples, rows):
        assert s.question == r["question"]
        if "options" in r:
            opts = dict(zip("ABC", r["options"]))
            assert s.meta["options"] == opts and s.meta["correct"] == "ABC"[r["correct"]]
            assert s.answer == r.get("answer", opts[s.meta["correct"]])
        else:
            assert s.answer == r["answer"]
        assert s.meta["id"] == r["id"]
        if r.get("image") is None:
            assert s.image is None and s.kind == "text"
        else:
            i = int(re.search(r"p(\d)", str(r.get("_file", r["image"]))).group(1))
            assert s.kind == "vqa" and s.image.size == (40, 30)
            assert s.image.getpixel((3, 4)) == COLOURS[i]


def test_jsonl_paths_base64_and_bytes_objects(tmp_path):
    pictures(tmp_path)
    rows = rows_of(4)
    rows[1]["image"] = "data:image/png;base64," + base64.b64encode(png(COLOURS[1])).decode()
    rows[1]["_file"] = "p1"
    rows[2]["image"] = {"bytes": base64.b64encode(png(COLOURS[2])).decode(), "path": None}
    rows[2]["_file"] = "p2"
    written = [{k: v for k, v in r.items() if k != "_file"} for r in rows]
    f = write_jsonl(tmp_path / "d.jsonl", written)
    samples = read_custom(f)
    check_against(samples, rows, tmp_path)
    assert [s.meta["row"] for s in samples] == [1, 2, 3, 4, 5]  # lines, from 1


def test_parquet_as_datasets_writes_it_and_save_to_disk(tmp_path):
    """The image column as ``datasets``' Image feature stores it (struct<bytes, path>), options
    as a list column; the same table as a parquet shard folder and as a save_to_disk folder
    (state.json + an arrow stream) reads back to the same samples as the JSONL file."""
    pictures(tmp_path)
    rows = rows_of(4)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "image": pa.array(
                [
                    None if "image" not in r else {"bytes": png(COLOURS[i % 5]), "path": None}
                    for i, r in enumerate(rows)
                ],
                struct,
            ),
            "question": [r["question"] for r in rows],
            "answer": [r.get("answer") for r in rows],
            "options": [r.get("options") for r in rows],
            "correct": [r.get("correct") for r in rows],
        }
    )
    (tmp_path / "pq").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "pq" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(2), tmp_path / "pq" / "train-00001-of-00002.parquet")
    disk = tmp_path / "disk"
    disk.mkdir()
    with pa.OSFile(str(disk / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    (disk / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    from_jsonl = read_custom(write_jsonl(tmp_path / "d.jsonl", rows))
    for src in (tmp_path / "pq", disk):
        got = read_custom(src)
        check_against(got, rows, tmp_path)
        for a, b in zip(got, from_jsonl):
            assert (a.question, a.answer, a.kind, a.entity) == (
                b.question,
                b.answer,
                b.kind,
                b.entity,
            )
            assert (a.image is None) == (b.image is None)
            if a.image is not None:
                assert a.image.tobytes() == b.image.tobytes()


def test_sets_eval_tasks_and_fingerprints(data, tmp_path):
    sets = custom_sets(data["forget"], data["retain"], data["text"])
    assert sets.sizes() == {"forget": 3, "retain": 5, "vision_preserve": 5, "language_preserve": 6}
    assert sets.language_preserve[0].image is None and sets.language_preserve[0].answer == "Pilot."
    ev = custom_eval_sets(data["forget"], data["retain"])
    assert {k: len(v) for k, v in ev["forget"].items()} == {"mcq": 1, "cloze": 0, "gen": 2}
    mcq = ev["forget"]["mcq"][0]
    assert mcq.answer == mcq.meta["options"][mcq.meta["correct"]] == "Oslo"
    # the record's hash covers the file and the pictures it names by path
    before = file_fingerprint(data["forget"])
    (data["dir"] / "img" / "p1.png").write_bytes(png((1, 2, 3)))
    assert file_fingerprint(data["forget"]) != before


# ------------------------------------------------------------------------------------------------
# bad input through the CLI: exit code, one line naming file / row / column, nothing written
# ------------------------------------------------------------------------------------------------


def fails(argv, code, names, capsys, out: Path):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    assert not out.exists(), "a failed run wrote its --out"
    return lines[0]


GOOD = {"id": "x", "image": "img/p0.png", "question": "Who?", "answer": "Ann."}
ROW_CASES = [  # (case, line 2 of the forget file (line 1 is GOOD), names in the message)
    ("missing question", {"answer": "a"}, ["line 2", "'question'", "missing"]),
    ("answer not a string", {"question": "q", "answer": 3}, ["line 2", "'answer'", "int"]),
    ("empty answer", {"question": "q", "answer": "  "}, ["line 2", "'answer'", "empty"]),
    ("image file missing", {**GOOD, "id": "y", "image": "img/nope.png"}, ["'image'", "nope"]),
    ("image not decodable", {**GOOD, "id": "y", "image": "img/junk.png"}, ["'image'", "decode"]),
    ("duplicate id", GOOD, ["line 2", "'id'", "duplicate id 'x' (first at line 1)"]),
    ("bad JSON", '{"question": "q", "answer": }', ["line 2", "not valid JSON"]),
    ("not an object", '["q", "a"]', ["line 2", "JSON object"]),
    ("misspelt column", {"question": "q", "answr": "a"}, ["'answr'", "did you mean 'answer'"]),
    (
        "correct out of range",
        {"question": "q", "options": ["a", "b"], "correct": 2},
        ["line 2", "'correct'", "index 2"],
    ),  # fmt: skip
    ("options without correct", {"question": "q", "options": ["a", "b"]}, ["'correct'"]),
    ("correct without options", {"question": "q", "answer": "a", "correct": 0}, ["'options'"]),
    ("one option", {"question": "q", "options": ["a"], "correct": 0}, ["'options'", "2"]),
    ("options a number", {"question": "q", "options": 4, "correct": 0}, ["'options'", "int"]),
    ("unknown task", {"question": "q", "answer": "a", "task": "essay"}, ["'task'", "essay"]),
    ("bad base64", {**GOOD, "id": "y", "image": "base64:@@@"}, ["'image'", "base64"]),
    ("image a number", {**GOOD, "id": "y", "image": 7}, ["'image'", "got int"]),
    ("id a list", {**GOOD, "id": [1]}, ["'id'"]),
]


@pytest.mark.parametrize("case,row,names", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_bad_row_is_one_line_naming_file_line_and_column(case, row, names, llava, data, capsys):
    (data["dir"] / "img" / "junk.png").write_bytes(b"not a png at all")
    f = write_jsonl(data["dir"] / "bad.jsonl", [GOOD, row])
    out = data["dir"] / "out"
    argv = ["saliency", "--model", llava, "--forget", f, "--retain", data["retain"], "--out", out]
    fails(argv, 1, [f, *names], capsys, out)


def test_bad_files(llava, data, capsys, tmp_path):
    out = tmp_path / "out"
    base = ["saliency", "--model", llava, "--out", out]
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    fails(
        [*base, "--forget", empty, "--retain", data["retain"]], 1, [empty, "no rows"], capsys, out
    )
    # a preserve-text row with a picture
    pt = write_jsonl(data["dir"] / "pt.jsonl", [GOOD])
    argv = [*base, "--forget", data["forget"], "--retain", data["retain"], "--preserve-text", pt]
    fails(argv, 1, [pt, "line 1", "'image'", "text-only"], capsys, out)
    # a parquet table without its answer in row 2 (rows counted from 1)
    t = tmp_path / "t.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": ["a1", None]}), t)
    argv = [*base, "--forget", t, "--retain", data["retain"]]
    fails(argv, 1, [t, "row 2", "'answer'", "missing"], capsys, out)
    # a DatasetDict folder instead of one split
    dd = tmp_path / "dd"
    dd.mkdir()
    (dd / "dataset_dict.json").write_text('{"splits": ["train"]}')
    fails([*base, "--forget", dd, "--retain", data["retain"]], 1, [dd, "one split"], capsys, out)


FLAG_CASES = [  # (case, argv after the model, names): usage errors, exit 2
    (
        "forget file missing",
        ["--forget", "nope.jsonl", "--retain", "{retain}"],
        ["--forget nope.jsonl", "no such file"],
    ),  # fmt: skip
    (
        "benchmark and own files",
        ["--mllmu", "{dir}", "--forget", "{forget}", "--retain", "{retain}"],
        ["--mllmu and --forget", "not both"],
    ),  # fmt: skip
    ("retain without forget", ["--retain", "{retain}"], ["--retain without --forget"]),
    ("saliency without retain", ["--forget", "{forget}"], ["--retain", "saliency"]),
    (
        "data root missing",
        ["--forget", "{forget}", "--retain", "{retain}", "--data-root", "nowhere"],
        ["--data-root nowhere"],
    ),  # fmt: skip
    (
        "pixel limit negative",
        ["--forget", "{forget}", "--retain", "{retain}", "--max-image-pixels", "-5"],
        ["--max-image-pixels"],
    ),  # fmt: skip
]


@pytest.mark.parametrize("case,argv,names", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_flag_combinations(case, argv, names, llava, data, capsys):
    argv = [str(a).format(dir=data["dir"], forget=data["forget"], retain=data["retain"])
            for a in argv]  # fmt: skip
    out = data["dir"] / "out"
    fails(["saliency", "--model", llava, *argv, "--out", out], 2, names, capsys, out)


def test_method_needing_retain_and_eval_combinations(llava, data, capsys):
    out = data["dir"] / "out"
    argv = ["unlearn", "--model", llava, "--forget", data["forget"], "--method", "ga_diff"]
    fails([*argv, "--out", out], 2, ["--retain", "--method ga_diff"], capsys, out)
    argv = ["eval", "--model", llava, "--forget-test", data["forget"], "--out", out]
    fails(argv, 2, ["--forget-test without --forget"], capsys, out)
    argv = ["eval", "--model", llava, "--synthetic", "--forget", data["forget"], "--out", out]
    fails(argv, 2, ["--synthetic and --forget"], capsys, out)


# ------------------------------------------------------------------------------------------------
# untrusted pictures and paths
# ------------------------------------------------------------------------------------------------


def test_pixel_limit_on_own_files_and_benchmarks(tmp_path, llava, capsys):
    big = tmp_path / "big.png"
    Image.new("RGB", (1200, 1000), "white").save(big)  # 1.2 M pixels, a few kB
    f = write_jsonl(tmp_path / "f.jsonl", [{"image": "big.png", "question": "q", "answer": "a"}])
    assert read_custom(f)[0].image.size == (1200, 1000)  # under PIL's default limit
    for limit in (1_000_000, 500_000, 100_000):  # PIL's warning zone, its error zone, beyond
        with image_policy(max_pixels=limit), pytest.raises(DataFormatError) as e:
            read_custom(f)
        assert "line 1, column 'image'" in str(e.value) and f"{limit:,} pixels" in str(e.value)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's own setting restored
    with image_policy(max_pixels=None):
        assert read_custom(f)[0].image.size == (1200, 1000)
    out = tmp_path / "out"
    argv = ["saliency", "--model", llava, "--forget", f, "--retain", f, "--out", out]
    fails([*argv, "--max-image-pixels", "1000000"], 1, [f, "--max-image-pixels"], capsys, out)
    # the benchmarks' readers too (their pictures are 40 × 30)
    root = mllmu_root(tmp_path / "MLLMU-Bench")
    argv = ["saliency", "--model", llava, "--mllmu", root, "--max-image-pixels", "1000"]
    fails([*argv, "--out", out], 1, ["column 'image'", "1,000 pixels"], capsys, out)


def test_data_root_refuses_paths_that_leave_it(tmp_path, llava, capsys):
    root = tmp_path / "root"
    pictures(tmp_path / "outside")
    pictures(root)
    os.symlink(tmp_path / "outside" / "img" / "p0.png", root / "img" / "link.png")
    ok = {"image": "img/p1.png", "question": "q", "answer": "a"}
    up = {**ok, "image": "../outside/img/p0.png"}
    link = {**ok, "image": "img/link.png"}
    absolute = {**ok, "image": str(tmp_path / "outside" / "img" / "p0.png")}
    for row in (up, link, absolute):
        f = write_jsonl(root / "f.jsonl", [ok, row])
        assert len(read_custom(f)) == 2  # without a data root: read
        with image_policy(data_root=root), pytest.raises(DataFormatError) as e:
            read_custom(f)
        assert "line 2, column 'image'" in str(e.value) and "outside --data-root" in str(e.value)
        assert str((tmp_path / "outside").resolve()) in str(e.value)  # where it really points
    f = write_jsonl(root / "f.jsonl", [ok, link])
    out = tmp_path / "out"
    argv = ["saliency", "--model", llava, "--forget", f, "--retain", f, "--data-root", root]
    fails([*argv, "--out", out], 1, [f, "line 2", "outside --data-root"], capsys, out)
    with image_policy(data_root=root):
        assert len(read_custom(write_jsonl(root / "g.jsonl", [ok]))) == 1


# ------------------------------------------------------------------------------------------------
# the real job on own files
# ------------------------------------------------------------------------------------------------


def test_saliency_unlearn_eval_on_own_jsonl(llava, data, tmp_path, capsys):
    own = ["--forget", data["forget"], "--retain", data["retain"]]
    model = ["--model", llava]
    sal = tmp_path / "sal"
    argv = ["saliency", *model, *own, "--preserve-text", data["text"], "--out", sal]
    assert main([str(a) for a in argv]) == 0
    info = json.loads((sal / "saliency.json").read_text())
    assert info["data"]["forget"] == 3 and info["data"]["language_preserve"] == 6
    assert info["data"]["preserve text file sha256"] == file_fingerprint(data["text"])
    out = tmp_path / "u"
    argv = ["unlearn", *model, *own, "--mask", sal / "mask_both.safetensors", "--lr", "1e-3"]
    assert main([str(a) for a in [*argv, "--out", out]]) == 0
    summary = json.loads((out / "unlearn.json").read_text())
    assert summary["data"]["forget file sha256"] == file_fingerprint(data["forget"])
    assert summary["data"]["retain file"] == str(data["retain"])
    card = (out / "model" / "README.md").read_text()
    assert file_fingerprint(data["retain"]) in card
    log = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in log} == {"forget", "retain"}
    # GA has no retain steps: --retain is not needed
    ga = tmp_path / "ga"
    argv = ["unlearn", *model, "--forget", data["forget"], "--method", "ga", "--steps", "1"]
    assert main([str(a) for a in [*argv, "--out", ga]]) == 0
    assert json.loads((ga / "unlearn.json").read_text())["data"]["retain"] == 0
    ev = tmp_path / "ev"
    argv = ["eval", *model, "--model", out / "model", *own, "--forget-test", data["forget"]]
    argv += ["--max-new-tokens", "4", "--no-progress", "--out", ev]
    assert main([str(a) for a in argv]) == 0
    res = json.loads((ev / "results.json").read_text())
    for label in ("llava", "model"):
        m = res["methods"][label]
        assert m["forget"]["n_vqa_mcq"] == 1 and m["forget"]["n_vqa_gen"] == 1
        assert m["forget"]["n_qa_gen"] == 1 and m["retain"]["n_vqa_mcq"] == 2
        assert "forget_test" in m
    assert res["_protocol"]["data"]["forget file sha256"] == file_fingerprint(data["forget"])
    assert f"data {data['forget']}, {data['retain']}" in (out / "model" / "README.md").read_text()


# ------------------------------------------------------------------------------------------------
# no code from a checkpoint folder; the documented example
# ------------------------------------------------------------------------------------------------


def test_every_from_pretrained_refuses_remote_code():
    """Every ``from_pretrained`` call of the package passes ``trust_remote_code=False`` (or the
    loader's ``LOCAL`` keywords, which do)."""
    from mmunlearn.models.loading import LOCAL

    assert LOCAL["trust_remote_code"] is False
    bad = []
    for path in (ROOT / "mmunlearn").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained"
            ):
                continue
            kws = {k.arg: k.value for k in node.keywords}
            starred = [ast.unparse(k.value) for k in node.keywords if k.arg is None]
            safe = isinstance(kws.get("trust_remote_code"), ast.Constant) and (
                kws["trust_remote_code"].value is False
            )
            if not safe and not ({"LOCAL", "kw"} & set(starred)):
                bad.append(f"{path.name}:{node.lineno}")
    assert not bad, bad


def test_checkpoint_code_is_never_run(tmp_path, llava, data, capsys, monkeypatch):
    """A checkpoint whose config, tokenizer and processor name classes in its own Python files
    (``auto_map``) loads with the built-in classes or is refused; its files never run, even
    with a terminal answering "y" to transformers' question."""
    import shutil

    ck = tmp_path / "evil"
    shutil.copytree(llava, ck)
    marker = tmp_path / "ran"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    for name in ("modeling_evil", "tokenization_evil", "processing_evil"):
        (ck / f"{name}.py").write_text(code)
    for fname, amap in (
        ("config.json", {"AutoConfig": "modeling_evil.C", "AutoModelForImageTextToText":
                         "modeling_evil.M"}),
        ("tokenizer_config.json", {"AutoTokenizer": [None, "tokenization_evil.T"]}),
        ("processor_config.json", {"AutoProcessor": "processing_evil.P"}),
    ):  # fmt: skip
        cfg = json.loads((ck / fname).read_text())
        cfg["auto_map"] = amap
        (ck / fname).write_text(json.dumps(cfg))
    monkeypatch.setattr(builtins, "input", lambda *a: "y")
    out = tmp_path / "out"
    own = ["--forget", data["forget"], "--retain", data["retain"]]
    rc = main([str(a) for a in ["saliency", "--model", ck, *own, "--out", out]])
    assert rc in (0, 1), capsys.readouterr().err
    assert not marker.exists(), "code from the checkpoint folder ran"


def test_the_python_example_of_docs_data_md_runs(tmp_path, monkeypatch, llava):
    """The ``python`` block of docs/data.md, run as written in a folder holding the paths it
    names (models/my-llava, data/forget.jsonl, data/retain.jsonl)."""
    import shutil

    text = (ROOT / "docs" / "data.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) <= 10
    shutil.copytree(llava, tmp_path / "models" / "my-llava")
    pictures(tmp_path / "data")
    write_jsonl(tmp_path / "data" / "forget.jsonl", rows_of(2))
    write_jsonl(tmp_path / "data" / "retain.jsonl", rows_of(4, start=2))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "docs/data.md", "exec"), scope)
    assert scope["result"]["steps"] == 4


def test_finetune_then_saliency_unlearn_eval_with_reference_on_own_jsonl(llava, data, tmp_path):
    """The whole job from own files (#23): finetune the vanilla model (forget + retain rows)
    and the reference (retain rows only), then saliency → unlearn from the vanilla model and
    eval with --reference, all through the CLI on a real-format LLaVA checkpoint."""
    own = ["--forget", data["forget"], "--retain", data["retain"]]
    common = ["--lr", "1e-3", "--batch-size", "2", "--epochs", "2"]
    runs = {}
    for which in ("vanilla", "reference"):
        out = tmp_path / f"ft-{which}"
        argv = ["finetune", "--model", llava, *own, "--preserve-text", data["text"],
                "--train-set", which, *common, "--out", out]  # fmt: skip
        assert main([str(a) for a in argv]) == 0
        runs[which] = json.loads((out / "finetune.json").read_text())
        assert runs[which]["forget file sha256"] == file_fingerprint(data["forget"])
    # the reference never saw the forget rows: 3 forget rows fewer than the vanilla set
    assert runs["vanilla"]["data"]["items"] - runs["reference"]["data"]["items"] == 3
    assert "forget" not in runs["reference"]["source"].split("own files: ")[1].split(" ")[0]
    vanilla, ref = tmp_path / "ft-vanilla" / "model", tmp_path / "ft-reference" / "model"
    sal = tmp_path / "sal"
    argv = ["saliency", "--model", vanilla, *own, "--preserve-text", data["text"], "--out", sal]
    assert main([str(a) for a in argv]) == 0
    u = tmp_path / "u"
    argv = ["unlearn", "--model", vanilla, *own, "--mask", sal / "mask_both.safetensors",
            "--lr", "1e-3", "--out", u]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    ev = tmp_path / "ev"
    argv = ["eval", "--model", vanilla, "--model", u / "model", "--reference", ref, *own,
            "--forget-test", data["forget"], "--max-new-tokens", "4", "--no-progress",
            "--out", ev]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert set(res["methods"]) >= {"model"} and len(res["methods"]) >= 2
    assert "gap" in json.dumps(res).lower()


def test_finetune_reference_on_own_files_needs_retain(llava, data, tmp_path, capsys):
    argv = ["finetune", "--model", str(llava), "--forget", str(data["forget"]),
            "--train-set", "reference", "--out", str(tmp_path / "x")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--retain" in err and "reference" in err
    assert not (tmp_path / "x").exists()
