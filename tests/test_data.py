"""Data: MLLMU-Bench and CLEAR parquet readers on small fixtures, and the synthetic benchmark."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmunlearn.data.clear import (
    CAPTION_PROMPTS,
    NAME_QUESTION,
    RECOGNITION_PROMPT,
    clear_config,
    read_clear,
    read_clear_name_mcq,
    read_clear_real,
)
from mmunlearn.data.mllmu import (
    DataFormatError,
    parquet_files,
    read_mllmu_biographies,
    read_mllmu_classification,
    read_mllmu_cloze,
    read_mllmu_eval,
    read_mllmu_generation,
    read_mllmu_split,
    text_preserve_set,
)
from mmunlearn.data.schema import Sample
from mmunlearn.data.synthetic import NAME, SyntheticBenchmark, draw_portrait, make_benchmark

# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 100, 50)]


def png(colour, size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def img_cell(colour, size=(6, 4)) -> dict:
    return {"bytes": png(colour, size), "path": None}


def write(path, rows, schema=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def pixel(img) -> tuple:
    return img.getpixel((0, 0))


def assert_names(err, file, row, column):
    msg = str(err.value)
    assert str(file) in msg, msg
    assert (f"row {row}" if row is not None else "column absent") in msg, msg
    assert repr(column) in msg, msg


def bio(name):
    return json.dumps({"Name": name, "Employment": "Baker", "Born": "1970"})


CLASSIFY = {
    "Image_Textual_Questions": [
        {
            "Question": "Job of the person?",
            "Options": {"A": "pilot", "B": "baker", "C": "nurse", "D": "chef"},
            "Correct_Answer": "B",
        },
    ],
    "Pure_Text_Questions": [
        {
            "Question": "Where was Ann born?",
            "Options": {"A": "Oslo", "B": "Lima", "C": "Rome", "D": "Bern"},
            "Correct_Answer": "C",
        },
        {
            "Question": "When was Ann born?",
            "Options": {"A": "1970", "B": "1980", "C": "1990", "D": "2000"},
            "Correct_Answer": "A",
        },
    ],
}
MASK = [
    {
        "Question": "The person in the image works as a __.",
        "Ground_Truth": "baker",
        "Type": "Image_Textual",
    },
    {"Question": "Ann was born in __.", "Ground_Truth": "Rome", "Type": "Pure_Text"},
]
GEN = [
    {
        "Question": "What does the person in the image do?",
        "Ground_Truth": "She bakes bread.",
        "Type": "Image_Textual",
    },
    {"Question": "What does Ann do?", "Ground_Truth": "She bakes.", "Type": "Pure_Text"},
]


def mllmu_row(i, **kw):
    row = {"ID": f"P{i}", "image": img_cell(COLOURS[i]), "biography": bio(f"Person {i}")}
    row.update(kw)
    return row


# ---------------------------------------------------------------------------------------------
# MLLMU-Bench
# ---------------------------------------------------------------------------------------------


def test_mllmu_metadata_layout(tmp_path):
    meta0 = [
        {"Question": "Who is this?", "Answer": "Ann"},
        {"Question": "What is her job?", "Answer": "baker"},
        {"Question": "Skipped?", "Answer": ""},
    ]
    meta1 = [{"Question": "Who is this?", "Answer": "Bob"}]
    f = write(
        tmp_path / "forget_5" / "train-00000-of-00001.parquet",
        [mllmu_row(0, metadata=json.dumps(meta0)), mllmu_row(1, metadata=json.dumps(meta1))],
    )
    for src in (tmp_path / "forget_5", f):
        s = read_mllmu_split(src)
        assert [(x.question, x.answer, x.entity) for x in s] == [
            ("Who is this?", "Ann", "P0"),
            ("What is her job?", "baker", "P0"),
            ("Who is this?", "Bob", "P1"),
        ]
        assert all(isinstance(x, Sample) and x.kind == "vqa" for x in s)
        assert [pixel(x.image) for x in s] == [COLOURS[0], COLOURS[0], COLOURS[1]]
        assert s[0].image.mode == "RGB" and s[0].image.size == (6, 4)
        assert s[2].meta == {"id": "P1", "source": str(f), "row": 1}
    assert read_mllmu_biographies(f) == {
        "P0": {"Name": "Person 0", "Employment": "Baker", "Born": "1970"},
        "P1": {"Name": "Person 1", "Employment": "Baker", "Born": "1970"},
    }


def test_mllmu_plain_layout_several_shards(tmp_path):
    d = tmp_path / "retain_95"
    write(d / "train-00001-of-00002.parquet", [mllmu_row(2, question="Q2?", answer="A2")])
    write(
        d / "train-00000-of-00002.parquet",
        [mllmu_row(0, question="Q0?", answer="A0"), mllmu_row(1, question="Q1?", answer="A1")],
    )
    assert [p.name for p in parquet_files(d)] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    s = read_mllmu_split(d)
    assert [(x.question, x.answer, x.entity, x.meta["row"]) for x in s] == [
        ("Q0?", "A0", "P0", 0),
        ("Q1?", "A1", "P1", 1),
        ("Q2?", "A2", "P2", 0),
    ]
    assert [pixel(x.image) for x in s] == COLOURS[:3]


def test_mllmu_eval_tasks_struct_and_json(tmp_path):
    rows = [mllmu_row(0, Classification_Task=CLASSIFY, Mask_Task=MASK, Generation_Task=GEN)]
    f_struct = write(tmp_path / "s" / "train.parquet", rows)
    rows_json = [
        mllmu_row(
            0,
            Classification_Task=json.dumps(CLASSIFY),
            Mask_Task=json.dumps(MASK),
            Generation_Task=json.dumps(GEN),
        )
    ]
    f_json = write(tmp_path / "j" / "train.parquet", rows_json)
    for f in (f_struct, f_json):
        mcq = read_mllmu_classification(f)
        assert [(x.question, x.answer, x.kind, x.meta["correct"]) for x in mcq] == [
            ("Job of the person?", "baker", "vqa", "B"),
            ("Where was Ann born?", "Rome", "text", "C"),
            ("When was Ann born?", "1970", "text", "A"),
        ]
        assert pixel(mcq[0].image) == COLOURS[0] and mcq[1].image is None
        assert mcq[0].meta["options"] == {"A": "pilot", "B": "baker", "C": "nurse", "D": "chef"}
        assert mcq[1].meta["type"] == "Pure_Text_Questions" and mcq[1].entity == "P0"
        assert mcq[0].meta["task"] == "classification" and mcq[0].meta["row"] == 0
        cloze = read_mllmu_cloze(f)
        assert [(x.answer, x.meta["ground_truth"], x.kind) for x in cloze] == [
            ("baker", "baker", "vqa"),
            ("Rome", "Rome", "text"),
        ]
        assert all("__" in x.question for x in cloze)
        assert pixel(cloze[0].image) == COLOURS[0] and cloze[1].image is None
        gen = read_mllmu_generation(f)
        assert [(x.question, x.answer, x.kind, x.meta["type"]) for x in gen] == [
            ("What does the person in the image do?", "She bakes bread.", "vqa", "Image_Textual"),
            ("What does Ann do?", "She bakes.", "text", "Pure_Text"),
        ]
        assert "ground_truth" not in gen[0].meta
        ev = read_mllmu_eval(f)
        assert [len(ev[k]) for k in ("mcq", "cloze", "gen")] == [3, 2, 2]
    pres = text_preserve_set(f_struct.parent)
    assert [(x.question, x.answer, x.kind, x.image, x.entity) for x in pres] == [
        ("Where was Ann born?", "Rome", "text", None, "P0"),
        ("When was Ann born?", "1970", "text", None, "P0"),
    ]
    assert pres[0].meta["options"]["C"] == "Rome" and pres[0].meta["correct"] == "C"


def test_mllmu_test_set_images_list(tmp_path):
    row = {
        "ID": "P0",
        "images": [img_cell(c) for c in COLOURS[:3]],
        "Classification_Task": CLASSIFY,
    }
    d = tmp_path / "Test_Set"
    write(d / "train-00000-of-00002.parquet", [row])
    write(d / "train-00001-of-00002.parquet", [{**row, "ID": "P1"}])
    first = read_mllmu_classification(d, image_choice="first")
    assert [pixel(x.image) for x in first if x.kind == "vqa"] == [COLOURS[0]] * 2
    every = [x for x in read_mllmu_classification(d, image_choice="all") if x.kind == "vqa"]
    assert [pixel(x.image) for x in every] == COLOURS[:3] * 2
    rnd = [pixel(x.image) for x in read_mllmu_classification(d, seed=3) if x.kind == "vqa"]
    assert rnd == [pixel(x.image) for x in read_mllmu_classification(d, seed=3) if x.kind == "vqa"]
    assert set(rnd) <= set(COLOURS[:3])


def test_mllmu_missing_qa_columns(tmp_path):
    f = write(tmp_path / "x.parquet", [mllmu_row(0)])
    with pytest.raises(ValueError) as err:
        read_mllmu_split(f)
    assert_names(err, f, None, "metadata")
    g = write(tmp_path / "y.parquet", [mllmu_row(0, question="Q?")])
    with pytest.raises(DataFormatError) as err:
        read_mllmu_split(g)
    assert_names(err, g, None, "answer")
    with pytest.raises(ValueError) as err:
        read_mllmu_classification(f)
    assert_names(err, f, None, "Classification_Task")


def test_mllmu_corrupt_image(tmp_path):
    rows = [mllmu_row(0, question="Q?", answer="A"), mllmu_row(1, question="Q?", answer="A")]
    rows[1]["image"] = {"bytes": b"\x89PNG not really", "path": None}
    f = write(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError) as err:
        read_mllmu_split(f)
    assert_names(err, f, 1, "image")
    assert "decode" in str(err.value)


def test_mllmu_bad_json(tmp_path):
    f = write(tmp_path / "m.parquet", [mllmu_row(0, metadata='[{"Question": "Q?", "Answer"')])
    with pytest.raises(ValueError) as err:
        read_mllmu_split(f)
    assert_names(err, f, 0, "metadata")
    assert "JSON" in str(err.value)
    rows = [mllmu_row(0), mllmu_row(1)]
    rows[1]["biography"] = "{not json"
    g = write(tmp_path / "b.parquet", rows)
    with pytest.raises(ValueError) as err:
        read_mllmu_biographies(g)
    assert_names(err, g, 1, "biography")
    h = write(tmp_path / "c.parquet", [mllmu_row(0, Classification_Task="{oops")])
    with pytest.raises(ValueError) as err:
        text_preserve_set(h)
    assert_names(err, h, 0, "Classification_Task")


def test_mllmu_malformed_entries(tmp_path):
    f = write(tmp_path / "m.parquet", [mllmu_row(0, metadata=json.dumps([{"Question": "Q?"}]))])
    with pytest.raises(ValueError) as err:
        read_mllmu_split(f)
    assert_names(err, f, 0, "metadata")
    assert "'Answer'" in str(err.value)
    bad = json.loads(json.dumps(CLASSIFY))
    bad["Pure_Text_Questions"][0]["Correct_Answer"] = "E"
    g = write(tmp_path / "c.parquet", [mllmu_row(0, Classification_Task=json.dumps(bad))])
    with pytest.raises(ValueError) as err:
        read_mllmu_classification(g)
    assert_names(err, g, 0, "Classification_Task")
    with pytest.raises(FileNotFoundError):
        read_mllmu_split(tmp_path / "nowhere")


def test_mllmu_correct_answer_given_as_text(tmp_path):
    alt = json.loads(json.dumps(CLASSIFY))
    alt["Pure_Text_Questions"][0]["Correct_Answer"] = "Rome"
    alt["Pure_Text_Questions"][1]["Correct_Answer"] = "A. 1970"
    f = write(tmp_path / "c.parquet", [mllmu_row(0, Classification_Task=alt)])
    assert [x.meta["correct"] for x in text_preserve_set(f)] == ["C", "A"]


# ---------------------------------------------------------------------------------------------
# CLEAR
# ---------------------------------------------------------------------------------------------

IMG_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def clear_rows(n=3):
    return [
        {"image": img_cell(COLOURS[i]), "caption": f"caption {i}", "name": f"Name {i}"}
        for i in range(n)
    ]


def test_clear_caption_and_recognition(tmp_path):
    d = tmp_path / "CLEAR"
    write(d / "forget05" / "train-00000-of-00001.parquet", clear_rows())
    cfg = clear_config(d, "forget05")
    cap = read_clear(cfg, "caption", seed=1)
    assert [(x.answer, x.entity, x.kind, pixel(x.image)) for x in cap] == [
        (f"caption {i}", f"Name {i}", "vqa", COLOURS[i]) for i in range(3)
    ]
    assert all(x.question in CAPTION_PROMPTS for x in cap)
    assert [x.question for x in cap] == [x.question for x in read_clear(cfg, seed=1)]
    assert cap[2].meta["mode"] == "caption" and cap[2].meta["row"] == 2
    rec = read_clear(cfg, "recognition")
    assert [(x.question, x.answer, x.kind) for x in rec] == [
        (RECOGNITION_PROMPT, f"Name {i}", "vqa") for i in range(3)
    ]
    with pytest.raises(ValueError):
        read_clear(cfg, "bogus")
    with pytest.raises(FileNotFoundError):
        clear_config(d, "forget10")


def test_clear_tofu_text_rows(tmp_path):
    rows = clear_rows(2) + [
        {
            "image": None,
            "caption": None,
            "name": None,
            "question": "Who wrote X?",
            "answer": "Y wrote it.",
        }
    ]
    for r in rows[:2]:
        r.update(question=None, answer=None)
    schema = pa.schema(
        [
            ("image", IMG_STRUCT),
            ("caption", pa.string()),
            ("name", pa.string()),
            ("question", pa.string()),
            ("answer", pa.string()),
        ]
    )
    f = write(tmp_path / "full+tofu" / "train-00000-of-00001.parquet", rows, schema)
    cap = read_clear(f.parent, "caption")
    assert [(x.kind, x.answer) for x in cap] == [
        ("vqa", "caption 0"),
        ("vqa", "caption 1"),
        ("text", "Y wrote it."),
    ]
    assert cap[2].image is None and cap[2].question == "Who wrote X?" and cap[2].entity == ""
    assert [x.kind for x in read_clear(f, "caption", include_text=False)] == ["vqa", "vqa"]
    assert [x.answer for x in read_clear(f, "recognition")] == ["Name 0", "Name 1", "Y wrote it."]
    text = read_clear(f, "text")
    assert [(x.question, x.answer, x.image, x.kind) for x in text] == [
        ("Who wrote X?", "Y wrote it.", None, "text")
    ]
    assert text[0].meta == {"mode": "text", "source": str(f), "row": 2}


def test_clear_perturbed_and_real(tmp_path):
    rows = clear_rows(2)
    for i, r in enumerate(rows):
        r.update(
            paraphrased_caption=f"para {i}",
            perturbed_captions=[f"bad {i}a", f"bad {i}b"],
            perturbed_names=["Wrong One", "Wrong Two", "Wrong Three"],
        )
    f = write(tmp_path / "forget05_perturbed" / "train-00000-of-00001.parquet", rows)
    mcq = read_clear_name_mcq(f, seed=0)
    assert [x.answer for x in mcq] == ["Name 0", "Name 1"]
    for x in mcq:
        assert x.question == NAME_QUESTION and x.kind == "vqa"
        assert x.meta["options"][x.meta["correct"]] == x.answer
        assert sorted(x.meta["options"].values()) == sorted(
            [x.answer, "Wrong One", "Wrong Two", "Wrong Three"]
        )
        assert list(x.meta["options"]) == ["A", "B", "C", "D"]
    assert [x.meta["correct"] for x in mcq] == [
        x.meta["correct"] for x in read_clear_name_mcq(f, seed=0)
    ]
    cap = read_clear(f, "caption")
    assert cap[1].meta["paraphrased_caption"] == "para 1"
    assert cap[1].meta["perturbed_captions"] == ["bad 1a", "bad 1b"]
    assert read_clear(f, "recognition")[0].meta["perturbed_names"][0] == "Wrong One"

    real = [
        {
            "image": img_cell(COLOURS[i]),
            "question": f"Who is {i}?",
            "answer": f"Star {i}",
            "options": ["Other A", "Other B", "Other C"],
        }
        for i in range(2)
    ]
    g = write(tmp_path / "real_faces" / "train-00000-of-00001.parquet", real)
    rf = read_clear_real(g.parent, seed=5)
    for i, x in enumerate(rf):
        assert (x.question, x.answer, pixel(x.image)) == (f"Who is {i}?", f"Star {i}", COLOURS[i])
        assert x.meta["options"][x.meta["correct"]] == f"Star {i}"
        assert len(x.meta["options"]) == 4


def test_clear_errors(tmp_path):
    rows = clear_rows(3)
    rows[2]["image"] = {"bytes": b"garbage", "path": None}
    f = write(tmp_path / "a.parquet", rows)
    with pytest.raises(ValueError) as err:
        read_clear(f, "caption")
    assert_names(err, f, 2, "image")
    g = write(tmp_path / "b.parquet", [{"image": img_cell(COLOURS[0]), "name": "N"}])
    with pytest.raises(ValueError) as err:
        read_clear(g, "caption")
    assert_names(err, g, None, "caption")
    with pytest.raises(ValueError) as err:
        read_clear(g, "text")
    assert_names(err, g, None, "question")
    schema = pa.schema([("image", IMG_STRUCT), ("caption", pa.string()), ("name", pa.string())])
    h = write(
        tmp_path / "c.parquet", [rows[0], {"image": None, "caption": "c", "name": "n"}], schema
    )
    with pytest.raises(ValueError) as err:
        read_clear(h, "recognition")
    assert_names(err, h, 1, "image")
    rows = clear_rows(1)
    rows[0]["perturbed_names"] = '["A", "B"'
    k = write(tmp_path / "d.parquet", rows)
    with pytest.raises(ValueError) as err:
        read_clear_name_mcq(k)
    assert_names(err, k, 0, "perturbed_names")


# ---------------------------------------------------------------------------------------------
# Synthetic benchmark
# ---------------------------------------------------------------------------------------------

SAMPLE_LISTS = [
    k for k, v in SyntheticBenchmark.__annotations__.items() if "list[Sample]" in str(v)
]


@pytest.fixture(scope="module")
def bench():
    return make_benchmark()


def fingerprint(b: SyntheticBenchmark):
    """Everything of a benchmark as comparable data (images as raw bytes)."""
    out = []
    for k in SAMPLE_LISTS:
        for s in getattr(b, k):
            img = None if s.image is None else (s.image.size, s.image.tobytes())
            out.append((k, s.question, s.answer, s.entity, s.kind, repr(s.meta), img))
    return out


def test_synthetic_default_sized(bench):
    # speed is measured, never asserted: the default builds in ~0.1 s on one core (2026-11-25)
    assert len(bench.people) == 40 and len(bench.forget_people) == 8
    assert len(set(bench.names)) == 40
    assert bench.image_attributes == ("birthplace", "occupation", "hobby")
    assert bench.text_only_attributes == ("pet",)
    assert all(len(v) == 8 for v in bench.attributes.values())
    per_vqa, per_text = 16 * (3 + 1), 4
    assert len(bench.forget_vqa) == 8 * per_vqa and len(bench.retain_vqa) == 32 * per_vqa
    assert len(bench.forget_text) == 8 * per_text and len(bench.retain_text) == 32 * per_text
    reps = bench.config["text_repeats"]
    assert reps == 16
    assert len(bench.train) == 40 * per_vqa + 40 * per_text * reps
    assert len(bench.forget_vqa_test) == 8 * 4 * 4 and len(bench.forget_link) == 8 * 4
    assert len(bench.forget_mcq) == 8 * (4 + 4) and len(bench.retain_mcq_test) == 32 * 4
    assert len(bench.forget_link_mcq) == 8 and len(bench.retain_cloze) == 32 * 8
    for p in bench.people:
        assert len(p.train_images) == 16 and len(p.test_images) == 4
        assert p.train_images[0].size == (32, 32) and p.train_images[0].mode == "RGB"
    sets = bench.eval_sets()
    assert set(sets) == {
        "forget",
        "forget_test",
        "forget_link",
        "retain",
        "retain_test",
        "retain_link",
    }
    assert all(set(v) == {"mcq", "cloze", "gen"} and all(v.values()) for v in sets.values())
    assert bench.candidates("pet") == list(bench.attributes["pet"])
    assert bench.candidates(NAME) == bench.names


def test_synthetic_deterministic():
    kw = dict(n_people=10, n_train_images=3, n_test_images=2)
    a, b = make_benchmark(seed=3, **kw), make_benchmark(seed=3, **kw)
    assert fingerprint(a) == fingerprint(b)
    c = make_benchmark(seed=4, **kw)
    assert a.names != c.names
    assert a.people[0].train_images[0].tobytes() != c.people[0].train_images[0].tobytes()
    assert fingerprint(a) != fingerprint(c)


def test_synthetic_splits_disjoint(bench):
    forget, retain = set(bench.forget_people), set(bench.retain_people)
    assert not forget & retain and forget | retain == set(bench.names)
    for k in SAMPLE_LISTS:
        items = getattr(bench, k)
        assert items, k
        for s in items:
            assert s.entity == s.meta["person"]
            assert (s.image is None) == (s.kind == "text")
            if k.startswith("forget_"):
                assert s.entity in forget and s.meta["split"] == "forget"
            elif k.startswith("retain_"):
                assert s.entity in retain and s.meta["split"] == "retain"
    assert {s.entity for s in bench.train} == set(bench.names)


def test_synthetic_train_and_test_pictures_differ(bench):
    for p in bench.people:
        train = {im.tobytes() for im in p.train_images}
        test = {im.tobytes() for im in p.test_images}
        assert len(train) == 16 and len(test) == 4 and not train & test
    ids = {id(im) for p in bench.people for im in p.test_images}
    assert not any(id(s.image) in ids for s in bench.train)
    for k in ("forget_vqa_test", "retain_mcq_test", "forget_link", "retain_link_mcq"):
        assert all(
            s.meta["view"].startswith("test") and id(s.image) in ids for s in getattr(bench, k)
        )
    # different people look different: their base portraits differ in many pixels
    base = np.stack([draw_portrait(p.appearance, 32) for p in bench.people])
    frac = (np.abs(base[:, None] - base[None]).max(-1) > 0.1).mean((-1, -2))
    assert frac[~np.eye(len(base), dtype=bool)].min() > 0.3


def test_synthetic_answers_are_the_facts(bench):
    for k in SAMPLE_LISTS:
        for s in getattr(bench, k):
            p = bench.person(s.entity)
            a = s.meta["attribute"]
            assert s.answer == (p.name if a == NAME else p.attributes[a])
            if a == NAME:
                assert s.image is not None
            elif s.image is None:
                assert p.name in s.question
            if "mcq" in k:
                opts = s.meta["options"]
                assert opts[s.meta["correct"]] == s.answer
                assert len(set(opts.values())) == 4 and list(opts) == ["A", "B", "C", "D"]
                assert set(opts.values()) <= set(bench.candidates(a))
            if "cloze" in k:
                assert "__" in s.question and s.meta["ground_truth"] == s.answer
    correct = [s.meta["correct"] for s in bench.retain_mcq + bench.retain_mcq_test]
    assert len(set(correct)) == 4  # the correct letter is not always in one position


def test_synthetic_text_only_facts(bench):
    text_only = set(bench.text_only_attributes)
    vqa_train = [s for s in bench.train if s.image is not None]
    assert not any(s.meta["attribute"] in text_only for s in vqa_train)
    assert not any(s.question == "What is the pet of the person in the image?" for s in bench.train)
    taught = {(s.entity, s.meta["attribute"]) for s in bench.train if s.image is None}
    for p in bench.people:
        for a in text_only:
            assert (p.name, a) in taught
    for s in bench.forget_link + bench.retain_link + bench.forget_link_mcq:
        assert s.meta["attribute"] in text_only and s.image is not None
        assert s.answer == bench.person(s.entity).attributes[s.meta["attribute"]]
    assert {s.entity for s in bench.forget_link} == set(bench.forget_people)


def test_synthetic_options_and_errors():
    b = make_benchmark(
        n_people=6,
        n_train_images=2,
        n_test_images=1,
        n_options=8,
        text_only_attributes=(),
        text_repeats=1,
        image_size=16,
    )
    assert not b.forget_link and b.text_only_attributes == ()
    assert b.people[0].train_images[0].size == (16, 16)
    assert len(b.train) == len(b.forget_vqa + b.retain_vqa + b.forget_text + b.retain_text)
    for s in b.forget_mcq:
        assert len(s.meta["options"]) == (6 if s.meta["attribute"] == NAME else 8)
    for bad in (
        dict(forget_ratio=0.0),
        dict(n_people=1),
        dict(n_options=9),
        dict(text_only_attributes=("shoe",)),
        dict(n_test_images=0),
    ):
        with pytest.raises(ValueError):
            make_benchmark(**bad)
