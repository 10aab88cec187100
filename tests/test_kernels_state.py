"""Masked AdamW with bf16 (stochastically rounded) moments, compacted state and sparse chunk
tables: the three twins against each other, SR's statistics, and the device-grouping guards.

The Triton side runs under TRITON_INTERPRET=1 without CUDA (conftest.py). Contract checked
here: all backends draw the same counter-based random bits, so with SR the cpu backend equals
the torch twin bit for bit (moments; bf16 parameters), and Triton (interpreter) equals it too;
compacted state equals dense state bit for bit at the same state dtype on every backend.
"""

from __future__ import annotations

import pytest
import torch

import mmunlearn.kernels as K
from mmunlearn.kernels import _common, _cpu
from mmunlearn.kernels.bits import MaskIndex, sparse_chunk_table

from conftest import DEVICE, TRITON_FMA_EXACT
from helpers import assert_close_verbose

BACKENDS = ["torch", "triton", "cpu"]
# odd sizes: several 4096-chunks, a 32 K CPU chunk boundary, tails of partial bytes
SHAPES = [(1,), (7,), (4095,), (3, 333), (8192 + 9,), (40000,)]
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _equal_bits(a, b):
    return torch.equal(_bits(a), _bits(b))


def _need(backend):
    if backend == "cpu" and (DEVICE.type != "cpu" or not _cpu.available()):
        pytest.skip("the cpu backend runs on CPU tensors")


def _inputs(pdt, sdt, shapes=SHAPES, frac=0.3, clustered=False):
    params = [torch.randn(s, device=DEVICE).to(pdt) for s in shapes]
    grads = [torch.randn(s, device=DEVICE) for s in shapes]
    m = [(torch.randn(s, device=DEVICE) * 0.1).to(sdt) for s in shapes]
    v = [(0.01 + torch.rand(s, device=DEVICE) * 0.01).to(sdt) for s in shapes]
    dense = []
    for s in shapes:
        d = torch.rand(s, device=DEVICE) < frac
        if clustered and d.numel() > 8192:
            d.view(-1)[:4096] = False  # a whole chunk selecting nothing
        dense.append(d)
    return params, grads, m, v, dense


def _run(backend, params, grads, m, v, masks, steps=(1, 2, 3), sr=False, seed_base=7, **kw):
    """Three steps on clones; with ``sr`` a new seed per step (``seed_base + step``)."""
    p, mm, vv = [x.clone() for x in params], [x.clone() for x in m], [x.clone() for x in v]
    for step in steps:
        seed = seed_base + step if sr else None
        K.masked_adamw_(p, grads, mm, vv, masks, step=step, backend=backend, sr_seed=seed,
                        **kw, **HP)  # fmt: skip
    return p, mm, vv


# ------------------------------------------------------------------ the shared hash
def test_hash_is_the_same_in_python_torch_and_c():
    xs = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789, 0xDEADBEEF]
    xs += torch.randint(0, 2**32, (1000,), dtype=torch.int64).tolist()
    t = _common.torch_mix32(torch.tensor(xs, dtype=torch.int64))
    assert t.tolist() == [_common.mix32(x) for x in xs]
    if _cpu.available():
        lib = _cpu.load()
        src = torch.tensor(xs, dtype=torch.int64).to(torch.int32)  # the same 32 bits
        out = torch.empty_like(src)
        lib.mmu_mix32(src.data_ptr(), out.data_ptr(), len(xs))
        assert (out.to(torch.int64) & 0xFFFFFFFF).tolist() == t.tolist()


def test_c_fp16_conversion_without_float16_type_matches_torch():
    """kernels/mmu_cpu.c converts fp16 by bit manipulation (no _Float16): every fp16 value
    widens exactly, and fp32 values (random bits, halfway cases, overflow, subnormals, inf)
    narrow like torch."""
    if not _cpu.available():
        pytest.skip("no C compiler")
    lib = _cpu.load()
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    wide = torch.empty(halves.numel(), dtype=torch.float32)
    lib.mmu_f16_to_f32(halves.data_ptr(), wide.data_ptr(), halves.numel())
    ref = halves.view(torch.float16).float()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(wide), nan)
    assert _equal_bits(wide[~nan], ref[~nan])
    x = torch.randint(-(2**31), 2**31 - 1, (200000,), dtype=torch.int64).to(torch.int32)
    x = x.view(torch.float32)
    special = torch.tensor(
        [0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e-8, 2.98e-8, 2.99e-8, 6.1e-5,
         1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, float("inf"), -float("inf"), 5.96e-8, -3e-8]
    )  # fmt: skip
    x = torch.cat([x[~torch.isnan(x)], special])
    out = torch.empty(x.numel(), dtype=torch.int16)
    lib.mmu_f32_to_f16(x.data_ptr(), out.data_ptr(), x.numel())
    assert torch.equal(out, x.to(torch.float16).view(torch.int16))


# ------------------------------------------------------------------ stochastic rounding
@pytest.mark.parametrize("backend", BACKENDS)
def test_sr_is_unbiased(backend):
    """β1 = 0 makes the new exp_avg exactly g (fp32); stored in bf16 with SR, the mean over
    65536 elements of the same value equals the value within 4 standard errors, and both
    neighbours of the bf16 grid occur. Without a seed: round to nearest (one value)."""
    _need(backend)
    n = 65536
    for x in (1.0 + 2.0**-9, 0.3 + 1e-4, -7.77e-3):
        g = torch.full((n,), x, device=DEVICE)
        p = torch.zeros(n, device=DEVICE)
        m = torch.zeros(n, device=DEVICE, dtype=torch.bfloat16)
        v = torch.zeros(n, device=DEVICE, dtype=torch.bfloat16)
        hp = {**HP, "beta1": 0.0}
        K.masked_adamw_([p], [g], [m], [v], None, step=1, sr_seed=11, backend=backend, **hp)
        mf = m.double()
        lo, hi = mf.min().item(), mf.max().item()
        assert lo < x < hi, (x, lo, hi)
        frac = (x - lo) / (hi - lo)
        se = (hi - lo) * (frac * (1 - frac) / n) ** 0.5
        assert abs(mf.mean().item() - x) < 4 * se, (x, mf.mean().item(), se)
        m2 = torch.zeros_like(m)
        K.masked_adamw_([p.clone()], [g], [m2], [v.clone()], None, step=1, backend=backend, **hp)
        assert torch.equal(m2, torch.full_like(m2, x))  # RNE: the nearest bf16


@pytest.mark.parametrize("pdt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_mask", [True, False])
def test_bf16_state_twins_bit_identical(pdt, with_mask):
    """bf16 moments with SR (and bf16 parameters with param_sr): cpu and Triton draw the torch
    twin's bits. Moments bit-identical; bf16 parameters bit-identical; fp32 parameters within
    1e-6 (ATen's sqrt, as in test_kernels_cpu)."""
    params, grads, m, v, dense = _inputs(pdt, torch.bfloat16)
    masks = [K.pack_bits(d) for d in dense] if with_mask else None
    ref = _run("torch", params, grads, m, v, masks, sr=True, param_sr=True)
    for be in ("cpu", "triton"):
        if be == "cpu" and (DEVICE.type != "cpu" or not _cpu.available()):
            continue
        if be == "triton" and not TRITON_FMA_EXACT:
            continue  # (this interpreter's tl.fma rounds twice: conftest.py)
        out = _run(be, params, grads, m, v, masks, sr=True, param_sr=True)
        for i in range(len(SHAPES)):
            assert _equal_bits(out[1][i], ref[1][i]), f"{be} exp_avg[{i}]"
            assert _equal_bits(out[2][i], ref[2][i]), f"{be} exp_avg_sq[{i}]"
            if pdt == torch.bfloat16:
                assert _equal_bits(out[0][i], ref[0][i]), f"{be} param[{i}]"
            else:
                assert_close_verbose(out[0][i], ref[0][i], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sr_reproducible_per_seed(backend):
    _need(backend)
    params, grads, m, v, dense = _inputs(torch.bfloat16, torch.bfloat16, SHAPES[-2:])
    masks = [K.pack_bits(d) for d in dense]
    a = _run(backend, params, grads, m, v, masks, sr=True, param_sr=True)
    b = _run(backend, params, grads, m, v, masks, sr=True, param_sr=True)
    c = _run(backend, params, grads, m, v, masks, sr=True, param_sr=True, seed_base=1000)
    for x, y in zip(a, b):
        assert all(_equal_bits(s, t) for s, t in zip(x, y))
    assert not all(_equal_bits(s, t) for s, t in zip(a[1], c[1]))


def test_param_sr_needs_a_seed():
    p = [torch.zeros(4, dtype=torch.bfloat16)]
    with pytest.raises(ValueError, match="param_sr needs an sr_seed"):
        K.masked_adamw_(p, [torch.ones(4)], [torch.zeros(4)], [torch.zeros(4)], None,
                        step=1, param_sr=True, **HP)  # fmt: skip


# ------------------------------------------------------------------ bf16-state update
# The bf16-state update is torch's quotient with one division, p + nss2·m / (sqrt(v) + eps2),
# nss2 = -step_size·bc2, eps2 = eps·bc2 in fp32 (adamw.bf16_state_scalars; the fp32-state step
# keeps ATen's two divisions). Against fp64, both stay within a few fp32 ulps of the update's
# scale S = step_size·(|m| + (1-β1)|g - m|) / (sqrt(v_new)/bc2 + eps) (the magnitude its
# roundings scale with; S = |update| unless the moment update cancels). Measured 2026-12-03
# (torch, cpu, triton interpreter; steps 1 and 7; MMU_TEST_SEED 1234, 1, 2, 3): max error / S
# 2.9e-7 with fp32 state (ATen's formula), 2.5e-7 with bf16 state (2.7e-7 on the torch twin:
# ATen's sqrt), i.e. <= 5 fp32 ulps (2^-24) either way. The bound is 16 ulps, 2^-20 = 9.5e-7;
# bf16's own resolution, which rounds the moments, is 2^-8.
UPDATE_BOUND = 2.0**-20


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16], ids=str)
def test_update_within_fp32_ulps_of_fp64(backend, sdt):
    """fp32 parameters at 0 (so the new value is the update itself), fresh random grads and
    moments (some v = 0, where eps decides), odd sizes, 70 % masks, a clip factor, steps 1 and
    7: every selected update is within 2^-20 of the fp64 value of torch's formula, relative to
    its scale (UPDATE_BOUND); unselected elements stay 0."""
    _need(backend)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    c = float(torch.tensor(0.7))  # the fp32 clip factor the kernels read
    worst = 0.0
    for step in (1, 7):
        grads = [torch.randn(s, device=DEVICE) * 3 for s in SHAPES]
        m = [(torch.randn(s, device=DEVICE) * 0.3).to(sdt) for s in SHAPES]
        v = [(torch.rand(s, device=DEVICE) * 0.05).to(sdt) for s in SHAPES]
        for x in v:
            x.view(-1)[::97] = 0  # denominators of eps alone
        dense = [torch.rand(s, device=DEVICE) < 0.7 for s in SHAPES]
        masks = [K.pack_bits(d) for d in dense]
        p = [torch.zeros(s, device=DEVICE) for s in SHAPES]
        m0, v0 = [x.double() for x in m], [x.double() for x in v]
        K.masked_adamw_(p, grads, m, v, masks, step=step, grad_mul=torch.tensor(0.7),
                        backend=backend, **hp)  # fmt: skip
        bc1, bc2 = 1 - hp["beta1"] ** step, (1 - hp["beta2"] ** step) ** 0.5
        for i, d in enumerate(dense):
            g = grads[i].double() * c
            w = (g - m0[i]) * (1 - hp["beta1"])
            mn = m0[i] + w
            vn = v0[i] * hp["beta2"] + (1 - hp["beta2"]) * g * g
            den = vn.sqrt() / bc2 + hp["eps"]
            upd = -(hp["lr"] / bc1) * mn / den
            scale = (hp["lr"] / bc1) * (m0[i].abs() + w.abs()) / den
            err = ((p[i].double() - upd).abs() / scale)[d]
            worst = max(worst, err.max().item() if err.numel() else 0.0)
            assert torch.all(p[i][~d] == 0), f"step {step} param[{i}]: unselected moved"
    assert worst <= UPDATE_BOUND, f"{sdt}: max error {worst:.3g} of the update's scale"


@pytest.mark.parametrize("pdt", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gdt", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sr", [True, False])
def test_bf16_state_cpu_equals_twin_every_dtype(pdt, gdt, sr):
    """bf16 moments on the cpu backend (its AVX2 blocks of 16 elements and the scalar tails)
    against the torch twin for every parameter / gradient dtype, with and without SR, masked
    and not, with inf and NaN gradients at some selected elements: moments and bf16 / fp16
    parameters bit-identical, fp32 parameters within 1e-6 (ATen's sqrt); NaN where the twin has
    NaN (its bits aside: torch's ``.to(bfloat16)`` writes NaN as 0xFFFF, the kernels 0x7FC0)."""
    if DEVICE.type != "cpu" or not _cpu.available():
        pytest.skip("the cpu backend runs on CPU tensors")
    shapes = [(5,), (16,), (4099,), (3, 333), (40000,)]
    params = [torch.randn(s).to(pdt) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    for g in grads:
        g.view(-1)[3::211] = float("inf")
        g.view(-1)[5::307] = float("nan")
        g.view(-1)[7::401] = -float("inf")
    grads = [g.to(gdt) for g in grads]
    m = [(torch.randn(s) * 0.1).to(torch.bfloat16) for s in shapes]
    v = [(0.01 + torch.rand(s) * 0.01).to(torch.bfloat16) for s in shapes]
    for masks in (None, [K.pack_bits(torch.rand(s) < 0.6) for s in shapes]):
        kw = dict(sr=sr, param_sr=sr and pdt == torch.bfloat16, grad_mul=torch.tensor(0.7))
        ref = _run("torch", params, grads, m, v, masks, **kw)
        out = _run("cpu", params, grads, m, v, masks, **kw)
        for i in range(len(shapes)):
            for k, name in enumerate(("param", "exp_avg", "exp_avg_sq")):
                a, b = out[k][i], ref[k][i]
                nan = torch.isnan(b)
                assert torch.equal(torch.isnan(a), nan), f"{name}[{i}]: NaN positions"
                if k == 0 and pdt == torch.float32:
                    assert_close_verbose(a, b, rtol=1e-6, atol=1e-7, name=f"param[{i}]")
                else:
                    assert _equal_bits(a[~nan], b[~nan]), f"{name}[{i}]"


# ------------------------------------------------------------------ compacted state
def _compact(t, d):
    return t.reshape(-1)[d.reshape(-1)].contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["scattered", "clustered", "runs"])
def test_compact_state_bit_identical_to_dense(backend, sdt, layout):
    """Compacted moments (selected elements only) and sparse chunk tables give exactly the
    dense masked step's parameters and (gathered) moments, SR included. ``runs``: 60 % of the
    elements plus selected runs of 40–400 elements at odd offsets, so the C kernel meets whole
    selected 64-element words (its contiguous path) between partial ones (its gathered tiles)."""
    _need(backend)
    frac = 0.6 if layout == "runs" else 0.05
    params, grads, m, v, dense = _inputs(
        torch.bfloat16, sdt, frac=frac, clustered=layout == "clustered"
    )
    if layout == "runs":
        g = torch.Generator().manual_seed(5)
        for d in dense:
            flat = d.view(-1)
            for _ in range(max(1, flat.numel() // 500)):
                a = int(torch.randint(0, flat.numel(), (1,), generator=g))
                flat[a : a + int(torch.randint(40, 400, (1,), generator=g))] = True
    masks = [K.pack_bits(d) for d in dense]
    index = [MaskIndex(k, d.numel()) for k, d in zip(masks, dense)]
    sr = dict(sr=True, param_sr=True) if sdt == torch.bfloat16 else {}
    ref = _run(backend, params, grads, m, v, masks, **sr)
    sparse = _run(backend, params, grads, m, v, masks, mask_index=index, **sr)
    mc = [_compact(x, d) for x, d in zip(m, dense)]
    vc = [_compact(x, d) for x, d in zip(v, dense)]
    comp = _run(backend, params, grads, mc, vc, masks, mask_index=index, compact=True, **sr)
    for i, d in enumerate(dense):
        for k in range(3):
            assert _equal_bits(sparse[k][i], ref[k][i]), f"sparse operand {k}[{i}]"
        assert _equal_bits(comp[0][i], ref[0][i]), f"param[{i}]"
        assert _equal_bits(comp[1][i], _compact(ref[1][i], d)), f"exp_avg[{i}]"
        assert _equal_bits(comp[2][i], _compact(ref[2][i], d)), f"exp_avg_sq[{i}]"


def test_compact_twins_agree():
    params, grads, m, v, dense = _inputs(torch.bfloat16, torch.bfloat16, frac=0.2)
    masks = [K.pack_bits(d) for d in dense]
    index = [MaskIndex(k, d.numel()) for k, d in zip(masks, dense)]
    mc = [_compact(x, d) for x, d in zip(m, dense)]
    vc = [_compact(x, d) for x, d in zip(v, dense)]
    kw = dict(mask_index=index, compact=True, sr=True, param_sr=True)
    ref = _run("torch", params, grads, mc, vc, masks, **kw)
    for be in ("triton", "cpu"):
        if be == "cpu" and (DEVICE.type != "cpu" or not _cpu.available()):
            continue
        out = _run(be, params, grads, mc, vc, masks, **kw)
        for k in range(3):
            for i in range(len(SHAPES)):
                assert _equal_bits(out[k][i], ref[k][i]), f"{be} operand {k}[{i}]"


def test_compact_rejects_wrong_sizes_and_missing_index():
    p, g = [torch.zeros(100)], [torch.ones(100)]
    d = torch.zeros(100, dtype=torch.bool)
    d[::10] = True
    k = [K.pack_bits(d)]
    ix = [MaskIndex(k[0], 100)]
    with pytest.raises(ValueError, match="needs 10"):
        K.masked_adamw_(p, g, [torch.zeros(100)], [torch.zeros(100)], k, step=1,
                        mask_index=ix, compact=True, **HP)  # fmt: skip
    with pytest.raises(ValueError, match="mask_index"):
        K.masked_adamw_(p, g, [torch.zeros(10)], [torch.zeros(10)], k, step=1, compact=True,
                        **HP)  # fmt: skip


def test_mask_index_drops_empty_chunks():
    n = 5 * 4096 + 3
    d = torch.zeros(n, dtype=torch.bool)
    d[4096 + 5] = d[3 * 4096 + 7 : 3 * 4096 + 20] = d[n - 1] = True
    ix = MaskIndex(K.pack_bits(d), n)
    assert ix.count == int(d.sum())
    starts, before = ix.chunks(4096)
    assert starts.tolist() == [4096, 3 * 4096, 5 * 4096]
    assert before.tolist() == [0, 1, 14]
    starts, before = ix.chunks(8192)
    assert starts.tolist() == [0, 8192, 16384]
    chunks, c = sparse_chunk_table([ix, ix], 4096, torch.device("cpu"))
    assert c == 6 and chunks.shape == (3, 6)
    assert chunks[0].tolist() == [0, 0, 0, 1, 1, 1]


# ------------------------------------------------------------------ devices
def test_launch_tables_never_mix_devices():
    """A list spanning devices is grouped by device before any table is built; a table asked
    for tensors of two devices refuses (``meta`` stands in for a second device)."""
    a, b = torch.zeros(8), torch.zeros(8, device="meta")
    with pytest.raises(ValueError, match="one launch table per device"):
        _common.chunk_tables([[a, b]], [8, 8], 4096)
    groups = _common.group_by_dtype([a, b, a], [a, b, a])
    assert sorted(len(ix) for ix in groups.values()) == [1, 2]
    assert {k[-1].type for k in groups} == {"cpu", "meta"}
    with pytest.raises(ValueError, match="operand 1 is on meta"):
        _common.group_by_dtype([a], [b])


def test_twin_handles_a_list_spanning_devices():
    """The torch twin steps each tensor on its own device (meta tensors: shapes only)."""
    ps = [torch.zeros(8), torch.zeros(8, device="meta")]
    gs = [torch.ones(8), torch.ones(8, device="meta")]
    ms = [torch.zeros(8), torch.zeros(8, device="meta")]
    vs = [torch.zeros(8), torch.zeros(8, device="meta")]
    K.masked_adamw_(ps, gs, ms, vs, None, step=1, backend="torch", **HP)
    assert (ps[0] != 0).all()


def test_grad_mul_multiplies_and_grad_scale_is_gone():
    """The gradient multiplier is ``grad_mul`` (a clip coefficient multiplies the gradient);
    the old name ``grad_scale`` — which torch's fused optimizers use for a *divisor* — is not
    accepted, so no caller can pass a loss scale expecting a division."""
    p, g = [torch.zeros(5)], [torch.ones(5)]
    a = [torch.zeros(5)], [torch.zeros(5)]
    b = [torch.zeros(5)], [torch.zeros(5)]
    K.masked_adamw_(p, g, *a, None, step=1, grad_mul=torch.tensor(0.5), backend="torch", **HP)
    q = [torch.zeros(5)]
    K.masked_adamw_(q, [torch.full((5,), 0.5)], *b, None, step=1, backend="torch", **HP)
    assert torch.equal(p[0], q[0]) and torch.equal(a[0][0], b[0][0])
    with pytest.raises(TypeError):
        K.masked_adamw_(p, g, *a, None, step=1, grad_scale=torch.tensor(2.0), **HP)
    with pytest.raises(TypeError):
        K.masked_sgd_(p, g, None, lr=0.1, grad_scale=torch.tensor(2.0))


def test_kernels_all_lists_the_dispatchers():
    """``mmunlearn.kernels.__all__`` names every dispatcher (``backend=``) and nothing missing;
    each dispatcher has its torch and triton twin (and a cpu one for the streaming ops)."""
    import inspect

    for name in K.__all__:
        assert hasattr(K, name), name
    dispatchers = ["masked_adamw_", "masked_sgd_", "fisher_accumulate_", "grad_sq_norm",
                   "saliency_mask", "saliency_histogram", "pack_bits", "unpack_bits"]  # fmt: skip
    for name in dispatchers:
        assert name in K.__all__, name
        assert "backend" in inspect.signature(getattr(K, name)).parameters, name
        assert f"torch_{name}" in K.__all__ and f"triton_{name}" in K.__all__, name
    for name in ("masked_adamw_", "masked_sgd_", "fisher_accumulate_", "grad_sq_norm"):
        assert f"cpu_{name}" in K.__all__, name
