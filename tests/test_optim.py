"""MaskedAdamW / MaskedSGD as torch optimizers: oracle vs torch.optim, masks, policies, state."""

from __future__ import annotations

import copy

import pytest
import torch

from mmunlearn.kernels import pack_bits
from mmunlearn.optim import MaskedAdamW, MaskedSGD

from conftest import DEVICE, HAS_CUDA
from helpers import assert_close_verbose, max_rel_err, ulp

BACKENDS = ["torch", "triton", "cpu"]


def _need_device(backend):
    if backend == "cpu" and DEVICE.type != "cpu":
        pytest.skip("the cpu backend runs on CPU tensors")


def _model(dtype=torch.float32, device=DEVICE):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 5)).to(
        device=device, dtype=dtype
    )


def _batches(n, device=DEVICE, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 13, generator=g).to(device, dtype),
            torch.randn(8, 5, generator=g).to(device, dtype),
        )
        for _ in range(n)
    ]


def _train(model, opt, batches, sched=None, **step_kw):
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step(**step_kw)
        opt.zero_grad()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ones_masks_match_torch_adamw_50_steps(backend):
    """External oracle: all-ones masks == torch.optim.AdamW over 50 steps (fp32, max rel.
    error relative to max(|ref|, 0.01) per element; see test_kernels for why the floor). The
    torch backend does AdamW's arithmetic in AdamW's order (<= 1e-6; 0 seen). The Triton kernel
    (CPU interpreter: numpy) rounds differently by ~1 ulp per step (the one-step bound is in
    test_kernels), and training feeds that back through the gradients: 1.2e-6 after 50 steps
    on an AMD EPYC, < 1e-6 on the machine before it, so the bound is 50 steps x 1 ulp."""
    _need_device(backend)
    ref, ours = _model(), _model()
    batches = _batches(50)
    kw = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    _train(ref, torch.optim.AdamW(ref.parameters(), foreach=False, **kw), batches)
    opt = MaskedAdamW(ours.parameters(), backend=backend, **kw)
    opt.set_masks({p: torch.ones_like(p, dtype=torch.bool) for p in ours.parameters()})
    _train(ours, opt, batches, masked=True)
    bound = 1e-6 if backend == "torch" else len(batches) * ulp(torch.float32)  # cpu: see above
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert max_rel_err(a.detach(), b.detach(), floor=1e-2) <= bound, name


@pytest.mark.gpu
def test_all_ones_masks_match_torch_adamw_50_steps_gpu():
    ref, ours = _model(device="cuda"), _model(device="cuda")
    batches = _batches(50, device="cuda")
    _train(ref, torch.optim.AdamW(ref.parameters(), lr=3e-3, foreach=False), batches)
    opt = MaskedAdamW(ours.parameters(), lr=3e-3)
    opt.set_masks({p: torch.ones_like(p, dtype=torch.bool) for p in ours.parameters()})
    _train(ours, opt, batches)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert max_rel_err(a.detach(), b.detach(), floor=1e-2) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_steps_leave_unselected_bytes_and_moments(backend, dtype):
    _need_device(backend)
    model = _model(dtype)
    opt = MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend=backend)
    batches = _batches(8, dtype=dtype)
    _train(model, opt, batches[:3], masked=False)  # moments become non-zero everywhere
    params = list(model.parameters())
    dense = {p: torch.rand(p.shape, device=DEVICE) < 0.3 for p in params}
    opt.set_masks(dense)
    before = {
        p: (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
        for p in params
    }
    _train(model, opt, batches[3:], masked=True, max_grad_norm=1.0)
    moved = 0
    for p in params:
        keep = ~dense[p]
        p0, m0, v0 = before[p]
        assert torch.equal(
            p.detach()[keep].view(torch.int16 if dtype != torch.float32 else torch.int32),
            p0[keep].view(torch.int16 if dtype != torch.float32 else torch.int32),
        )
        assert torch.equal(
            opt.state[p]["exp_avg"][keep].view(torch.int32), m0[keep].view(torch.int32)
        )
        assert torch.equal(
            opt.state[p]["exp_avg_sq"][keep].view(torch.int32), v0[keep].view(torch.int32)
        )
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        moved += int((p.detach()[dense[p]] != p0[dense[p]]).sum())
    assert moved > 0.5 * sum(int(d.sum()) for d in dense.values())


@pytest.mark.parametrize("policy", ["freeze", "update"])
def test_unmasked_policy(policy):
    model = _model()
    first, *rest = list(model.parameters())
    opt = MaskedAdamW(model.parameters(), lr=1e-2, unmasked=policy, backend="torch")
    opt.set_masks({first: torch.ones_like(first, dtype=torch.bool)})
    before = [p.detach().clone() for p in rest]
    _train(model, opt, _batches(3))  # masked=None → masked, since masks are set
    for p, b in zip(rest, before):
        if policy == "freeze":
            assert torch.equal(p.detach(), b)
            assert "exp_avg" not in opt.state.get(p, {})
        else:
            assert not torch.equal(p.detach(), b)
    # masked=False is a plain step over everything, whatever the policy
    _train(model, opt, _batches(1), masked=False)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(rest, before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_reproduces_trajectory(backend):
    _need_device(backend)
    batches = _batches(12, dtype=torch.bfloat16)
    model = _model(torch.bfloat16)
    opt = MaskedAdamW(model.parameters(), lr=1e-2, backend=backend)
    opt.set_masks(
        {
            p: pack_bits(torch.rand(p.shape, device=DEVICE) < 0.5)
            for p in list(model.parameters())[:2]
        }
    )
    _train(model, opt, batches[:6], masked=True)
    snap_model = copy.deepcopy(model.state_dict())
    snap_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, batches[6:], masked=True)

    model2 = _model(torch.bfloat16)
    model2.load_state_dict(snap_model)
    opt2 = MaskedAdamW(model2.parameters(), lr=5.0, backend=backend)  # lr comes from the dict
    opt2.load_state_dict(snap_opt)
    for p in list(model2.parameters())[:2]:
        assert opt2.get_mask(p).dtype == torch.uint8
        assert opt2.state[p]["exp_avg"].dtype == torch.float32
    assert opt2.param_groups[0]["lr"] == 1e-2
    _train(model2, opt2, batches[6:], masked=True)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_lr_scheduler_and_clipping_match_torch():
    batches = _batches(20)
    ref, ours = _model(), _model()
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    rsched = torch.optim.lr_scheduler.LinearLR(
        ropt, start_factor=1.0, end_factor=0.1, total_iters=20
    )
    opt = MaskedAdamW(ours.parameters(), lr=1e-2, backend="torch")
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=20)
    for x, y in batches:
        for m, o, s, fused in ((ref, ropt, rsched, False), (ours, opt, sched, True)):
            torch.nn.functional.mse_loss(m(x), y * 10).backward()
            if fused:
                o.step(max_grad_norm=0.5)
            else:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
                o.step()
            o.zero_grad()
            s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(ropt.param_groups[0]["lr"])
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert_close_verbose(a, b, rtol=1e-5, atol=1e-6)


def test_mask_then_clip_uses_masked_norm():
    model = _model()
    p = next(iter(model.parameters()))
    opt = MaskedAdamW([p], lr=1.0, backend="torch", clip_order="mask_then_clip")
    opt.set_masks({p: torch.zeros_like(p, dtype=torch.bool)})
    p.grad = torch.ones_like(p)
    coef = opt._clip_scale(1.0, masked=True)  # nothing selected: a zero norm, no clipping
    assert coef.item() == 1.0
    mask = torch.zeros_like(p, dtype=torch.bool)
    mask.view(-1)[:4] = True
    opt.set_masks({p: mask})
    coef = opt._clip_scale(1.0, masked=True)
    assert coef.item() == pytest.approx(1.0 / (2.0 + 1e-6))  # ‖masked grad‖ = sqrt(4) = 2
    opt.clip_order = "clip_then_mask"
    full = opt._clip_scale(1.0, masked=True)
    assert full.item() == pytest.approx(1.0 / (p.numel() ** 0.5 + 1e-6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_sgd_matches_torch_sgd_and_freezes(backend):
    _need_device(backend)
    ref, ours = _model(), _model()
    batches = _batches(10)
    _train(ref, torch.optim.SGD(ref.parameters(), lr=0.05), batches)
    opt = MaskedSGD(ours.parameters(), lr=0.05, backend=backend)
    _train(ours, opt, batches)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert_close_verbose(a, b, rtol=1e-5, atol=1e-6)
    p = next(iter(ours.parameters()))
    dense = torch.rand(p.shape, device=DEVICE) < 0.5
    opt.set_masks({p: dense})
    before = [q.detach().clone() for q in ours.parameters()]
    _train(ours, opt, batches[:2])
    assert torch.equal(p.detach()[~dense], before[0][~dense])
    assert all(torch.equal(q.detach(), b) for q, b in zip(list(ours.parameters())[1:], before[1:]))


def test_set_masks_rejects_bad_masks_with_names():
    model = _model()
    p = next(iter(model.parameters()))
    opt = MaskedAdamW(model.parameters())
    with pytest.raises(ValueError, match=r"group 0 param 0 has shape \(3,\)"):
        opt.set_masks({p: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="needs"):
        opt.set_masks({p: torch.ones(3, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="not a parameter"):
        opt.set_masks({torch.zeros(3): torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="unmasked"):
        MaskedAdamW(model.parameters(), unmasked="sometimes")


def test_add_param_group_and_zero_grad():
    a, b = _model(), _model()
    opt = MaskedAdamW(a.parameters(), lr=1e-3)
    opt.add_param_group({"params": b.parameters(), "lr": 1e-2})
    assert opt.param_groups[1]["lr"] == 1e-2 and opt.param_groups[1]["betas"] == (0.9, 0.999)
    x, y = _batches(1)[0]
    (torch.nn.functional.mse_loss(a(x), y) + torch.nn.functional.mse_loss(b(x), y)).backward()
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in list(a.parameters()) + list(b.parameters()))


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only check of the no-sync contract")
def test_step_keeps_clip_coefficient_on_device():
    model = _model()
    opt = MaskedAdamW(model.parameters(), backend="torch")
    x, y = _batches(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    coef = opt._clip_scale(1.0, masked=False)
    assert isinstance(coef, torch.Tensor) and coef.dim() == 0


# ------------------------------------------------------------------ found_inf (issue 16)
def _state_bytes(opt):
    return {
        p: {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
        for p, st in opt.state.items()
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_found_inf_skips_step_on_device(backend, dtype):
    """A flagged step leaves parameters, moments and step counts as they were; an unflagged
    one equals the step without the flag (bias corrections on the device: within ulps)."""
    _need_device(backend)
    model, ref = _model(dtype), _model(dtype)
    batches = _batches(6, dtype=dtype)
    opt = MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend=backend)
    ropt = MaskedAdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, backend=backend)
    dense = [torch.rand(p.shape, device=DEVICE) < 0.5 for p in model.parameters()]
    opt.set_masks(dict(zip(model.parameters(), dense)))
    ropt.set_masks(dict(zip(ref.parameters(), dense)))
    for k, (x, y) in enumerate(batches):
        for m, o, guarded in ((model, opt, True), (ref, ropt, False)):
            loss = torch.nn.functional.mse_loss(m(x).float(), y.float())
            loss.backward()
            if guarded:
                before = [p.detach().clone() for p in m.parameters()], _state_bytes(o)
                skip = torch.tensor(k % 3 == 1, device=DEVICE)  # steps 1 and 4 are skipped
                o.step(max_grad_norm=1.0, found_inf=skip | ~torch.isfinite(loss.detach()))
                if k % 3 == 1:
                    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), before[0]))
                    for p, st in before[1].items():
                        for key, val in st.items():
                            assert torch.equal(o.state[p][key].to(val.device), val), key
            elif k % 3 != 1:
                o.step(max_grad_norm=1.0)
            o.zero_grad()
    for p, r in zip(model.parameters(), ref.parameters()):
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
        assert_close_verbose(p, r, **tol)
    counts = {float(opt.state[p]["step"]) for p in model.parameters()}
    assert counts == {4.0}  # 6 calls, 2 skipped


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_gradient_norm_skips_when_guarded(backend):
    _need_device(backend)
    model = _model()
    opt = MaskedSGD(model.parameters(), lr=0.1, backend=backend)
    x, y = _batches(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    next(iter(model.parameters())).grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(max_grad_norm=1.0, found_inf=torch.zeros((), device=DEVICE))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    opt.step(max_grad_norm=1.0)  # unguarded: clip coefficient 0, inf·0 = NaN (as with torch's
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # clip_grad_norm_)


def test_guarded_triton_step_reads_nothing_back(monkeypatch):
    """found_inf + clipping on the Triton backend: no tensor value is read on the host."""
    model = _model()
    opt = MaskedAdamW(model.parameters(), lr=1e-2, backend="triton")
    opt.set_masks({p: torch.rand(p.shape, device=DEVICE) < 0.5 for p in model.parameters()})
    x, y = _batches(1)[0]
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step(max_grad_norm=1.0, found_inf=~torch.isfinite(loss.detach()))  # state created

    def no_sync(*a, **k):
        raise AssertionError("host read of a tensor value during a guarded step")

    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    flag = ~torch.isfinite(loss.detach())
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    opt.step(max_grad_norm=1.0, found_inf=flag)
    monkeypatch.undo()
    assert {float(opt.state[p]["step"]) for p in model.parameters()} == {2.0}
