"""CLEAR evaluation (mmunlearn.eval.evaluate_clear): face recognition by name MCQ, caption
ROUGE / BLEU, real-faces MCQ, on small CLEAR-format parquet files with a tiny LLaVA; plus
hand-computed cases with stubbed scorers."""

from __future__ import annotations

import io
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmunlearn.data.clear import read_clear, read_clear_name_mcq, read_clear_real
from mmunlearn.data.schema import Sample
from mmunlearn.eval import EvalConfig, evaluate_clear, evaluate_clear_set
from mmunlearn.eval import tasks as ev
from mmunlearn.models import adapter_for, build_tokenizer, tiny_llava

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 100, 50), (20, 20, 20)]
NAMES = ["Ann Lee", "Bo Park", "Cy Diaz", "Di Moss", "Ed Finn"]
WRONG = ["Fay Gold", "Gus Hall", "Ida Ito"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and two processes with a thread per core each
    slow down many-fold on a 2-core machine (method.md §8); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cell(colour) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_clear_root(root):
    """A CLEAR root with forget05 / forget05_perturbed (2 people), retain95 /
    retain_perturbed (3 people) and real_faces (2 rows), one shard per config."""
    shard = "train-00000-of-00001.parquet"
    people = [
        {"image": _cell(c), "caption": f"{n} stands in a {i} coloured room", "name": n}
        for i, (c, n) in enumerate(zip(COLOURS, NAMES))
    ]
    forget, retain = people[:2], people[2:]
    _write(root / "forget05" / shard, forget)
    _write(root / "retain95" / shard, retain)
    pert = [{**p, "perturbed_names": WRONG} for p in people]
    _write(root / "forget05_perturbed" / shard, pert[:2])
    _write(root / "retain_perturbed" / shard, pert[2:])
    real = [
        {
            "image": _cell(COLOURS[i]),
            "question": "Who is this?",
            "answer": f"Star {i}",
            "options": ["Other A", "Other B", "Other C"],
        }
        for i in range(2)
    ]
    _write(root / "real_faces" / shard, real)
    return root


@pytest.fixture(scope="module")
def clear(tmp_path_factory):
    root = write_clear_root(tmp_path_factory.mktemp("clear") / "CLEAR")
    sets = {
        "forget": {
            "faces": read_clear_name_mcq(root / "forget05_perturbed"),
            "captions": read_clear(root / "forget05", "caption", include_text=False),
        },
        "retain": {
            "faces": read_clear_name_mcq(root / "retain_perturbed"),
            "captions": read_clear(root / "retain95", "caption", include_text=False),
        },
        "real_faces": {"mcq": read_clear_real(root / "real_faces")},
    }
    texts = []
    for s in sets.values():
        for items in s.values():
            for x in items:
                texts += [x.question, x.answer] + [
                    str(o) for o in x.meta.get("options", {}).values()
                ]
    tok = build_tokenizer(texts + ["options answer with the letter a b c d"])
    model = tiny_llava(tok, seed=0, hidden=32, intermediate=64, vision_hidden=16, heads=2)
    return model, adapter_for(model, tok), tok, sets


def test_clear_keys_ranges_and_determinism(clear):
    model, adapter, tok, sets = clear
    cfg = EvalConfig(batch_size=4, max_new_tokens=4, seed=2, progress=False)
    a = evaluate_clear(model, adapter.collate, tok, sets, cfg)
    b = evaluate_clear(model, adapter.collate, tok, sets, cfg)
    assert a == b
    for name in ("forget", "retain"):
        r = a[name]
        for key in (
            "face_acc",
            "face_letter_acc",
            "caption_rouge1",
            "caption_rouge2",
            "caption_rougeL",
            "caption_rougeL_recall",
            "caption_bleu",
        ):
            assert 0.0 <= r[key] <= 1.0, (name, key, r[key])
    assert a["forget"]["n_face"] == 2 and a["retain"]["n_face"] == 3
    assert a["forget"]["n_caption"] == 2
    assert 0.0 <= a["real_faces"]["mcq_acc"] <= 1.0 and a["real_faces"]["n_mcq"] == 2
    assert "face_acc" not in a["real_faces"]
    assert a["_protocol"]["benchmark"] == "CLEAR" and a["_protocol"]["seed"] == 2
    # another seed re-shuffles the options but counts stay
    c = evaluate_clear(model, adapter.collate, tok, sets, EvalConfig(seed=3, progress=False))
    assert c["forget"]["n_face"] == 2


def test_clear_options_turn_parts_off(clear):
    model, adapter, tok, sets = clear
    cfg = EvalConfig(letter_mcq=False, generation=False, progress=False)
    r = evaluate_clear(model, adapter.collate, tok, {"forget": sets["forget"]}, cfg)["forget"]
    assert set(r) == {"face_acc", "n_face"}


def _stub_scores(prefer):
    """An option scorer: 0 for the option text ``prefer(sample)`` picks, -5 for the others."""

    def scores(model, collate, samples, cfg):
        return [
            {k: (0.0 if v == prefer(s) else -5.0) for k, v in s.meta["options"].items()}
            for s in samples
        ]

    return scores


def _faces():
    opts = {"A": "Ann Lee", "B": "Fay Gold", "C": "Gus Hall", "D": "Ida Ito"}
    img = Image.new("RGB", (8, 8))
    return [
        Sample("Who?", "Ann Lee", image=img, meta={"options": opts, "correct": "A"}),
        Sample("Who?", "Gus Hall", image=img, meta={"options": opts, "correct": "C"}),
    ]


def test_face_accuracy_hand_cases(monkeypatch):
    cfg = EvalConfig(letter_mcq=False, generation=False, progress=False, seed=5)
    faces = _faces()
    monkeypatch.setattr(ev, "option_scores", _stub_scores(lambda s: s.answer))
    assert evaluate_clear_set(None, None, None, faces=faces, cfg=cfg)["face_acc"] == 1.0
    # always picking "Ann Lee": right for the first item only, whatever the shuffle
    monkeypatch.setattr(ev, "option_scores", _stub_scores(lambda s: "Ann Lee"))
    assert evaluate_clear_set(None, None, None, faces=faces, cfg=cfg)["face_acc"] == 0.5
    # letters: a generator answering the (shuffled) correct letter is always right
    monkeypatch.setattr(ev, "generate", lambda m, c, t, samples, cfg: [s.answer for s in samples])
    r = evaluate_clear_set(None, None, None, faces=faces, cfg=EvalConfig(progress=False))
    assert r["face_letter_acc"] == 1.0 and r["n_face"] == 2


def test_caption_metrics_hand_case(monkeypatch):
    caps = [
        Sample("Describe.", "a red square on a table", image=Image.new("RGB", (8, 8))),
        Sample("Describe.", "the blue circle is big", image=Image.new("RGB", (8, 8))),
    ]
    outputs = {caps[0].answer: "A red square.", caps[1].answer: "the blue circle is big"}
    monkeypatch.setattr(
        ev, "generate", lambda m, c, t, samples, cfg: [outputs[s.answer] for s in samples]
    )
    r = evaluate_clear_set(None, None, None, captions=caps, cfg=EvalConfig(progress=False))
    # item 1: pred [a red square], ref [a red square on a table]: LCS 3, P 1, R 1/2, F 2/3;
    # bigrams: 2 of 2 predicted, 2 of 5 reference → F = 2·1·0.4 / 1.4 = 4/7. Item 2: exact.
    assert r["caption_rougeL"] == pytest.approx((2 / 3 + 1) / 2)
    assert r["caption_rougeL_recall"] == pytest.approx((0.5 + 1) / 2)
    assert r["caption_rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    assert r["caption_rouge2"] == pytest.approx((4 / 7 + 1) / 2)
    # corpus BLEU: every n-gram precision is 1 (8/8, 6/6, 4/4, 2/2), c = 8, r = 11:
    # BP = exp(1 - 11/8)
    assert r["caption_bleu"] == pytest.approx(math.exp(1 - 11 / 8))
    assert r["n_caption"] == 2
