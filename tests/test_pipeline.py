"""Saliency + MMUnlearner + every baseline for a few steps on synthetic data, for each model
family (tiny LLaVA and tiny Qwen2-VL), on CPU."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from mmunlearn.config import RunConfig
from mmunlearn.data.batching import make_batches
from mmunlearn.data.synthetic import make_benchmark
from mmunlearn.loop import unlearn
from mmunlearn.masks import build_masks
from mmunlearn.methods import METHODS
from mmunlearn.models import adapter_for, build_tokenizer, tiny_llava, tiny_qwen2vl

FAMILIES = {"llava": tiny_llava, "qwen2vl": tiny_qwen2vl}


@pytest.mark.parametrize("family", FAMILIES)
def test_saliency_and_every_method(family):
    bench = make_benchmark(n_people=4, forget_ratio=0.25, seed=0, n_train_images=2, n_test_images=1)
    tok = build_tokenizer([s.question + " " + s.answer for s in bench.train])
    model = FAMILIES[family](tok, seed=0)
    adapter = adapter_for(model, tok)
    rng = random.Random(0)
    b = lambda xs, n=None: make_batches(adapter, xs, 4, rng, n)  # noqa: E731
    masks = build_masks(
        model,
        b(bench.forget_vqa, 2),
        b(bench.retain_vqa, 2),
        b(bench.forget_text + bench.retain_vqa, 2),
        progress=False,
    )
    assert (
        masks["both"].coverage()["total"]["selected"]
        == masks["vision"].coverage()["total"]["selected"]
        + masks["language"].coverage()["total"]["selected"]
    )
    forget, retain = b(bench.forget_vqa, 2), b(bench.retain_vqa + bench.retain_text, 2)
    cfg = RunConfig(lr=1e-3, forget_freq=1, progress=False, rmu_layer=0, manu_layers=1)
    for name in METHODS:
        m = copy.deepcopy(model)
        start = {n: p.detach().clone() for n, p in m.named_parameters()}
        kw = {"masks": masks["both"].for_model(m)} if name == "mmunlearner" else {}
        res = unlearn(m, name, forget, retain, config=cfg, **kw)
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res["history"]), name
        moved = sum(int((p.detach() != start[n]).sum()) for n, p in m.named_parameters())
        assert moved > 0, name


def test_bf16_llava_mmunlearner_keeps_masked_out_weights():
    """A bf16 model end to end: finite losses, bf16 kept, masked-out weights bit-identical
    across every forget step (retain steps may move them)."""
    bench = make_benchmark(n_people=4, forget_ratio=0.25, seed=1, n_train_images=2, n_test_images=1)
    tok = build_tokenizer([s.question + " " + s.answer for s in bench.train])
    model = tiny_llava(tok, seed=0).to(torch.bfloat16)
    adapter = adapter_for(model, tok)
    rng = random.Random(0)

    def b(xs, n=None):
        out = make_batches(adapter, xs, 4, rng, n)
        for x in out:
            if "pixel_values" in x:
                x["pixel_values"] = x["pixel_values"].to(torch.bfloat16)
        return out

    masks = build_masks(
        model,
        b(bench.forget_vqa, 2),
        b(bench.retain_vqa, 2),
        b(bench.forget_text + bench.retain_vqa, 2),
        progress=False,
    )
    params = dict(model.named_parameters())
    keep = {n: ~masks["both"].dense(n) for n in params}
    snap = {n: p.detach().clone() for n, p in params.items()}
    seen = []

    def check(step, kind, loss):
        for n, p in params.items():
            if kind == "forget":
                assert torch.equal(
                    p.detach()[keep[n]].view(torch.int16), snap[n][keep[n]].view(torch.int16)
                ), n
            snap[n] = p.detach().clone()
        seen.append(kind)

    res = unlearn(
        model,
        "mmunlearner",
        b(bench.forget_vqa, 2),
        b(bench.retain_vqa, 2),
        masks=masks["both"].for_model(model),
        callback=check,
        config=RunConfig(lr=1e-2, forget_freq=1, progress=False),
    )
    assert seen.count("forget") == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res["history"])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
