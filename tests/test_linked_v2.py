"""The linked world's v2 variant (issue #22): v1 unchanged, forget answers that never restate a
name-and-fact string, the language preserve set, the F split, and the v2 study runner
(experiments/fidelity_v2.py): interpolation, selection, the random-mask verdict, resume."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from mmunlearn.data import linked_probes as lp
from mmunlearn.data.linked import IMAGE_ATTRIBUTES, LINK_ATTRIBUTES, make_linked_world

# sha256 of the v1 data (every pool, the people, held-out pictures, swap partners, the four
# unlearning sets, the curriculum's shape), taken before the v2 variant was added
V1_HASHES = {
    (): "813ebd05b688d20d25a0dbae7d82d8eefa35c78cf7be0e07af77ea2a536dd68d",
    (("n_people", 6), ("seed", 3)): (
        "ec7cd7b7e5f45213da44a0bcbfbbf60d041d7f3a4f42f6edba69fc29e906a660"
    ),
}


def world_hash(w) -> str:
    h = hashlib.sha256()
    for pool in ("text", "identity", "grounding"):
        for s in getattr(w, pool):
            row = [pool, s.question, s.answer, s.entity, s.kind, s.meta]
            h.update(json.dumps(row, sort_keys=True).encode())
            if s.image is not None:
                h.update(s.image.tobytes())
    for p in w.people:
        h.update(json.dumps([p.name, p.split, p.attributes], sort_keys=True).encode())
        for img in p.test_images:
            h.update(img.tobytes())
    h.update(json.dumps(sorted((list(k), v) for k, v in w.swap_partner.items())).encode())
    sets = w.unlearning_sets()
    for n in ("forget", "retain", "vision_preserve", "language_preserve"):
        rows = [(s.question, s.answer, s.entity) for s in getattr(sets, n)]
        h.update(json.dumps([n, rows]).encode())
    for ref in (False, True):
        shape = [(st, [(len(i), wt) for i, wt in pools]) for st, pools in w.stages(ref)]
        h.update(json.dumps(shape).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def v2():
    return make_linked_world(variant="v2")


@pytest.mark.parametrize("kw", list(V1_HASHES))
def test_v1_data_unchanged(kw):
    w = make_linked_world(**dict(kw))
    assert w.variant == "v1" and w.direct == []
    assert world_hash(w) == V1_HASHES[kw]
    assert world_hash(make_linked_world(**dict(kw), variant="v1")) == V1_HASHES[kw]
    with pytest.raises(ValueError):
        make_linked_world(variant="v3")


def test_v2_keeps_v1_people_and_pools(v2):
    v1 = make_linked_world()
    assert v1.names == v2.names and [p.split for p in v1.people] == [p.split for p in v2.people]
    for pool in ("text", "identity", "grounding"):
        a, b = getattr(v1, pool), getattr(v2, pool)
        assert [(s.question, s.answer) for s in a] == [(s.question, s.answer) for s in b]
    assert len(v2.direct) == 40 * 16 * 2
    assert v2.direct[0].answer.startswith("This person's ")
    pools = dict(v2.stages())["grounding"]
    assert [(len(i), w) for i, w in pools] == [(1280, 2.0), (1280, 1.0), (640, 1.0), (480, 2.0)]
    # the reference: no forget person's picture item in any pool, direct items included
    for _, pools in v2.stages(without_forget_pictures=True):
        for items, _ in pools:
            assert not any(s.image is not None and s.meta["split"] == "forget" for s in items)


def test_v2_forget_answers_never_restate_a_name_and_fact(v2):
    forget = v2.unlearning_sets().forget
    assert forget and {s.meta["split"] for s in forget} == {"forget"}
    assert all(s.image is not None for s in forget)
    n_forget = len(v2.forget_people)
    assert len(forget) == n_forget * 16 * (1 + len(IMAGE_ATTRIBUTES))
    for s in forget:
        for name in v2.names:
            for a in v2.attributes:
                assert f"{name}'s {a} is" not in s.answer, s.answer
                assert lp.fact_prefix(name, a) not in s.answer
        assert s.meta["attribute"] == "name" or s.meta.get("form") == "direct"
    # v1, for contrast, restates it in every fact item
    v1_forget = make_linked_world().unlearning_sets().forget
    assert any("'s occupation is" in s.answer for s in v1_forget)


def test_v2_language_preserve_is_every_profiles_text(v2):
    sets = v2.unlearning_sets()
    lp_set = sets.language_preserve
    assert all(s.image is None for s in lp_set) and len(lp_set) == 40 * 4 * 3
    assert {(s.entity, s.meta["attribute"], s.question) for s in lp_set} == {
        (s.entity, s.meta["attribute"], s.question) for s in v2.text
    }
    assert {s.meta["split"] for s in lp_set} == {"forget", "retain"}
    assert {s.meta["split"] for s in sets.retain} == {"retain"}
    assert sum(s.meta.get("form") == "direct" for s in sets.retain) == 32 * 16 * 2
    assert sets.vision_preserve == v2.pictures("retain")


def test_facts_name_split_by_attribute(v2):
    ps = lp.probes(v2, "forget", ["facts_name"])["facts_name"]
    ok = [p.attribute in LINK_ATTRIBUTES for p in ps]  # only the name-only facts right
    out = lp.split_facts_name(v2, {"forget": {"facts_name": ok, "name_pic": [True]}})
    acc = lp.accuracies(out)["forget"]
    assert acc["facts_name_link"] == 1.0 and acc["facts_name_img"] == 0.0
    assert acc["facts_name"] == 0.5 and acc["name_pic"] == 1.0
    n = len(v2.forget_people) * 2 * 3
    assert len(out["forget"]["facts_name_img"]) == len(out["forget"]["facts_name_link"]) == n


# ---------------------------------------------------------------------------------------------
# the v2 runner (experiments/fidelity_v2.py)
# ---------------------------------------------------------------------------------------------


def test_runner_configs_and_settings():
    from experiments import fidelity_v2 as f2

    assert len(f2.CONFIGS) == 22
    assert f2.CONFIGS["language_official_saliency"] == (
        "mmunlearner",
        "language_official_saliency",
        "official",
    )
    assert f2.settings_for("ga") == ["lr1e-04_f1", "lr3e-04_f1", "lr1e-03_f1"]
    assert len(f2.settings_for("ga_diff")) == 6
    assert f2.parse_setting("lr3e-04_f4") == (3e-4, 4)
    assert not set(f2.TEST_SEEDS) & set(f2.VAL_SEEDS) and len(f2.TEST_SEEDS) == 20


def test_interpolation_at_the_crossing():
    from experiments.fidelity_v2 import interpolate

    prev, at = {"F": 1.0, "R": 0.9}, {"F": 0.6, "R": 0.7}
    out = interpolate(0.25, 0.0, prev, at)  # crosses 0.05 at 4/5 of the way
    assert out["w"] == pytest.approx(0.8)
    assert out["F"] == pytest.approx(0.68) and out["R"] == pytest.approx(0.74)
    assert interpolate(0.0, 0.0, prev, at)["F"] == 0.6  # reached at the start: the end point
    assert interpolate(0.06, -0.5, prev, at)["w"] == pytest.approx(0.01 / 0.56)


def test_selection_and_random_verdicts():
    from experiments.fidelity_v2 import select, versus_random

    def rec(setting, k, reached=True, label="ga_diff"):
        return {"label": label, "setting": setting, "reached": reached, "interp": {"K": k}}

    runs = [rec("lr1e-04_f1", 0.9, s < 2) for s in range(3)]  # best K, reached on 2 of 3
    runs += [rec("lr1e-03_f1", 0.7) for _ in range(3)]
    runs += [rec("lr3e-04_f4", 0.7) for _ in range(3)]  # tie on K: the smaller lr wins
    assert select(runs, ["ga_diff", "ga"]) == {"ga_diff": "lr3e-04_f4"}
    # amendment 1: a random control is not tuned; it runs at its saliency configuration's setting
    sal = [rec("lr1e-04_f4", 0.8, label="vision_ours_saliency") for _ in range(3)]
    ctrl = [rec("lr1e-03_f1", 0.99, label="vision_ours_random_group") for _ in range(3)]
    assert select(sal + ctrl, ["vision_ours_random_group", "vision_ours_random_tensor"]) == {
        "vision_ours_random_group": "lr1e-04_f4",
        "vision_ours_random_tensor": "lr1e-04_f4",
    }
    assert versus_random([0.05, 0.06, 0.04, 0.05]) == "better than random"
    assert versus_random([0.01, -0.01, 0.0, 0.005, -0.005]) == (
        "no better than random (equivalent)"
    )
    assert versus_random([0.2, -0.2, 0.1, -0.1]) == "inconclusive"
    assert versus_random([0.1]) == "too few seeds"


@pytest.mark.slow
def test_runner_resumes(tmp_path, monkeypatch):
    """One smoke cell (the demo's --fast configuration) computed, then read back: a second
    invocation trains nothing and runs nothing."""
    from argparse import Namespace

    from experiments import fidelity_v2 as f2

    torch.set_num_threads(1)
    out = str(tmp_path)
    rec = f2.phase_a(out, 7, fast=True)
    assert os.path.exists(
        os.path.join(out, "seed7", "masks", "language_official_random_tensor.safetensors")
    )
    # amendment 1: top-10 % per group (ties may add a few), the official filter a part of it,
    # the controls have the same count; γ = 1's coverage is recorded beside them
    cov = rec["coverage"]
    for ms in f2.MASK_SETS:
        assert 0.09 < cov[f"{ms}_ours_saliency"] < 0.12, (ms, cov)
        assert 0.0 < cov[f"{ms}_official_saliency"] < 1.0  # of its (Linear) tensors
        assert cov[f"{ms}_ours_random_group"] == cov[f"{ms}_ours_saliency"]
        assert 0.0 < cov[f"{ms}_ours_gamma1"] <= 1.0
    run = f2.phase_b(out, 7, "ga_diff", "lr1e-03_f1", fast=True)
    assert set(run["interp"]) >= {"F", "F_img", "F_link", "R", "K", "w"}

    st = Namespace(out=out, seeds=[7, 8], configs=["ga_diff", "ga"], settings=["lr1e-03_f1"])
    assert f2.status(st).splitlines() == [
        f"seed 7: phase A done ({rec['seconds']:.0f} s, gates failed, not enforced); "
        f"runs 1/2 ({run['seconds']:.0f} s)",
        "seed 8: phase A not done",
    ]
    # the records are committed, the models and masks are not: a checkout that has the record
    # but not the files rebuilds them and checks that they reproduce the record
    import shutil

    os.remove(os.path.join(out, "seed7", "models.pt"))
    shutil.rmtree(os.path.join(out, "seed7", "masks"))
    assert f2.phase_a(out, 7, fast=True) == rec
    assert os.path.exists(os.path.join(out, "seed7", "masks", "both_ours_saliency.safetensors"))
    rec_path = os.path.join(out, "seed7", "seed.json")
    forged = json.loads(open(rec_path).read())
    forged["vanilla"]["forget"]["name"] = -1.0  # a record the rebuild cannot reproduce
    with open(rec_path, "w") as fh:
        json.dump(forged, fh)
    os.remove(os.path.join(out, "seed7", "models.pt"))
    with pytest.raises(SystemExit, match=r"seed7/seed.json: the rebuilt .* differ .* vanilla"):
        f2.phase_a(out, 7, fast=True)
    with open(rec_path, "w") as fh:
        json.dump(rec, fh)

    def boom(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    import mmunlearn.demo_linked

    monkeypatch.setattr(mmunlearn.demo_linked, "train_linked", boom)
    monkeypatch.setattr(f2, "run_to_match", boom)
    assert f2.phase_a(out, 7, fast=True) == rec
    assert f2.phase_b(out, 7, "ga_diff", "lr1e-03_f1", fast=True) == run
    # a non-validation seed runs the frozen setting, or the ones asked for
    args = Namespace(out=out, configs=["ga", "ga_diff"], settings=None)
    with pytest.raises(SystemExit):
        f2.cells(args, [7])
    with open(os.path.join(out, "frozen.json"), "w") as fh:
        json.dump({"ga": "lr1e-04_f1", "ga_diff": "lr1e-03_f4"}, fh)
    assert f2.cells(args, [7]) == [(7, "ga", "lr1e-04_f1"), (7, "ga_diff", "lr1e-03_f4")]
    assert len(f2.cells(args, [200])) == 3 + 6
    # validation: the controls are not run (amendment 1); test seeds run them at the frozen
    # setting of their saliency configuration
    args = Namespace(
        out=out, configs=["vision_ours_saliency", "vision_ours_random_tensor"], settings=None
    )
    assert len(f2.cells(args, [200])) == 6
    with open(os.path.join(out, "frozen.json"), "w") as fh:
        json.dump({"vision_ours_saliency": "lr3e-04_f4"}, fh)
    assert f2.cells(args, [7]) == [
        (7, "vision_ours_saliency", "lr3e-04_f4"),
        (7, "vision_ours_random_tensor", "lr3e-04_f4"),
    ]


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("MMUNLEARN_LONG"),
    reason="minutes of training (the demo's recipe); set MMUNLEARN_LONG=1 to run",
)
def test_v2_gates_pass_at_the_demo_settings(tmp_path):
    """The v2 vanilla model (the demo's recipe and size, pilot seed 50) passes the v1 gates."""
    from experiments import fidelity_v2 as f2

    rec = f2.phase_a(str(tmp_path), 50)
    assert rec["gates"]["passed"], rec["gates"]


def test_v2_criteria_on_hand_made_records():
    """premise, A, B, C, D and the verdict (experiments/fidelity_v2.py) on synthetic runs."""
    from experiments import fidelity_v2 as f2

    seeds = range(100, 116)  # 16 ≥ MIN_SEEDS
    jit = [0.01 * ((s * 7) % 5 - 2) for s in seeds]

    def rec(s, label, f, r):
        q = {"F": f, "F_img": f, "F_link": f, "R": r, "K": (f + r) / 2}
        return {"seed": s, "label": label, "reached": True, "interp": q}

    def world(primary_f, random_f):
        runs = []
        for s, j in zip(seeds, jit):
            runs += [rec(s, "ga", 0.6, 0.3), rec(s, "ga_diff", 0.6 + j, 0.9)]
            runs += [rec(s, "npo", 0.7, 0.3), rec(s, "vision_ours_saliency", 0.99, 0.9)]
            runs += [rec(s, "both_ours_saliency", 0.8 + j, 0.9)]
            runs += [rec(s, f2.PRIMARY, primary_f + j, 0.97)]
            for r in ("random_tensor", "random_group"):
                runs.append(rec(s, f"language_official_{r}", random_f + j * (r[7] == "t"), 0.97))
        return runs

    vanilla = {s: {"F": 1.0, "F_img": 1.0, "F_link": 1.0, "R": 1.0, "K": 1.0} for s in seeds}
    out = f2.summarize(world(0.98, 0.8), vanilla)
    c = out["criteria"]
    assert c["premise_holds"] and c[f2.PRIMARY]["holds"] == {"A": True, "B": True, "C": True}
    assert c["verdict"].startswith("The paper's claim holds")
    assert c["D"]["both_ours_saliency"]["vision_keeps_more"]
    assert out["versus_random"][f"{f2.PRIMARY} vs random_group"]["verdict"] == "better than random"
    # the saliency mask no better than random: C fails and the verdict names it
    same = f2.summarize(world(0.98, 0.98), vanilla)
    assert not same["criteria"][f2.PRIMARY]["holds"]["C"]
    assert "C failed" in same["criteria"]["verdict"]
    v = same["versus_random"][f"{f2.PRIMARY} vs random_group"]["verdict"]
    assert v == "no better than random (equivalent)"
    # too few seeds: nothing holds
    few = [r for r in world(0.98, 0.8) if r["seed"] < 105]
    few_c = f2.summarize(few, vanilla)["criteria"]
    assert not few_c[f2.PRIMARY]["holds"]["A"] and few_c["verdict"].startswith("No verdict")
    # GA never at matched forgetting on 16 seeds: its premise fails, the verdict still follows
    no_ga = [dict(r, reached=False) if r["label"] == "ga" else r for r in world(0.98, 0.8)]
    c = f2.summarize(no_ga, vanilla)["criteria"]
    assert not c["premise"]["ga"]["holds"] and c["premise"]["ga_diff"]["holds"]
    assert c["verdict"] == f"The paper's claim does not hold here ({f2.PRIMARY}): premise failed."
    json.dumps(out)
    assert "Verdict" in f2.markdown(out)


@pytest.mark.slow
def test_scale_profile_smoke_and_no_mixing(tmp_path, capsys):
    """The scale check's profile (wider model, more people) runs end to end in its smoke form,
    records its profile, and one --out never mixes it with the study's seeds."""
    from experiments import fidelity_v2 as f2

    out = str(tmp_path / "scale")
    argv = ["--seeds", "9", "--configs", "ga_diff", "--settings", "lr1e-03_f1", "--out", out]
    assert f2.main([*argv, "--fast", "--scale"]) == 0
    rec = json.loads(open(os.path.join(out, "seed9", "seed.json")).read())
    assert rec["profile"]["scale"] and rec["profile"]["people"] == 18
    assert rec["profile"]["parameters"] > 5 * f2.SCALE["hidden"] ** 2  # the wide model
    assert os.path.exists(os.path.join(out, "seed9", "runs", "ga_diff@lr1e-03_f1.json"))
    with pytest.raises(SystemExit, match="scale=True"):
        f2.main([*argv, "--fast"])
