"""The linked world (issue #15): how it is built, what its probes ask, the gates' and matched
forgetting's arithmetic, the shared text stage, the fidelity study's verdict logic."""

from __future__ import annotations

import json

import pytest
import torch

from mmunlearn.data import linked_probes as lp
from mmunlearn.data.linked import (
    IMAGE_ATTRIBUTES,
    LINK_ATTRIBUTES,
    STAGES,
    make_linked_world,
)
from mmunlearn.data.synthetic import NAME


@pytest.fixture(scope="module")
def world():
    return make_linked_world()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _words(s) -> set[str]:
    return set(
        s.question.lower().replace("?", " ").replace(".", " ").replace(";", " ").split()
    ) | set(s.answer.lower().replace(".", " ").replace(";", " ").replace("'s", " ").split())


def test_link_attributes_never_appear_with_a_picture(world):
    link_words = set(LINK_ATTRIBUTES) | {
        v.lower() for a in LINK_ATTRIBUTES for v in world.attributes[a]
    }
    pictures = [s for _, pools in world.stages() for items, _ in pools for s in items if s.image]
    assert pictures and len({id(s) for s in pictures}) == len(world.identity + world.grounding)
    for s in pictures:
        assert s.meta["attribute"] in (*IMAGE_ATTRIBUTES, NAME)
        assert not _words(s) & link_words, (s.question, s.answer)
    # ... while every link fact of every person is taught by name, in every paraphrase
    taught = {(s.entity, s.meta["attribute"], s.question) for s in world.text}
    for p in world.people:
        for a in LINK_ATTRIBUTES:
            assert sum((p.name, a) == t[:2] for t in taught) == 3
    assert all(s.image is None for s in world.text)


def test_held_out_pictures_are_never_trained_on(world):
    trained = {s.image.tobytes() for s in world.identity + world.grounding}
    trained_ids = {id(s.image) for s in world.identity + world.grounding}
    for p in world.people:
        assert len(p.train_images) == 16 and len(p.test_images) == 4
        for img in p.test_images:
            assert img.tobytes() not in trained and id(img) not in trained_ids
    for split in lp.SPLITS:
        for kind, items in lp.probes(world, split).items():
            for pr in items:
                assert pr.image is None or id(pr.image) not in trained_ids, kind


def test_world_shape_names_and_answers(world):
    assert len(world.people) == 40 and len(world.forget_people) == 8
    assert all(" " not in n and n.isalpha() for n in world.names) and len(set(world.names)) == 40
    assert len(world.text) == 40 * 4 * 3
    assert len(world.identity) == 40 * 16 and len(world.grounding) == 40 * 16 * 2
    s = world.grounding[0]
    p = world.person(s.entity)
    a = s.meta["attribute"]
    assert s.answer == f"This is {p.name}; {p.name}'s {a} is {p.attributes[a]}."
    assert [st for st, _ in world.stages()] == list(STAGES)
    a, b = make_linked_world(n_people=6, seed=3), make_linked_world(n_people=6, seed=3)
    assert a.names == b.names
    assert a.people[0].test_images[0].tobytes() == b.people[0].test_images[0].tobytes()
    assert make_linked_world(n_people=6, seed=4).names != a.names
    for bad in (dict(n_people=2), dict(forget_ratio=1.0), dict(n_test_images=0)):
        with pytest.raises(ValueError):
            make_linked_world(**bad)


def test_reference_stages_drop_only_the_forget_pictures(world):
    van, ref = world.stages(), world.stages(without_forget_pictures=True)
    for (name, vp), (rname, rp) in zip(van, ref):
        assert name == rname
        for (vi, vw), (ri, rw) in zip(vp, rp):
            assert vw == rw
            kept = {id(s) for s in ri}
            for s in vi:
                dropped = s.image is not None and s.meta["split"] == "forget"
                assert (id(s) in kept) != dropped
    sets = world.unlearning_sets()
    assert {s.meta["split"] for s in sets.forget} == {"forget"}
    assert all(s.image is not None for s in sets.forget)
    assert {s.meta["split"] for s in sets.retain} == {"retain"}
    assert {s.meta["split"] for s in sets.language_preserve if s.image is None} == {"forget"}


def test_probe_counts_reach_the_gates_minimum(world):
    for split in lp.SPLITS:
        ps = lp.probes(world, split)
        n = 8 if split == "forget" else 32
        assert len(ps["name_pic"]) == n * 4 >= lp.MIN_ITEMS
        assert len(ps["link_pic"]) == n * 4 * 2 and len(ps["facts_pic"]) == n * 4 * 2
        assert len(ps["facts_name"]) == n * 4 * 3
    swaps = [k for k, v in world.swap_partner.items() if v is not None]
    for name, a, _ in swaps:
        partner = world.person(world.swap_partner[(name, a, _)])
        me = world.person(name)
        assert partner.split == me.split and partner.attributes[a] != me.attributes[a]


def test_gates_arithmetic():
    good = {
        "name_pic": [1] * 29 + [0] * 3,
        "facts_name": [1] * 95 + [0],
        "link_pic": [1] * 52 + [0] * 12,
        "swap": [1] * 40 + [0] * 10,
    }
    g = lp.gates({"forget": good, "retain": good})
    assert g["passed"] and len(g["checks"]) == 8
    acc = {(c["split"], c["kind"]): c["accuracy"] for c in g["checks"]}
    assert acc[("forget", "name_pic")] == pytest.approx(29 / 32)  # ≥ 0.9 passes
    assert acc[("forget", "link_pic")] == pytest.approx(0.8125)
    # one item short of the minimum, one threshold missed, a kind missing: each fails alone
    for broken in (
        {**good, "name_pic": [1] * 31},
        {**good, "name_pic": [1] * 28 + [0] * 4},  # 0.875 < 0.9
        {**good, "facts_name": [1] * 94 + [0] * 2},  # 0.979 ≥ 0.95 passes ...
        {k: v for k, v in good.items() if k != "swap"},
    ):
        g2 = lp.gates({"forget": good, "retain": broken})
        bad = [c for c in g2["checks"] if not c["ok"]]
        if broken["facts_name"] == [1] * 94 + [0] * 2:
            assert g2["passed"] and not bad  # ... as the threshold is inclusive
        else:
            assert not g2["passed"] and len(bad) == 1 and bad[0]["split"] == "retain"
    assert not lp.gates({})["passed"]


def test_forgetting_matched_arithmetic():
    ref = {"name_pic": 0.0, "facts_pic": 0.2}
    m = lp.forgetting_matched({"name_pic": 0.03125, "facts_pic": 0.25}, ref)
    assert m["reached"] and m["within"] and m["gaps"]["facts_pic"] == pytest.approx(0.05)
    m = lp.forgetting_matched({"name_pic": 0.0, "facts_pic": 0.0}, ref)
    assert m["reached"] and not m["within"]  # overshot: the answer is avoided
    assert not lp.forgetting_matched({"name_pic": 0.0625, "facts_pic": 0.2}, ref)["reached"]


def test_swap_scores_need_both_pictures_right():
    world = make_linked_world(n_people=6, n_test_images=1, seed=0)
    ps = lp.probes(world, "retain", ["link_pic"])["link_pic"]
    right = lp.swap_scores(world, ps, [True] * len(ps))
    assert right and all(right)
    wrong_one = [p.person != world.retain_people[0] for p in ps]
    out = lp.swap_scores(world, ps, wrong_one)
    partners = {(p.person, p.attribute): world.swap_partner[(p.person, p.attribute, 0)] for p in ps}
    expect = [
        p.person != world.retain_people[0]
        and partners[(p.person, p.attribute)] != world.retain_people[0]
        for p in ps
        if partners[(p.person, p.attribute)] is not None
    ]
    assert out == expect and not all(out)


def test_score_chains_through_the_models_own_name(monkeypatch):
    """Pass 2 of a picture probe reads the value after the name the model gave in pass 1, not
    the true name; by-name probes use the true name."""
    from mmunlearn.models import adapter_for, build_tokenizer
    from mmunlearn.tinyrun import TinyRunConfig, tiny_model

    world = make_linked_world(n_people=4, n_train_images=1, n_test_images=1, seed=1)
    tok = build_tokenizer(world.vocabulary_text())
    model = tiny_model(tok, TinyRunConfig(hidden=32, vision_hidden=16), torch.device("cpu"))
    calls = []
    real = lp.choose

    def spy(model, collate, items, candidates, batch_size=64):
        calls.append(items)
        return [0] * len(items) if len(calls) % 2 == 1 else real(model, collate, items, candidates)

    monkeypatch.setattr(lp, "choose", spy)
    sc = lp.score(model, adapter_for(model, tok).collate, tok, world)
    first = world.names[0]
    for i in range(0, len(calls), 2):
        for _q, img, prefix in calls[i + 1]:
            if img is not None:
                assert prefix.startswith(f"This is {first}; {first}'s ")
            else:
                assert any(prefix.startswith(f"{n}'s ") for n in world.names)
    for split in lp.SPLITS:
        assert set(sc[split]) == {*lp.KINDS, "swap"}
        assert sc[split]["name_pic"] == [p.name == first for p in world.group(split)]
        assert len(sc[split]["facts_name"]) == len(world.group(split)) * 4 * 3


def test_token_ids_refuse_a_word_of_two_tokens():
    world = make_linked_world(n_people=4, seed=0)
    from mmunlearn.models import build_tokenizer

    tok = build_tokenizer(world.vocabulary_text())
    assert len(set(lp.token_ids(tok, world.names))) == 4
    with pytest.raises(ValueError):
        lp.token_ids(tok, ["two words"])


def test_twins_share_the_text_stage_exactly():
    """The reference built from the vanilla model's text stage equals a reference trained
    from scratch through its own curriculum."""
    from mmunlearn.models import adapter_for, build_tokenizer
    from mmunlearn.tinyrun import TinyRunConfig, tiny_model
    from mmunlearn.train import finetune_stages, finetune_twins

    world = make_linked_world(n_people=4, n_train_images=2, n_test_images=1, seed=2)
    tok = build_tokenizer(world.vocabulary_text())
    cfg = TinyRunConfig(hidden=32, vision_hidden=16)
    dev = torch.device("cpu")
    steps = {"text": 3, "identity": 2, "grounding": 2}
    model, twin, alone = (tiny_model(tok, cfg, dev) for _ in range(3))
    adapter = adapter_for(model, tok)
    ref_stages = world.stages(without_forget_pictures=True)
    finetune_twins(model, twin, adapter, world.stages(), ref_stages, steps, 1e-3, 4, 0, dev, False)
    finetune_stages(alone, adapter, ref_stages, steps, 1e-3, 4, 0, dev, False)
    for (n, a), b in zip(twin.state_dict().items(), alone.state_dict().values()):
        assert torch.equal(a, b), n
    assert any(
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), alone.state_dict().values())
    )


def test_fidelity_verdict_logic():
    """The study's criteria on hand-made per-seed records (experiments/fidelity.py)."""
    from experiments.fidelity import summarize

    def acc(f, r):
        kinds = {k: r for k in lp.KINDS}
        forget = {"facts_name": f, "name_pic": 0.0, "facts_pic": 0.1, "link_pic": 0.1}
        return {"forget": forget, "retain": {**kinds, "mean": r}}

    def rec(seed, label, f, r, reached=True):
        return {
            "seed": seed,
            "label": label,
            "reached": reached,
            "within": reached,
            "forget_steps": 10,
            "acc": acc(f, r),
        }

    seeds = {s: {"vanilla": acc(1.0, 1.0)} for s in range(5)}
    jit = [0.0, 0.01, -0.01, 0.02, -0.02]
    claim = []
    for s in range(5):
        claim += [
            rec(s, "ga", 0.5, 0.3),
            rec(s, "ga_diff", 0.6 + jit[s], 0.9),
            rec(s, "npo", 0.7, 0.3),
            rec(s, "mmunlearner", 0.98 + jit[s], 0.97),
            rec(s, "random_tensor", 0.8 + jit[s], 0.95),
            rec(s, "random_group", 0.85, 0.95),
        ]
    out = summarize(seeds, claim)
    assert out["premise_holds"] and out["verdict"].startswith("The paper's claim holds")
    # the premise fails for every baseline: nothing to fix
    none = [
        dict(r, acc=acc(0.95, 0.5)) if r["label"] in ("ga", "ga_diff", "npo") else r for r in claim
    ]
    assert "nothing to fix" in summarize(seeds, none)["verdict"]
    # MMUnlearner no better than a random mask: C fails, the claim does not hold
    same = [
        dict(r, acc=acc(0.98 + jit[r["seed"]], 0.97)) if r["label"].startswith("random") else r
        for r in claim
    ]
    v = summarize(seeds, same)
    assert not v["criteria"]["C"]["random_tensor"]["holds"] and "C failed" in v["verdict"]
    # MMUnlearner reaching matched forgetting in 2 of 5 seeds: A, B, C cannot hold
    few = [dict(r, reached=r["seed"] < 2) if r["label"] == "mmunlearner" else r for r in claim]
    v = summarize(seeds, few)
    assert not v["criteria"]["A"]["holds"] and not v["criteria"]["B"]["holds"]
    json.dumps(v)  # serialisable
