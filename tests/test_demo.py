"""The LLaVA demo end to end in a fast configuration: every file and key is written."""

from __future__ import annotations

import json

import torch

from mmunlearn.demo import DemoConfig, run_demo
from mmunlearn.methods import METHODS
from mmunlearn.models import load_model
from mmunlearn.saliency import SaliencyMask


def test_fast_demo_writes_everything(tmp_path, monkeypatch):
    cfg = DemoConfig(
        n_people=6,
        forget_ratio=0.34,
        vanilla_steps=20,
        unlearn_steps=3,
        batch_size=8,
        hidden=32,
        vision_hidden=32,
        progress=False,
    )
    import mmunlearn.demo as demo_mod

    seen = []  # training items of each fine-tune: vanilla, then the reference
    real = demo_mod.finetune
    monkeypatch.setattr(
        demo_mod,
        "finetune",
        lambda m, a, samples, *r, **k: seen.append(samples) or real(m, a, samples, *r, **k),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_demo(str(tmp_path), cfg)
        assert torch.get_num_threads() == 1  # pinned for the run (2), restored after
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "results.json").read_text())
    # the reference saw everything the vanilla model saw but the forget people's pictures
    from mmunlearn.data.synthetic import make_benchmark

    bench = make_benchmark(n_people=6, forget_ratio=0.34, seed=0)
    assert len(seen) == 2 and len(seen[0]) == len(bench.train)
    assert len(seen[1]) == len(bench.train) - len(bench.forget_vqa)
    assert not any(s.image is not None and s.meta["split"] == "forget" for s in seen[1])
    assert data["methods"].keys() == {"vanilla", *METHODS, "reference"} == res["methods"].keys()
    assert data["environment"]["threads"] == 2 and data["environment"]["world_size"] == 1
    assert data["environment"]["cpu"] and data["environment"]["cpu_capability"]
    for name, sets in data["methods"].items():
        for set_name in ("forget", "forget_test", "retain", "retain_test"):
            assert "vqa_mcq_acc" in sets[set_name], (name, set_name)
        assert "qa_mcq_acc" in sets["forget"] and "qa_mcq_acc" in sets["retain"]
        for g in ("forget", "retain"):  # cloze and generation (ROUGE / BLEU) per modality
            for k in ("vqa_cloze_acc", "qa_cloze_acc", "vqa_rougeL", "qa_rougeL", "qa_bleu"):
                assert 0.0 <= sets[g][k] <= 1.0, (name, g, k)
    assert set(data["mask_coverage"]) == {"vision", "language", "both"}
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# ") and "Mask coverage (γ = 1):" in report
    assert "| reference |" in report and "Environment:" in report and "cpu_capability" in report
    assert "## Cloze and generation" in report and "Forget VQA ROUGE-L" in report
    assert "## Every metric" in report
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("vanilla", "reference", *METHODS):
        assert (tmp_path / name / "config.json").exists(), name
    model, tok = load_model(str(tmp_path / "mmunlearner"))
    mask = SaliencyMask.load(str(tmp_path / "mask_both.safetensors"), model=model)
    assert mask.coverage()["total"]["selected"] > 0
