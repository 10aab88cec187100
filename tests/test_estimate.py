"""The memory estimate: parameter count from a config on the meta device, and its arithmetic."""

from __future__ import annotations

import json

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mmunlearn.cli import main
from mmunlearn.estimate import count_parameters, estimate


def _cfg():
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
        image_token_index=3,
    )


def test_parameter_count_matches_the_real_model():
    cfg = _cfg()
    total, block = count_parameters(cfg)
    assert total == sum(p.numel() for p in LlavaForConditionalGeneration(cfg).parameters())
    assert 0 < block < total


def test_sharded_terms_scale_with_world_size():
    cfg = _cfg()
    one = {e.phase: e for e in estimate(cfg, 1)}
    two = {e.phase: e for e in estimate(cfg, 2)}
    P, _ = count_parameters(cfg)
    assert one["unlearning"].terms["AdamW moments (fp32)"] == 8 * P
    assert two["unlearning"].terms["AdamW moments (fp32)"] == 4 * P
    assert two["saliency"].terms["fisher accumulators (2 × fp32)"] == 4 * P
    ref = {e.phase: e for e in estimate(cfg, 1, method="npo")}
    assert ref["unlearning"].total > one["unlearning"].total
    ck = {e.phase: e for e in estimate(cfg, 1, seq=512, grad_checkpointing=True)}
    no = {e.phase: e for e in estimate(cfg, 1, seq=512)}
    assert ck["saliency"].terms["activations"] < no["saliency"].terms["activations"]


def test_cli_estimate_from_config_json(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_cfg().to_dict()))
    assert main(["estimate", "--model", str(path), "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "AdamW moments" in out and "peak (sum)" in out
