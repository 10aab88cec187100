"""The command line end to end: the demo, saliency → unlearn with a config file, help, errors;
and the kernel example (examples/masked_mlp.py)."""

from __future__ import annotations

import json

import pytest
import torch

from mmunlearn.cli import build_parser, main


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_example_forgets_the_class(tmp_path, threads):
    from examples.masked_mlp import main as example

    torch.set_num_threads(threads)  # the outcome must not hang on rounding (restored by conftest)
    assert example(["--out", str(tmp_path / "results.json")]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("mask_selected", "mask_total", "before", "after", "masked_out_untouched_by_ascent"):
        assert key in res
    assert 0 < res["mask_selected"] < res["mask_total"]
    assert res["masked_out_untouched_by_ascent"] is True
    assert res["before"]["forget"] > 0.9 and res["after"]["forget"] < 0.2
    assert res["after"]["retain"] > 0.9


def test_fast_llava_demo_from_the_cli(tmp_path):
    assert main(["demo", "--fast", "--out", str(tmp_path)]) == 0
    assert "mmunlearner" in json.loads((tmp_path / "results.json").read_text())["methods"]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "saliency", "unlearn", "eval", "estimate"):
        assert cmd in out


def test_saliency_then_unlearn_with_config_file(tmp_path):
    from mmunlearn.models import load_model
    from mmunlearn.saliency import SaliencyMask

    small = ["--tiny", "--synthetic", "--people", "6", "--vanilla-steps", "3"]
    assert main(["saliency", *small, "--out", str(tmp_path / "sal")]) == 0
    mask_file = tmp_path / "sal" / "mask_both.safetensors"
    assert mask_file.exists()
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"method": "ga", "steps": 2, "lr": 0.5}))
    # the file says ga, the flag says mmunlearner: the flag wins; steps come from the file
    out = tmp_path / "unl"
    argv = ["unlearn", *small, "--config", str(cfg), "--method", "mmunlearner"]
    assert main([*argv, "--mask", str(mask_file), "--out", str(out)]) == 0
    model, _ = load_model(str(out / "model"))
    SaliencyMask.load(str(out / "mask.safetensors"), model=model)
    state = json.loads((out / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["lr"] == 0.5  # --steps bounds the run


@pytest.mark.parametrize(
    "content, message",
    [
        ("- just\n- a list\n", "expected a mapping"),
        ("lrr: 0.1\n", "unknown option 'lrr'; did you mean 'lr'?"),
        ("lr: fast\n", "lr: 'fast' is not valid"),
        ("method: gd\n", "is not one of ga, ga_diff"),
        ("fisher_offload: 3\n", "is not true or false"),
    ],
)
def test_bad_config_file_is_one_line_naming_it(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    assert main(["unlearn", "--tiny", "--synthetic", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.yaml" in err and message in err, err
    assert "Traceback" not in err


def test_shipped_configs_are_valid_for_saliency_and_unlearn():
    """Every mmunlearn/configs/*/*.yaml reads cleanly (each key an option, each value of its
    type) for both commands that take it."""
    from pathlib import Path

    from mmunlearn.cli import _build
    from mmunlearn.cli.common import load_config

    _, commands = _build()
    files = sorted(Path(__file__).resolve().parents[1].glob("mmunlearn/configs/*/*.yaml"))
    assert len(files) >= 4
    for f in files:
        for cmd in ("saliency", "unlearn"):
            others = tuple(p for n, p in commands.items() if n != cmd)
            values = load_config(str(f), commands[cmd], others)
            assert values["recipe"] == "official" and values["split"] == 5, f
            assert ("mllmu" in values) != ("clear" in values), f
        assert load_config(str(f), commands["unlearn"])["lr"] == 1e-5


def test_builtin_configs_by_name(capsys):
    """``--config mllmu/llava-1.5-7b`` (no path, no suffix) finds the packaged config; an
    unknown name is one line listing the built-in ones; ``estimate --model`` takes the packaged
    7B model configs by name."""
    from mmunlearn.cli.common import builtin_configs, config_path

    names = builtin_configs()
    assert {"mllmu/llava-1.5-7b", "clear/qwen2-vl-7b", "models/llava-1.5-7b-hf"} <= set(names)
    assert config_path("mllmu/llava-1.5-7b").endswith("mllmu/llava-1.5-7b.yaml")
    assert config_path("configs/clear/qwen2-vl-7b.yaml").endswith("clear/qwen2-vl-7b.yaml")
    assert main(["unlearn", "--tiny", "--synthetic", "--config", "mllmu/llava-1.5-7b-typo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mllmu/llava-1.5-7b-typo" in err and "built-in:" in err
    rc = main(["estimate", "--config", "mllmu/llava-1.5-7b", "--model", "models/llava-1.5-7b-hf",
               "--gpu-memory", "80"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "unlearning:" in out and "fits in 80 GiB" in out
