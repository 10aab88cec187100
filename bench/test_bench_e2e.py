"""End-to-end saliency benchmarks (bench/e2e_saliency.py, bench/topk_scale.py) at tiny sizes,
plus the correctness checks that make their comparisons meaningful.

CPU: torch twins vs the official way, 2^16 elements. CUDA: the Triton path at 16 M elements too
(skipped without a GPU). Timings are recorded by pytest-benchmark, never asserted.
"""

from __future__ import annotations

import math
import os

import e2e_saliency as E
import pytest
import topk_scale as T
import torch
from cases import model_shapes
from measure import MemoryProbe, parse_size

import mmunlearn.kernels as K

CUDA = torch.cuda.is_available()
SEED = int(os.environ.get("MMU_TEST_SEED", "1234"))
TINY = 1 << 16
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _run_batches(inp, impls, batches=3):
    for b in range(batches):
        if b:
            inp.resample()
        for impl in impls:
            impl.fisher_forget()
            impl.fisher_preserve()


# ------------------------------------------------------------------ correctness
def test_parse_size():
    assert parse_size("1M") == 1 << 20
    assert parse_size("2^25") == 1 << 25
    assert parse_size("7e9") == 7 * 10**9
    assert parse_size("4096") == 4096


def test_fisher_mask_step_match_official_fp32():
    """fp32 gradients: ours' Fisher = the official host Fisher, same masks, same steps."""
    inp = E.Inputs(TINY, torch.float32, "cpu", seed=SEED)
    ours, off = E.Ours(inp), E.Official(inp, own_copies=True)
    _run_batches(inp, (ours, off))
    (of, op), (xf, xp) = ours.fishers_fp32(), off.fishers_fp32()
    for a, b in zip(of + op, xf + xp):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)
    ours.mask()
    off.mask()
    mo, mx = ours.packed_masks_cpu(), off.packed_masks_cpu()
    assert len(mo) == len(mx) == len(inp.shapes)
    assert all(torch.equal(a, b) for a, b in zip(mo, mx))
    selected = int(ours.counts.sum())
    assert selected == sum(int(m.sum()) for m in off.host_masks)
    assert 0.3 * inp.numel < selected < 0.7 * inp.numel  # two iid Fishers: about half
    before = [p.clone() for p in ours.params]
    for _ in range(3):
        ours.step()
        off.step()
    for p, q, p0, m in zip(ours.params, off.leaf, before, off.host_masks):
        torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-9)
        assert torch.equal(p[~m], p0[~m])  # unselected weights never move
        assert not torch.equal(p[m], p0[m]) or not m.any()


def test_bf16_official_fisher_loses_precision():
    """bf16 gradients: ours matches the fp64 sum of squares; the official bf16 sum does not."""
    inp = E.Inputs(TINY, torch.bfloat16, "cpu", seed=SEED)
    ours, off = E.Ours(inp), E.Official(inp, own_copies=True)
    ref = [torch.zeros(s, dtype=torch.float64) for s in inp.shapes]
    for b in range(3):
        if b:
            inp.resample()
        ours.fisher_forget()
        off.fisher_forget()
        for r, g in zip(ref, inp.g_forget):
            r.add_(g.double() ** 2)
    ours_f, _ = ours.fishers_fp32()
    off_f, _ = off.fishers_fp32()
    worst = 0.0
    for a, x, r in zip(ours_f, off_f, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-6, atol=0.0)
        worst = max(worst, ((x.double() - r).abs() / r.clamp_min(1e-30)).max().item())
    assert worst > 1e-3  # bf16 accumulation: ~3 significant digits


def test_agreement_summary():
    c = E.agreement(TINY, torch.float32, "cpu", batches=2, seed=SEED)
    assert c["masks_equal"] and c["fisher_max_rel_diff"] <= 1e-6
    assert c["mask_mismatch_fraction"] == 0.0
    assert c["ours_selected_fraction"] == c["official_selected_fraction"]


@pytest.mark.parametrize("method", ["ours", "topk", "quantile"])
def test_topk_threshold_bit_exact_vs_kthvalue(method):
    ff, fp = T.make_fishers(TINY, "cpu", seed=SEED)
    ref = T.threshold("kthvalue", ff, fp, 0.05)
    assert T.f32_bits(T.threshold(method, ff, fp, 0.05)) == T.f32_bits(ref)
    scores = torch.cat([K.saliency_ratio(a, b).reshape(-1) for a, b in zip(ff, fp)])
    k = K.topk_count(0.05, scores.numel())
    assert int((scores >= ref).sum()) >= k > int((scores > ref).sum())


def test_topk_check_flags_disagreement():
    rows = [
        dict(size=8, method="kthvalue", status="ok", threshold=1.0, bits="3f800000"),
        dict(size=8, method="ours", status="ok", threshold=1.5, bits="3fc00000"),
        dict(size=8, method="topk", status="OOM", error="out of memory"),
    ]
    failures = T.check(rows)
    assert len(failures) == 1 and "ours" in failures[0]
    assert rows[1]["agrees"] is False and rows[2]["agrees"] is None


def test_quantile_refusal_is_recorded(monkeypatch):
    """Over 2^24 elements torch.quantile refuses; the script records it instead of crashing."""
    n = (1 << 24) + 8  # one flat zero Fisher pair: cheap to build, every score exactly 1
    monkeypatch.setattr(
        T,
        "make_fishers",
        lambda total, device, seed=0: ([torch.zeros(total)], [torch.zeros(total)]),
    )
    r = T.measure("quantile", n, "cpu", 0.05, reps=1, seed=SEED)
    assert r["numel"] == n
    assert r["status"] == "refused", r
    assert "too large" in r["error"]
    r = T.measure("ours", n, "cpu", 0.05, reps=1, seed=SEED)
    assert r["status"] == "ok" and r["threshold"] == 1.0


def test_measure_reports_phases_and_memory():
    r = E.measure("official", TINY, "bf16", "cpu", reps=1, seed=SEED)
    for key in ("fisher_s", "mask_s", "step_s"):
        assert r[key] > 0
    assert r["numel"] == sum(math.prod(s) for s in model_shapes(TINY))
    probe = MemoryProbe(torch.device("cpu"))
    probe.start()
    assert set(probe.read()) == {"host_method", "host_peak_mib", "device_peak_mib"}


# ------------------------------------------------------------------ benchmarks
def _bench_obj(impl, dtype, device, total):
    inp = E.Inputs(total, E.DTYPES[dtype], device, seed=SEED)
    obj = E.Ours(inp) if impl == "ours" else E.Official(inp)
    obj.fisher_forget()
    obj.fisher_preserve()
    obj.mask()
    return obj


def _bench(benchmark, obj, phase, device):
    fn = getattr(obj, phase)
    dev = torch.device(device)

    def run():
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    run()
    benchmark.pedantic(run, rounds=20 if dev.type == "cuda" else 5, iterations=1)


@pytest.mark.benchmark
@pytest.mark.parametrize("phase", ["fisher_forget", "mask", "step"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("impl", ["ours", "official"])
def test_bench_e2e_cpu(benchmark, impl, dtype, phase):
    benchmark.group = f"e2e-{phase}-{dtype}-cpu-{TINY >> 10}K"
    _bench(benchmark, _bench_obj(impl, dtype, "cpu", TINY), phase, "cpu")


@cuda_only
@pytest.mark.benchmark
@pytest.mark.parametrize("phase", ["fisher_forget", "mask", "step"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("impl", ["ours", "official"])
def test_bench_e2e_cuda(benchmark, impl, dtype, phase):
    benchmark.group = f"e2e-{phase}-{dtype}-cuda-16M"
    _bench(benchmark, _bench_obj(impl, dtype, "cuda", 1 << 24), phase, "cuda")


@pytest.mark.benchmark
@pytest.mark.parametrize("method", ["ours", "kthvalue", "topk"])
def test_bench_topk_cpu(benchmark, method):
    ff, fp = T.make_fishers(1 << 18, "cpu", seed=SEED)
    benchmark.group = "topk-cpu-256K"
    benchmark.pedantic(lambda: T.threshold(method, ff, fp, 0.05), rounds=3, iterations=1)


@cuda_only
def test_cuda_triton_matches_official_fp32():
    """Triton Fisher vs the official host Fisher: ≤ 1 ulp (FMA); masks equal but for ties."""
    inp = E.Inputs(1 << 20, torch.float32, "cuda", seed=SEED)
    ours, off = E.Ours(inp), E.Official(inp, own_copies=True)
    _run_batches(inp, (ours, off))
    (of, op), (xf, xp) = ours.fishers_fp32(), off.fishers_fp32()
    for a, b in zip(of + op, xf + xp):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)
    ours.mask()
    off.mask()
    diff = sum(
        int((K.unpack_bits(a, (n,)) != K.unpack_bits(b, (n,))).sum())
        for a, b, n in zip(
            ours.packed_masks_cpu(), off.packed_masks_cpu(), map(math.prod, inp.shapes)
        )
    )
    assert diff <= 1e-5 * inp.numel


@cuda_only
@pytest.mark.benchmark
@pytest.mark.parametrize("method", ["ours", "kthvalue", "topk"])
def test_bench_topk_cuda(benchmark, method):
    ff, fp = T.make_fishers(1 << 26, "cuda", seed=SEED)
    benchmark.group = "topk-cuda-64M"
    ref = T.threshold("kthvalue", ff, fp, 0.05)

    def run():
        out = T.threshold(method, ff, fp, 0.05)
        torch.cuda.synchronize()
        return out

    assert T.f32_bits(run()) == T.f32_bits(ref)
    benchmark.pedantic(run, rounds=10, iterations=1)
