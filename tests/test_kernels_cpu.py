"""The ``cpu`` backend (C kernels, kernels/_cpu.py) against the torch twins, on CPU tensors.

Bit-exact where the twin's ATen ops are correctly rounded: Fisher, grad-norm partials (up to
summation order), saliency masks, counts, histograms, thresholds, SGD, both AdamW moments and
bf16/fp16 AdamW parameters. fp32 AdamW parameters within 1e-6 relative: ATen's CPU ``sqrt``
is not correctly rounded (torch 2.13: 79 % of fp32 results equal the IEEE square root on
AVX2/AVX-512), the C kernel's (like the GPU's) is. Masked-out elements: byte-identical.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import mmunlearn.kernels as K
from mmunlearn.kernels import _cpu
from mmunlearn.kernels._common import resolve_backend

from helpers import assert_close_verbose

if not _cpu.available():  # pragma: no cover - a machine without a C compiler
    pytest.skip("the cpu backend cannot be built here", allow_module_level=True)

# one tensor spanning several 32 K-element chunks (and threads), odd tails, empty-ish ones
SHAPES = [(1,), (7,), (4095,), (3, 333), (8192,), (17,), (100003,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _equal_bits(a, b) -> bool:
    return torch.equal(_bits(a), _bits(b))


def _adam_inputs(pdt, gdt, shapes=SHAPES):
    params = [torch.randn(s).to(pdt) for s in shapes]
    grads = [torch.randn(s).to(gdt) for s in shapes]
    m = [torch.randn(s) * 0.1 for s in shapes]
    v = [0.01 + torch.rand(s) * 0.01 for s in shapes]
    masks = [K.pack_bits(torch.rand(s) < 0.5) for s in shapes]
    return params, grads, m, v, masks


def test_auto_picks_cpu_for_cpu_tensors():
    assert resolve_backend("auto", [torch.zeros(3)]) == "cpu"
    assert resolve_backend("cpu", [torch.zeros(3)]) == "cpu"


@pytest.mark.parametrize("pdt", DTYPES, ids=str)
@pytest.mark.parametrize("gdt", DTYPES, ids=str)
@pytest.mark.parametrize("with_mask", [True, False])
def test_masked_adamw_matches_twin(pdt, gdt, with_mask):
    params, grads, m, v, masks = _adam_inputs(pdt, gdt)
    masks = masks if with_mask else None
    out = {}
    for be in ("torch", "cpu"):
        p, mm, vv = [x.clone() for x in params], [x.clone() for x in m], [x.clone() for x in v]
        for step in (1, 2, 3):
            K.masked_adamw_(
                p, grads, mm, vv, masks, step=step, grad_mul=torch.tensor(0.7),
                maximize=step == 2, backend=be, **HP,
            )  # fmt: skip
        out[be] = (p, mm, vv)
    for i in range(len(SHAPES)):
        (pt, mt, vt), (pc, mc, vc) = ([x[i] for x in out[b]] for b in ("torch", "cpu"))
        assert _equal_bits(mc, mt), f"exp_avg[{i}]"
        assert _equal_bits(vc, vt), f"exp_avg_sq[{i}]"
        if pdt == torch.float32:  # ATen's sqrt: see the module docstring
            assert_close_verbose(pc, pt, rtol=1e-6, atol=1e-7, name=f"param[{i}]")
        else:
            assert _equal_bits(pc, pt), f"param[{i}]"


@pytest.mark.parametrize("pdt", DTYPES, ids=str)
def test_masked_sgd_matches_twin_same_grads(pdt):
    params = [torch.randn(s).to(pdt) for s in SHAPES]
    masks = [K.pack_bits(torch.rand(s) < 0.5) for s in SHAPES]
    grads = [[torch.randn(s).to(torch.bfloat16) for s in SHAPES] for _ in range(3)]
    out = {}
    for be in ("torch", "cpu"):
        p = [x.clone() for x in params]
        for g in grads:
            K.masked_sgd_(p, g, masks, lr=0.05, weight_decay=0.01, maximize=True,
                          grad_mul=torch.tensor(0.5), backend=be)  # fmt: skip
        out[be] = p
    for i, (a, b) in enumerate(zip(out["cpu"], out["torch"])):
        assert _equal_bits(a, b), f"param[{i}]"


@pytest.mark.parametrize("gdt", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["sq", "abs"])
def test_fisher_accumulate_bit_exact(gdt, mode):
    grads = [torch.randn(s).to(gdt) for s in SHAPES]
    start = [torch.rand(s) for s in SHAPES]
    acc = {be: [x.clone() for x in start] for be in ("torch", "cpu")}
    for be, a in acc.items():
        for scale in (1.0, 0.3):
            K.fisher_accumulate_(a, grads, scale, mode, backend=be)
    for i, (a, b) in enumerate(zip(acc["cpu"], acc["torch"])):
        assert torch.equal(a, b), f"acc[{i}]"


@pytest.mark.parametrize("gdt", DTYPES, ids=str)
def test_grad_sq_norm_close_and_thread_independent(gdt):
    grads = [torch.randn(s).to(gdt) for s in SHAPES]
    got = K.grad_sq_norm(grads, backend="cpu")
    oracle = sum((g.double() ** 2).sum() for g in grads)
    assert got.shape == () and got.dtype == torch.float32
    assert_close_verbose(got, oracle, rtol=1e-6, atol=0, name="vs fp64")
    torch.set_num_threads(1)
    assert torch.equal(K.grad_sq_norm(grads, backend="cpu"), got)


def _fishers(shapes):
    return [torch.randn(s).pow(2) * torch.exp(torch.randn(s) * 4) for s in shapes]


@pytest.mark.parametrize("gamma", [1.0, 0.37, 25.0])
def test_saliency_mask_and_counts_bit_exact(gamma):
    ff, fp = _fishers(SHAPES), _fishers(SHAPES)
    fp[2][:100] = ff[2][:100]  # exact ties at ratio 1
    b_t, c_t = K.saliency_mask(ff, fp, gamma, backend="torch")
    b_c, c_c = K.saliency_mask(ff, fp, gamma, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(b_c, b_t))
    assert torch.equal(c_c, c_t)


def test_histograms_and_topk_bit_exact():
    ff, fp = _fishers(SHAPES), _fishers(SHAPES)
    h0 = K.saliency_histogram(ff, fp, 0, backend="torch")
    assert torch.equal(K.saliency_histogram(ff, fp, 0, backend="cpu"), h0)
    d0 = int(torch.nonzero(h0).max())
    h1 = K.saliency_histogram(ff, fp, 1, d0, backend="torch")
    assert torch.equal(K.saliency_histogram(ff, fp, 1, d0, backend="cpu"), h1)
    d1 = int(torch.nonzero(h1).max())
    h2 = K.saliency_histogram(ff, fp, 2, (d0 << 11) | d1, backend="torch")
    assert torch.equal(K.saliency_histogram(ff, fp, 2, (d0 << 11) | d1, backend="cpu"), h2)
    for frac in (1e-6, 0.01, 0.3, 1.0):
        want = K.saliency_threshold_topk(ff, fp, frac, backend="torch")
        assert K.saliency_threshold_topk(ff, fp, frac, backend="cpu") == want


def test_results_do_not_depend_on_thread_count():
    params, grads, m, v, masks = _adam_inputs(torch.bfloat16, torch.bfloat16)
    ff, fp = _fishers(SHAPES), _fishers(SHAPES)
    out = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        p, mm, vv = [x.clone() for x in params], [x.clone() for x in m], [x.clone() for x in v]
        K.masked_adamw_(p, grads, mm, vv, masks, step=1, backend="cpu", **HP)
        acc = [x.clone() for x in ff]
        K.fisher_accumulate_(acc, grads, backend="cpu")
        out.append((p, mm, vv, acc, K.saliency_histogram(ff, fp, 0, backend="cpu")))
    for other in out[1:]:
        for xs, ys in zip(out[0], other):
            xs, ys = (xs, ys) if isinstance(xs, list) else ([xs], [ys])
            assert all(_equal_bits(x, y) if x.is_floating_point() else torch.equal(x, y)
                       for x, y in zip(xs, ys))  # fmt: skip


@pytest.mark.parametrize("pdt", DTYPES, ids=str)
@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16], ids=str)
def test_masked_out_bytes_untouched(pdt, sdt):
    """Masked-out elements keep their exact bytes through 10 steps, even NaN payloads, -0.0 and
    subnormals, and even where their gradients are inf or NaN (the read-modify-write stores
    back the integer bits it read). bf16 moments (the AVX2 blocks' blends) with SR."""
    shapes = [(5,), (4099,), (70001,)]
    params, _, m, v, _ = _adam_inputs(pdt, torch.float32, shapes)
    m, v = [x.to(sdt) for x in m], [x.to(sdt) for x in v]
    dense = [torch.rand(s) < 0.3 for s in shapes]
    masks = [K.pack_bits(d) for d in dense]
    odd = torch.tensor([0x7FC00001, 0xFFA00001, 0x80000000, 0x00000001], dtype=torch.int64)
    for *xs, d in zip(params, m, v, dense):
        out_idx = torch.nonzero(~d).flatten()[:4]
        for x in xs:
            if x.dtype == torch.float32:
                x.view(torch.int32)[out_idx] = odd[: len(out_idx)].to(torch.int32)
            else:
                odd16 = torch.tensor([0x7FC1, -0x0001, -0x8000, 0x0001], dtype=torch.int16)
                x.view(torch.int16)[out_idx] = odd16[: len(out_idx)]
    start = [[x.clone() for x in lst] for lst in (params, m, v)]
    for step in range(1, 11):
        grads = [torch.randn(s) for s in shapes]
        for g, d in zip(grads, dense):
            g[~d] = float("inf") if step % 2 else float("nan")
        sr = dict(sr_seed=step, param_sr=pdt == torch.bfloat16) if sdt == torch.bfloat16 else {}
        K.masked_adamw_(params, grads, m, v, masks, step=step, backend="cpu",
                        grad_mul=torch.tensor(0.5), **sr, **{**HP, "lr": 0.1})  # fmt: skip
    for name, now, was in zip(("param", "exp_avg", "exp_avg_sq"), (params, m, v), start):
        for i, d in enumerate(dense):
            assert torch.equal(_bits(now[i])[~d], _bits(was[i])[~d]), f"{name}[{i}] changed"
    moved = sum(int((p[d] != s[d]).sum()) for p, s, d in zip(params, start[0], dense))
    assert moved > 0.8 * sum(int(d.sum()) for d in dense)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_found_inf_skips_the_step(backend):
    params, grads, m, v, masks = _adam_inputs(torch.bfloat16, torch.bfloat16)
    start = [[x.clone() for x in lst] for lst in (params, m, v)]
    for flag in (torch.tensor(1.0), torch.tensor(True), torch.tensor(float("nan"))):
        K.masked_adamw_(params, grads, m, v, masks, step=1, found_inf=flag, backend=backend, **HP)
        K.masked_sgd_(params, grads, None, lr=0.1, found_inf=flag, backend=backend)
    for now, was in zip((params, m, v), start):
        assert all(_equal_bits(a, b) for a, b in zip(now, was))
    ref = [[x.clone() for x in lst] for lst in start]
    K.masked_adamw_(params, grads, m, v, masks, step=1, found_inf=torch.tensor(0), backend=backend,
                    **HP)  # fmt: skip
    K.masked_adamw_(*ref[:1], grads, *ref[1:], masks, step=1, backend=backend, **HP)
    for now, want in zip((params, m, v), ref):
        assert all(_equal_bits(a, b) for a, b in zip(now, want))


def test_device_step_tensors_match_int_steps():
    params, grads, m, v, masks = _adam_inputs(torch.float32, torch.float32)
    ref = [[x.clone() for x in lst] for lst in (params, m, v)]
    steps = [torch.tensor(3.0) for _ in params]
    K.masked_adamw_(params, grads, m, v, masks, step=steps, backend="cpu", **HP)
    K.masked_adamw_(ref[0], grads, ref[1], ref[2], masks, step=3, backend="cpu", **HP)
    for now, want in zip((params, m, v), ref):
        assert all(_equal_bits(a, b) for a, b in zip(now, want))


def test_unaligned_views():
    """Storage offsets that break 16-byte alignment (the Triton kernels' scalar fallback) are
    plain pointers here: same results as the twin."""
    buf = torch.randn(3 * 5000 + 3).to(torch.bfloat16)
    params = [buf[1:5001], buf[5003:10003]]
    grads = [torch.randn(5000).to(torch.bfloat16) for _ in params]
    m, v = [torch.zeros(5000) for _ in params], [torch.zeros(5000) for _ in params]
    masks = [K.pack_bits(torch.rand(5000) < 0.5) for _ in params]
    ref = [p.clone() for p in params]
    rm, rv = [x.clone() for x in m], [x.clone() for x in v]
    K.masked_adamw_(params, grads, m, v, masks, step=1, backend="cpu", **HP)
    K.masked_adamw_(ref, grads, rm, rv, masks, step=1, backend="torch", **HP)
    assert all(_equal_bits(a, b) for a, b in zip(params, ref))


def test_missing_compiler_falls_back_to_twins(monkeypatch, tmp_path):
    saved = dict(_cpu._STATE)
    try:
        _cpu._STATE.clear()
        monkeypatch.setenv("MMUNLEARN_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv("CC", "/nonexistent/cc")
        monkeypatch.setattr(_cpu.shutil, "which", lambda name: None)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert resolve_backend("auto", [torch.zeros(3)]) == "torch"
        assert any("CPU kernels unavailable" in str(x.message) for x in w)
        with pytest.raises(RuntimeError, match="unavailable"):
            resolve_backend("cpu", [torch.zeros(3)])
        acc = [torch.zeros(4)]
        K.fisher_accumulate_(acc, [torch.ones(4)])  # auto still works, on the twin
        assert acc[0].tolist() == [1.0] * 4
    finally:
        _cpu._STATE.clear()
        _cpu._STATE.update(saved)


def test_build_is_cached_and_keyed(tmp_path, monkeypatch):
    """A fresh cache directory builds once; a second load in a new state reuses the file."""
    saved = dict(_cpu._STATE)
    try:
        monkeypatch.setenv("MMUNLEARN_CACHE_DIR", str(tmp_path))
        _cpu._STATE.clear()
        _cpu.load()
        built = list(tmp_path.glob("mmu_cpu_*.so"))
        assert len(built) == 1 and "build" in _cpu._STATE
        _cpu._STATE.clear()
        _cpu.load()
        assert "build" not in _cpu._STATE and list(tmp_path.glob("mmu_cpu_*.so")) == built
    finally:
        _cpu._STATE.clear()
        _cpu._STATE.update(saved)


def test_cache_dir_falls_back_to_a_private_temp_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MMUNLEARN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ro"))
    monkeypatch.setattr(_cpu.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(_cpu.os, "access", lambda path, mode: False)  # as if not writable
    d = _cpu.cache_dir()
    assert d == str(tmp_path / "tmp" / f"mmunlearn-{_cpu.os.getuid()}")
    assert (_cpu.os.stat(d).st_mode & 0o777) == 0o700
    monkeypatch.setenv("MMUNLEARN_CACHE_DIR", str(tmp_path / "explicit"))
    assert _cpu.cache_dir() == str(tmp_path / "explicit")


def test_c_source_is_package_data_without_float16():
    """kernels/mmu_cpu.c ships as package data (a non-editable install builds from it) and
    uses no ``_Float16`` (gcc < 12 lacks it on x86)."""
    import os
    import re

    code = re.sub(r"/\*.*?\*/", "", _cpu.source(), flags=re.S)  # comments may name it
    assert "mmu_adamw" in code and "_Float16" not in code
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml")) as f:
        assert '"mmunlearn.kernels" = ["mmu_cpu.c"]' in f.read()
    assert os.path.basename(_cpu._SOURCE_PATH) == "mmu_cpu.c"


def test_a_failed_build_says_why_once_and_how_to_get_the_fast_path(monkeypatch, tmp_path):
    """A compiler that fails: the warning names the compiler, its flags and the first error
    line, and says how to get the C kernels; said once, then the twins run."""
    cc = tmp_path / "badcc"
    cc.write_text(
        "#!/bin/sh\necho 'mmu_cpu.c:1:1: error: unknown type name _Float16' >&2\nexit 1\n"
    )
    cc.chmod(0o755)
    saved = dict(_cpu._STATE)
    try:
        _cpu._STATE.clear()
        monkeypatch.setenv("MMUNLEARN_CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.setenv("CC", str(cc))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert resolve_backend("auto", [torch.zeros(3)]) == "torch"
            assert resolve_backend("auto", [torch.zeros(3)]) == "torch"
        msgs = [str(x.message) for x in w if "CPU kernels" in str(x.message)]
        assert len(msgs) == 1, msgs
        assert str(cc) in msgs[0] and "-O3 -std=gnu11" in msgs[0], msgs[0]
        assert "error: unknown type name _Float16" in msgs[0] and "install gcc or clang" in msgs[0]
    finally:
        _cpu._STATE.clear()
        _cpu._STATE.update(saved)


def test_cache_dir_without_getuid(monkeypatch, tmp_path):
    """Where os.getuid does not exist (Windows) the private temp dir is named by the user."""
    monkeypatch.delenv("MMUNLEARN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ro"))
    monkeypatch.setattr(_cpu.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(_cpu.os, "access", lambda path, mode: False)
    monkeypatch.delattr(_cpu.os, "getuid")
    monkeypatch.setattr("getpass.getuser", lambda: "ada")
    assert _cpu.cache_dir() == str(tmp_path / "tmp" / "mmunlearn-ada")
