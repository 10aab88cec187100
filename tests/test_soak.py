"""Kill-and-requeue soak, the CI variant of ``tests/soak.py`` (the full run: 1,000 steps, 10
SIGKILL + 5 SIGTERM, figures in the README): 150 steps, 2 SIGKILL + 1 SIGTERM at random steps,
each time the same command again (``--resume auto``); the final weights and optimizer moments
equal those of an uninterrupted run, bit for bit."""

from __future__ import annotations

from soak import soak


def test_killed_and_requeued_run_ends_bit_identical(tmp_path):
    res = soak(tmp_path, steps=150, kills=2, terms=1, seed=1, every=10)
    assert [k["signal"] for k in res["kills"]].count("SIGKILL") == 2
    assert all(k["exit"] in (-9, 75) for k in res["kills"]), res["kills"]
    assert res["moment tensors"] > 0 and res["tensors compared"] > res["moment tensors"]
    assert res["bit-identical"], res
