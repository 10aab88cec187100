"""Evaluation on a tiny LLaVA: every key present, deterministic for a seed, MCQ sanity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmunlearn.data.schema import Sample
from mmunlearn.eval import EvalConfig, evaluate
from mmunlearn.models import adapter_for, build_tokenizer, tiny_llava

WORDS = ["paris", "london", "rome", "madrid", "pilot", "chef", "nurse", "judge"]


def _img(seed):
    a = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    return Image.fromarray(a)


def _mcq(q, correct, opts, image=None):
    return Sample(
        question=q, answer=opts[correct], image=image, meta={"options": opts, "correct": correct}
    )


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer(
        WORDS
        + [
            "where does the person live",
            "what is the job of ann",
            "ann lives in __",
            "options",
            "answer with the letter",
            "a b c d",
        ]
    )
    model = tiny_llava(tok, seed=0)
    return model, adapter_for(model, tok), tok


def _sets():
    opts = {"A": "paris", "B": "london", "C": "rome", "D": "madrid"}
    jobs = {"A": "pilot", "B": "chef", "C": "nurse", "D": "judge"}
    return {
        "forget": {
            "mcq": [
                _mcq("where does the person live", "B", opts, _img(1)),
                _mcq("what is the job of ann", "C", jobs),
            ],
            "cloze": [Sample("ann lives in __", "paris", None, meta={"ground_truth": "paris"})],
            "gen": [
                Sample("where does the person live", "paris", _img(2)),
                Sample("what is the job of ann", "pilot", None),
            ],
        },
        "retain": {"mcq": [_mcq("where does the person live", "A", opts, _img(3))]},
    }


def test_evaluate_keys_and_determinism(setup):
    model, adapter, tok = setup
    cfg = EvalConfig(batch_size=3, max_new_tokens=4, progress=False, seed=11)
    a = evaluate(model, adapter.collate, tok, _sets(), cfg)
    b = evaluate(model, adapter.collate, tok, _sets(), cfg)
    assert a == b
    f = a["forget"]
    for key in (
        "vqa_mcq_acc",
        "qa_mcq_acc",
        "vqa_mcq_letter_acc",
        "qa_mcq_letter_acc",
        "qa_cloze_acc",
        "vqa_rouge1",
        "vqa_rougeL",
        "qa_bleu",
        "n_vqa_mcq",
    ):
        assert key in f, key
    assert a["_protocol"]["seed"] == 11 and a["_protocol"]["shots"] == 0
    assert 0.0 <= f["vqa_mcq_acc"] <= 1.0


def test_mcq_likelihood_picks_a_trained_answer(setup):
    """After teaching the answer, likelihood MCQ must pick it (the scorer is not random)."""
    model, adapter, tok = setup
    model = tiny_llava(tok, seed=1)
    s = _mcq("what is the job of ann", "C", {"A": "pilot", "B": "chef", "C": "nurse", "D": "judge"})
    batch = adapter.collate([s])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(25):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    res = evaluate(
        model,
        adapter.collate,
        tok,
        {"x": {"mcq": [s]}},
        EvalConfig(progress=False, letter_mcq=False),
    )
    assert res["x"]["qa_mcq_acc"] == 1.0


def test_shuffle_options_is_seeded_and_keeps_the_answer():
    import random

    from mmunlearn.eval import shuffle_options

    opts = {"A": "paris", "B": "london", "C": "rome", "D": "madrid"}
    items = [_mcq("where", "B", opts), _mcq("where", "D", opts)] * 5
    a = shuffle_options(items, random.Random(4))
    b = shuffle_options(items, random.Random(4))
    assert [x.meta for x in a] == [x.meta for x in b]
    for old, new in zip(items, a):
        assert new.meta["options"][new.meta["correct"]] == old.meta["options"][old.meta["correct"]]
        assert sorted(new.meta["options"].values()) == sorted(opts.values())
        assert list(new.meta["options"]) == ["A", "B", "C", "D"]
    assert len({x.meta["correct"] for x in a}) > 1  # not always the same position
    assert items[0].meta["correct"] == "B"  # the input is not modified


def test_protocol_record():
    from mmunlearn.eval import protocol

    p = protocol(EvalConfig(seed=7, batch_size=5, letter_mcq=False, length_normalized=False))
    assert p == {
        "seed": 7,
        "batch_size": 5,
        "shots": 0,
        "mcq": "option log-likelihood (sum)",
        "letter_mcq": False,
        "max_new_tokens": 16,
        "decoding": "greedy",
        "rouge": "rouge_score F1, no stemming",  # issue #26: the scorer is named
    }
    assert protocol(EvalConfig(rouge_stemmer=True))["rouge"] == "rouge_score F1, Porter stemming"


def test_keep_items_changes_no_number_and_keeps_every_score(setup):
    """``keep_items`` adds per-item scores whose means are the reported numbers (corpus BLEU:
    the statistics it is computed from); every reported number is unchanged."""
    from mmunlearn.eval import metrics

    model, adapter, tok = setup
    cfg = EvalConfig(batch_size=3, max_new_tokens=4, progress=False, seed=11)
    plain = evaluate(model, adapter.collate, tok, _sets(), cfg)
    cfg.keep_items = True
    kept = evaluate(model, adapter.collate, tok, _sets(), cfg)
    assert kept["_protocol"] == plain["_protocol"]
    for name in ("forget", "retain"):
        k = dict(kept[name])
        items, bleu = k.pop("_items"), k.pop("_bleu_stats", {})
        assert k == plain[name]
        assert set(items) | set(bleu) == {key for key in k if not key.startswith("n_")}
        for key, vals in items.items():
            assert np.mean(vals) == pytest.approx(k[key]), key
        for key, stats in bleu.items():
            assert metrics.corpus_bleu_from_stats(stats) == k[key]
    assert len(kept["forget"]["_items"]["vqa_mcq_acc"]) == kept["forget"]["n_vqa_mcq"]
