"""The unlearning loop on a real HF causal LM: every method, masks, resume, NaN guard."""

from __future__ import annotations

import os

import pytest
import torch

from mmunlearn.config import RunConfig
from mmunlearn.kernels import pack_bits
from mmunlearn.loop import NonFiniteLossError, build_schedule, unlearn
from mmunlearn.losses import per_sample_ce, sequence_logprob
from mmunlearn.methods import METHODS, Method

from helpers import tiny_llama


def _model(seed=0):
    return tiny_llama(seed)


def _batches(n, seed, bs=4, t=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (bs, t), generator=g)
        labels = ids.clone()
        labels[:, : t // 2] = -100  # answer-only: the prompt half carries no loss
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


FORGET, RETAIN = _batches(2, 1), _batches(6, 2)
CFG = dict(lr=1e-3, progress=False, lr_schedule="constant", rmu_layer=0)


def test_schedule_interleaves_like_the_official_loop():
    plan = build_schedule(Method("mmunlearner"), 2, 6)
    assert [k for k, _ in plan].count("retain") == 6 and [k for k, _ in plan].count("forget") == 2
    assert [k for k, _ in plan][:2] == ["forget", "retain"] and plan[4][0] == "forget"  # freq 3
    assert sorted(i for k, i in plan if k == "retain") == list(range(6))
    assert [k for k, _ in build_schedule(Method("ga"), 3, 6)] == ["forget"] * 3
    assert build_schedule(Method("ga_diff"), 2, 6, seed=1) == build_schedule(
        Method("ga_diff"), 2, 6, seed=1
    )


def test_loss_primitives_agree_with_hf_loss():
    model = _model()
    b = FORGET[0]
    out = model(**b)
    n_tok = (b["labels"][:, 1:] != -100).sum(-1)
    ce = per_sample_ce(out.logits, b["labels"])
    assert torch.allclose(ce, -sequence_logprob(out.logits, b["labels"]) / n_tok)
    assert torch.allclose((ce * n_tok).sum() / n_tok.sum(), out.loss, rtol=1e-5)


# MANU: a vision side; SMFA: batches that remember their samples (test_methods_smfa_mip.py)
@pytest.mark.parametrize("name", [m for m in METHODS if m not in ("manu", "smfa")])
def test_every_method_runs_and_ascends_on_forget(name):
    model = _model()
    if name in ("rmu", "mip_editor"):  # their objective is activations, not the forget CE
        m = RunConfig(**CFG).method_for(name)
        with torch.no_grad():
            before = m.forget_loss(model, FORGET[0]).item()
        unlearn(model, m, FORGET * 2, RETAIN, config=RunConfig(**CFG, mip_batches=1))
        with torch.no_grad():
            after = m.forget_loss(model, FORGET[0]).item()
        assert after < before, (before, after)
        return
    before = model(**FORGET[0]).loss.item()
    masks = None
    if name == "mmunlearner":
        masks = {p: torch.rand(p.shape) < 0.5 for p in model.parameters()}
    res = unlearn(model, name, FORGET * 2, RETAIN, masks=masks, config=RunConfig(**CFG))
    assert res["steps"] == len(res["history"]) > 0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res["history"])
    after = model(**FORGET[0]).loss.item()
    assert after > before, f"{name}: forget loss did not rise ({before:.3f} → {after:.3f})"


def test_mmunlearner_forget_steps_leave_masked_out_weights_bit_identical():
    model = _model()
    params = list(model.parameters())
    dense = {p: torch.rand(p.shape) < 0.3 for p in params}
    snap = {"w": [p.detach().clone() for p in params]}
    checked = []

    def cb(step, kind, loss):
        now = [p.detach().clone() for p in params]
        if kind == "forget":
            for p, was, cur in zip(params, snap["w"], now):
                assert torch.equal(cur[~dense[p]], was[~dense[p]])
            checked.append(step)
        snap["w"] = now

    unlearn(
        model,
        "mmunlearner",
        FORGET,
        RETAIN,
        masks={p: pack_bits(d) for p, d in dense.items()},
        config=RunConfig(**CFG),
        callback=cb,
    )
    assert len(checked) == 2


class _Kill(Exception):
    pass


@pytest.mark.parametrize("name", ["mmunlearner", "npo", "rmu"])
def test_kill_and_resume_gives_the_same_weights(tmp_path, name):
    masks_of = lambda m: (
        {
            p: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.5  # noqa: E731
            for i, p in enumerate(m.parameters())
        }
        if name == "mmunlearner"
        else None
    )
    cfg = RunConfig(**{**CFG, "lr_schedule": "linear"}, checkpoint_every=2)
    forget = FORGET * 3  # NPO walks forget batches only: 6 steps
    ref = _model()
    unlearn(
        ref, name, forget, RETAIN, masks=masks_of(ref), config=cfg, output_dir=str(tmp_path / "a")
    )

    def kill(step, kind, loss):
        if step == 4:
            raise _Kill

    model = _model()
    with pytest.raises(_Kill):
        unlearn(
            model,
            name,
            forget,
            RETAIN,
            masks=masks_of(model),
            config=cfg,
            output_dir=str(tmp_path / "b"),
            callback=kill,
        )
    resumed = _model()  # a fresh process would rebuild the vanilla model, then resume
    res = unlearn(
        resumed,
        name,
        forget,
        RETAIN,
        masks=masks_of(resumed),
        config=cfg,
        output_dir=str(tmp_path / "b"),
        resume=True,
    )
    assert res["resumed_from"] == 4
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    model = _model()

    def poison(step, kind, loss):
        if step == 1:
            with torch.no_grad():
                model.model.embed_tokens.weight.fill_(float("nan"))

    cfg = RunConfig(**CFG, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* loss \(nan\) at step 2"):
        unlearn(
            model, "ga_diff", FORGET, RETAIN, config=cfg, output_dir=str(tmp_path), callback=poison
        )
    ck = tmp_path / "checkpoint"
    assert (ck / "state.json").exists() and (ck / "model.safetensors").exists()
    fresh = _model()
    from safetensors.torch import load_model

    load_model(fresh, str(ck / "model.safetensors"))
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_mmunlearner_without_masks_is_refused():
    with pytest.raises(ValueError, match="needs saliency masks"):
        unlearn(_model(), "mmunlearner", FORGET, RETAIN, config=RunConfig(**CFG))
    with pytest.raises(ValueError, match="unknown method"):
        Method("gd")


def test_corrupt_checkpoint_is_reported(tmp_path):
    ck = tmp_path / "checkpoint"
    os.makedirs(ck)
    (ck / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot resume from"):
        unlearn(
            _model(),
            "ga",
            FORGET,
            config=RunConfig(**CFG),
            output_dir=str(tmp_path),
            resume=True,
        )


def test_unsharded_model_under_torchrun_is_refused(monkeypatch):
    """Under torchrun each rank computes only its rows of a batch: a model whose gradients are
    not reduced across ranks (neither FSDP2 nor DDP) would train on a different gradient per
    rank, so unlearn and the Fisher pass refuse it."""
    import mmunlearn.distributed as mdist
    from mmunlearn.fisher import collect_fisher

    monkeypatch.setattr(mdist, "world_size", lambda: 2)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="reduced across ranks"):
        unlearn(model, "ga", [{"x": torch.zeros(1, 3)}], [], config=RunConfig(progress=False))
    with pytest.raises(ValueError, match="reduced across ranks"):
        collect_fisher(model, [{"input_ids": torch.zeros(1, 3, dtype=torch.long)}], progress=False)


def test_no_host_sync_between_logs_skips_a_nan_step_and_reports_it(monkeypatch):
    """log_every > 1: the loss stays on the device; a non-finite step is skipped there
    (found_inf) and reported at the next log point, naming its step; the steps before it
    match a run that stops there, the skipped step changed nothing."""
    real = Method.retain_loss

    def poisoned(self, model, batch, ref=None):
        loss = real(self, model, batch, ref)
        return loss * float("nan") if poisoned.calls == 4 else loss  # step 5

    poisoned.calls = 0

    def counting(self, model, batch, ref=None):
        poisoned.calls += 1
        return poisoned(self, model, batch, ref)

    cfg = RunConfig(**CFG, log_every=4)
    monkeypatch.setattr(Method, "retain_loss", counting)
    model = _model()
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite retain loss at step 5 .* up to step 7"
    ):
        unlearn(model, "ga_diff", FORGET, RETAIN, config=cfg)
    # the oracle: the same run without the poisoned step applied
    monkeypatch.setattr(Method, "retain_loss", real)
    ref = _model()
    plan = build_schedule(Method("ga_diff"), len(FORGET), len(RETAIN), forget_freq=None, seed=0)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-8, weight_decay=0.0)
    m = Method("ga_diff")
    for step, (kind, i) in enumerate(plan[:7]):  # the error stops the run before step 7
        batch = (FORGET if kind == "forget" else RETAIN)[i]
        loss = m.forget_loss(ref, batch) if kind == "forget" else m.retain_loss(ref, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
        if step != 5:  # the skipped step
            opt.step()
        opt.zero_grad()
    for (n, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=n)
