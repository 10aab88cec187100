"""Triton kernels vs their torch twins (and independent oracles), on fresh random inputs.

Without CUDA the Triton side runs under TRITON_INTERPRET=1 on the CPU (see conftest.py); tensors
stay ≤ 1e6 elements there. Tolerances: masks, counts, histograms and thresholds are bit-exact;
fp32 updates within 1e-6 relative (+1e-7 absolute for values near 0); bf16/fp16 parameters
within one unit of their last place.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmunlearn.kernels as K

from conftest import DEVICE
from helpers import assert_close_verbose, max_rel_err, ulp

SIZES = [1, 4095, 65537]
BACKENDS = ["torch", "triton", "cpu"]
MIXED = [[1, 4095, 65537], [7, (3, 333), 8192, 17]]
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _shapes(spec):
    return [s if isinstance(s, tuple) else (s,) for s in spec]


def _rand(shapes, dtype=torch.float32, kind="normal"):
    out = []
    for s in shapes:
        t = torch.randn(s, device=DEVICE) if kind == "normal" else torch.rand(s, device=DEVICE)
        out.append(t.to(dtype))
    return out


def _fishers(shapes, zero_frac=0.05):
    """Non-negative Fisher-like tensors spanning many magnitudes, some exact zeros."""
    out = []
    for s in shapes:
        t = torch.randn(s, device=DEVICE).pow(2) * torch.exp(torch.randn(s, device=DEVICE) * 4)
        t[torch.rand(s, device=DEVICE) < zero_frac] = 0.0
        out.append(t)
    return out


ALL_SPECS = [[n] for n in SIZES] + MIXED


def _need_device(backend):
    """The cpu backend takes CPU tensors; with a GPU, DEVICE is CUDA (test_kernels_cpu.py covers
    the cpu backend there)."""
    if backend == "cpu" and DEVICE.type != "cpu":
        pytest.skip("the cpu backend runs on CPU tensors")


# ------------------------------------------------------------------ bits
@pytest.mark.parametrize("n", [1, 7, 8, 9, 4095, 65537])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pack_unpack_matches_numpy(n, backend):
    mask = torch.rand(n, device=DEVICE) < 0.37
    packed = K.pack_bits(mask, backend=backend)
    ref = np.packbits(mask.cpu().numpy(), bitorder="little")
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert np.array_equal(packed.cpu().numpy(), ref)
    back = K.unpack_bits(packed, (n,), backend=backend)
    assert torch.equal(back, mask)


def test_unpack_rejects_wrong_size():
    with pytest.raises(ValueError, match="needs|bytes"):
        K.unpack_bits(torch.zeros(3, dtype=torch.uint8), (100,), backend="torch")


# ------------------------------------------------------------------ fisher_accumulate_
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
@pytest.mark.parametrize("gdt", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["sq", "abs"])
def test_fisher_accumulate_matches_twin(spec, gdt, mode):
    shapes = _shapes(spec)
    grads = _rand(shapes, gdt)
    start = _fishers(shapes)
    a_ref, a_tri = [t.clone() for t in start], [t.clone() for t in start]
    for _ in range(2):
        K.fisher_accumulate_(a_ref, grads, scale=0.25, mode=mode, backend="torch")
        K.fisher_accumulate_(a_tri, grads, scale=0.25, mode=mode, backend="triton")
    for i, (x, y) in enumerate(zip(a_tri, a_ref)):
        assert_close_verbose(x, y, rtol=1e-6, atol=0, name=f"acc[{i}]")
    # independent oracle: the formula in fp64
    for i, (x, s, g) in enumerate(zip(a_tri, start, grads)):
        g64 = g.double()
        want = s.double() + 2 * 0.25 * (g64 * g64 if mode == "sq" else g64.abs())
        assert_close_verbose(x, want, rtol=1e-6, atol=0, name=f"oracle[{i}]")


def test_fisher_accumulate_rejects_bad_inputs():
    with pytest.raises(ValueError, match="float32"):
        K.fisher_accumulate_([torch.zeros(4, dtype=torch.bfloat16)], [torch.zeros(4)])
    with pytest.raises(ValueError, match=r"accs\[0\] has 4 elements"):
        K.fisher_accumulate_([torch.zeros(4)], [torch.zeros(5)])
    with pytest.raises(ValueError, match="mode"):
        K.fisher_accumulate_([torch.zeros(4)], [torch.zeros(4)], mode="cube")
    with pytest.raises(ValueError, match="backend"):
        K.fisher_accumulate_([torch.zeros(4)], [torch.zeros(4)], backend="cuda")


# ------------------------------------------------------------------ grad_sq_norm
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
@pytest.mark.parametrize("gdt", GRAD_DTYPES, ids=str)
def test_grad_sq_norm_matches_twin(spec, gdt):
    grads = _rand(_shapes(spec), gdt)
    got = K.grad_sq_norm(grads, backend="triton")
    ref = K.grad_sq_norm(grads, backend="torch")
    oracle = sum((g.double() ** 2).sum() for g in grads)
    assert got.shape == () and got.dtype == torch.float32 and got.device == grads[0].device
    assert_close_verbose(got, ref, rtol=1e-5, atol=0, name="vs twin")
    assert_close_verbose(got, oracle, rtol=1e-5, atol=0, name="vs fp64")
    # deterministic run to run
    assert torch.equal(got, K.grad_sq_norm(grads, backend="triton"))


def test_grad_sq_norm_mixed_dtypes_in_one_list():
    grads = [torch.randn(100, device=DEVICE).to(d) for d in GRAD_DTYPES]
    oracle = sum((g.double() ** 2).sum() for g in grads)
    for be in ("torch", "triton"):
        assert_close_verbose(K.grad_sq_norm(grads, backend=be), oracle, rtol=1e-5, atol=0)


# ------------------------------------------------------------------ saliency_mask
def _formula_mask(ff, fp, gamma, eps):
    """Independent oracle: the plain torch expression, packed by numpy."""
    sel = (ff + eps) / (fp + eps) >= gamma
    return np.packbits(sel.reshape(-1).cpu().numpy(), bitorder="little"), int(sel.sum())


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
@pytest.mark.parametrize("gamma", [1.0, 0.37, 25.0])
def test_saliency_mask_bit_exact(spec, gamma):
    shapes = _shapes(spec)
    ff, fp = _fishers(shapes), _fishers(shapes)
    # ties with the threshold: equal Fishers give ratio exactly 1
    fp[0].view(-1)[: max(1, fp[0].numel() // 10)] = ff[0].view(-1)[: max(1, fp[0].numel() // 10)]
    eps = 1e-15
    for be in ("torch", "triton"):
        bits, counts = K.saliency_mask(ff, fp, gamma, eps, backend=be)
        assert counts.dtype == torch.int64 and counts.shape == (len(shapes),)
        for i in range(len(shapes)):
            want_bits, want_count = _formula_mask(ff[i], fp[i], gamma, eps)
            assert np.array_equal(bits[i].cpu().numpy(), want_bits), f"{be}: mask {i} differs"
            assert counts[i].item() == want_count, f"{be}: count {i}"


def test_saliency_mask_zero_fishers_select_at_gamma_one():
    # (0 + eps) / (0 + eps) == 1 >= 1: unused weights are selected by the official rule
    z = [torch.zeros(10, device=DEVICE)]
    for be in ("torch", "triton"):
        _, counts = K.saliency_mask(z, z, 1.0, backend=be)
        assert counts.sum().item() == 10


# ------------------------------------------------------------------ top-k (radix select)
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_saliency_histograms_bit_exact(spec):
    shapes = _shapes(spec)
    ff, fp = _fishers(shapes), _fishers(shapes)
    h0 = K.saliency_histogram(ff, fp, 0, backend="torch")
    assert torch.equal(K.saliency_histogram(ff, fp, 0, backend="triton"), h0)
    assert h0.sum().item() == sum(t.numel() for t in ff)
    d0 = int(torch.nonzero(h0).max())  # the top non-empty digit
    h1 = K.saliency_histogram(ff, fp, 1, d0, backend="torch")
    assert torch.equal(K.saliency_histogram(ff, fp, 1, d0, backend="triton"), h1)
    assert h1.sum().item() == h0[d0].item()
    d1 = int(torch.nonzero(h1).max())
    p2 = (d0 << 11) | d1
    h2 = K.saliency_histogram(ff, fp, 2, p2, backend="torch")
    assert torch.equal(K.saliency_histogram(ff, fp, 2, p2, backend="triton"), h2)
    assert h2.sum().item() == h1[d1].item() and h2.numel() == 1024


def _topk_oracle(ff, fp, fraction, eps=1e-15):
    scores = torch.cat([((a + eps) / (b + eps)).reshape(-1) for a, b in zip(ff, fp)])
    k = K.topk_count(fraction, scores.numel())
    return torch.topk(scores, k).values[-1].item()


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
@pytest.mark.parametrize("fraction", [1e-6, 0.01, 0.3, 1.0])
def test_topk_threshold_bit_exact(spec, fraction):
    shapes = _shapes(spec)
    ff, fp = _fishers(shapes), _fishers(shapes)
    want = _topk_oracle(ff, fp, fraction)
    for be in ("torch", "triton"):
        assert K.saliency_threshold_topk(ff, fp, fraction, backend=be) == want, be


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_topk_with_ties_and_negative_scores():
    # many exact ties and (non-Fisher) negative inputs: the key order must still be the float order
    ff = [torch.tensor([3.0, 3.0, 3.0, -1.0, -2.0, 0.0, 5.0], device=DEVICE)]
    fp = [torch.ones(7, device=DEVICE)]
    for frac, want in [(1 / 7, 5.0), (2 / 7, 3.0), (4 / 7, 3.0), (5 / 7, 0.0), (1.0, -2.0)]:
        for be in ("torch", "triton"):
            got = K.saliency_threshold_topk(ff, fp, frac, eps=0.0, backend=be)
            assert got == want, (frac, be, got)


@pytest.mark.parametrize("log2n", [16, 20, 22])
def test_topk_torch_path_matches_torch_topk_large(log2n):
    n = 1 << log2n
    shapes = [(n // 2 + 3,), (n // 2 - 3,)]
    ff, fp = _fishers(shapes), _fishers(shapes)
    for fraction in (0.001, 0.05, 0.5):
        want = _topk_oracle(ff, fp, fraction)
        assert K.saliency_threshold_topk(ff, fp, fraction, backend="torch") == want


@pytest.mark.slow
def test_topk_beyond_quantile_limit_cpu():
    """2^25 elements: torch.quantile refuses (> 2^24), the radix select does not."""
    n = 1 << 25
    g = torch.Generator().manual_seed(7)
    ff = [torch.rand(n, generator=g)]
    fp = [torch.full((n,), 0.5)]
    with pytest.raises(RuntimeError):
        torch.quantile(ff[0], 0.99)
    thr = K.saliency_threshold_topk(ff, fp, 0.01, backend="torch")
    k = K.topk_count(0.01, n)
    ratio = (ff[0] + 1e-15) / (0.5 + 1e-15)
    above = int((ratio > thr).sum())
    at_or_above = int((ratio >= thr).sum())
    assert above < k <= at_or_above  # thr is exactly the k-th largest


def test_topk_rejects_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        K.saliency_threshold_topk([torch.ones(3)], [torch.ones(3)], 0.0)


# ------------------------------------------------------------------ masked AdamW
def _adam_inputs(shapes, pdt, gdt):
    params = [torch.randn(s, device=DEVICE).to(pdt) for s in shapes]
    grads = [torch.randn(s, device=DEVICE).to(gdt) for s in shapes]
    m = [torch.randn(s, device=DEVICE) * 0.1 for s in shapes]
    v = [
        0.01 + torch.rand(s, device=DEVICE) * 0.01 for s in shapes
    ]  # denom >= 0.1: no 1/denom blow-up
    masks = [K.pack_bits(torch.rand(s, device=DEVICE) < 0.5) for s in shapes]
    return params, grads, m, v, masks


HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _param_tol(pdt):
    return dict(rtol=1e-6, atol=1e-7) if pdt == torch.float32 else dict(rtol=ulp(pdt), atol=1e-6)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
@pytest.mark.parametrize("pdt", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("gdt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_mask", [True, False])
def test_masked_adamw_matches_twin(spec, pdt, gdt, with_mask):
    shapes = _shapes(spec)
    params, grads, m, v, masks = _adam_inputs(shapes, pdt, gdt)
    masks = masks if with_mask else None
    scale = torch.tensor(0.7, device=DEVICE)
    ref = ([p.clone() for p in params], [x.clone() for x in m], [x.clone() for x in v])
    tri = ([p.clone() for p in params], [x.clone() for x in m], [x.clone() for x in v])
    for step in (1, 2, 3):
        K.masked_adamw_(
            *ref[:1], grads, *ref[1:], masks, step=step, grad_mul=scale, backend="torch", **HP
        )
        K.masked_adamw_(
            *tri[:1], grads, *tri[1:], masks, step=step, grad_mul=scale, backend="triton", **HP
        )
    for i in range(len(shapes)):
        assert_close_verbose(tri[0][i], ref[0][i], name=f"param[{i}]", **_param_tol(pdt))
        # moments: m += (1-β1)(g - m) rounds differently with and without FMA (torch's lerp
        # uses one); the difference is an ulp of the |g| ~ 1 term, not of the small result.
        assert_close_verbose(tri[1][i], ref[1][i], rtol=1e-6, atol=1e-7, name=f"exp_avg[{i}]")
        assert_close_verbose(tri[2][i], ref[2][i], rtol=1e-6, atol=1e-10, name=f"exp_avg_sq[{i}]")


def _bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pdt", GRAD_DTYPES, ids=str)
def test_masked_adamw_leaves_masked_out_bytes_untouched(backend, pdt):
    """Ten steps; masked-out elements hold NaN payloads, -0.0 and subnormals and get inf / NaN
    gradients: their bytes must not change (full chunks rewrite them with the bits they read,
    tail chunks do not write them). 4104 elements: a full chunk plus a tail of whole bytes."""
    _need_device(backend)
    shapes = _shapes(MIXED[1]) + [(4104,)]
    params, _, m, v, _ = _adam_inputs(shapes, pdt, torch.float32)
    dense = [torch.rand(s, device=DEVICE) < 0.3 for s in shapes]
    masks = [K.pack_bits(d) for d in dense]
    for p, d in zip(params, dense):
        idx = torch.nonzero(~d.reshape(-1)).flatten()[:4]
        odd = [0x7FC00001, -0x005FFFFF, -0x80000000, 0x1] if p.element_size() == 4 else [
            0x7FC1, -0x1, -0x8000, 0x1]  # fmt: skip
        _bits(p).reshape(-1)[idx] = torch.tensor(odd, device=DEVICE).to(_bits(p).dtype)[: len(idx)]
    start = ([p.clone() for p in params], [x.clone() for x in m], [x.clone() for x in v])
    for step in range(1, 11):
        grads = [torch.randn(s, device=DEVICE) for s in shapes]
        for g, d in zip(grads, dense):
            g[~d] = float("inf") if step % 2 else float("nan")
        K.masked_adamw_(
            params,
            grads,
            m,
            v,
            masks,
            step=step,
            backend=backend,
            grad_mul=torch.tensor(0.5, device=DEVICE),
            **{**HP, "lr": 0.1},
        )
    for i, d in enumerate(dense):
        for name, now, was in (
            ("param", params, start[0]),
            ("exp_avg", m, start[1]),
            ("exp_avg_sq", v, start[2]),
        ):
            a, b = _bits(now[i])[~d], _bits(was[i])[~d]
            assert torch.equal(a, b), f"{name}[{i}]: a masked-out element changed"
    moved = sum(int((p[d] != s[d]).sum()) for p, s, d in zip(params, start[0], dense))
    assert moved > 0.8 * sum(int(d.sum()) for d in dense), "masked-in elements did not move"


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_adamw_unmasked_matches_torch_adamw_20_steps(backend):
    """External oracle: masks=None is torch.optim.AdamW (fp32, max rel. error <= 1e-6).

    Relative error per element is |a - b| / max(|b|, 0.01): params are N(0, 1), and an element
    that drifts to ~1e-3 carries the absolute rounding of twenty O(lr) updates (~1e-9), which
    no reordering of fp32 ops can remove (torch's CPU lerp/addcmul use FMA, the interpreter
    does not). The norm-wise error is checked too.
    """
    _need_device(backend)
    shapes = _shapes(MIXED[1])
    params = [torch.randn(s, device=DEVICE) for s in shapes]
    ref = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(
        ref, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, foreach=False
    )
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step in range(1, 21):
        grads = [torch.randn(s, device=DEVICE) for s in shapes]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        K.masked_adamw_(
            params,
            grads,
            m,
            v,
            None,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            step=step,
            backend=backend,
        )
    for i, (p, r) in enumerate(zip(params, ref)):
        err = max_rel_err(p, r.detach(), floor=1e-2)
        assert err <= 1e-6, f"param[{i}] max rel err {err:.3g}"
        assert (p - r.detach()).norm() <= 1e-7 * r.detach().norm()
        st = opt.state[r]
        assert_close_verbose(m[i], st["exp_avg"], rtol=1e-5, atol=1e-7, name="exp_avg")
        assert_close_verbose(v[i], st["exp_avg_sq"], rtol=1e-5, atol=1e-9, name="exp_avg_sq")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_adamw_maximize_and_scale(backend):
    _need_device(backend)
    p0 = torch.randn(300, device=DEVICE)
    g = torch.randn(300, device=DEVICE)
    a, b = p0.clone(), p0.clone()
    z = lambda: torch.zeros(300, device=DEVICE)  # noqa: E731
    ma, va, mb, vb = z(), z(), z(), z()
    # maximize with scale c  ==  minimise with grad -c·g
    K.masked_adamw_(
        [a],
        [g],
        [ma],
        [va],
        None,
        step=1,
        maximize=True,
        backend=backend,
        grad_mul=torch.tensor(0.25, device=DEVICE),
        **HP,
    )
    K.masked_adamw_([b], [-0.25 * g], [mb], [vb], None, step=1, backend=backend, **HP)
    assert_close_verbose(a, b, rtol=1e-6, atol=1e-7)


def test_masked_adamw_rejects_bad_inputs():
    p, g = [torch.zeros(10)], [torch.zeros(10)]
    m, v = [torch.zeros(10)], [torch.zeros(10)]
    with pytest.raises(ValueError, match=r"masks\[0\] has 1 bytes.*needs 2"):
        K.masked_adamw_(p, g, m, v, [torch.zeros(1, dtype=torch.uint8)], step=1, **HP)
    with pytest.raises(ValueError, match="packed uint8"):
        K.masked_adamw_(p, g, m, v, [torch.ones(10, dtype=torch.bool)], step=1, **HP)
    with pytest.raises(ValueError, match="exp_avgs"):
        K.masked_adamw_(p, g, [torch.zeros(10, dtype=torch.bfloat16)], v, None, step=1, **HP)
    with pytest.raises(ValueError, match="step"):
        K.masked_adamw_(p, g, m, v, None, step=0, **HP)


# ------------------------------------------------------------------ masked SGD
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
@pytest.mark.parametrize("pdt", GRAD_DTYPES, ids=str)
def test_masked_sgd_matches_twin_and_freezes(spec, pdt):
    shapes = _shapes(spec)
    params = [torch.randn(s, device=DEVICE).to(pdt) for s in shapes]
    dense = [torch.rand(s, device=DEVICE) < 0.5 for s in shapes]
    masks = [K.pack_bits(d) for d in dense]
    ref, tri = [p.clone() for p in params], [p.clone() for p in params]
    for _ in range(3):
        grads = [torch.randn(s, device=DEVICE) for s in shapes]
        kw = dict(lr=0.05, weight_decay=0.01, grad_mul=torch.tensor(0.5, device=DEVICE))
        K.masked_sgd_(ref, grads, masks, backend="torch", **kw)
        K.masked_sgd_(tri, grads, masks, backend="triton", **kw)
    for i in range(len(shapes)):
        assert_close_verbose(tri[i], ref[i], name=f"param[{i}]", **_param_tol(pdt))
        assert torch.equal(tri[i][~dense[i]], params[i][~dense[i]])


def test_masked_sgd_unmasked_matches_torch_sgd():
    p = torch.randn(1000, device=DEVICE)
    ref = p.clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=0.1, weight_decay=0.0)
    for _ in range(5):
        g = torch.randn(1000, device=DEVICE)
        ref.grad = g.clone()
        opt.step()
        K.masked_sgd_([p], [g], None, lr=0.1, backend="triton")
    assert_close_verbose(p, ref.detach(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ bf16 rounding
def test_bf16_store_is_round_to_nearest_even():
    """The Triton bf16 store equals torch's fp32→bf16 conversion on hand-picked bit patterns."""
    patterns = [
        0x3F808000,  # tie, even below → stays 0x3F80
        0x3F818000,  # tie, odd below → rounds up to 0x3F82
        0x3F807FFF,  # just below a tie → down
        0x3F808001,  # just above a tie → up
        0x7F7FFFFF,  # max fp32 → rounds to bf16 inf
        0xFF800000,  # -inf
        0x7FC00001,  # NaN
        0x00000001,  # smallest subnormal
        0x80000000,  # -0
    ]
    vals = torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)
    vals = torch.cat([vals, torch.randn(4093) * 100]).to(DEVICE)
    p = torch.full_like(vals, -0.0, dtype=torch.bfloat16)
    # p = -0·(1 - 0) - (-1)·g = g exactly in fp32 (signed zeros included), then stored as bf16
    K.masked_sgd_([p], [vals], None, lr=-1.0, backend="triton")
    want = vals.to(torch.bfloat16)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(p), nan)
    assert torch.equal(p[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.gpu
def test_gpu_auto_backend_is_triton():
    from mmunlearn.kernels._common import resolve_backend

    assert resolve_backend("auto", [torch.zeros(1, device="cuda")]) == "triton"


def test_mixed_dtype_lists_in_one_call():
    """One call over a list mixing dtypes: grouped into one launch per dtype pair internally."""
    shapes = [(5,), (4095,), (3, 7), (65537,)]
    pdts = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]
    gdts = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
    params = [torch.randn(s, device=DEVICE).to(d) for s, d in zip(shapes, pdts)]
    grads = [torch.randn(s, device=DEVICE).to(d) for s, d in zip(shapes, gdts)]
    masks = [K.pack_bits(torch.rand(s, device=DEVICE) < 0.5) for s in shapes]
    out = {}
    for be in ("torch", "triton"):
        p = [x.clone() for x in params]
        m = [torch.zeros(s, device=DEVICE) for s in shapes]
        v = [torch.zeros(s, device=DEVICE) for s in shapes]
        acc = [torch.zeros(s, device=DEVICE) for s in shapes]
        K.masked_adamw_(p, grads, m, v, masks, step=1, backend=be, **HP)
        K.fisher_accumulate_(acc, grads, backend=be)
        out[be] = (p, m, acc)
    for i, pdt in enumerate(pdts):
        assert_close_verbose(out["triton"][0][i], out["torch"][0][i], **_param_tol(pdt))
        assert_close_verbose(out["triton"][1][i], out["torch"][1][i], rtol=1e-6, atol=1e-7)
        assert_close_verbose(out["triton"][2][i], out["torch"][2][i], rtol=1e-6, atol=0)


# ------------------------------------------------------------------ codegen paths (issue 16)
def test_adamw_paths_full_tail_unaligned_and_skipped_chunks():
    """Triton vs twin over every path of the kernel: full chunks (128-bit), a chunk whose mask
    bytes are all zero (skipped), tails of whole bytes and of a partial byte, and tensors whose
    storage offset breaks 16-byte alignment (ALIGNED=False: the scalar-access variant)."""
    buf = torch.randn(2 * 4104 + 9, device=DEVICE).to(torch.bfloat16)
    unaligned = [buf[1:4100], buf[4101 : 4101 + 4104]]  # odd offsets: data_ptr % 16 != 0
    params = [torch.randn(8192, device=DEVICE).to(torch.bfloat16), *unaligned]
    params.append(torch.randn(4104, device=DEVICE).to(torch.bfloat16))
    shapes = [p.shape for p in params]
    dense = [torch.rand(s, device=DEVICE) < 0.5 for s in shapes]
    dense[0][:4096] = False  # first chunk: nothing selected
    masks = [K.pack_bits(d) for d in dense]
    grads = [torch.randn(s, device=DEVICE).to(torch.bfloat16) for s in shapes]
    m0 = [torch.randn(s, device=DEVICE) * 0.1 for s in shapes]
    v0 = [0.01 + torch.rand(s, device=DEVICE) * 0.01 for s in shapes]
    out = {}
    for be in ("torch", "triton"):
        p = [x.clone() for x in params] if be == "torch" else params
        m, v = [x.clone() for x in m0], [x.clone() for x in v0]
        K.masked_adamw_(p, grads, m, v, masks, step=2, backend=be, **HP)
        out[be] = (p, m, v)
    for i in range(len(shapes)):
        assert_close_verbose(out["triton"][0][i], out["torch"][0][i], name=f"param[{i}]",
                             **_param_tol(torch.bfloat16))  # fmt: skip
        assert_close_verbose(out["triton"][1][i], out["torch"][1][i], rtol=1e-6, atol=1e-7)
        assert_close_verbose(out["triton"][2][i], out["torch"][2][i], rtol=1e-6, atol=1e-10)
        assert torch.equal(out["triton"][1][i][~dense[i]], m0[i][~dense[i]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_turns_steps_into_no_ops(backend):
    _need_device(backend)
    shapes = _shapes(MIXED[1])
    params, grads, m, v, masks = _adam_inputs(shapes, torch.bfloat16, torch.bfloat16)
    start = [[x.clone() for x in lst] for lst in (params, m, v)]
    for flag in (torch.tensor(1.0), torch.tensor(True), torch.tensor([float("nan")])):
        flag = flag.to(DEVICE)
        K.masked_adamw_(params, grads, m, v, masks, step=1, found_inf=flag, backend=backend,
                        grad_mul=torch.tensor(0.5, device=DEVICE), **HP)  # fmt: skip
        K.masked_sgd_(params, grads, None, lr=0.1, found_inf=flag, backend=backend)
    for now, was in zip((params, m, v), start):
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(now, was))
    # found_inf == 0: the same step as without the flag
    ref = [[x.clone() for x in lst] for lst in start]
    zero = torch.zeros((), device=DEVICE)
    K.masked_adamw_(params, grads, m, v, masks, step=1, found_inf=zero, backend=backend, **HP)
    K.masked_adamw_(ref[0], grads, ref[1], ref[2], masks, step=1, backend=backend, **HP)
    for now, want in zip((params, m, v), ref):
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(now, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_step_counts_match_host_steps(backend):
    """Per-tensor step tensors (torch's fused ``state_steps``): bias corrections computed from
    them (on the device for Triton, in fp64) equal the host's within an fp32 rounding."""
    _need_device(backend)
    shapes = _shapes(MIXED[1])
    params, grads, m, v, masks = _adam_inputs(shapes, torch.float32, torch.float32)
    ref = [[x.clone() for x in lst] for lst in (params, m, v)]
    for step in (1, 2, 7):
        steps = [torch.tensor(float(step), device=DEVICE) for _ in shapes]
        K.masked_adamw_(params, grads, m, v, masks, step=steps, backend=backend, **HP)
        K.masked_adamw_(ref[0], grads, ref[1], ref[2], masks, step=step, backend=backend, **HP)
    for i in range(len(shapes)):
        assert_close_verbose(params[i], ref[0][i], rtol=1e-6, atol=1e-7, name=f"param[{i}]")
        assert torch.equal(m[i], ref[1][i]) and torch.equal(v[i], ref[2][i])
    with pytest.raises(ValueError, match="step tensors"):
        K.masked_adamw_(params, grads, m, v, masks, step=steps[:1], backend=backend, **HP)


# ------------------------------------------------------------------ Fisher buckets
@pytest.mark.parametrize("backend", BACKENDS)
def test_fisher_buckets_one_launch_per_bucket(backend):
    _need_device(backend)
    shapes = [(1000,), (3, 700), (5000,), (17,), (2048,), (9,)]
    grads = [torch.randn(s, device=DEVICE).to(torch.bfloat16) for s in shapes]
    want = [torch.zeros(s, device=DEVICE) for s in shapes]
    K.fisher_accumulate_(want, grads, 0.5, backend="torch")
    accs = [torch.zeros(s, device=DEVICE) for s in shapes]
    fb = K.FisherBuckets(0.5, bucket_bytes=4000, backend=backend)
    for a, g in zip(accs, grads):
        fb.add(a, g)
        assert fb.pending_bytes < 4000  # a full bucket is accumulated at once
    fb.flush()
    assert fb.pending_bytes == 0
    # 2000 + 4200 B → launch; 10000 → launch; 34 + 4096 → launch; 18 → flush
    assert fb.launches == 4
    for i, (a, w) in enumerate(zip(accs, want)):
        assert_close_verbose(a, w, rtol=1e-6, atol=0, name=f"acc[{i}]")
    fb.add(accs[0], grads[0])
    fb.clear()
    fb.flush()
    assert fb.launches == 4


def test_fisher_buckets_from_backward_hooks():
    """The use the Fisher pass makes of it: post-accumulate-grad hooks queue each gradient and
    drop ``.grad``; one flush after backward; the result equals per-parameter accumulation."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    accs = {p: torch.zeros_like(p) for p in model.parameters()}
    want = {p: torch.zeros_like(p) for p in model.parameters()}
    fb = K.FisherBuckets(bucket_bytes=1 << 20)

    def hook(p):
        fb.add(accs[p], p.grad)
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(hook) for p in model.parameters()]
    x = torch.randn(8, 16)
    for _ in range(3):
        model(x).pow(2).sum().backward()
        fb.flush()
    for h in handles:
        h.remove()
    for _ in range(3):
        model(x).pow(2).sum().backward()
        for p in model.parameters():
            K.fisher_accumulate_([want[p]], [p.grad], backend="torch")
            p.grad = None
    assert fb.launches == 3  # one bucket per backward: 4 parameters, one launch
    for p in model.parameters():
        assert_close_verbose(accs[p], want[p], rtol=1e-6, atol=0)


def test_histogram_on_triton_without_histogram_mask(monkeypatch):
    """Tritons without tl.histogram(mask=) take the overflow-half variant: same histograms."""
    from mmunlearn.kernels import saliency

    shapes = _shapes(MIXED[1])
    ff, fp = _fishers(shapes), _fishers(shapes)
    want = [K.saliency_histogram(ff, fp, 0, backend="triton")]
    d0 = int(torch.nonzero(want[0]).max())
    want.append(K.saliency_histogram(ff, fp, 1, d0, backend="triton"))
    monkeypatch.setattr(saliency, "HIST_MASK", False)
    assert torch.equal(K.saliency_histogram(ff, fp, 0, backend="triton"), want[0])
    assert torch.equal(K.saliency_histogram(ff, fp, 1, d0, backend="triton"), want[1])
