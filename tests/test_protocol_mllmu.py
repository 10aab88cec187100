"""``--protocol mllmu`` (mmunlearn.eval.mllmu_protocol): the prompts MLLMU-Bench's eval.py builds,
compared as strings with prompts written out by hand from that code (franciscoliu/MLLMU-Bench
@0e3098e eval.py; the worked examples of docs/reference/eval_protocols.md §1.9), on a
benchmark-layout fixture (forget_5, Test_Set, retain_95, Retain_Set, Full_Set); its parsing and
scoring; and an end-to-end run of ``mmunlearn eval --protocol mllmu`` on a tiny model."""

from __future__ import annotations

import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmunlearn.eval import mllmu_protocol as mp
from mmunlearn.eval.tasks import EvalConfig

SHARD = "train-00000-of-00001.parquet"

# ----------------------------------------------------------------------------- hand-written prompts
# Written out by hand from eval.py:349-361 / 403-416 (classification), :596-608 (cloze),
# :731 / :751 (generation); the same strings as docs/reference/eval_protocols.md §1.9.
ZERO_SHOT_IMAGE_MCQ = (
    "USER: <image>\nWhat is the profession of this person?\nA: Architect\nB: Marine biologist\n"
    "C: Violinist\nD: Pastry chef\nJust give ONE letter representing the answer directly.\n"
    "ASSISTANT:"
)
ONE_SHOT_IMAGE_MCQ = (
    "USER: <image>\nQuestion: What is the nationality of this person?\nA: Chilean\nB: Danish\n"
    "C: Kenyan\nD: Thai\nCorrect Answer: B\nUSER: <image>\nQuestion: Which hobby does this "
    "person enjoy most?\nA: Sailing\nB: Chess\nC: Pottery\nD: Cycling\nCorrect Answer: C\n"
    "USER: <image>\nWhat is the profession of this person?\nA: Architect\nB: Marine biologist\n"
    "C: Violinist\nD: Pastry chef\nJust give ONE letter representing the answer directly.\n"
    "ASSISTANT:"
)
ZERO_SHOT_TEXT_MCQ = (
    "USER:\nWhat is the profession of Elena Marwick?\nA: Architect\nB: Marine biologist\n"
    "C: Violinist\nD: Pastry chef\nJust give ONE letter representing the answer directly.\n"
    "ASSISTANT:"
)
ONE_SHOT_TEXT_MCQ = (
    "USER:\nQuestion: Which city does Tomas Vell live in?\nA: Oslo\nB: Lima\nC: Rome\nD: Bern\n"
    "Correct Answer: C\nUSER:\nWhat is the profession of Elena Marwick?\nA: Architect\n"
    "B: Marine biologist\nC: Violinist\nD: Pastry chef\nJust give ONE letter representing the "
    "answer directly.\nASSISTANT:"
)
ZERO_SHOT_IMAGE_CLOZE = (
    "USER: <image>\nThis person works as a [Blank] at the Lisbon Oceanarium.\nPlease **ONLY** "
    "provide the correct answer that should replace the [Blank].\nASSISTANT:"
)
TWO_SHOT_IMAGE_CLOZE = (
    "USER:<image>\nThis person was born in [Blank].\nPlease **ONLY** provide the correct answer "
    "that should replace the [Blank].\nCorrect Answer: Porto\nUSER:<image>\nThis person studied "
    "at [Blank] University.\nPlease **ONLY** provide the correct answer that should replace the "
    "[Blank].\nCorrect Answer: Uppsala\nUSER: <image>\nThis person works as a [Blank] at the "
    "Lisbon Oceanarium.\nPlease **ONLY** provide the correct answer that should replace the "
    "[Blank].\nASSISTANT:"
)
ZERO_SHOT_TEXT_CLOZE = (
    "USER:\nElena Marwick works as a [Blank] at the Lisbon Oceanarium.\nPlease **ONLY** provide "
    "the correct answer that should replace the [Blank].\nASSISTANT:"
)
SHOT_TEXT_CLOZE = (
    "USER:\nTomas Vell was born in [Blank].\nPlease **ONLY** provide the correct answer that "
    "should replace the [Blank].\nCorrect Answer: Porto\nUSER:\nElena Marwick works as a [Blank] "
    "at the Lisbon Oceanarium.\nPlease **ONLY** provide the correct answer that should replace "
    "the [Blank].\nASSISTANT:"
)
IMAGE_GENERATION = (
    "USER: <image>\nWhere was this person born?\nAnswer the question based on your trained "
    "knowledge in one sentence accurately in ENGLISH.\nASSISTANT: "
)
TEXT_GENERATION = (
    "USER: Where was Elena Marwick born?\nAnswer the question based on your trained knowledge in "
    "one sentence in ENGLISH.\nASSISTANT:"
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (2 shared cores); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- the fixture
COLOUR = {"E1": (200, 0, 0), "X1": (0, 200, 0), "X2": (0, 0, 200), "C1": (90, 90, 90)}
COLOUR.update({f"R{i}": (10 * i, 100, 100) for i in (1, 2, 3)})


def _cell(colour) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _mcq(q, opts, correct):
    return {"Question": q, "Options": dict(zip("ABCD", opts)), "Correct_Answer": correct}


PROFESSIONS = ["Architect", "Marine biologist", "Violinist", "Pastry chef"]
TASKS = {
    "E1": {
        "Classification_Task": {
            "Image_Textual_Questions": [
                _mcq("What is the profession of this person?", PROFESSIONS, "B")
            ],
            "Pure_Text_Questions": [
                _mcq("What is the profession of Elena Marwick?", PROFESSIONS, "B")
            ],
        },
        "Mask_Task": [
            {
                "Question": "This person works as a __ at the Lisbon Oceanarium.",
                "Ground_Truth": "marine biologist",
                "Type": "Image_Textual",
            },
            {
                "Question": "Elena Marwick works as a __ at the Lisbon Oceanarium.",
                "Ground_Truth": "marine biologist",
                "Type": "Pure_Text",
            },
        ],
        "Generation_Task": [
            {
                "Question": "Where was this person born?",
                "Ground_Truth": "She was born in Porto.",
                "Type": "Image_Textual",
            },
            {
                "Question": "Where was Elena Marwick born?",
                "Ground_Truth": "Elena Marwick was born in Porto.",
                "Type": "Pure_Text",
            },
        ],
    },
    "X1": {
        "Classification_Task": {
            "Image_Textual_Questions": [
                _mcq(
                    "What is the nationality of this person?",
                    ["Chilean", "Danish", "Kenyan", "Thai"],
                    "B",
                ),  # noqa: E501
                _mcq(
                    "Which hobby does this person enjoy most?",
                    ["Sailing", "Chess", "Pottery", "Cycling"],
                    "C",
                ),  # noqa: E501
            ],
            "Pure_Text_Questions": [
                _mcq("Which city does Tomas Vell live in?", ["Oslo", "Lima", "Rome", "Bern"], "C")
            ],
        },
        "Mask_Task": [
            {
                "Question": "This person was born in __.",
                "Ground_Truth": "Porto",
                "Type": "Image_Textual",
            },  # fmt: skip
            {
                "Question": "Tomas Vell was born in __.",
                "Ground_Truth": "Porto",
                "Type": "Pure_Text",
            },  # fmt: skip
        ],
        "Generation_Task": [
            {
                "Question": "What is this person's job?",
                "Ground_Truth": "A sailor.",
                "Type": "Image_Textual",
            },  # fmt: skip
        ],
    },
    "X2": {
        "Classification_Task": {
            "Image_Textual_Questions": [
                _mcq("Where does this person work?", ["Bank", "Farm", "Lab", "Port"], "D")
            ],
            "Pure_Text_Questions": [],
        },
        "Mask_Task": [
            {
                "Question": "This person studied at __ University.",
                "Ground_Truth": "Uppsala",
                "Type": "Image_Textual",
            },  # fmt: skip
        ],
        "Generation_Task": [],
    },
}
for rid in ("R1", "R2", "R3", "C1"):
    TASKS[rid] = {
        "Classification_Task": {
            "Image_Textual_Questions": [
                _mcq("What is the profession of this person?", PROFESSIONS, "A")
            ],
            "Pure_Text_Questions": [
                _mcq(f"What is the profession of {rid}?", PROFESSIONS, "C"),
            ],
        },
        "Mask_Task": [
            {"Question": f"{rid} works as a __.", "Ground_Truth": "violinist", "Type": "Pure_Text"}
        ],
        "Generation_Task": [
            {
                "Question": f"What does {rid} do?",
                "Ground_Truth": "Plays music.",
                "Type": "Pure_Text",
            }
        ],
    }
TEST_IMAGES = [(250, 250, 0), (0, 250, 250)]


def _row(rid, images=None):
    row = {"ID": rid, **{k: json.dumps(v) for k, v in TASKS[rid].items()}}
    if images is None:
        row["image"] = _cell(COLOUR[rid])
    else:
        row["images"] = [_cell(c) for c in images]
    return row


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_mllmu_root(root):
    """forget_5 = E1, X1, X2; retain_95 = R1..R3; Test_Set = E1 (two pose images; a retain row
    that must be filtered out); Retain_Set = C1 (a celebrity, not in Full_Set); Full_Set = X1,
    X2, E1, R1..R3 in that order."""
    _write(root / "forget_5" / SHARD, [_row(i) for i in ("E1", "X1", "X2")])
    _write(root / "retain_95" / SHARD, [_row(i) for i in ("R1", "R2", "R3")])
    _write(root / "Test_Set" / SHARD, [_row("E1", TEST_IMAGES), _row("R1", TEST_IMAGES)])
    _write(root / "Retain_Set" / SHARD, [_row("C1")])
    _write(root / "Full_Set" / SHARD, [_row(i) for i in ("X1", "X2", "E1", "R1", "R2", "R3")])
    return root


SEED = 19  # draws X1 for classification and {X2, X1} for cloze in forget mode (asserted below)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    from mmunlearn.eval.suite import make_plan

    root = write_mllmu_root(tmp_path_factory.mktemp("mllmu") / "MLLMU-Bench")
    plan = make_plan("mllmu", "MLLMU-Bench", EvalConfig(seed=SEED), data=root, split=5)
    return plan.build("<image>"), plan, root


def _item(items, rid, question):
    (hit,) = [s for s in items if s.meta["id"] == rid and s.question == question]
    return hit


# ----------------------------------------------------------------------------- prompt strings
def test_prompt_functions_reproduce_the_worked_examples():
    opts = dict(zip("ABCD", PROFESSIONS))
    q = "What is the profession of this person?"
    assert mp.mcq_prompt(q, opts, True) == ZERO_SHOT_IMAGE_MCQ
    assert mp.mcq_prompt("What is the profession of Elena Marwick?", opts, False) == (
        ZERO_SHOT_TEXT_MCQ
    )
    cq = mp.cloze_question("This person works as a __ at the Lisbon Oceanarium.")
    assert mp.cloze_prompt(cq, True) == ZERO_SHOT_IMAGE_CLOZE
    assert mp.generation_prompt("Where was this person born?", True) == IMAGE_GENERATION
    assert mp.generation_prompt("Where was Elena Marwick born?", False) == TEXT_GENERATION
    # the image token is the model's, once per image
    assert mp.mcq_prompt(q, opts, True, image_token="<|image_pad|>") == (
        ZERO_SHOT_IMAGE_MCQ.replace("<image>", "<|image_pad|>")
    )


def test_forget_set_prompts_equal_the_official_strings(sets):
    items, plan, _ = sets
    f = items["forget"]
    assert random.Random(f"mllmu:{SEED}:forget:classification").sample(["E1", "X1", "X2"], 1) == [
        "X1"
    ]
    assert plan.record["shot_ids"]["forget"] == {"classification": ["X1"], "cloze": ["X2", "X1"]}
    img_mcq = _item(f["mcq"], "E1", "What is the profession of this person?")
    assert img_mcq.meta["raw_prompt"] == ONE_SHOT_IMAGE_MCQ
    # images: the exemplar's picture once per exemplar question, then the query's
    assert [im.getpixel((0, 0)) for im in img_mcq.image] == [COLOUR["X1"]] * 2 + [COLOUR["E1"]]
    txt_mcq = _item(f["mcq"], "E1", "What is the profession of Elena Marwick?")
    assert txt_mcq.meta["raw_prompt"] == ONE_SHOT_TEXT_MCQ and txt_mcq.image is None
    assert txt_mcq.meta["correct"] == "B" and txt_mcq.answer == "Marine biologist"
    # the exemplar profile's own questions are skipped; X2's are asked with the shots
    assert {s.meta["id"] for s in f["mcq"]} == {"E1", "X2"}
    img_cloze = _item(f["cloze"], "E1", "This person works as a __ at the Lisbon Oceanarium.")
    # shots in Full_Set order (X1, X2), whatever the order of the draw
    assert img_cloze.meta["raw_prompt"] == TWO_SHOT_IMAGE_CLOZE
    assert [im.getpixel((0, 0)) for im in img_cloze.image] == [
        COLOUR["X1"],
        COLOUR["X2"],
        COLOUR["E1"],
    ]
    txt_cloze = _item(f["cloze"], "E1", "Elena Marwick works as a __ at the Lisbon Oceanarium.")
    assert txt_cloze.meta["raw_prompt"] == SHOT_TEXT_CLOZE and txt_cloze.image is None
    assert {s.meta["id"] for s in f["cloze"]} == {"E1"}  # X1, X2 are the exemplars
    gen = {s.question: s for s in f["gen"] if s.meta["id"] == "E1"}
    assert gen["Where was this person born?"].meta["raw_prompt"] == IMAGE_GENERATION
    assert gen["Where was Elena Marwick born?"].meta["raw_prompt"] == TEXT_GENERATION
    assert gen["Where was Elena Marwick born?"].image is None
    assert {s.meta["id"] for s in f["gen"]} == {"E1", "X1"}  # generation never skips


def test_celebrity_and_test_and_retain_modes(sets):
    items, plan, _ = sets
    # celebrities are not in Full_Set: zero-shot, as eval.py in retain_celebrity mode
    c = items["retain_celebrity"]
    mcq = _item(c["mcq"], "C1", "What is the profession of this person?")
    assert mcq.meta["raw_prompt"] == ZERO_SHOT_IMAGE_MCQ
    assert mcq.image.getpixel((0, 0)) == COLOUR["C1"]
    assert c["cloze"][0].meta["raw_prompt"] == (
        "USER:\nC1 works as a [Blank].\nPlease **ONLY** provide the correct answer that should "
        "replace the [Blank].\nASSISTANT:"
    )
    # Test: only the forget IDs' rows; one of the row's pose images per task; shots drawn
    t = items["forget_test"]
    assert {s.meta["id"] for part in t.values() for s in part} <= {"E1", "X1", "X2"}
    shot = plan.record["shot_ids"]["forget_test"]["classification"]
    for s in t["mcq"]:
        if s.kind == "vqa":
            assert s.meta["raw_prompt"].endswith(ZERO_SHOT_IMAGE_MCQ)
            n_img = s.meta["raw_prompt"].count("<image>")
            assert n_img == 1 + len(
                TASKS[shot[0]]["Classification_Task"]["Image_Textual_Questions"]
            )
            query = s.image[-1] if isinstance(s.image, list) else s.image
            assert query.getpixel((0, 0)) in TEST_IMAGES
    # retain: shots from the retain IDs (2 cloze profiles of 3: one profile's cloze remains)
    r = items["retain"]
    assert len(plan.record["shot_ids"]["retain"]["cloze"]) == 2
    assert len(r["cloze"]) == 1
    assert r["cloze"][0].meta["raw_prompt"].count("Correct Answer:") == 2


def test_zero_shots_and_the_same_seed_give_the_same_prompts(sets):
    from mmunlearn.eval.suite import make_plan

    _, _, root = sets
    a = make_plan("mllmu", "MLLMU-Bench", EvalConfig(seed=SEED), data=root).build("<image>")
    b = make_plan("mllmu", "MLLMU-Bench", EvalConfig(seed=SEED), data=root).build("<image>")
    prompts = [[s.meta["raw_prompt"] for p in a[n].values() for s in p] for n in a]
    assert prompts == [[s.meta["raw_prompt"] for p in b[n].values() for s in p] for n in b]
    zero = make_plan(
        "mllmu",
        "MLLMU-Bench",
        EvalConfig(seed=SEED),
        data=root,
        shots={"classification": 0, "cloze": 0},
    ).build("<image>")
    f = zero["forget"]
    assert _item(f["mcq"], "E1", "What is the profession of this person?").meta["raw_prompt"] == (
        ZERO_SHOT_IMAGE_MCQ
    )
    assert (
        _item(f["cloze"], "E1", "Elena Marwick works as a __ at the Lisbon Oceanarium.").meta[
            "raw_prompt"
        ]
        == ZERO_SHOT_TEXT_CLOZE
    )
    assert {s.meta["id"] for s in f["mcq"]} == {"E1", "X1", "X2"}  # nothing skipped


# ----------------------------------------------------------------------------- parsing, scoring
@pytest.mark.parametrize(
    "decoded, letter",
    [
        ("ASSISTANT: B: Marine biologist", "B"),
        ("ASSISTANT: b) marine biologist", "B"),
        ("ASSISTANT: (B)", None),  # eval.py:376 checks the first character only
        ("ASSISTANT: Answer: B", "A"),  # ... which reads "Answer" as A
        ("ASSISTANT: E", None),
        ("ASSISTANT:", None),
    ],
)
def test_mcq_parse_is_the_official_one(decoded, letter):
    assert mp.mcq_letter(mp.response(decoded), dict(zip("ABCD", PROFESSIONS))) == letter


def test_response_and_cloze_rules():
    assert mp.response("USER: x ASSISTANT:  Porto \n") == "Porto"
    assert mp.response("ASSISTANT: a ASSISTANT: b") == "a"  # up to a second ASSISTANT:
    assert mp.response("Correct Answer: Porto") == "Porto"
    assert mp.response("  Porto ") == "Porto"
    assert mp.cloze_correct("Marine Biologist", "She is a marine biologist.")
    assert mp.cloze_correct("art", "party")  # plain substring, as eval.py
    assert not mp.cloze_correct("Porto", "Lisbon")


def test_scores_with_canned_responses(sets, monkeypatch):
    """Accuracies, ROUGE (rouge_score, stemmed, F) and BLEU (nltk method1) from canned
    generations; the official block in percent under eval.py's names."""
    pytest.importorskip("rouge_score")
    pytest.importorskip("nltk")
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_score.rouge_scorer import RougeScorer

    items, _, _ = sets
    f = items["forget"]
    canned = {}
    for s in f["mcq"]:
        canned[s.meta["raw_prompt"]] = " B" if s.meta["id"] == "E1" else " A: Bank"
    for s in f["cloze"]:
        canned[s.meta["raw_prompt"]] = " a Marine Biologist!" if s.kind == "vqa" else " no idea"
    for s in f["gen"]:
        canned[s.meta["raw_prompt"]] = " She was born in Porto, Portugal."

    def fake_generate(model, collate, tok, samples, cfg, strip=True):
        return [canned[s.meta["raw_prompt"]] for s in samples]

    monkeypatch.setattr(mp, "generate", fake_generate)
    monkeypatch.setattr(mp, "_check_images", lambda adapter, items: None)
    adapter = type("Stub", (), {"collate": None})()
    r = mp.evaluate_set(None, adapter, None, f, EvalConfig())
    # MCQ: E1 image + text right (B), X2's image question wrong (A ≠ D)
    assert r["vqa_mcq_letter_acc"] == 0.5 and r["qa_mcq_letter_acc"] == 1.0
    assert r["_items"]["vqa_mcq_letter_acc"] in ([1.0, 0.0], [0.0, 1.0])
    assert r["vqa_cloze_acc"] == 1.0 and r["qa_cloze_acc"] == 0.0
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pred = "She was born in Porto, Portugal."
    refs = [s.meta["ground_truth"] for s in f["gen"] if s.kind == "vqa"]
    want = sum(scorer.score(t, pred)["rougeL"].fmeasure for t in refs) / len(refs)
    assert r["vqa_rougeL"] == pytest.approx(want)
    bleu = [
        sentence_bleu([t.split()], pred.split(), smoothing_function=SmoothingFunction().method1)
        for t in refs
    ]
    assert r["vqa_bleu"] == pytest.approx(sum(bleu) / len(bleu))
    off = r["_official"]
    assert off["classification"] == {
        "Image-Textual Question Accuracy": 50.0,
        "Pure Text Question Accuracy": 100.0,
    }
    assert off["fill_in_the_blank"] == {"image_textual_accuracy": 100.0, "pure_text_accuracy": 0.0}
    assert off["generation"]["Average ROUGE-L (Image_Textual)"] == pytest.approx(want)
    assert set(off["generation"]) == {
        f"Average {m} ({t})"
        for m in ("ROUGE-1", "ROUGE-2", "ROUGE-L", "BLEU")
        for t in ("Image_Textual", "Pure_Text")
    }
    assert r["_outputs"][0]["response"] in ("B", "A: Bank")


def test_multi_image_prompt_needs_an_adapter_that_takes_them():
    class OneImage:
        family = "llava"

        def collate(self, samples, ans_only=True, with_answer=True):
            raise ValueError("raw_prompt must hold the image token 1 time(s)")

    from mmunlearn.data.schema import Sample

    s = Sample("q", "a", image=[Image.new("RGB", (2, 2))] * 3, meta={"raw_prompt": "x"})
    with pytest.raises(mp.MultiImageUnsupported, match="3 images"):
        mp._check_images(OneImage(), [s])
    mp._check_images(OneImage(), [Sample("q", "a", image=None)])  # nothing to check


# ----------------------------------------------------------------------------- end to end
def _tiny_dir(tmp_path, items):
    from mmunlearn.models import build_tokenizer, save_model, tiny_llava

    words = []
    for parts in items.values():
        for part in parts.values():
            for s in part:
                words += [s.meta["raw_prompt"], s.answer]
    tok = build_tokenizer(words)
    dirs = []
    for seed, name in ((0, "vanilla"), (1, "reference")):
        m = tiny_llava(tok, seed=seed, hidden=32, intermediate=64, vision_hidden=16, heads=2)
        dirs.append(str(save_model(m, tok, tmp_path / name)))
    return dirs


def test_cli_protocol_mllmu_end_to_end(sets, tmp_path, capsys):
    from mmunlearn.cli import main

    items, _, root = sets
    model, ref = _tiny_dir(tmp_path, items)
    out = tmp_path / "out"
    argv = ["eval", "--protocol", "mllmu", "--model", model, "--reference", ref]
    argv += ["--mllmu", str(root), "--max-new-tokens", "3", "--seed", str(SEED), "--n-boot", "50"]
    argv += ["--batch-size", "4", "--out", str(out)]
    code = main(argv + ["--shots", "0"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"vanilla", "reference"}
    f = res["methods"]["vanilla"]["forget"]
    for key in (
        "vqa_mcq_letter_acc",
        "qa_mcq_letter_acc",
        "vqa_cloze_acc",
        "vqa_rougeL",
        "qa_bleu",
    ):
        assert 0.0 <= f[key] <= 1.0, key
        ci = res["intervals"]["vanilla"]["forget"][key]
        assert ci["lo"] <= f[key] <= ci["hi"] and ci["n"] == len(f["_items"][key])
    assert f["n_vqa_mcq"] == 4  # E1 (1) + X1 (2) + X2 (1): zero-shot skips no exemplar
    proto = res["_protocol"]
    assert proto["name"] == "mllmu" and proto["max_new_tokens"] == 3 and proto["seed"] == SEED
    assert proto["shots"] == {"classification": 0, "cloze": 0}
    off = res["official"]["vanilla"]
    assert set(off) == {
        "Forget Set Results",
        "Test Set Results",
        "Retain Set (shared dataset) Results",
        "Retain Set (real person) Results",
    }
    assert "forget_quality" in res["unlearning"]["vanilla"]
    assert "vanilla" in res["gap"]["methods"] and res["gap"]["closest"] == "vanilla"
    outputs = json.loads((out / "outputs.json").read_text())
    assert len(outputs["vanilla"]["forget"]) == sum(
        f[k] for k in f if k.startswith("n_") and isinstance(f[k], int)
    )
    md = (out / "report.md").read_text()
    assert "Forget cls ↓" in md and "Unlearning metrics" in md and "Closest to the reference" in md
    # the default (official) shots: several images in one prompt (the exemplars' pictures,
    # then the question's), which the adapters take as a list
    code = main(argv[:-2] + ["--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 0, err
