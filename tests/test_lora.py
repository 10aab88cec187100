"""``--lora`` for the baselines (PEFT): a LoRA GA_Diff run through the CLI on a real-format
LLaVA checkpoint, saved merged and as an adapter, both evaluated by ``mmunlearn eval``. Only
the adapter trains (the base weights in the run's checkpoint are bit-identical to the start),
and the merged folder is the base plus ``α/r · B·A`` computed here from that checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from realformat import llava_checkpoint, mllmu_root
from safetensors.torch import load_file

from mmunlearn.cli import main

pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # restored by conftest


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {"llava": llava_checkpoint(root / "llava"), "mllmu": mllmu_root(root / "MLLMU")}


def _state(folder):
    from mmunlearn.models import load_checkpoint

    model, _ = load_checkpoint(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lora_ga_diff_merged_and_adapter_both_evaluate(files, tmp_path):
    base = ["--model", str(files["llava"]), "--mllmu", str(files["mllmu"])]
    run = [*base, "--method", "ga_diff", "--lora", "--lr", "1e-2", "--steps", "3"]
    assert main(["unlearn", *run, "--out", str(tmp_path / "m")]) == 0
    assert main(["unlearn", *run, "--lora-save", "adapter", "--out", str(tmp_path / "a")]) == 0

    start = _state(files["llava"])
    # the run's last checkpoint holds the PEFT model before merging
    ckpt = load_file(str(tmp_path / "m" / "run" / "checkpoint" / "model.safetensors"))
    lora, kept = {}, 0
    for k, v in ckpt.items():
        name = k.removeprefix("base_model.model.")
        if ".lora_" in name:
            lora[name] = v
            continue
        name = name.replace(".base_layer.", ".")
        assert torch.equal(v, start[name]), name  # base weights bit-identical
        kept += 1
    assert kept == len(start) and lora
    b_moved = [k for k, v in lora.items() if ".lora_B." in k and v.abs().sum() > 0]
    assert b_moved  # B starts at zero: only training moves it

    merged = _state(tmp_path / "m" / "model")
    cfg = json.loads((tmp_path / "m" / "unlearn.json").read_text())["config"]
    assert (cfg["lora"], cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (
        True,
        16,
        16.0,
        0.05,
    )  # fmt: skip  (MLLMU-Bench's values)
    targets = {k.split(".lora_A.")[0] for k in lora if ".lora_A." in k}
    for name, w in start.items():
        mod = name.removesuffix(".weight")
        if name.endswith(".weight") and mod in targets:
            a = lora[f"{mod}.lora_A.default.weight"].double()
            b = lora[f"{mod}.lora_B.default.weight"].double()
            want = (w.double() + (16.0 / 16) * b @ a).to(w.dtype)
            torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(merged[name], w), name
    # the vision tower's q_proj is wrapped too (PEFT's suffix match of MLLMU-Bench's names),
    # the projector and lm_head are not
    assert any("vision_tower" in t and t.endswith("q_proj") for t in targets)
    assert not any("multi_modal_projector" in t or t.endswith("lm_head") for t in targets)

    adapter = tmp_path / "a" / "model"
    assert (adapter / "adapter_config.json").is_file()
    assert not (adapter / "model.safetensors").exists()
    from_adapter = _state(adapter)  # base + adapter, merged on load
    for k, v in merged.items():
        torch.testing.assert_close(from_adapter[k], v, rtol=1e-5, atol=1e-6)

    ev = tmp_path / "ev"
    argv = ["eval", "--model", str(files["llava"]), "--model", str(tmp_path / "m" / "model")]
    argv += ["--model", str(adapter), "--mllmu", str(files["mllmu"]), "--max-new-tokens", "4"]
    assert main([*argv, "--out", str(ev)]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert len(res["methods"]) == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "mmunlearner"], "mask selects base weights"),
        (["--method", "ga", "--lora-r", "0"], "lora_r must be an integer"),
        (["--method", "ga", "--lora-dropout", "1"], "lora_dropout must be in [0, 1)"),
    ],
)
def test_lora_refusals_are_one_line(tmp_path, capsys, extra, message):
    argv = ["unlearn", "--tiny", "--synthetic", "--lora", *extra, "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_adapter_save_of_the_tiny_model_is_refused(tmp_path, capsys):
    argv = ["unlearn", "--tiny", "--synthetic", "--lora", "--method", "ga"]
    assert main([*argv, "--lora-save", "adapter", "--out", str(tmp_path)]) == 2
    assert "no base folder" in capsys.readouterr().err
