"""The command line and the kernel demo run end to end."""

from __future__ import annotations

import json

import pytest
import torch

from mmunlearn.cli import build_parser, main


@pytest.mark.parametrize("threads", [1, 2])
def test_demo_writes_results_and_forgets(tmp_path, threads):
    torch.set_num_threads(threads)  # the outcome must not hang on rounding (restored by conftest)
    assert main(["demo", "--kernels", "--out", str(tmp_path)]) == 0
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
    assert "demo" in out and "bench" in out


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
    assert (
        main(
            [
                "unlearn",
                *small,
                "--config",
                str(cfg),
                "--method",
                "mmunlearner",
                "--mask",
                str(mask_file),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    model, _ = load_model(str(out / "model"))
    SaliencyMask.load(str(out / "mask.safetensors"), model=model)
    state = json.loads((out / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["config"]["lr"] == 0.5  # 2 forget + 2 retain steps


def test_bad_config_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SystemExit, match="bad.yaml"):
        main(["unlearn", "--tiny", "--synthetic", "--config", str(bad)])
