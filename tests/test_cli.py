"""The command line and the kernel demo run end to end."""

from __future__ import annotations

import json

import pytest

from mmunlearn.cli import build_parser, main


def test_demo_writes_results_and_forgets(tmp_path):
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
