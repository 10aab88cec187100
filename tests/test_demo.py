"""The LLaVA demo end to end in a fast configuration: every file and key is written."""

from __future__ import annotations

import json

import torch

from mmunlearn.demo import run_demo
from mmunlearn.methods import PAPER_METHODS as METHODS
from mmunlearn.models import load_model
from mmunlearn.saliency import SaliencyMask
from mmunlearn.tinyrun import TinyRunConfig


def test_fast_demo_writes_everything(tmp_path, monkeypatch):
    cfg = TinyRunConfig(
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


def test_fast_linked_demo(tmp_path, monkeypatch):
    """The linked world's demo in the smoke configuration: every method run towards matched
    forgetting, the reference trained without the forget pictures, every file and key; with
    the gates enforced a failing vanilla model stops the run as "not testable"."""
    import mmunlearn.train as train_mod
    from mmunlearn.cli.demo import FAST
    from mmunlearn.demo_linked import run_linked_demo

    seen = []  # (stage, pools) of every stage trained
    real = train_mod.finetune_stages
    monkeypatch.setattr(
        train_mod,
        "finetune_stages",
        lambda m, a, stages, *r, **k: seen.append(stages) or real(m, a, stages, *r, **k),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_linked_demo(str(tmp_path), TinyRunConfig(**FAST, progress=False))
    finally:
        torch.set_num_threads(threads)
    # text once (shared), identity + grounding for the vanilla model, the same for the reference
    names = [[n for n, _ in stages] for stages in seen]
    assert names == [["text"], ["identity", "grounding"], ["identity", "grounding"]]
    ref_items = [s for _, pools in seen[2] for items, _ in pools for s in items]
    assert ref_items and not any(
        s.image is not None and s.meta["split"] == "forget" for s in ref_items
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["world"] == "linked" and data["testable"] is True
    assert not data["gates"]["passed"]  # a smoke run: reported, not enforced
    assert data["methods"].keys() == {"vanilla", *METHODS, "reference"} == res["methods"].keys()
    assert data["matched"].keys() == set(METHODS)
    for name, run in data["matched"].items():
        assert 1 <= run["forget_steps"] <= FAST["max_unlearn_steps"] and "within" in run, name
    for name, acc in data["methods"].items():
        for split in ("forget", "retain"):
            assert {"name_pic", "facts_pic", "link_pic", "facts_name", "swap"} <= acc[split].keys()
        g = data["gap"][name]
        assert g["lo"] <= g["avg_gap"] <= g["hi"] or g["lo"] == g["hi"]
    assert data["gap"]["reference"]["avg_gap"] == 0.0
    report = (tmp_path / "report.md").read_text()
    assert (
        "Gates (vanilla model" in report
        and "not enforced" in report
        and "| mmunlearner |" in report
    )
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "mask_both.safetensors").exists() and (
        tmp_path / "reference" / "config.json"
    ).exists()
    # enforced: the same smoke model fails the gates, nothing is unlearned
    cfg = TinyRunConfig(
        **{**FAST, "enforce_gates": True}, progress=False, save_models=False, threads=1
    )
    res = run_linked_demo(str(tmp_path / "gated"), cfg)
    assert res["testable"] is False and res["methods"].keys() == {"vanilla", "reference"}
    assert "not testable" in (tmp_path / "gated" / "report.md").read_text()


def test_demo_cli_world_choice(tmp_path):
    """`mmunlearn demo --fast --world linked` runs the linked world (--fast alone: the basic
    one, whose plumbing fits in seconds); the linked world refuses --no-reference."""
    from mmunlearn.cli import main

    threads = torch.get_num_threads()
    try:
        assert (
            main(["demo", "--fast", "--world", "linked", "--threads", "1", "--out", str(tmp_path)])
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["world"] == "linked" and "mmunlearner" in data["matched"]
    rc = main(["demo", "--world", "linked", "--no-reference", "--out", str(tmp_path / "x")])
    assert rc == 2 and not (tmp_path / "x").exists()


def test_demo_with_bf16_optimizer_state(tmp_path):
    """`mmunlearn demo --state-dtype bf16` unlearns with bf16 moments (stochastic rounding); the
    run config saved in results.json says so."""
    from mmunlearn.cli import main

    threads = torch.get_num_threads()
    try:
        argv = ["demo", "--fast", "--state-dtype", "bf16", "--threads", "1"]
        assert main([*argv, "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["unlearn"]["state_dtype"] == "bf16"
    assert {"ga", "mmunlearner"} <= set(data["methods"])


def test_demo_methods_option_adds_the_newer_methods(tmp_path, capsys):
    """`mmunlearn demo --methods all`: every method mmunlearn has, in both worlds (SMFA at
    matched forgetting by rerunning its whole run at growing budgets); without the option the
    paper's five (the other tests); bad lists are one line, exit 2."""
    from mmunlearn.cli import main
    from mmunlearn.methods import METHODS as ALL

    threads = torch.get_num_threads()
    try:
        argv = ["demo", "--fast", "--world", "linked", "--threads", "1", "--methods", "all"]
        assert main([*argv, "--out", str(tmp_path / "linked")]) == 0
        argv = ["demo", "--fast", "--threads", "1", "--methods", "rmu,smfa,mip_editor,manu"]
        assert main([*argv, "--out", str(tmp_path / "basic")]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "linked" / "results.json").read_text())
    assert list(data["matched"]) == list(ALL) and set(ALL) <= set(data["methods"])
    assert data["config"]["methods"] == list(ALL)
    for name, run in data["matched"].items():
        assert 0 <= run["forget_steps"] <= 3, (name, run)
    assert data["matched"]["manu"]["forget_steps"] == 0  # one edit, no step
    assert data["matched"]["smfa"]["forget_steps"] >= 1
    report = (tmp_path / "linked" / "report.md").read_text()
    assert "| smfa |" in report and "| mip_editor |" in report
    basic = json.loads((tmp_path / "basic" / "results.json").read_text())
    assert {"rmu", "smfa", "mip_editor", "manu"} <= set(basic["methods"])
    for bad, word in (("ga,nope", "'nope'"), ("ga,ga", "twice"), (" , ", "at least one")):
        capsys.readouterr()
        assert main(["demo", "--fast", "--methods", bad, "--out", str(tmp_path / "x")]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
        assert len(err) == 1 and word in err[0] and "--methods" in err[0], err
    assert not (tmp_path / "x").exists()
