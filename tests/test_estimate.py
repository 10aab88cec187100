"""The memory estimate: parameter count from a config on the meta device, and its arithmetic;
its activation terms against the bytes really allocated by a forward + backward on CPU.

Measured: every CPU allocation and free of one training step (forward, HF loss, backward), as
the profiler records them (``profile_memory=True``), summed in time order from zero at the
start of forward: ``held`` = the bytes alive when the forward returns (what autograd saved,
the logits and the loss side), ``peak`` = the most alive at once during the whole step.
Parameter gradients are dropped as soon as they are accumulated (they are the estimate's
"grads" term, not activations), so only the one being produced is ever alive.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from realformat import TRANSFORMERS_4
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mmunlearn.cli import main
from mmunlearn.estimate import activation_held, activation_terms, count_parameters, estimate

SEED = int(os.environ.get("MMU_TEST_SEED", "1234"))
TOL = 0.15  # the bar; the achieved error is a few percent (printed with -s, docs/estimate.md)


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


def _acts(e):
    return sum(v for k, v in e.terms.items() if k.startswith(("activations", "logits", "backw")))


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
    # activations are per rank (per-rank batch), not sharded
    assert _acts(one["saliency"]) == _acts(two["saliency"]) > 0
    ck = {e.phase: e for e in estimate(cfg, 1, seq=512, grad_checkpointing=True)}
    no = {e.phase: e for e in estimate(cfg, 1, seq=512)}
    assert _acts(ck["saliency"]) < _acts(no["saliency"])
    eager = {e.phase: e for e in estimate(cfg, 1, seq=512, attn="eager")}
    assert _acts(eager["saliency"]) > _acts(no["saliency"])  # the s² softmax term


def test_cli_estimate_from_config_json(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_cfg().to_dict()))
    assert main(["estimate", "--model", str(path), "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "AdamW moments" in out and "peak (sum)" in out and "vision tower" in out
    assert main(["estimate", "--model", str(path), "--attn", "eager", "--images", "2"]) == 0
    assert "eager" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Activations: estimate against measured bytes
# --------------------------------------------------------------------------------------------


def measure_step(model, inputs) -> dict:
    """``held`` / ``peak`` bytes allocated by one training step (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    model.train()
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        for p in model.parameters()
    ]
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = model(**inputs, use_cache=False)
            loss = out.loss
            with record_function("mmu::backward_starts"):
                pass
            loss.backward()
            del out, loss
    finally:
        for hk in hooks:
            hk.remove()
    events = prof.profiler.kineto_results.events()
    mark = min(e.start_ns() for e in events if e.name() == "mmu::backward_starts")
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    assert mem, "the profiler recorded no allocation"
    cur = peak = 0
    held = None
    for t, nbytes in mem:
        if held is None and t >= mark:
            held = cur
        cur += nbytes
        peak = max(peak, cur)
    return {"held": held, "peak": peak, "end": cur}


def _llama_text(rng, layers):
    heads = rng.choice([2, 4])
    hd = rng.choice([8, 16])
    h = heads * hd
    return LlamaConfig(
        vocab_size=rng.randint(150, 400),
        hidden_size=h,
        intermediate_size=rng.randint(2 * h, 4 * h),  # real models: 2.7h (Llama) to 4h
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=rng.choice([h for h in (1, 2, heads) if heads % h == 0]),
        max_position_embeddings=512,
    )


def _case(kind: str, attn: str, rng):
    """(model, inputs, batch, seq, images per sample) of a random tiny config."""
    batch, seq = rng.randint(1, 3), rng.randint(128, 200)
    if kind == "llama":
        cfg = _llama_text(rng, rng.randint(1, 3))
        cfg._attn_implementation = attn
        model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq))
        return model, {"input_ids": ids, "labels": ids}, batch, seq
    patch = rng.choice([4, 8])
    vheads = rng.choice([1, 2])
    text = _llama_text(rng, rng.randint(1, 2))
    hv = vheads * rng.choice([8, 16, 24])
    vision = CLIPVisionConfig(
        hidden_size=hv,
        intermediate_size=rng.randint(2 * hv, 4 * hv),
        num_hidden_layers=rng.randint(1, 3),
        num_attention_heads=vheads,
        image_size=patch * rng.randint(3, 6),
        patch_size=patch,
    )
    strategy = rng.choice(["default", "full"])
    n_img = (vision.image_size // patch) ** 2 + (strategy == "full")
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=3,
        image_seq_length=n_img,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=rng.choice([-1, -2]),
    )
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg)
    ids = torch.randint(4, text.vocab_size, (batch, seq))
    ids[:, 1 : 1 + n_img] = 3
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size)
    return model, {"input_ids": ids, "pixel_values": pixels, "labels": ids}, batch, seq


CASES = [
    (kind, attn, dtype, ck)
    for kind in ("llama", "llava")
    for attn in ("sdpa", "eager")
    for dtype in ("fp32", "bf16")
    for ck in (False, True)
]


def _run_case(kind, attn, dtype, ck, seed):
    torch.set_num_threads(1)
    rng = random.Random(f"{seed}-{kind}-{attn}-{dtype}-{ck}")
    torch.manual_seed(seed)
    model, inputs, batch, seq = _case(kind, attn, rng)
    tdtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    model = model.to(tdtype)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(tdtype)
    if ck:
        model.gradient_checkpointing_enable()
    got = measure_step(model, inputs)
    terms = activation_terms(model.config, dtype, batch, seq, ck, attn)
    return got, {"held": activation_held(terms), "peak": sum(terms.values())}, terms


@pytest.mark.parametrize("kind,attn,dtype,ck", CASES)
def test_activation_estimate_matches_measured_bytes(kind, attn, dtype, ck):
    got, est, terms = _run_case(kind, attn, dtype, ck, SEED)
    assert got["end"] < 0.02 * got["peak"]  # the step frees what it allocated
    for k in ("held", "peak"):
        err = est[k] / got[k] - 1
        print(f"{kind} {attn} {dtype} ck={ck} {k}: est {est[k]} got {got[k]} ({err:+.1%})")
        low = -TOL
        if (kind, attn, dtype, ck, k) == ("llava", "sdpa", "bf16", True, "peak"):
            # known, unexplained miss (docs/estimate.md): for some random sizes (seeds 3, 7)
            # the loss-side peak held a second logits + log-softmax ((b + 4)·V per token),
            # −29 … −35 %, on one machine; −1 % on another (AMD EPYC); other seeds ±10 %
            low = -0.40
        if attn == "sdpa" and TRANSFORMERS_4:
            # torch 2.6 + transformers 4.56 (the declared minimums) hold 3 … 23 % more under
            # sdpa than the pinned versions the terms are fitted to (docs/install.md)
            low = -0.30
        assert low <= err <= TOL, (k, est, got, terms)


def test_textbook_formula_misses_what_the_estimate_gets():
    """The check has teeth: Korthikanti's 16-bit count (34·s·b·h + 5·a·s²·b per layer, fp32
    logits + grad) is far off on a SwiGLU / GQA / sdpa model where the estimate is not."""
    model_cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
    )
    model_cfg._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(model_cfg).to(torch.bfloat16)
    b, s = 1, 256
    ids = torch.randint(0, 300, (b, s))
    got = measure_step(model, {"input_ids": ids, "labels": ids})
    h, a, L, V = 64, 4, 2, 300
    textbook = L * s * b * h * (34 + 5 * a * s / h) + 2 * 4 * b * s * V
    terms = activation_terms(model_cfg, "bf16", b, s, False, "sdpa")
    assert abs(activation_held(terms) / got["held"] - 1) <= TOL
    print(f"textbook {textbook:.0f}, estimate {activation_held(terms)}, measured {got['held']}")
    assert abs(textbook / got["held"] - 1) > 2 * TOL


@pytest.mark.parametrize(
    "state_dtype, compact", [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]
)
def test_moment_bytes_match_a_real_optimizer(state_dtype, compact):
    """The estimate's moment term against the bytes MaskedAdamW really allocates on a LLaVA of
    the scaled config (fp32 / bf16 state, dense / compacted at the mask's fraction): within 1 %
    (the compacted state rounds its per-chunk offsets, a few bytes per tensor)."""
    from mmunlearn.optim import MaskedAdamW

    cfg = _cfg()
    model = LlavaForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(SEED)
    masks = {p: torch.rand(p.shape, generator=g) < 0.05 for p in model.parameters()}
    sd = torch.bfloat16 if state_dtype == "bf16" else torch.float32
    opt = MaskedAdamW(model.parameters(), lr=1e-3, state_dtype=sd, compact_state=compact)
    opt.set_masks(masks)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step(masked=True)
    measured = sum(
        t.numel() * t.element_size()
        for p in model.parameters()
        for k, t in opt.state_tensors(p).items()
        if k in ("exp_avg", "exp_avg_sq")
    )
    frac = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    est = {e.phase: e for e in estimate(cfg, 1, state_dtype=state_dtype,
                                        compact_fraction=frac if compact else None)}  # fmt: skip
    term = next(v for k, v in est["unlearning"].terms.items() if k.startswith("AdamW moments"))
    assert measured == pytest.approx(term, rel=0.01), (measured, term)


def test_grad_release_bytes_match_the_live_gradients_of_a_real_run():
    """With ``grad_release`` the estimate's gradient term is the largest tensor's bytes; on a
    LLaVA of the scaled config the most gradient bytes alive at any hook of a real backward
    with :class:`~mmunlearn.optim.GradRelease` equal it (fp32 here: b = 4), and the term is
    far below the all-gradients term it replaces."""
    from mmunlearn.optim import GradRelease, MaskedAdamW

    cfg = _cfg()
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(cfg)
    opt = MaskedAdamW(model.parameters(), lr=1e-3)
    rel = GradRelease(opt)
    peak = [0]
    orig = opt._release_step

    def spy(p, gi, pi, armed):
        live = sum(q.grad.numel() * q.grad.element_size() for q in model.parameters()
                   if q.grad is not None)  # fmt: skip
        peak[0] = max(peak[0], live)
        return orig(p, gi, pi, armed)

    opt._release_step = spy
    ids = torch.randint(0, cfg.text_config.vocab_size, (1, 16))
    ids[ids == cfg.image_token_index] = 1
    with rel.armed(masked=False):
        model(input_ids=ids, labels=ids).loss.backward()
    est = {e.phase: e for e in estimate(cfg, 1, dtype="fp32", grad_release=True)}
    full = {e.phase: e for e in estimate(cfg, 1, dtype="fp32")}
    term = est["unlearning"].terms["grads (one tensor at a time: step in backward)"]
    assert peak[0] == term
    assert term < full["unlearning"].terms["grads (sharded)"] / 5
    with pytest.raises(ValueError, match="one rank"):
        estimate(cfg, 2, grad_release=True)
