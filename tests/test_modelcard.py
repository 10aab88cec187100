"""The model card written into every unlearned model folder: Hub metadata that parses, the
provenance (method, mask hash and coverage, run config, data), and the eval table that
``mmunlearn eval`` puts there — replaced on a second evaluation, never duplicated."""

from __future__ import annotations

import hashlib

from huggingface_hub import ModelCard

from mmunlearn.cli import main
from mmunlearn.modelcard import EVAL_START, add_eval

SMALL = ["--tiny", "--synthetic", "--people", "6", "--vanilla-steps", "3"]


def test_unlearn_writes_a_card_and_eval_fills_it_once(tmp_path):
    out = tmp_path / "u"
    argv = ["unlearn", *SMALL, "--method", "ga", "--steps", "2", "--lr", "1e-3"]
    assert main([*argv, "--out", str(out)]) == 0
    card_path = out / "model" / "README.md"
    card = ModelCard.load(card_path)
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert {"mmunlearn", "machine-unlearning", "ga"} <= set(meta["tags"])
    text = card_path.read_text()
    assert "## Saliency mask" not in text  # GA has none
    assert '"lr": 0.001' in text and "forget fingerprint" in text and "Not evaluated yet" in text

    ev = ["eval", "--model", str(out / "model"), *SMALL[1:4], "--no-generation", "--no-letter-mcq"]
    for k in range(2):
        assert main([*ev, "--seed", str(k), "--out", str(tmp_path / f"ev{k}")]) == 0
    text = card_path.read_text()
    assert text.count(EVAL_START) == 1 and "Not evaluated yet" not in text
    assert "seed 1" in text and "seed 0" not in text  # the second evaluation replaced the first
    assert ModelCard.load(card_path).data.to_dict()["base_model"] == meta["base_model"]


def test_add_eval_leaves_foreign_readmes_alone(tmp_path):
    (tmp_path / "README.md").write_text("# someone else's card\n")
    assert add_eval(str(tmp_path), "| a |") is False
    assert (tmp_path / "README.md").read_text() == "# someone else's card\n"
    assert add_eval(str(tmp_path / "none"), "| a |") is False


def test_the_card_names_the_mask_file_rule_and_coverage(tmp_path):
    import torch

    from mmunlearn.config import RunConfig
    from mmunlearn.modelcard import write_card
    from mmunlearn.saliency import mask_from_dense

    dense = {"a.weight": torch.tensor([1, 0, 1, 1]), "b.weight": torch.tensor([0, 0, 1, 0])}
    mask = mask_from_dense(dense, {"rule": "gamma", "gamma": 1.0},
                           groups={"vision": ["a.weight"], "language": ["b.weight"]})  # fmt: skip
    mask.save(str(tmp_path / "mask.safetensors"))
    write_card(str(tmp_path), base_model="org/base", method="mmunlearner", steps=3,
               config=RunConfig().to_dict(), data={"forget": 2}, mask=mask,
               mask_file=str(tmp_path / "mask.safetensors"))  # fmt: skip
    text = (tmp_path / "README.md").read_text()
    sha = hashlib.sha256((tmp_path / "mask.safetensors").read_bytes()).hexdigest()
    assert f"sha256 `{sha}`" in text and '"gamma"' in text
    assert "| vision | 3 | 4 | 75.00 % |" in text and "| language | 1 | 4 | 25.00 % |" in text
    assert ModelCard.load(tmp_path / "README.md").data.to_dict()["base_model"] == "org/base"
