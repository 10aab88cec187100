"""The research sweep (experiments/sweep.py) in a tiny configuration: files and keys, a cell
equals the demo run with the same settings, the script's command line."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.sweep import METRICS, SweepConfig, main, run_sweep
from mmunlearn.demo import run_demo
from mmunlearn.tinyrun import TinyRunConfig

TINY = dict(
    n_people=4,
    forget_ratio=0.25,
    vanilla_steps=6,
    batch_size=4,
    hidden=32,
    vision_hidden=16,
    save_models=False,
    progress=False,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and two processes with a thread per core each
    slow down many-fold on a 2-core machine (method.md §8); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_sweep_files_keys_and_demo_parity(tmp_path):
    cfg = SweepConfig(
        seeds=[0, 1],
        lrs=[1e-3],
        steps=[1, 2],
        methods=["ga", "mmunlearner", "mmunlearner:random"],
        demo=TinyRunConfig(**TINY),
        threads=None,
        progress=False,
    )
    grid = run_sweep(str(tmp_path), cfg)
    data = json.loads((tmp_path / "grid.json").read_text())
    assert len(data["rows"]) == 2 * 1 * 2 * 3 == len(grid["rows"])
    assert set(data["vanilla"]) == {"0", "1"} and set(data["mask_coverage"]["0"]) == {
        "vision",
        "language",
        "both",
    }
    for r in data["rows"]:
        for key, *_ in METRICS:
            assert 0.0 <= r[key] <= 1.0, (r, key)
        assert r["delta_language"] > 0.0 and r["forget_ce"] > 0.0
    probe = data["mask_probe"]["0"]["total"]
    assert 0.0 < probe["coverage"] < 1.0 and 0.0 <= probe["l1_share"] <= 1.0
    assert data["mask_probe"]["0"]["total"]["grad_l1_fraction"] == pytest.approx(1.0)
    assert set(data["ascent_only"]["1"]["0.001"]) == {"none", "mask", "random"}
    assert set(data["ascent_only"]["1"]["0.001"]["mask"]) == {"1", "2"}
    assert "## Mask probe" in (tmp_path / "grid.md").read_text()
    assert len(data["summary"]) == 2 * 3 and all(s["n_seeds"] == 2 for s in data["summary"])
    md = (tmp_path / "grid.md").read_text()
    assert md.startswith("# mmunlearn sweep") and "| 0.001 | 2 | mmunlearner |" in md
    # the cell (seed 0, lr 1e-3, 2 steps) is the demo run with those settings
    demo = run_demo(
        str(tmp_path / "demo"),
        TinyRunConfig(**TINY, unlearn_steps=2, methods=["ga", "mmunlearner"]),
    )
    for method in ("ga", "mmunlearner"):
        row = next(
            r for r in data["rows"] if (r["seed"], r["steps"], r["method"]) == (0, 2, method)
        )
        for key, set_name, metric, _ in METRICS:
            assert row[key] == demo["methods"][method][set_name][metric], (method, key)


def test_sweep_cli(tmp_path):
    argv = ["--fast", "--seeds", "0", "--lrs", "1e-3", "--steps", "1", "--threads", "0"]
    extra = ["--methods", "ga", "--vanilla-steps", "3", "--no-probe", "--out", str(tmp_path)]
    assert main(argv + extra) == 0
    data = json.loads((tmp_path / "grid.json").read_text())
    assert data["rows"][0]["method"] == "ga" and "mask_probe" not in data
    with pytest.raises(SystemExit):
        main(argv + ["--methods", "bogus"])


def test_cheap_constants_match_their_sources():
    """sweep.py keeps torch out of its import (--help); its copies must agree."""
    from experiments import sweep
    from mmunlearn.methods import PAPER_METHODS

    assert sweep.METHODS == PAPER_METHODS  # the paper's five, as the demo
    assert sweep.VANILLA_STEPS == TinyRunConfig.vanilla_steps
