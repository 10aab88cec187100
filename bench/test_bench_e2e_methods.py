"""bench/e2e_methods.py at a smoke size: every method mmunlearn.methods lists is timed, GA_Diff
is the ratio's 1, MMUnlearner's mask pass is inside its total; and one pytest-benchmark case
per method (``--benchmark-disable`` in CI: each runs once). Timings are recorded, never
asserted."""

from __future__ import annotations

import e2e_methods as E
import pytest
import torch

SMALL = dict(people=6, steps=2, batch_size=8, hidden=32, vanilla_steps=0)


@pytest.fixture(scope="module")
def work():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield E.Workload(**SMALL)
    torch.set_num_threads(n)


def test_every_listed_method_is_timed(tmp_path):
    from mmunlearn.methods import METHODS

    argv = ["--people", "6", "--steps", "2", "--batch-size", "8", "--hidden", "32",
            "--vanilla-steps", "0", "--rounds", "1", "--no-warmup"]  # fmt: skip
    argv += ["--out", str(tmp_path)]
    out = E.main(argv)
    assert list(out["methods"]) == list(METHODS)
    rat = out["ratio_to_ga_diff"]
    assert rat["ga_diff"]["cpu"] == 1.0 and rat["ga_diff"]["wall"] == 1.0
    mm = out["methods"]["mmunlearner"]
    assert 0 < mm["mask_cpu_s"] < mm["cpu_s"] and "mask_cpu" in rat["mmunlearner"]
    assert out["methods"]["ga"]["steps"] == 2 and out["methods"]["ga_diff"]["steps"] == 4
    assert (tmp_path / "e2e_methods.json").exists() and (tmp_path / "e2e_methods.md").exists()


@pytest.mark.benchmark
@pytest.mark.parametrize("method", E.methods())
def test_bench_method_end_to_end(benchmark, work, method):
    benchmark.group = "e2e-methods-cpu-tiny"
    benchmark.pedantic(lambda: work.run(method), rounds=3, iterations=1)
