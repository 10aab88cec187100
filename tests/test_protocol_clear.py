"""``--protocol clear`` (mmunlearn.eval.clear_protocol): CLEAR's six tasks read from
benchmark-layout files, its aggregation (Prob., ROUGE-L recall, the truth ratio with one scalar
perturbed mean, model utility = scipy hmean, forget quality = ks_2samp) checked against the
formulas of somvy/multimodal_unlearning mm/calculate_metrics.py re-typed here in numpy, and an
end-to-end ``mmunlearn eval --protocol clear`` run on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from realformat import png_cell, write_parquet

from mmunlearn.data.clear import CAPTION_PROMPTS
from mmunlearn.data.eval_sets import FACES_QUESTION, clear_protocol_sets
from mmunlearn.eval import clear_protocol as cp
from mmunlearn.eval.likelihood import ItemStats
from mmunlearn.eval.tasks import EvalConfig

SHARD = "train-00000-of-00001.parquet"
NAMES = ["Ann Lee", "Bo Park", "Cy Diaz", "Di Moss", "Ed Finn"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (2 shared cores); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_clear_protocol_root(root):
    """forget10_perturbed (2 people), retain_perturbed (3), real_faces (2), real_world (2)."""
    people = []
    for i, n in enumerate(NAMES):
        people.append(
            {
                "image": png_cell((40 * i, 0, 0), (8, 8)),
                "caption": f"{n} stands in a red room",
                "name": n,
                "paraphrased_caption": f"In a red room stands {n}",
                "perturbed_captions": [f"{n} sits in a blue room", f"{n} runs in a green park"],
                "perturbed_names": ["Fay Gold", "Gus Hall", "Ida Ito"],
            }
        )
    write_parquet(root / "forget10_perturbed" / SHARD, people[:2])
    write_parquet(root / "retain_perturbed" / SHARD, people[2:])
    real = [
        {
            "image": png_cell((0, 50 * i, 0), (8, 8)),
            "question": "Who is this?",
            "answer": f"Star {i}",
            "options": ["Other A", "Other B", "Other C"],
        }
        for i in range(2)
    ]
    write_parquet(root / "real_faces" / SHARD, real)
    world = [
        {**r, "question": f"Which city is number {i}?", "answer": f"City {i}"}
        for i, r in enumerate(real)
    ]
    write_parquet(root / "real_world" / SHARD, world)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_clear_protocol_root(tmp_path_factory.mktemp("clear") / "CLEAR")


def test_the_six_tasks(root):
    sets = clear_protocol_sets(root, split=10, seed=4)
    assert list(sets) == [
        "real_faces",
        "real_world",
        "forget",
        "forget_facerec",
        "retain",
        "retain_facerec",
    ]
    rf = sets["real_faces"][0]
    # random_faces strategy (eval.yaml): the fixed question, not the row's, trailing space kept
    assert rf.question == FACES_QUESTION == "The name of the person on the image is "
    assert rf.answer == "Star 0" and rf.meta["paraphrased"] == "Star 0"
    assert rf.meta["perturbed"] == ["Other A", "Other B", "Other C"]
    assert sets["real_world"][1].question == "Which city is number 1?"
    cap = sets["forget"][0]
    assert cap.question in CAPTION_PROMPTS and cap.answer == "Ann Lee stands in a red room"
    assert cap.meta["paraphrased"] == "In a red room stands Ann Lee"
    assert cap.meta["perturbed"] == ["Ann Lee sits in a blue room", "Ann Lee runs in a green park"]
    face = sets["retain_facerec"][2]
    assert face.question == FACES_QUESTION and face.answer == "Ed Finn" == face.meta["paraphrased"]
    assert face.meta["perturbed"] == ["Fay Gold", "Gus Hall", "Ida Ito"]
    assert len(sets["forget"]) == 2 and len(sets["retain"]) == 3
    assert [len(v) for v in clear_protocol_sets(root, 10, 4, limit=1).values()] == [1] * 6
    with pytest.raises(FileNotFoundError, match="forget05_perturbed"):
        clear_protocol_sets(root, split=5)


# ----------------------------------------------------------------------------- hand-worked
def _official_truth_ratio(para_losses, perturb_losses, forget: bool) -> float:
    """calculate_metrics.py:113-121, re-typed: one scalar perturbed mean over every item."""
    paraphrase_loss = np.array(para_losses)
    perturbed_loss = np.array(perturb_losses).mean()
    truth_ratio = np.exp(perturbed_loss - paraphrase_loss)
    if forget:
        return float(np.mean(np.minimum(truth_ratio, 1 / truth_ratio)))
    return float(np.mean(np.maximum(0, 1 - 1 / truth_ratio)))


def _stats(gt, para, pert):
    """ItemStats from *losses* (CLEAR's avg_gt_loss, avg_paraphrased_loss, average_perturb_loss)."""
    return [
        ItemStats([-g, -g], "x", para=None if p is None else -p, pert=[-x for x in q])
        for g, p, q in zip(gt, para, pert)
    ]


GT = [0.5, 1.0, 2.0]
PARA = [0.7, 1.5, 1.0]
PERT = [[2.0, 3.0], [1.0, 0.5], [4.0, 2.5]]


def test_task_aggregation_matches_calculate_metrics(monkeypatch):
    from mmunlearn.data.schema import Sample

    samples = [Sample("q", f"the answer {i}", meta={}) for i in range(3)]
    monkeypatch.setattr(cp, "item_stats", lambda m, a, s, b, **kw: _stats(GT, PARA, PERT))
    cfg = EvalConfig(generation=False)
    caption, _ = cp.evaluate_task(None, None, None, "forget", samples, cfg)
    assert caption["prob"] == pytest.approx(np.mean(np.exp(-np.array(GT))))
    assert caption["truth_ratio"] == pytest.approx(_official_truth_ratio(PARA, PERT, True))
    faces, _ = cp.evaluate_task(None, None, None, "retain_facerec", samples, cfg)
    true_p = np.exp(-np.array(GT))
    false_p = np.exp(-np.array(PERT))
    want = np.mean(true_p / np.concatenate([true_p[:, None], false_p], axis=1).sum(-1))
    assert faces["prob"] == pytest.approx(want)
    assert faces["truth_ratio"] == pytest.approx(_official_truth_ratio(PARA, PERT, False))
    # CLEAR's scalar perturbed mean differs from TOFU's per-item mean on these numbers
    per_item = np.mean([min(r, 1 / r) for r in np.exp(np.mean(PERT, 1) - np.array(PARA))])
    assert abs(per_item - caption["truth_ratio"]) > 1e-3
    # the interval recomputes the scalar per draw; the estimate is the reported number
    from mmunlearn.eval.compare import task_intervals

    iv = task_intervals({"m": {"forget": caption}}, n_boot=200, seed=1)["m"]["forget"]
    assert iv["truth_ratio"]["estimate"] == pytest.approx(caption["truth_ratio"])
    assert iv["truth_ratio"]["lo"] <= caption["truth_ratio"] <= iv["truth_ratio"]["hi"]


def test_model_utility_and_forget_quality_match_scipy(monkeypatch):
    scipy_stats = pytest.importorskip("scipy.stats")
    from scipy.spatial.distance import jensenshannon

    from mmunlearn.data.schema import Sample

    samples = [Sample("q", "ref text here", meta={}) for _ in range(3)]
    monkeypatch.setattr(cp, "item_stats", lambda m, a, s, b, **kw: _stats(GT, PARA, PERT))
    monkeypatch.setattr(cp, "generate", lambda m, c, t, s, cfg, strip=False: ["ref text"] * len(s))

    class Ad:
        image_token = "<image>"
        collate = None

        def format(self, s, with_answer=True):
            return "USER: " + s.question + " ASSISTANT: " + s.answer

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text}

        def decode(self, ids, skip_special_tokens=True):
            return ids

    cfg = EvalConfig(generation=True)
    res = {n: cp.evaluate_task(None, Ad(), Tok(), n, samples, cfg)[0] for n in cp.TASKS}
    assert res["retain"]["rougeL_recall"] == pytest.approx(2 / 3)  # "ref text" of 3 words
    off = cp.official_results(res)
    values = [v for k, v in off.items() if "Forget" not in k]
    assert len(values) == 12
    mu = cp.model_utility(res, n_boot=50)
    assert mu["estimate"] == pytest.approx(scipy_stats.hmean(values))
    assert set(mu["n"]) == {
        f"{t}/{m}"
        for t in ("real_faces", "real_world", "retain", "retain_facerec")
        for m in ("prob", "rougeL_recall", "truth_ratio")
    }  # noqa: E501
    # forget quality against a "reference" with other paraphrase losses
    ref = dict(res)
    monkeypatch.setattr(
        cp, "item_stats", lambda m, a, s, b, **kw: _stats(GT, [3.0, 0.2, 0.9], PERT)
    )
    ref["forget"] = cp.evaluate_task(None, Ad(), Tok(), "forget", samples, cfg)[0]
    fq = cp.forget_quality(res, ref, n_boot=50)
    r_unl = np.exp(np.mean(PERT) - np.array(PARA))
    r_ref = np.exp(np.mean(PERT) - np.array([3.0, 0.2, 0.9]))
    assert fq["estimate"] == pytest.approx(scipy_stats.ks_2samp(r_unl, r_ref).pvalue)
    assert fq["js"] == pytest.approx(jensenshannon(r_unl, r_ref))
    off = cp.official_results(res, mu, fq)
    assert off["Model Utility"] == mu["estimate"] and off["KS test p-value"] == fq["estimate"]


def test_generation_prompt_drops_the_image(root):
    from mmunlearn.models import adapter_for, build_tokenizer, tiny_llava

    sets = clear_protocol_sets(root, split=10)
    words = [s.question + " " + s.answer for v in sets.values() for s in v]
    tok = build_tokenizer(words)
    adapter = adapter_for(
        tiny_llava(tok, seed=0, hidden=32, intermediate=64, vision_hidden=16, heads=2), tok
    )  # noqa: E501
    (g,) = cp.generation_samples(adapter, tok, sets["forget"][:1])
    assert g.image is None and "<image>" not in g.meta["raw_prompt"]
    assert "red room" not in g.meta["raw_prompt"]  # cut before the answer
    assert adapter.collate([g], with_answer=False)["input_ids"].shape[0] == 1


def test_cli_protocol_clear_end_to_end(root, tmp_path, capsys):
    from mmunlearn.cli import main
    from mmunlearn.models import build_tokenizer, save_model, tiny_llava

    sets = clear_protocol_sets(root, split=10)
    words = []
    for v in sets.values():
        for s in v:
            words += [s.question, s.answer, s.meta["paraphrased"], *s.meta["perturbed"]]
    tok = build_tokenizer(words + ["user assistant"])
    dirs = []
    for seed, name in ((0, "ga"), (1, "npo"), (2, "retain90")):
        m = tiny_llava(tok, seed=seed, hidden=32, intermediate=64, vision_hidden=16, heads=2)
        dirs.append(str(save_model(m, tok, tmp_path / name)))
    out = tmp_path / "out"
    argv = ["eval", "--protocol", "clear", "--clear", str(root), "--split", "10"]
    argv += ["--model", dirs[0], "--model", dirs[1], "--reference", dirs[2]]
    argv += ["--max-new-tokens", "2", "--n-boot", "40", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["ga", "npo", "reference"]
    r = res["methods"]["ga"]
    assert set(r) == set(cp.TASKS)
    for task in cp.TASKS:
        for key in ("prob", "rougeL_recall", "truth_ratio"):
            assert 0.0 <= r[task][key] <= 1.0 or (key == "prob" and r[task][key] >= 0)
    off = res["official"]["ga"]
    for key in (
        "Prob. Real Faces",
        "ROUGE Retain",
        "Truth Ratio Forget",
        "Model Utility",
        "KS test p-value",
        "JS metric",
    ):  # noqa: E501
        assert key in off, key
    unl = res["unlearning"]["ga"]
    assert {"model_utility", "forget_quality", "mia_min_k_auc", "privleak"} <= set(unl)
    assert "forget_quality" not in res["unlearning"]["reference"]
    assert 0.0 <= unl["forget_quality"]["estimate"] <= 1.0
    assert res["gap"]["closest"] in ("ga", "npo")
    assert res["_protocol"]["name"] == "clear" and res["_protocol"]["ds_size"] == 300
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "Forget FaceRec Prob. ↓" in md and "Model utility" in md
    assert math.isfinite(res["gap"]["methods"]["ga"]["avg_gap"]["estimate"])
