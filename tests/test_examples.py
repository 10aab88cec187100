"""examples/hf_trainer.py: MMUnlearner's masked forget step inside a ``transformers.Trainer``
on a tiny Llama: the forget loss rises, and a forget step leaves every masked-out weight
bit-identical while it moves the selected ones."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from realformat import TRANSFORMERS_4

# transformers 4.x's Trainer needs accelerate (not a dependency of mmunlearn; 5.x's does not)
pytestmark = pytest.mark.skipif(
    TRANSFORMERS_4 and importlib.util.find_spec("accelerate") is None,
    reason="transformers 4.x's Trainer needs accelerate, not installed",
)


def test_hf_trainer_example_forgets_with_masked_steps(tmp_path):
    from examples.hf_trainer import run

    torch.set_num_threads(1)  # restored by conftest
    r = run(steps=6, out=str(tmp_path / "hf"), lr=1e-3)
    assert r["forget_steps"] == 6  # one before every retain step
    assert r["forget_loss_after"] > r["forget_loss_before"] + 0.1
    assert 0.0 < r["mask_fraction"] < 1.0
    # one more forget step through the Trainer's own path: masked-out weights stay
    model, mask = r["model"], r["mask"]
    trainer = r["trainer"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer._forget_step(model)
    dense = {n: mask.dense(n).to(p.device) for n, p in model.named_parameters()}
    moved = 0
    for n, p in model.named_parameters():
        keep = ~dense[n]
        assert torch.equal(p.detach()[keep], before[n][keep]), n
        moved += int((p.detach()[dense[n]] != before[n][dense[n]]).sum())
    assert moved > 0


def test_hf_trainer_example_runs_as_a_script(tmp_path, capsys):
    from examples.hf_trainer import main

    torch.set_num_threads(1)
    assert main(["--steps", "2", "--out", str(tmp_path / "hf")]) == 0
    assert "forget loss" in capsys.readouterr().out
