"""SMFA and MIP-Editor: each checked against an independent hand-written reference on a tiny
model with fresh random inputs (the whole SMFA run against three plain ``torch.optim.AdamW``
loops and a loop-by-element sculpting; MIP-Editor's path scores against gradients taken
through a multiplicative gate, its steering loss and gradient against a per-sample loop),
their behaviour (what moves, what stays, resume), their options' errors, and full runs
through ``mmunlearn unlearn`` → ``eval`` on the real-format LLaVA and Qwen2-VL checkpoints."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from dataclasses import replace

import pytest
import torch
from realformat import llava_checkpoint, mllmu_root, qwen2vl_checkpoint

from mmunlearn.cli import main
from mmunlearn.config import RunConfig
from mmunlearn.data.batching import BatchSource, make_batches
from mmunlearn.data.recipe import synthetic_sets
from mmunlearn.data.synthetic import make_benchmark
from mmunlearn.loop import unlearn
from mmunlearn.methods import Method, mip, smfa
from mmunlearn.tinyrun import TinyRunConfig, build_tiny


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # restored by conftest


SETS = ("forget", "retain")


@pytest.fixture(scope="module")
def tiny():
    """The tiny LLaVA (hidden 32), its adapter and the synthetic sets (6 people)."""
    bench = make_benchmark(n_people=6, forget_ratio=0.34, seed=0)
    cfg = TinyRunConfig(seed=0, n_people=6, hidden=32, vision_hidden=16, progress=False)
    model, tok, adapter = build_tiny(bench, cfg, torch.device("cpu"))
    return model.eval(), adapter, synthetic_sets(bench)


# ------------------------------------------------------------------------------------------------
# SMFA
# ------------------------------------------------------------------------------------------------


def _sculpt_by_element(delta, anchor, k):
    """The sculpting rule written out element by element (Python floats)."""
    d, a = delta.double().flatten().tolist(), anchor.double().flatten().tolist()
    ratio = math.sqrt(sum(x * x for x in d)) / (math.sqrt(sum(x * x for x in a)) + 1e-12)
    out = [0.0 if (x * y < 0 and k * ratio * abs(y) < abs(x)) else x for x, y in zip(d, a)]
    return torch.tensor(out, dtype=torch.float64).reshape(delta.shape)


def test_sculpt_hand_computed_and_against_the_element_loop():
    # δ = [3, −4], a = [1, 1]: ρ = 5/√2; element 0 agrees → kept; element 1 disagrees and
    # |−4| > k·ρ·1 for k = 0.5 (1.77) → 0, but not for k = 1 (3.54 < 4 → 0 too) nor k = 2 (7.07)
    d, a = torch.tensor([3.0, -4.0]), torch.tensor([1.0, 1.0])
    assert smfa.sculpt(d, a, 0.5).tolist() == [3.0, 0.0]
    assert smfa.sculpt(d, a, 1.0).tolist() == [3.0, 0.0]
    assert smfa.sculpt(d, a, 2.0).tolist() == [3.0, -4.0]
    assert smfa.sculpt(d, torch.zeros(2), 5.0).tolist() == [3.0, -4.0]  # no anchor: nothing
    g = torch.Generator().manual_seed(1234)
    for k in (0.0, 0.3, 1.0, 5.0):
        d, a = torch.randn(7, 9, generator=g), torch.randn(7, 9, generator=g) * 0.1
        got = smfa.sculpt(d, a, k)
        want = _sculpt_by_element(d, a, k)
        assert torch.allclose(got.double(), want, rtol=0, atol=1e-6), k  # fp32 vs fp64 norms
        if k == 0.0:  # every disagreeing element goes
            assert torch.equal(got == 0, d * a < 0)


def test_refusal_and_text_views():
    from mmunlearn.data.schema import Sample

    s = Sample("Who is this?", "Ann Bell", image="IMG", entity="ann", meta={"x": 1})
    r = smfa.refusal(s, seed=3)
    assert r.answer in smfa.REFUSALS and r.question == s.question and r.image == "IMG"
    assert r == smfa.refusal(s, seed=3) and s.answer == "Ann Bell"  # fixed; s untouched
    assert len({smfa.refusal(replace(s, question=f"q{i}")).answer for i in range(40)}) > 1
    t = smfa.text_only(s)
    assert t.image is None and t.kind == "text" and (t.question, t.answer) == (s.question, s.answer)
    with pytest.raises(ValueError, match="smfa relabels forget items"):
        smfa.views([{"input_ids": torch.zeros(1)}], [{"input_ids": torch.zeros(1)}])
    with pytest.raises(ValueError, match="smfa needs retain batches"):
        smfa.views([{"input_ids": torch.zeros(1)}], [])


def _adamw_run(model, batches, cfg):
    """Plain ``torch.optim.AdamW`` descent on each batch's HF loss in order (constant lr, the
    global gradient norm clipped as ``cfg.max_grad_norm``)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay)  # fmt: skip
    model.train()
    for b in batches:
        model(**b).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_smfa_run_matches_three_adamw_runs_and_the_sculpted_merge(tiny):
    model, adapter, data = tiny
    rng = random.Random(7)  # fresh batches: 2 forget items, 3 retain items, mixed modalities
    fs = rng.sample(data.forget, 2)
    rs = rng.sample([s for s in data.retain if s.image is not None], 2)
    rs += rng.sample([s for s in data.retain if s.image is None], 1)
    forget = make_batches(adapter, fs, 2, random.Random(0))
    retain = make_batches(adapter, rs, 3, random.Random(0))
    cfg = RunConfig(lr=2e-3, lr_schedule="constant", max_grad_norm=0.5, epochs=2,
                    smfa_multi_k=0.5, smfa_text_k=2.0, progress=False, backend="torch",
                    seed=5)  # fmt: skip
    start = copy.deepcopy(model)
    got = copy.deepcopy(model)
    res = unlearn(got, "smfa", forget, retain, config=cfg)
    # the reference: the same batches made by hand from the samples
    fb, rb = forget.chunks[0], retain.chunks[0]

    def c(items):
        return adapter.collate(items)

    ref = [smfa.refusal(s, 5) for s in fb]
    runs = {
        "anchor": [c(rb), c([smfa.text_only(s) for s in rb])] * 2,
        "multi": [c(ref), c(rb)] * 2,
        "text": [c([smfa.text_only(s) for s in ref]), c([smfa.text_only(s) for s in rb])] * 2,
    }
    theta0 = {n: p.detach().clone() for n, p in start.named_parameters()}
    after = {k: _adamw_run(copy.deepcopy(start), b, cfg) for k, b in runs.items()}
    want = {}
    for n, t0 in theta0.items():
        a = after["anchor"][n] - t0
        dm = _sculpt_by_element(after["multi"][n] - t0, a, 0.5)
        dt = _sculpt_by_element(after["text"][n] - t0, a, 2.0)
        want[n] = t0.double() + (dm + dt) / 2
    for n, p in got.named_parameters():
        if n.endswith("self_attn.k_proj.bias"):
            # its gradient is 0 in exact arithmetic (the softmax over keys ignores a shift
            # common to all of them): both runs move it by AdamW steps on rounding noise
            # (≈ lr·g/eps), which differ with the order of the float operations (beyond atol
            # on transformers 4.x); both must stay that small
            for x in (p.double(), want[n]):
                assert (x - theta0[n].double()).abs().max() < 1e-4, n
            continue
        assert torch.allclose(p.double(), want[n], rtol=1e-4, atol=2e-6), n
    assert res["steps"] == 12 and [h["kind"] for h in res["history"][:4]] == [
        "anchor:retain", "anchor:retain_text", "anchor:retain", "anchor:retain_text"]  # fmt: skip
    rep = res["smfa"]
    assert rep["multi"]["zeroed"] > 0 and rep["multi"]["changed"] > rep["multi"]["zeroed"]
    # a smaller k zeroes more of the same update
    again = copy.deepcopy(start)
    rep2 = unlearn(again, "smfa", forget, retain, config=replace(cfg, smfa_multi_k=50.0))["smfa"]
    assert rep2["multi"]["zeroed"] < rep["multi"]["zeroed"]


def test_smfa_moves_forget_items_toward_refusals(tiny):
    model, adapter, data = tiny
    forget = make_batches(adapter, data.forget, 4, random.Random(1))
    retain = make_batches(adapter, data.retain, 4, random.Random(2))
    refusals = forget.view(smfa.refusal)
    # a model that knows the true answers first (one epoch of plain AdamW on every item): from
    # the random init SMFA's retain terms teach the answer format and may lower the forget
    # loss too (they do from the init transformers 4.x draws for the same seed)
    m = copy.deepcopy(model)
    both = [*forget, *retain]
    random.Random(3).shuffle(both)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    m.train()
    for b in both:
        m(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()

    def ce(model, batches):
        with torch.no_grad():
            return sum(model(**b).loss.item() for b in batches) / len(batches)

    before = (ce(m, refusals), ce(m, forget))
    unlearn(m, "smfa", forget, retain, config=RunConfig(lr=3e-3, epochs=3, progress=False))
    after = (ce(m, refusals), ce(m, forget))
    assert after[0] < before[0] - 0.5, (before, after)  # the refusal becomes likely
    assert after[1] > before[1], (before, after)  # the true answers less so


def test_smfa_resume_reads_finished_phases_back_and_reruns_the_missing_one(tiny, tmp_path):
    model, adapter, data = tiny
    src = {k: BatchSource(getattr(data, k), adapter.collate, 4, seed=1) for k in SETS}
    cfg = RunConfig(lr=1e-3, progress=False, max_steps=3)
    first = copy.deepcopy(model)
    r1 = unlearn(first, "smfa", src["forget"], src["retain"], config=cfg, output_dir=tmp_path)
    assert not r1["finished"] and r1["steps"] == 9
    for p in smfa.PHASES:
        assert (tmp_path / f"smfa_{p}" / "checkpoint" / "state.json").exists()
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["phase"] == "smfa_merge" and rows[-1]["multi"] == r1["smfa"]["multi"]
    shutil.rmtree(tmp_path / "smfa_text")  # as if killed in the text phase
    second = copy.deepcopy(model)
    r2 = unlearn(second, "smfa", src["forget"], src["retain"], config=cfg, output_dir=tmp_path,
                 resume=True)  # fmt: skip
    assert not r2["finished"] and r2["resumed_from"] == 6  # anchor and multi read back
    third = copy.deepcopy(model)
    r3 = unlearn(third, "smfa", src["forget"], src["retain"], config=cfg, output_dir=tmp_path,
                 resume=True)  # fmt: skip
    assert r3["finished"]
    for a, b, c in zip(first.parameters(), second.parameters(), third.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_smfa_refuses_what_it_cannot_do(tiny):
    model, adapter, data = tiny
    f = make_batches(adapter, data.forget[:2], 2, random.Random(0))
    r = make_batches(adapter, data.retain[:2], 2, random.Random(0))
    with pytest.raises(ValueError, match="eval_every: SMFA's model exists only once"):
        unlearn(copy.deepcopy(model), "smfa", f, r, config=RunConfig(progress=False),
                monitor=lambda m, s: {"score": 0.0})  # fmt: skip
    with pytest.raises(ValueError, match="lora: smfa is implemented at full parameter"):
        unlearn(copy.deepcopy(model), "smfa", f, r, config=RunConfig(progress=False, lora=True))
    with pytest.raises(ValueError, match="is not one loss"):
        Method("smfa").forget_loss(model, f[0])


# ------------------------------------------------------------------------------------------------
# MIP-Editor
# ------------------------------------------------------------------------------------------------


def _gate_scores(model, batch, modules):
    """|a·∂L/∂a| per input channel of each module, by a different route: the input is
    multiplied by a gate of ones whose gradient is a·g; language: mean over label positions,
    vision: over every position."""
    gates, handles = {}, []
    for mods in modules.values():
        for name, lin in mods.items():

            def pre(_m, inputs, name=name):
                if name in gates:
                    return None
                g = torch.ones_like(inputs[0], requires_grad=True)
                gates[name] = g
                return (inputs[0] * g,)

            handles.append(lin.register_forward_pre_hook(pre))
    try:
        model(**batch).loss.backward()
    finally:
        for h in handles:
            h.remove()
    out = {}
    labels = batch["labels"]
    for side, mods in modules.items():
        for name in mods:
            s = gates[name].grad.abs()
            if side == "language":
                rows = [s[b, t] for b in range(s.shape[0]) for t in range(s.shape[1])
                        if labels[b, t] != -100]  # fmt: skip
                out[name] = torch.stack(rows).mean(0)
            else:
                out[name] = s.reshape(-1, s.shape[-1]).mean(0)
    return out


def test_mip_path_scores_match_gradients_through_a_gate(tiny):
    model, adapter, data = tiny
    m = copy.deepcopy(model)
    batches = make_batches(adapter, random.Random(11).sample(data.forget, 4), 2, random.Random(3))
    mods = mip.ffn_modules(m)
    assert len(mods["language"]) == 2 and len(mods["vision"]) == 2
    got, used = mip.path_scores(m, batches, 5, mods)
    assert used == 2 and all(p.grad is None for p in m.parameters())  # no .grad left behind
    want: dict = {}
    for b in batches:
        mm = copy.deepcopy(model)
        sc = _gate_scores(mm, b, _names_to(mm, mods))
        for k, v in sc.items():
            want[k] = v / 2 if k not in want else want[k] + v / 2
    assert got.keys() == want.keys()
    for k in got:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-9), k
    masks = mip.select(got, 3)
    for k, mask in masks.items():
        assert int(mask.sum()) == 3 and bool(got[k][mask].min() >= got[k][~mask].max())


def _names_to(model, mods):
    """The same ``{side: {name: linear}}`` on another copy of the model."""
    named = dict(model.named_modules())
    return {side: {n: named[n] for n in d} for side, d in mods.items()}


def test_mip_steering_loss_hand_computed_and_against_a_per_sample_loop():
    # d = 2, target [3, 4]. Sample 0: labels at t = 0, 1 with a = [1, 2], [3, 4] → per token
    # (4 + 4)/2 = 4 and 0 → mean 2; sample 1: one label token, a = [3, 6] → 2; sample 2: no
    # label token (left out) → loss (2 + 2)/2 = 2
    act = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[3.0, 6.0], [9.0, 9.0]], [[0.0, 0.0]] * 2])
    labels = torch.tensor([[5, 5], [5, -100], [-100, -100]])
    assert mip.steering_mse(act, torch.tensor([3.0, 4.0]), labels).item() == pytest.approx(2.0)
    g = torch.Generator().manual_seed(99)
    act = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 2, (3, 5), generator=g) * 7 - 100 * (
        torch.rand(3, 5, generator=g) < 0.5
    )
    labels[0] = -100
    labels[1, 2] = 7
    tgt = torch.randn(4, generator=g)
    loss = mip.steering_mse(act, tgt, labels)
    want, n = 0.0, 0
    for b in range(3):
        toks = [((act[b, t] - tgt) ** 2).mean() for t in range(5) if labels[b, t] != -100]
        if toks:
            want, n = want + sum(toks) / len(toks), n + 1
    want = want / n
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    (gw,) = torch.autograd.grad(want, act)
    loss.backward()
    assert torch.allclose(act.grad, gw, atol=1e-7)


def test_mip_forget_loss_through_the_model_matches_the_mlp_output(tiny):
    model, adapter, data = tiny
    b = adapter.collate(random.Random(5).sample(data.forget, 3))
    m1, m2 = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    loss = Method("mip_editor", mip_coeff=2.5, mip_forget_weight=3.0, seed=4).forget_loss(m1, b)
    loss.backward()
    # the reference: the last language block's MLP output (= its down projection's output),
    # captured by a hook on the MLP, the target drawn by hand, a per-sample loop
    from mmunlearn.models.adapters import _language_model

    cap = []
    h = _language_model(m2).layers[-1].mlp.register_forward_hook(lambda _m, _i, o: cap.append(o))
    m2(**b)
    h.remove()
    gen = torch.Generator().manual_seed(4)
    r = torch.randn(cap[0].shape[-1], generator=gen, dtype=torch.float64)
    tgt = (r / r.norm() * 2.5).float()
    per = []
    for i in range(cap[0].shape[0]):
        toks = [((cap[0][i, t] - tgt) ** 2).mean() for t in range(cap[0].shape[1])
                if b["labels"][i, t] != -100]  # fmt: skip
        per.append(sum(toks) / len(toks))
    want = 3.0 * sum(per) / len(per)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    want.backward()
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        if p2.grad is None:
            assert p1.grad is None or not bool(p1.grad.any()), n
        else:
            assert torch.allclose(p1.grad, p2.grad, rtol=1e-4, atol=1e-7), n


def test_mip_editor_run_edits_holds_the_paths_and_steers_forget_activations(tiny, tmp_path):
    model, adapter, data = tiny
    forget = make_batches(adapter, data.forget, 2, random.Random(1))
    retain = make_batches(adapter, data.retain, 4, random.Random(2))
    method = Method("mip_editor", mip_topk=3, mip_batches=2, seed=0)
    m = copy.deepcopy(model)
    edit = mip.PathEdit(copy.deepcopy(model), forget, 3, 2)  # the paths the run will pick
    with torch.no_grad():
        before = sum(method.forget_loss(m, b).item() for b in forget)
    cfg = RunConfig(lr=2e-3, epochs=3, progress=False, mip_topk=3, mip_batches=2,
                    weight_decay=0.1)  # fmt: skip
    res = unlearn(m, "mip_editor", forget, retain, config=cfg, output_dir=str(tmp_path))
    with torch.no_grad():
        after = sum(method.forget_loss(m, b).item() for b in forget)
    assert after < 0.5 * before, (before, after)
    named = dict(m.named_modules())
    for name, mask in edit.masks.items():
        w = named[name].weight
        assert bool((w[:, mask] == 0).all()), name  # zeroed and held through every step
        assert bool((w[:, ~mask] != 0).any()), name
    rep = res["mip"]
    assert rep["language"]["channels"] == 3 * rep["language"]["edited_modules"]
    assert rep["vision"]["edited_modules"] >= 1 and rep["batches"] == 2
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows[0]["phase"] == "mip_paths" and {r["phase"] for r in rows[1:]} == {
        "forget", "retain"}  # fmt: skip
    assert all(not lin._backward_hooks for lin in named.values())  # hooks removed
    assert all(not p._backward_hooks for p in m.parameters() if p._backward_hooks is not None)


class _Crash(Exception):
    pass


def test_mip_editor_resume_matches_an_uninterrupted_run(tiny, tmp_path):
    model, adapter, data = tiny
    src = {k: BatchSource(getattr(data, k), adapter.collate, 4, seed=1) for k in SETS}
    cfg = RunConfig(lr=1e-3, progress=False, checkpoint_every=1, mip_batches=1)
    whole = copy.deepcopy(model)
    unlearn(whole, "mip_editor", src["forget"], src["retain"], config=cfg)

    def crash(step, kind, loss):
        if step == 1:
            raise _Crash

    part = copy.deepcopy(model)
    with pytest.raises(_Crash):
        unlearn(part, "mip_editor", src["forget"], src["retain"], config=cfg,
                output_dir=str(tmp_path), callback=crash)  # fmt: skip
    again = copy.deepcopy(model)
    r = unlearn(again, "mip_editor", src["forget"], src["retain"], config=cfg,
                output_dir=str(tmp_path), resume=True)  # fmt: skip
    assert r["resumed_from"] == 2
    for a, b in zip(whole.parameters(), again.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"smfa_multi_k": -1.0}, "smfa_multi_k must be a finite number ≥ 0"),
        ({"smfa_text_k": float("nan")}, "smfa_text_k must be a finite number ≥ 0"),
        ({"mip_topk": 0}, "mip_topk must be an integer ≥ 1"),
        ({"mip_batches": 1.5}, "mip_batches must be an integer ≥ 1"),
        ({"mip_coeff": 0.0}, "mip_coeff must be a finite number > 0"),
        ({"mip_forget_weight": float("inf")}, "mip_forget_weight must be a finite number > 0"),
        ({"mip_retain_weight": -0.1}, "mip_retain_weight must be a finite number ≥ 0"),
    ],
)
def test_bad_values_are_refused_by_the_config_and_the_method(kw, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**kw)
    with pytest.raises(ValueError, match=message):
        Method("smfa", **kw)


def test_config_reaches_the_methods():
    cfg = RunConfig(smfa_multi_k=2.0, smfa_text_k=3.0, mip_topk=7, mip_batches=2, mip_coeff=4.0,
                    mip_forget_weight=1.5, mip_retain_weight=0.0, seed=9)  # fmt: skip
    s, m = cfg.method_for("smfa"), cfg.method_for("mip_editor")
    assert (s.smfa_multi_k, s.smfa_text_k, s.seed) == (2.0, 3.0, 9)
    assert (m.mip_topk, m.mip_batches, m.mip_coeff, m.mip_forget_weight,
            m.mip_retain_weight) == (7, 2, 4.0, 1.5, 0.0)  # fmt: skip
    for x in (s, m):
        assert x.has_retain and not x.needs_reference and not x.uses_mask and not x.one_shot
    assert s.phased and not s.edits_paths and m.edits_paths and not m.phased


# ------------------------------------------------------------------------------------------------
# the CLI on real-format checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {
        "llava": llava_checkpoint(root / "llava"),
        "qwen2vl": qwen2vl_checkpoint(root / "qwen2vl"),
        "mllmu": mllmu_root(root / "MLLMU-Bench", n_forget=2, n_people=4),
    }


def _weights(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_smfa_and_mip_editor_unlearn_then_eval(files, tmp_path, family):
    model = ["--model", str(files[family])]
    data = ["--mllmu", str(files["mllmu"]), "--split", "5"]
    small = ["--lr", "1e-3", "--steps", "2", "--batch-size", "2"]
    cfg = tmp_path / "smfa.yaml"
    cfg.write_text("method: smfa\nsmfa_multi_k: 2.0\nsmfa_text_k: 4.0\n")
    assert main(["unlearn", "--config", str(cfg), *model, *data, *small,
                 "--out", str(tmp_path / "smfa")]) == 0  # fmt: skip
    assert main(["unlearn", "--method", "mip_editor", "--mip-topk", "2", "--mip-batches", "1",
                 "--mip-coeff", "3", *model, *data, *small,
                 "--out", str(tmp_path / "mip")]) == 0  # fmt: skip
    before = _weights(files[family])
    s = json.loads((tmp_path / "smfa" / "unlearn.json").read_text())
    assert s["method"] == "smfa" and s["steps"] == 6
    assert (s["config"]["smfa_multi_k"], s["config"]["smfa_text_k"]) == (2.0, 4.0)
    assert set(s["smfa"]) == {"multi_k", "text_k", "multi", "text"}
    for p in smfa.PHASES:
        log = (tmp_path / "smfa" / "run" / f"smfa_{p}" / "log.jsonl").read_text().splitlines()
        assert len(log) == 2 and all(json.loads(x)["phase"].startswith(p) for x in log)
    m = json.loads((tmp_path / "mip" / "unlearn.json").read_text())
    assert m["method"] == "mip_editor" and m["mip"]["topk"] == 2
    assert m["mip"]["language"]["edited_modules"] == 2  # both decoder layers
    log = [json.loads(x) for x in (tmp_path / "mip" / "run" / "log.jsonl").read_text().split("\n")
           if x]  # fmt: skip
    assert log[0]["phase"] == "mip_paths" and {r["phase"] for r in log[1:]} == {"forget", "retain"}
    for name in ("smfa", "mip"):
        after = _weights(tmp_path / name / "model")
        assert all(bool(t.isfinite().all()) for t in after.values())
        assert any(not torch.equal(before[k], after[k]) for k in before), name
    ev = tmp_path / "ev"
    argv = ["eval", "--model", str(tmp_path / "smfa" / "model"), "--model",
            str(tmp_path / "mip" / "model"), *data, "--limit", "2"]  # fmt: skip
    assert main([*argv, "--max-new-tokens", "2", "--out", str(ev)]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert len(res["methods"]) == 2


def test_bad_options_are_one_line_errors(files, tmp_path, capsys):
    base = ["unlearn", "--model", str(files["llava"]), "--mllmu", str(files["mllmu"])]
    for method, flag, value, rc, text in (
        ("smfa", "--smfa-multi-k", "-1", 2, "--smfa-multi-k: smfa_multi_k must be a finite"),
        ("smfa", "--smfa-text-k", "inf", 2, "--smfa-text-k: smfa_text_k must be a finite"),
        ("mip_editor", "--mip-topk", "0", 2, "--mip-topk: mip_topk must be an integer ≥ 1"),
        ("mip_editor", "--mip-batches", "x", 2, "--mip-batches"),
        ("mip_editor", "--mip-coeff", "-2", 2, "--mip-coeff: mip_coeff must be a finite"),
        ("mip_editor", "--mip-forget-weight", "0", 2, "--mip-forget-weight: mip_forget_weight"),
        ("mip_editor", "--mip-retain-weight", "-1", 2, "--mip-retain-weight: mip_retain_weight"),
        # refused before PEFT is looked for (the minimum install has none)
        ("smfa", "--lora", None, 2, "--lora: smfa is implemented at full parameter"),
        ("mip_editor", "--lora", None, 2, "--lora: mip_editor is implemented at full"),
    ):
        capsys.readouterr()
        argv = [*base, "--method", method, flag] + ([value] if value is not None else [])
        assert main([*argv, "--steps", "1", "--out", str(tmp_path / "x")]) == rc, (flag, value)
        err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
        assert len(err) == 1 and text in err[0], err


def test_compare_runs_both_and_resumes_a_preempted_smfa(files, tmp_path, capsys, monkeypatch):
    from mmunlearn import runctl

    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(files["qwen2vl"]), "--mllmu", str(files["mllmu"]),
            "--split", "5", "--methods", "smfa,mip_editor", "--steps", "2", "--lr", "1e-3",
            "--batch-size", "2", "--mip-batches", "1", "--n-boot", "10",
            "--max-new-tokens", "2", "--no-progress", "--out", str(out)]  # fmt: skip
    # preempted after SMFA's first step (as SIGTERM would): exit 75, the anchor's checkpoint
    monkeypatch.setattr(runctl.Preemption, "requested", lambda self, device=None: True)
    assert main(argv) == 75
    assert (out / "smfa" / "run" / "smfa_anchor" / "checkpoint").is_dir()
    assert not (out / "smfa" / "unlearn.json").exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv) == 0
    log = (out / "smfa" / "run" / "smfa_anchor" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == [0, 1]  # resumed, not redone
    assert json.loads((out / "smfa" / "unlearn.json").read_text())["steps"] == 6
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["vanilla", "smfa", "mip_editor"]
    for m in ("smfa", "mip_editor"):
        assert (out / m / "model").is_dir(), m
