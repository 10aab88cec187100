"""``mmunlearn attack`` (mmunlearn.attack, mmunlearn.cli.attack): linear CKA against worked
cases and the feature-space formula, the picture transforms (deterministic, shapes kept, each
doing what it says), the relearning hold-out, and the command on the demo's tiny models and on
a real-format LLaVA with MLLMU-Bench-format files, with oracles a run must meet (a model
against itself: CKA 1, every difference 0; zero relearning steps: nothing changes)."""

from __future__ import annotations

import copy
import importlib.util
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mmunlearn.attack import cka as C
from mmunlearn.attack import probes as P
from mmunlearn.attack.transforms import TRANSFORMS, rephrase, rephrased_items
from mmunlearn.cli import main
from mmunlearn.data.schema import Sample

from conftest import SEED

PEOPLE = 5


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------- CKA
def test_cka_worked_example_is_the_squared_correlation():
    # centred x = (-1, 0, 1), y = (0, -1, 1): ‖yᵀx‖² = 1, ‖xᵀx‖ = ‖yᵀy‖ = 2 → 1/4
    assert C.linear_cka([1.0, 2.0, 3.0], [1.0, 0.0, 2.0]) == pytest.approx(0.25, abs=1e-15)
    rng = np.random.default_rng(SEED)
    a, b = rng.normal(size=20), rng.normal(size=20)
    assert C.linear_cka(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1] ** 2, rel=1e-12)


def test_cka_invariances_and_feature_space_form():
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(30, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # orthogonal
    assert C.linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)
    assert C.linear_cka(x, 2.0 * x) == pytest.approx(1.0, abs=1e-12)
    assert C.linear_cka(x, x + 5.0) == pytest.approx(1.0, abs=1e-12)
    y = rng.normal(size=(30, 4))
    xc, yc = x - x.mean(0), y - y.mean(0)
    feat = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    got = C.linear_cka(x, y)
    assert got == pytest.approx(feat, rel=1e-12) and 0.0 <= got < 1.0
    # not invariant to a non-isotropic scaling: the check can fail
    assert C.linear_cka(x, x * np.arange(1, 7)) < 0.99
    assert np.isnan(C.linear_cka(np.ones((5, 3)), x[:5]))
    with pytest.raises(ValueError, match="inputs"):
        C.linear_cka(x, y[:10])


def test_cka_interval_resamples_the_inputs():
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(12, 3))
    y = x + rng.normal(scale=0.5, size=(12, 3))
    ci = C.cka_interval(x, y, n_boot=200, seed=4)
    # oracle: the same draws by hand (scipy's: rng.integers(0, n, (n_boot, n)))
    idx = np.random.default_rng(4).integers(0, 12, size=(200, 12))
    reps = np.array([C.linear_cka(x[i], y[i]) for i in idx])
    lo, hi = np.nanquantile(reps, [0.025, 0.975])
    assert ci["estimate"] == C.linear_cka(x, y) and ci["n"] == 12
    assert (ci["lo"], ci["hi"]) == pytest.approx((lo, hi), rel=1e-9)


# ------------------------------------------------------------------------------ transforms
def _picture(mode="RGB", size=(40, 30)):
    rng = np.random.default_rng(SEED)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(arr[..., 0]))
    return img.convert(mode) if mode != "RGBA" else img


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_transforms_are_deterministic_and_keep_the_shape(name, mode):
    img = _picture(mode)
    a, b = rephrase(img, name, seed=3, index=1), rephrase(img, name, seed=3, index=1)
    assert a.size == img.size and a.mode == img.mode
    assert a.tobytes() == b.tobytes()
    if (name, mode) != ("greyscale", "L"):  # a grey picture stays itself
        assert a.tobytes() != img.tobytes()  # it changes the picture
    if mode == "RGBA":
        assert a.getchannel("A").tobytes() == img.getchannel("A").tobytes()


@pytest.mark.parametrize("name", ["crop", "jitter", "blur"])
def test_random_transforms_draw_per_seed_and_picture(name):
    img = _picture()
    base = rephrase(img, name, seed=0, index=0).tobytes()
    assert rephrase(img, name, seed=1, index=0).tobytes() != base
    assert rephrase(img, name, seed=0, index=1).tobytes() != base


def test_each_transform_does_what_it_says():
    img = _picture()
    grey = np.asarray(rephrase(img, "greyscale"))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    post = np.asarray(rephrase(img, "posterize"))
    assert (post & 0b00011111 == 0).all()  # 3 bits kept
    checker = Image.fromarray(((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8))
    blurred = np.asarray(rephrase(checker.convert("RGB"), "blur"), dtype=np.float64)
    assert blurred.std() < 0.5 * np.asarray(checker, dtype=np.float64).std()
    with pytest.raises(ValueError, match="unknown image transform"):
        rephrase(img, "sepia")


def test_rephrased_items_keep_text_items_and_order():
    img = _picture()
    items = [Sample("q1", "a", img, "e"), Sample("q2", "b", None, "e"), Sample("q3", "c", [img])]
    out = rephrased_items(items, "crop", seed=2)
    assert [s.question for s in out] == ["q1", "q2", "q3"] and out[1].image is None
    assert out[0].image.tobytes() == rephrase(img, "crop", 2, 0).tobytes()
    assert out[2].image[0].tobytes() == rephrase(img, "crop", 2, "2.0").tobytes()
    assert items[0].image is img  # the originals are untouched


def test_held_out_leaves_out_the_shown_facts():
    def mcq(entity, right, wrong="x"):
        return Sample("q", right, None, entity, meta={"options": {"A": wrong, "B": right},
                                                      "correct": "B"})  # fmt: skip

    seen = [Sample("q", "The person is a Baker.", None, "P0")]
    items = [mcq("P0", "baker"), mcq("P1", "baker"), mcq("P0", "pilot"), mcq("P0", "a baker")]
    kept, n = P.held_out(items, seen)
    assert n == 2 and [s.meta["options"]["B"] for s in kept] == ["baker", "pilot"]
    assert [s.entity for s in kept] == ["P1", "P0"]


# ------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """The demo's recipe at a smoke size (mmunlearn.tinyrun): a vanilla tiny LLaVA fine-tuned on
    the synthetic world, and GA_Diff unlearned from it; both saved."""
    from mmunlearn.config import RunConfig
    from mmunlearn.data.batching import make_batches
    from mmunlearn.data.recipe import synthetic_sets
    from mmunlearn.data.synthetic import make_benchmark
    from mmunlearn.loop import unlearn
    from mmunlearn.models import save_model
    from mmunlearn.tinyrun import TinyRunConfig, build_tiny
    from mmunlearn.train import finetune

    torch.set_num_threads(1)
    bench = make_benchmark(n_people=PEOPLE, seed=0)
    cfg = TinyRunConfig(seed=0, hidden=32, vision_hidden=32, n_people=PEOPLE)
    dev = torch.device("cpu")
    torch.manual_seed(0)
    model, tok, adapter = build_tiny(bench, cfg, dev)
    finetune(model, adapter, bench.train, 40, 1e-3, 8, 0, dev, progress=False)
    root = tmp_path_factory.mktemp("attack_models")
    van = save_model(model, tok, root / "vanilla")
    data, rng = synthetic_sets(bench), random.Random(0)
    forget = make_batches(adapter, data.forget, 8, rng, 3)
    retain = make_batches(adapter, data.retain, 8, rng, 3)
    m = copy.deepcopy(model)
    run = RunConfig(lr=1e-3, forget_freq=1, lr_schedule="constant", progress=False)
    unlearn(m, "ga_diff", forget, retain, config=run)
    return str(van), str(save_model(m, tok, root / "ga_diff"))


def _argv(model, vanilla, out, *extra):
    argv = ["attack", "--model", model, "--synthetic", "--people", str(PEOPLE), "--n-boot",
            "50", "--relearn-lr", "1e-3", "--relearn-steps", "3", "--relearn-k", "4",
            "--cka-items", "8", "--no-progress", "--out", str(out)]  # fmt: skip
    return argv + (["--vanilla", vanilla] if vanilla else []) + list(extra)


def _intervals(obj):
    """Every {"estimate", "lo", "hi"} in a result tree."""
    if isinstance(obj, dict):
        if {"estimate", "lo", "hi"} <= set(obj):
            yield obj
        for v in obj.values():
            yield from _intervals(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _intervals(v)


def test_attack_all_probes_on_the_demo_models(tiny_models, tmp_path):
    van, unl = tiny_models
    out = tmp_path / "a"
    assert main(_argv(unl, van, out)) == 0
    res = json.loads((out / "attack.json").read_text())
    assert set(res["probes"]) == {"relearn", "images", "text", "cka"}
    for d in _intervals(res):
        if not np.isnan(d["estimate"]):
            assert d["lo"] - 1e-12 <= d["estimate"] <= d["hi"] + 1e-12, d
    r = res["relearn"]
    assert r["k"] == 4 and r["excluded"] > 0 and len(r["items"]) == 4
    m = r["metrics"]["vqa_mcq_acc"]
    assert m["delta"]["estimate"] == pytest.approx(m["after"]["estimate"] - m["before"]["estimate"])
    assert set(res["images"]["forget"]) == {"original", *TRANSFORMS}
    assert set(res["text"]) == {"forget", "retain"}
    layers = [x["layer"] for x in res["cka"]["layers"]]
    assert any("vision" in x for x in layers) and any("language" in x for x in layers), layers
    assert res["cka"]["n"] == {"forget": 8, "retain": 8}
    md = (out / "attack.md").read_text()
    for title in ("Relearning attack", "Rephrased pictures", "Text-only probes", "CKA"):
        assert title in md
    if importlib.util.find_spec("matplotlib") is not None:  # (the plot extra)
        assert (out / "attack.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert not (out / "attack.png").exists()


def test_a_model_against_itself_changes_nothing(tiny_models, tmp_path):
    """Oracle: the vanilla model as both models: CKA 1 at every layer, the unlearned column
    equal to the vanilla one, every paired difference 0; zero relearning steps change
    nothing."""
    van, _ = tiny_models
    out = tmp_path / "self"
    assert main(_argv(van, van, out, "--relearn-steps", "0", "--transforms", "blur")) == 0
    res = json.loads((out / "attack.json").read_text())
    for layer in res["cka"]["layers"]:
        for side in ("forget", "retain"):
            assert layer[side]["estimate"] == pytest.approx(1.0, abs=1e-6), layer
    for row in res["text"].values():
        assert row["unlearned"] == row["vanilla"] and row["delta"]["estimate"] == 0.0
    for rows in res["images"].values():
        for row in rows.values():
            assert row["unlearned"] == row["vanilla"]
    for m in res["relearn"]["metrics"].values():
        assert m["after"] == m["before"] == m["vanilla"] and m["delta"]["estimate"] == 0.0


def test_attack_real_format_llava_on_mllmu_files(tmp_path):
    from realformat import llava_checkpoint, mllmu_root

    van = llava_checkpoint(tmp_path / "vanilla", seed=0)
    unl = llava_checkpoint(tmp_path / "unlearned", seed=1)
    data = mllmu_root(tmp_path / "MLLMU-Bench")
    out = tmp_path / "out"
    argv = ["attack", "--model", str(unl), "--vanilla", str(van), "--mllmu", str(data),
            "--relearn-k", "2", "--relearn-steps", "2", "--relearn-lr", "1e-3",
            "--cka-items", "4", "--n-boot", "30", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "attack.json").read_text())
    assert res["text"]["forget"]["unlearned"]["n"] == 4  # 2 forget people × (forget + Test_Set)
    assert res["images"]["forget"]["original"]["unlearned"]["n"] == 4
    layers = [x["layer"] for x in res["cka"]["layers"]]
    assert len(layers) == 4 and not res["cka"]["skipped"]  # 2 CLIP layers + 2 Llama layers
    assert res["relearn"]["excluded"] > 0
    assert res["relearn"]["metrics"]["vqa_mcq_acc"]["before"]["n"] < 4


def _fails(argv, capsys, *names, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("mmunlearn attack: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in names:
        assert n in lines[0], lines[0]


def test_bad_inputs_are_one_line(tiny_models, tmp_path, capsys):
    van, unl = tiny_models
    out = tmp_path / "x"
    _fails(["attack", "--synthetic", "--out", str(out)], capsys, "--model")
    _fails(_argv(unl, None, out, "--probes", "cka"), capsys, "--vanilla")
    _fails(_argv(unl, van, out, "--probes", "cka,sepia"), capsys, "sepia")
    _fails(_argv(unl, van, out, "--transforms", "sepia"), capsys, "sepia")
    _fails(_argv(unl, van, out, "--relearn-k", "0"), capsys, "--relearn-k")
    _fails(_argv(str(tmp_path / "nope"), van, out), capsys, "--model")
    _fails(_argv(unl, str(tmp_path / "nope"), out), capsys, "--vanilla")
    argv = ["attack", "--model", unl, "--mllmu", str(tmp_path / "none"), "--out", str(out)]
    _fails(argv, capsys, "none")
    _fails(["attack", "--model", unl, "--clear", str(tmp_path)], capsys, "--clear")
    assert not out.exists()


def test_help_lists_attack_and_a_config_file_is_checked(tmp_path, capsys):
    from mmunlearn.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "attack" in capsys.readouterr().out
    cfg = tmp_path / "a.json"
    cfg.write_text(json.dumps({"relearn-kk": 3}))
    _fails(["attack", "--config", str(cfg)], capsys, "relearn-kk", "relearn-k")
