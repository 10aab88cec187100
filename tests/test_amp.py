"""``torch.amp.GradScaler`` with :class:`~mmunlearn.optim.MaskedAdamW` (fp16 training): the
scaled step equals the unscaled one bit for bit, a step with an inf/NaN gradient leaves weights,
moments and step counts untouched while the scale backs off, and scale and weights follow
``torch.optim.AdamW`` under the same scaler (the oracle)."""

from __future__ import annotations

import pytest
import torch

from mmunlearn.optim import MaskedAdamW, MaskedSGD


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    return m.to(dtype)


def _batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 8, generator=g).to(dtype), torch.randn(6, 4, generator=g).to(dtype))
            for _ in range(n)]  # fmt: skip


def _loss(model, x, y):
    return ((model(x).float() - y.float()) ** 2).mean()


def _state(opt, model):
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state_tensors(p).items()})
            for p in model.parameters()]  # fmt: skip


def _same(a, b) -> bool:
    return all(torch.equal(p, q) and all(torch.equal(s[k], t[k]) for k in s)
               for (p, s), (q, t) in zip(a, b))  # fmt: skip


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("masked", [False, True])
def test_scaled_step_equals_the_unscaled_step(clip, masked):
    runs = []
    for scaled in (False, True):
        model = _model()
        opt = MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        if masked:
            g = torch.Generator().manual_seed(3)
            opt.set_masks({p: torch.rand(p.shape, generator=g) < 0.5 for p in model.parameters()})
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
        for x, y in _batches(5):
            loss = _loss(model, x, y)
            if scaled:
                scaler.scale(loss).backward()
                scaler.step(opt, masked=masked, max_grad_norm=clip)
                scaler.update()
            else:
                loss.backward()
                opt.step(masked=masked, max_grad_norm=clip)
            opt.zero_grad()
        runs.append(_state(opt, model))
    assert _same(*runs)


@pytest.mark.parametrize("masked", [False, True])
def test_an_inf_gradient_skips_the_step_and_backs_off(masked):
    model = _model()
    opt = MaskedAdamW(model.parameters(), lr=1e-2)
    if masked:
        opt.set_masks({p: torch.ones_like(p, dtype=torch.bool) for p in model.parameters()})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    (x, y), (x2, y2) = _batches(2)
    scaler.scale(_loss(model, x, y)).backward()
    scaler.step(opt, masked=masked, max_grad_norm=1.0)
    scaler.update()
    opt.zero_grad()
    before = _state(opt, model)
    scaler.scale(_loss(model, x2, y2)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt, masked=masked, max_grad_norm=1.0)
    scaler.update()
    assert _same(_state(opt, model), before)  # weights, moments and the step count
    assert scaler.get_scale() == 2.0**7


def test_scale_and_weights_follow_torch_adamw_under_the_same_scaler():
    """fp32 master weights: MaskedAdamW (scale folded into the kernel) against torch.optim.AdamW
    (GradScaler unscales the gradients itself), over steps with two overflows."""
    out = []
    for cls in (MaskedAdamW, torch.optim.AdamW):
        model = _model()
        opt = cls(model.parameters(), lr=1e-2, weight_decay=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        scales = []
        for i, (x, y) in enumerate(_batches(8)):
            scaler.scale(_loss(model, x, y)).backward()
            if i in (2, 5):
                list(model.parameters())[2].grad[1, 1] = float("nan")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            scales.append(scaler.get_scale())
        out.append(([p.detach().clone() for p in model.parameters()], scales))
    (pa, sa), (pb, sb) = out
    assert sa == sb and sa[2] == sa[1] / 2 and max(sa) > sa[0]  # backed off and grew
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [MaskedAdamW, MaskedSGD])
def test_fp16_weights_train_under_the_scaler(cls):
    """Pure fp16 weights and gradients (what ``--dtype fp16`` trains): the scaler's fp16
    gradients are never unscaled in fp16; the loss falls, masked-out weights stay."""
    model = _model(dtype=torch.float16)
    opt = cls(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    masks = {p: torch.rand(p.shape, generator=g) < 0.5 for p in model.parameters()}
    opt.set_masks(masks)
    start = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    data = _batches(1, dtype=torch.float16) * 30
    first = _loss(model, *data[0]).item()
    for x, y in data:
        scaler.scale(_loss(model, x, y)).backward()
        scaler.step(opt, masked=True, max_grad_norm=1.0)
        scaler.update()
        opt.zero_grad()
    assert _loss(model, *data[0]).item() < 0.9 * first
    for p, q in zip(model.parameters(), start):
        assert torch.equal(p.detach()[~masks[p]], q[~masks[p]])
        assert not torch.equal(p.detach()[masks[p]], q[masks[p]])


# ------------------------------------------------------------------------------------------------
# the unlearning loop on fp16 weights
# ------------------------------------------------------------------------------------------------


def _lm_batches(n, seed, bs=4, t=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (bs, t), generator=g)
        labels = ids.clone()
        labels[:, : t // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _fp16_run(tmp, steps, resume=False, model=None, **kw):
    from mmunlearn.config import RunConfig
    from mmunlearn.loop import unlearn

    from helpers import tiny_llama

    model = model if model is not None else tiny_llama(0).half()
    cfg = RunConfig(lr=1e-3, progress=False, max_steps=steps, checkpoint_every=1, **kw)
    out = unlearn(model, "ga_diff", _lm_batches(2, 1), _lm_batches(6, 2), config=cfg,
                  output_dir=str(tmp), resume=resume)  # fmt: skip
    return model, out


def test_the_loop_trains_fp16_weights_with_a_loss_scale_that_resumes(tmp_path, monkeypatch):
    import functools
    import json

    from helpers import tiny_llama

    # a scale that overflows at first and grows every 2 good steps: the scale moves both ways
    scaler = functools.partial(torch.amp.GradScaler, init_scale=2.0**22, growth_interval=2)
    monkeypatch.setattr(torch.amp, "GradScaler", scaler)
    start = tiny_llama(0).half()
    ref = [p.detach().clone() for p in start.parameters()]
    whole, out = _fp16_run(tmp_path / "a", 6, model=start)
    assert all(torch.isfinite(p).all() for p in whole.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(whole.parameters(), ref))
    state = json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] < 2.0**22  # backed off from overflowing gradients
    # stopped after 3 steps and resumed: the same weights as the uninterrupted run
    _fp16_run(tmp_path / "b", 3)
    ckpt = tmp_path / "b" / "checkpoint" / "state.json"
    half = json.loads(ckpt.read_text())
    half["config"]["max_steps"] = half["identity"]["config"]["max_steps"] = 6
    ckpt.write_text(json.dumps(half))
    resumed, _ = _fp16_run(tmp_path / "b", 6, resume=True)
    for p, q in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(p, q)


def test_fp16_with_the_official_zero_grad_step_is_refused(tmp_path):
    from mmunlearn.config import RunConfig
    from mmunlearn.loop import unlearn

    from helpers import tiny_llama

    model = tiny_llama(0).half()
    masks = {p: torch.ones_like(p, dtype=torch.bool) for p in model.parameters()}
    cfg = RunConfig(progress=False, mask_mode="zero_grad", max_steps=1)
    with pytest.raises(ValueError, match="fp16 weights need loss scaling"):
        unlearn(model, "mmunlearner", _lm_batches(2, 1), _lm_batches(2, 2), masks=masks,
                config=cfg)  # fmt: skip
