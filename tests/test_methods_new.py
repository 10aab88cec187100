"""RMU and UNDIAL: their losses and gradients against numbers worked out by hand, their options
(API, CLI flags, --config) and bad values, and full runs through ``mmunlearn unlearn`` → ``eval``
on the real-format LLaVA and Qwen2-VL checkpoints (tests/realformat.py)."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from realformat import llava_checkpoint, mllmu_root, qwen2vl_checkpoint

from mmunlearn.cli import main
from mmunlearn.config import RunConfig
from mmunlearn.methods import Method
from mmunlearn.methods.rmu import activation_mse, control_vector, decoder_layer
from mmunlearn.methods.undial import undial_loss


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # restored by conftest


# ------------------------------------------------------------------------------------------------
# UNDIAL
# ------------------------------------------------------------------------------------------------


def test_undial_loss_and_gradient_hand_computed():
    # V = 3, one label token (position 1, predicted from position 0); γ = 2.
    # reference logits at position 0: [0, ln 2, ln 3 + 2]; label 2 → adjusted [0, ln 2, ln 3]
    # → target [1/6, 2/6, 3/6]. Student logits [0, 0, 0] → log p = −ln 3 everywhere
    # → L = ln 3; dL/dz = p − target = [1/3 − 1/6, 1/3 − 1/3, 1/3 − 1/2] = [1/6, 0, −1/6].
    ref = torch.tensor([[[0.0, math.log(2), math.log(3) + 2.0], [5.0, -1.0, 0.0]]])
    logits = torch.zeros(1, 2, 3, requires_grad=True)
    labels = torch.tensor([[-100, 2]])
    loss = undial_loss(logits, ref, labels, strength=2.0)
    assert loss.item() == pytest.approx(math.log(3), abs=1e-6)
    loss.backward()
    want = torch.tensor([[[1 / 6, 0.0, -1 / 6], [0.0, 0.0, 0.0]]])  # position 1 predicts nothing
    assert torch.allclose(logits.grad, want, atol=1e-6)


def test_undial_averages_over_label_tokens():
    # two label tokens, γ = 0 (plain self-distillation). Token A: ref = student = [0, 0]
    # → L_A = ln 2. Token B: ref [0, ln 3] → target [1/4, 3/4]; student [0, 0] → L_B = ln 2.
    # Token C (label −100) is ignored. mean = ln 2; at γ = 1 token A's target becomes
    # softmax([0, −1]) (label 1) but its student loss is still ln 2: mean stays ln 2.
    ref = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [9.0, 0.0], [0.0, 0.0]]])
    logits = torch.zeros(1, 4, 2)
    labels = torch.tensor([[-100, 1, 0, -100]])
    assert undial_loss(logits, ref, labels, 0.0).item() == pytest.approx(math.log(2), abs=1e-6)
    assert undial_loss(logits, ref, labels, 1.0).item() == pytest.approx(math.log(2), abs=1e-6)
    # token A with student [0, 10] and γ = 1: target softmax([0, −1]) = [e/(1+e), 1/(1+e)],
    # log p = [−lse, 10 − lse] with lse = ln(1 + e^10): L_A = p₀·lse + p₁·(lse − 10)
    logits[0, 0] = torch.tensor([0.0, 10.0])
    p = math.e / (1 + math.e)
    lse = math.log(1 + math.exp(10))
    want_a = p * lse + (1 - p) * (lse - 10)
    got = undial_loss(logits, ref, labels, 1.0).item()
    assert got == pytest.approx((want_a + math.log(2)) / 2, abs=1e-5)


# ------------------------------------------------------------------------------------------------
# RMU
# ------------------------------------------------------------------------------------------------


def test_activation_mse_and_gradient_hand_computed():
    # tokens: (0,0) label, (0,1) no label, (1,0) label; d = 2; target [3, 4].
    # (0,0): a = [1, 2] → ((1−3)² + (2−4)²)/2 = 4; (1,0): a = [3, 6] → (0 + 4)/2 = 2 → mean 3.
    # dL/da = 2(a − t)/(d·N) = (a − t)/2: (0,0) → [−1, −1], (1,0) → [0, 1], (0,1) → 0.
    act = torch.tensor([[[1.0, 2.0], [7.0, 7.0]], [[3.0, 6.0], [0.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[5, -100], [5, -100]])
    loss = activation_mse(act, torch.tensor([3.0, 4.0]), labels)
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    want = torch.tensor([[[-1.0, -1.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]])
    assert torch.equal(act.grad, want)


def test_control_vector_is_a_fixed_nonnegative_direction_of_norm_c():
    v = control_vector(16, 6.5, seed=3)
    assert v.shape == (16,) and v.dtype == torch.float32
    assert v.norm().item() == pytest.approx(6.5, rel=1e-6) and bool((v >= 0).all())
    assert torch.equal(v, control_vector(16, 6.5, seed=3))  # the same on resume
    assert not torch.equal(v, control_vector(16, 6.5, seed=4))
    assert torch.allclose(control_vector(16, 1.0, seed=3) * 6.5, v)


class _Boom(torch.nn.Module):
    def forward(self, h):
        raise AssertionError("RMU ran past its layer")


class _Toy(torch.nn.Module):
    """``model.layers``: a 2×2 linear map (the RMU layer) then a layer that must not run."""

    def __init__(self, w):
        super().__init__()
        self.model = torch.nn.Module()
        lin = torch.nn.Linear(2, 2, bias=False)
        lin.weight.data = torch.tensor(w)
        self.model.layers = torch.nn.ModuleList([lin, _Boom()])

    def forward(self, x, labels=None):
        h = x
        for layer in self.model.layers:
            h = layer(h)
        return SimpleNamespace(logits=h, loss=None)


def test_rmu_forget_and_retain_through_a_model_stop_at_the_layer():
    # x: token 0 = [1, 1] (label), token 1 = [2, 3] (no label); W = diag(1, 2) → h = [1, 2]
    x = torch.tensor([[[1.0, 1.0], [2.0, 3.0]]])
    batch = {"x": x, "labels": torch.tensor([[7, -100]])}
    model, ref = _Toy([[1.0, 0.0], [0.0, 2.0]]), _Toy([[1.0, 0.0], [0.0, 1.0]])
    m = Method("rmu", rmu_layer=0, rmu_coeff=5.0, rmu_alpha=4.0, seed=1)
    v = control_vector(2, 5.0, seed=1)
    loss = m.forget_loss(model, batch, ref)
    assert loss.item() == pytest.approx(((1 - v[0]) ** 2 + (2 - v[1]) ** 2).item() / 2, rel=1e-6)
    loss.backward()
    # dL/dW = (2/d)(h − v) xᵀ / N with d = 2, N = 1, x = [1, 1]
    g = (torch.tensor([1.0, 2.0]) - v)[:, None] * torch.tensor([[1.0, 1.0]])
    assert torch.allclose(model.model.layers[0].weight.grad, g, atol=1e-6)
    # retain: ref h = [1, 1], ours [1, 2] → α·((0)² + (1)²)/2 = 4 · 0.5 = 2
    assert m.retain_loss(model, batch, ref).item() == pytest.approx(2.0)
    assert Method("rmu", rmu_layer=-2).forget_loss(model, batch, ref).isfinite()  # = layer 0
    with pytest.raises(ValueError, match=r"rmu_layer 2: the language model has 2 decoder layers"):
        decoder_layer(model, 2)
    with pytest.raises(ValueError, match="rmu_layer -3"):
        Method("rmu", rmu_layer=-3).check_model(model)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"rmu_coeff": 0.0}, "rmu_coeff must be a finite number > 0"),
        ({"rmu_coeff": float("inf")}, "rmu_coeff must be a finite number > 0"),
        ({"rmu_alpha": -1.0}, "rmu_alpha must be a finite number ≥ 0"),
        ({"undial_strength": float("nan")}, "undial_strength must be a finite number > 0"),
        ({"rmu_layer": 1.5}, "rmu_layer must be an integer"),
        ({"rmu_layer": True}, "rmu_layer must be an integer"),
    ],
)
def test_bad_values_are_refused_by_the_config_and_the_method(kw, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**kw)
    with pytest.raises(ValueError, match=message):
        Method("rmu", **kw)


def test_config_reaches_the_method():
    cfg = RunConfig(rmu_layer=-1, rmu_coeff=6.5, rmu_alpha=1200.0, undial_strength=3.0, seed=9)
    m = cfg.method_for("rmu")
    assert (m.rmu_layer, m.rmu_coeff, m.rmu_alpha, m.seed) == (-1, 6.5, 1200.0, 9)
    assert cfg.method_for("undial").undial_strength == 3.0
    assert m.needs_reference and m.has_retain and not m.uses_mask
    u = Method("undial")
    assert u.needs_reference and not u.has_retain and not u.uses_mask


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


# the language model's decoder layer N / final norm in a saved key, LLaVA's layout
# (language_model.model.layers.N) or Qwen2-VL's (model.layers.N); not the vision encoder's
_LM = r"(^|language_model\.)(model\.)?"


def _layer(n: int):
    return re.compile(_LM + rf"layers\.{n}\.")


def _changed(before: dict, after: dict) -> set:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_rmu_and_undial_unlearn_then_eval(files, tmp_path, family, capsys):
    model = ["--model", str(files[family])]
    data = ["--mllmu", str(files["mllmu"]), "--split", "5"]
    small = ["--lr", "1e-3", "--steps", "3", "--batch-size", "2"]
    # RMU from a --config file (method and options), UNDIAL from flags
    cfg = tmp_path / "rmu.yaml"
    cfg.write_text("method: rmu\nrmu_layer: 0\nrmu_coeff: 5.0\nrmu_alpha: 10.0\n")
    assert main(["unlearn", "--config", str(cfg), *model, *data, *small,
                 "--out", str(tmp_path / "rmu")]) == 0  # fmt: skip
    assert main(["unlearn", "--method", "undial", "--undial-strength", "3", *model, *data,
                 *small, "--out", str(tmp_path / "undial")]) == 0  # fmt: skip
    before = _weights(files[family])
    for name, phases in (("rmu", {"forget", "retain"}), ("undial", {"forget"})):
        out = tmp_path / name
        summary = json.loads((out / "unlearn.json").read_text())
        assert summary["method"] == name
        log = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
        assert {r["phase"] for r in log} == phases
        assert all(math.isfinite(r["loss"]) for r in log)
        after = _weights(out / "model")
        assert all(bool(t.isfinite().all()) for t in after.values())
        changed = _changed(before, after)
        assert changed, name
        if name == "rmu":
            c = summary["config"]
            assert (c["rmu_layer"], c["rmu_coeff"], c["rmu_alpha"]) == (0, 5.0, 10.0)
            # nothing after decoder layer 0 reaches RMU's loss: layer 1 and the head stay put
            late = re.compile(_LM + r"(layers\.1\.|norm\.)|lm_head")
            assert not any(late.search(k) for k in changed), sorted(changed)
            assert any(_layer(0).search(k) for k in changed), sorted(changed)
        else:
            assert summary["config"]["undial_strength"] == 3.0
            assert any(_layer(1).search(k) for k in changed), sorted(changed)
    ev = tmp_path / "ev"
    argv = ["eval", "--model", str(tmp_path / "rmu" / "model"), "--model",
            str(tmp_path / "undial" / "model"), *data, "--limit", "2"]  # fmt: skip
    assert main([*argv, "--max-new-tokens", "2", "--out", str(ev)]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert len(res["methods"]) == 2
    for m in res["methods"].values():
        assert set(m) >= {"forget", "retain"}


def test_bad_options_are_one_line_errors(files, tmp_path, capsys):
    base = ["unlearn", "--model", str(files["llava"]), "--mllmu", str(files["mllmu"])]
    for flag, value, rc, text in (
        ("--rmu-coeff", "-1", 2, "--rmu-coeff: rmu_coeff must be a finite number > 0"),
        ("--undial-strength", "nan", 2, "--undial-strength: undial_strength must be a finite"),
        ("--rmu-alpha", "-0.5", 2, "--rmu-alpha: rmu_alpha must be a finite number ≥ 0"),
        ("--rmu-layer", "1.5", 2, "--rmu-layer"),
        ("--rmu-layer", "7", 1, "rmu_layer 7: the language model has 2 decoder layers"),
    ):
        capsys.readouterr()
        argv = [*base, "--method", "rmu", flag, value, "--steps", "1"]
        assert main([*argv, "--out", str(tmp_path / "x")]) == rc, (flag, value)
        err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
        assert len(err) == 1 and text in err[0], err


def _llama_batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (2, 10), generator=g)
        labels = ids.clone()
        labels[:, :5] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def test_rmu_gradient_is_the_same_with_gradient_checkpointing_and_stops_at_the_layer():
    from helpers import tiny_llama

    b = _llama_batches(1, 0)[0]
    m = Method("rmu", rmu_layer=0)
    grads = []
    for gc in (False, True):
        model = tiny_llama(0).train()
        if gc:  # the layer runs again in backward: the capture hook must leave it alone
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        m.forget_loss(model, b).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    # only what precedes layer 0's output has a gradient: the embeddings and layer 0
    assert all(k.startswith(("model.embed_tokens.", "model.layers.0.")) for k in grads[0])


@pytest.mark.parametrize("name", ["rmu", "undial"])
def test_grad_release_matches_the_ordinary_loop(name):
    from mmunlearn.loop import unlearn

    from helpers import tiny_llama

    forget, retain = _llama_batches(2, 1), _llama_batches(4, 2)
    states = []
    for release in (False, True):
        model = tiny_llama(0)
        cfg = RunConfig(lr=1e-3, progress=False, rmu_layer=0, max_grad_norm=None,
                        grad_release=release)  # fmt: skip
        unlearn(model, name, forget, retain, config=cfg)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    start = tiny_llama(0).state_dict()
    assert any(not torch.equal(start[k], states[0][k]) for k in start)  # the run moved weights


# ------------------------------------------------------------------------------------------------
# MANU
# ------------------------------------------------------------------------------------------------


def test_manu_statistics_importance_selection_and_pruning_hand_computed():
    from mmunlearn.methods import manu

    # neuron 0 fires 1, 3 → mean |a| 2, std 1, RMS √5; neuron 1 fires −2, 0 → 1, 1, √2
    st = manu.neuron_stats(torch.tensor([[1.0, -2.0], [3.0, 0.0]]))
    assert torch.allclose(st["abs"], torch.tensor([2.0, 1.0]))
    assert torch.allclose(st["std"], torch.tensor([1.0, 1.0]))
    assert torch.allclose(st["rms"], torch.tensor([math.sqrt(5), math.sqrt(2)]))
    assert manu.neuron_stats(torch.tensor([[5000.0], [-3000.0]]))["abs"].item() == 1000.0
    # retain: abs [1, 1], std [1, 2], RMS equal → s₀ = 2(2−1) + 2(1−1) + 0 = 2,
    # s₁ = 2(1−1) + 2(0.5−1) + 0 = −1 (ε = 0)
    r = {"abs": torch.tensor([1.0, 1.0]), "std": torch.tensor([1.0, 2.0]), "rms": st["rms"]}
    s = manu.importance({"a": st}, {"a": r}, eps=0.0)["a"]
    assert torch.allclose(s, torch.tensor([2.0, -1.0]))
    # top 40 % of 5 neurons = 2; the second largest (2) is tied: all three ≥ 2 are chosen
    masks = manu.select({"a": s, "b": torch.tensor([5.0, 0.0, 2.0])}, 40.0)
    assert masks["a"].tolist() == [True, False] and masks["b"].tolist() == [True, False, True]
    assert manu.select({"a": s}, 1.0)["a"].tolist() == [True, False]  # at least one
    lin = torch.nn.Linear(2, 3)
    keep = lin.weight[1].detach().clone()
    assert manu.zero_rows({"b": lin}, {"b": masks["b"]}) == 2
    assert lin.weight[[0, 2]].abs().sum() == 0 and lin.bias[[0, 2]].abs().sum() == 0
    assert torch.equal(lin.weight[1], keep) and lin.bias[1] != 0


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1, bias=False)
        self.lin.weight.data.fill_(1.0)

    def forward(self, x, attention_mask):
        return self.lin(x)


def test_manu_language_statistics_skip_padding():
    from mmunlearn.methods import manu

    # batch 1: positions 3 (kept), 100 (padding) → |a| 3; batch 2: −1 → 1; mean over batches 2
    b1 = {"x": torch.tensor([[[3.0], [100.0]]]), "attention_mask": torch.tensor([[1, 0]])}
    b2 = {"x": torch.tensor([[[-1.0]]]), "attention_mask": torch.tensor([[1]])}
    model = _Lin()
    st = manu.collect_stats(model, [b1, b2], 2, {"language": {"lin": model.lin}}, "cpu")
    assert torch.allclose(st["lin"]["abs"], torch.tensor([2.0]))
    assert torch.allclose(st["lin"]["rms"], torch.tensor([2.0]))  # (3 + 1) / 2
    # the vision side counts every position: (3 + 100)/2 = 51.5, then (51.5 + 1)/2
    st = manu.collect_stats(model, [b1, b2], 2, {"vision": {"lin": model.lin}}, "cpu")
    assert torch.allclose(st["lin"]["abs"], torch.tensor([26.25]))


_VISION = re.compile(r"vision_tower|visual")


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_manu_unlearn_then_eval(files, tmp_path, family):
    model = ["--model", str(files[family])]
    data = ["--mllmu", str(files["mllmu"]), "--split", "5", "--batch-size", "2"]
    out = tmp_path / "manu"
    argv = ["unlearn", "--method", "manu", "--manu-layers", "1", "--manu-percent", "25"]
    assert main([*argv, *model, *data, "--out", str(out)]) == 0
    summary = json.loads((out / "unlearn.json").read_text())
    rep = summary["manu"]
    assert summary["steps"] == 0 and rep["batches"] >= 1
    log = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["manu"] and log[0]["vision"] == rep["vision"]
    before, after = _weights(files[family]), _weights(out / "model")
    changed = _changed(before, after)
    # only MLP linears of the last block of each side move, and only to whole zero rows
    assert changed and all(".mlp." in k for k in changed), sorted(changed)
    zero = {"vision": 0, "language": 0}
    for k in changed:
        side = "vision" if _VISION.search(k) else "language"
        assert _layer(0).search(k) is None  # the language model's first layer: not the last
        w, w0 = after[k], before[k]
        rows = (w != w0).reshape(w.shape[0], -1).any(-1)
        assert bool((w[rows] == 0).all())
        if k.endswith(".weight"):
            zero[side] += int(rows.sum())
    for side in ("vision", "language"):
        n, k = rep[side]["neurons"], rep[side]["pruned"]
        assert k >= max(1, int(0.25 * n)) and zero[side] == k, (side, rep, zero)
    ev = tmp_path / "ev"
    argv = ["eval", "--model", str(out / "model"), "--mllmu", str(files["mllmu"]), "--split"]
    assert main([*argv, "5", "--limit", "2", "--max-new-tokens", "2", "--out", str(ev)]) == 0


def test_manu_bad_options_are_one_line_errors(files, tmp_path, capsys):
    base = ["unlearn", "--model", str(files["llava"]), "--mllmu", str(files["mllmu"])]
    for flag, value, rc, text in (
        ("--manu-percent", "0", 2, "--manu-percent: manu_percent must be a finite number in"),
        ("--manu-percent", "101", 2, "manu_percent must be a finite number in (0, 100]"),
        ("--manu-layers", "0", 2, "--manu-layers: manu_layers must be an integer ≥ 1"),
        ("--manu-layers", "3", 1, "manu_layers 3: the vision side has 2 blocks"),
    ):
        capsys.readouterr()
        argv = [*base, "--method", "manu", flag, value, "--out", str(tmp_path / "x")]
        assert main(argv) == rc, (flag, value)
        err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
        assert len(err) == 1 and text in err[0], err


def test_estimate_counts_each_methods_reference_and_state():
    from transformers import LlamaConfig

    from mmunlearn.estimate import count_parameters, estimate

    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    P, _ = count_parameters(cfg)

    def terms(method):
        return estimate(cfg, 1, dtype="bf16", batch=2, seq=8, method=method)[1].terms

    # bf16: 2 bytes; UNDIAL keeps the reference and its fp32 logits (4·B·T·V = 4·2·8·100)
    assert terms("undial")["reference model (frozen)"] == 2 * P
    assert terms("undial")["reference logits (fp32)"] == 6400
    # RMU: the reference's hidden states at its layer only (B·T·d·2 = 2·8·16·2)
    assert terms("rmu")["reference hidden states at the RMU layer"] == 512
    assert "reference logits (fp32)" not in terms("rmu")
    # MANU: no gradients, moments, mask or reference
    t = terms("manu")
    assert "weights (sharded)" in t and not any(
        k.startswith(("grads", "AdamW", "mask", "ref")) for k in t
    )
