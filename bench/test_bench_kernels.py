"""pytest-benchmark suite: every op, every implementation, side by side in one run.

CPU (CI): 1 M elements, cpu/torch/eager/fused_adamw/official rows. CUDA: 1 M … 256 M elements,
Triton and torch.compile rows too. Run ``pytest bench --benchmark-only``; group rows by op and size.
"""

from __future__ import annotations

import pytest
import torch
from cases import OPS, Case, sync

CUDA = torch.cuda.is_available()
SIZES = [1 << 20, 1 << 24, 1 << 28] if CUDA else [1 << 20]
IMPLS = ["triton", "cpu", "torch", "eager", "compile", "fused_adamw", "official"]
_CASES: dict = {}


def _case(op, size):
    key = (op, size)
    if key not in _CASES:
        _CASES.clear()  # one case alive at a time keeps GPU memory bounded
        _CASES[key] = Case(op, size, "cuda" if CUDA else "cpu")
    return _CASES[key]


@pytest.mark.benchmark
@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n >> 20}M")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_bench(benchmark, op, impl, size):
    case = _case(op, size)
    fns = case.impls()
    if impl not in fns:
        pytest.skip(f"{impl} has no {op} on {case.device.type}")
    fn = fns[impl]
    benchmark.group = f"{op}-{size >> 20}M"
    benchmark.extra_info["bytes_moved"] = case.bytes_moved

    def run():
        fn()
        sync(case.device)

    run()  # warm-up (compilation)
    benchmark.pedantic(run, rounds=5 if not CUDA else 20, iterations=1)
