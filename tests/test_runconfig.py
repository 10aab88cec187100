"""One run configuration: a setting added to RunConfig reaches the loop from the command line,
a ``--config`` file and the Python API with no other edit; recipes return RunConfigs; the CLI
reaches checkpointing through one Checkpoints object per run."""

from __future__ import annotations

import json
from dataclasses import field, fields, make_dataclass, replace

import pytest
import torch

import mmunlearn.config as config_mod
import mmunlearn.loop as loop_mod
import mmunlearn.presets as presets_mod
from mmunlearn.cli import main
from mmunlearn.config import RunConfig, cli_fields
from mmunlearn.presets import differences, official, resolve

from helpers import tiny_llama

SMALL = ["--tiny", "--synthetic", "--people", "6", "--vanilla-steps", "3", "--method", "ga"]


@pytest.fixture
def extended(monkeypatch):
    """RunConfig with one more field, ``probe_knob``, as a developer would add it; and every
    config the loop's stepper is built with, recorded."""
    meta = {"group": "optimizer", "help": "a new setting", "identity": True, "cli": True}
    cls = make_dataclass(
        "RunConfig",
        [("probe_knob", int, field(default=3, metadata=meta))],
        bases=(RunConfig,),
        frozen=True,
    )
    for mod in (config_mod, presets_mod, loop_mod):
        monkeypatch.setattr(mod, "RunConfig", cls)
    seen = []

    class Spy(loop_mod.Stepper):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            seen.append(self.cfg)

    monkeypatch.setattr(loop_mod, "Stepper", Spy)
    return cls, seen


def test_a_new_setting_reaches_the_loop_from_cli_config_file_and_api(extended, tmp_path):
    cls, seen = extended
    assert "probe_knob" in [f.name for f in cli_fields("unlearn")]
    # the command line
    argv = ["unlearn", *SMALL, "--steps", "1", "--probe-knob", "7", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    assert seen[-1].probe_knob == 7 and isinstance(seen[-1], cls)
    saved = json.loads((tmp_path / "a" / "unlearn.json").read_text())["config"]
    assert saved["probe_knob"] == 7  # saved with the run
    # a config file (and a bad value in it named)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("probe_knob: 8\nsteps: 1\n")
    assert main(["unlearn", *SMALL, "--config", str(cfg), "--out", str(tmp_path / "b")]) == 0
    assert seen[-1].probe_knob == 8 and seen[-1].max_steps == 1
    # the API: a recipe, then dataclasses.replace
    base = presets_mod.resolve("mmunlearn", "ga", "synthetic")
    assert isinstance(base, cls) and base.probe_knob == 3
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    cfg = replace(base, probe_knob=9, progress=False)
    loop_mod.unlearn(tiny_llama(0), "ga", [batch], config=cfg)
    assert seen[-1].probe_knob == 9


def test_recipes_are_functions_returning_one_run_config():
    off = official("mmunlearner", "mllmu")
    assert isinstance(off, RunConfig) and off.recipe == "official"
    assert resolve("official", "mmunlearner", "mllmu") == off
    assert resolve("mmunlearn", "ga", lr=3e-4) == replace(RunConfig(), lr=3e-4)
    d = differences("mmunlearner")
    assert d["mask_mode"] == ("masked_step", "zero_grad") and "recipe" not in d
    with pytest.raises(ValueError, match="unknown recipe setting 'lrr'"):
        resolve("mmunlearn", "ga", lrr=1.0)


def test_run_config_checks_every_value_and_round_trips():
    with pytest.raises(ValueError, match="lr must be a positive"):
        RunConfig(lr=0.0)
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        RunConfig(mask_mode="zero")
    with pytest.raises(ValueError, match="retain_max_grad_norm"):
        RunConfig(retain_max_grad_norm="twice")
    with pytest.raises(ValueError, match="grad_accum must be an integer"):
        RunConfig(grad_accum=0)
    c = RunConfig(lr=2e-5, betas=(0.8, 0.9), state_dtype="bf16")
    assert RunConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="unknown run setting 'nope'"):
        RunConfig.from_dict({"nope": 1})
    ident = c.identity()
    assert "lr" in ident and "log_every" not in ident and "backend" not in ident
    assert {f.name for f in fields(RunConfig)} >= set(ident)


def test_a_bad_run_option_is_one_line_naming_the_flag(tmp_path, capsys):
    rc = main(["unlearn", *SMALL, "--grad-accum", "0", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("mmunlearn unlearn: error: ")
    assert "--grad-accum" in err[0] and "grad_accum must be an integer ≥ 1" in err[0]
    assert not (tmp_path / "x").exists()


def test_compact_state_is_refused_where_a_step_is_unmasked():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="compact_state .* ga takes unmasked steps"):
        loop_mod.unlearn(model, "ga", [{}], config=RunConfig(compact_state=True, progress=False))


def test_the_cli_checkpoints_through_one_object_per_run(tmp_path, monkeypatch):
    made, saves = [], []

    class Spy(loop_mod.Checkpoints):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

        def save(self, *a, **kw):
            saves.append(a[2])
            return super().save(*a, **kw)

    monkeypatch.setattr(loop_mod, "Checkpoints", Spy)
    argv = ["unlearn", *SMALL, "--steps", "2", "--checkpoint-every", "1"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 0
    assert len(made) == 1 and not made[0].sharded and saves == [1, 2]  # the final one once
    assert (tmp_path / "r" / "run" / "checkpoint" / "state.json").exists()
