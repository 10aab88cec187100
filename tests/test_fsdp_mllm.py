"""FSDP2 on the tiny LLaVA, 2 gloo ranks vs 1 process, same global batches (issue 8):

* Fisher (sharded accumulation, gathered per tensor) allclose; mask bits equal; the top-k
  threshold bit-identical; the mask files written by rank 0 byte-identical to 1-process files;
* a mask made in 1 process loads on 2 ranks and drives an MMUnlearner run whose weights end
  within tolerance of the 1-process run, with masked-out weights bit-identical across every
  forget step on every rank;
* a run interrupted after a sharded (DCP) checkpoint resumes to the same final weights;
* a mask made on 2 ranks loads in 1 process and drives the same masked step.
"""

from __future__ import annotations

import functools
import random

import torch

from conftest import needs_cpu_fsdp
from helpers import assert_close_verbose, run_ranks

pytestmark = needs_cpu_fsdp

GAMMA = 1.0
FRACTION = 0.05
STEPS = 3  # forget batches; MMUnlearner interleaves as many retain steps


def _setup():
    from mmunlearn.data.batching import make_batches
    from mmunlearn.data.synthetic import make_benchmark
    from mmunlearn.models import adapter_for, build_tokenizer, tiny_llava

    bench = make_benchmark(n_people=4, forget_ratio=0.25, seed=0, n_train_images=2, n_test_images=1)
    tok = build_tokenizer([s.question + " " + s.answer for s in bench.train])
    model = tiny_llava(tok, seed=0, hidden=32, intermediate=64, vision_hidden=16).train()
    adapter = adapter_for(model, tok)
    rng = random.Random(0)
    b = lambda xs, n: make_batches(adapter, xs, 5, rng, n)  # noqa: E731  (5 rows: ranks get 3 + 2)
    data = {
        "forget": b(bench.forget_vqa, 2),
        "vision": b(bench.retain_vqa, 2),
        # + two short batches every rank takes whole (shard_batch's "replicate"): one image row
        # among text rows, and a single text row
        "language": b(bench.forget_text + bench.retain_vqa, 2)
        + [adapter.collate(bench.retain_vqa[:1] + bench.forget_text[:4])]
        + [adapter.collate(bench.forget_text[:1])],
        "unlearn_forget": b(bench.forget_vqa, STEPS),
        "unlearn_retain": b(bench.retain_vqa + bench.retain_text, STEPS),
    }
    return model, adapter, data


def _masks(model, data, fisher_dir=None, fraction=None):
    from mmunlearn.masks import build_masks

    return build_masks(
        model,
        data["forget"],
        data["vision"],
        data["language"],
        gamma=GAMMA,
        fraction=fraction,
        progress=False,
        fisher_dir=fisher_dir,
        backend="torch",
    )


def _cfg(**kw):
    from mmunlearn.config import RunConfig

    return RunConfig(lr=1e-3, forget_freq=1, progress=False, backend="torch", **kw)


def _local_masks(opt, model):
    """{name: (local param tensor, local bool mask)} of every masked parameter."""
    from mmunlearn.params import canonical_parameters

    out = {}
    for name, p in canonical_parameters(model).items():
        m = opt.state.get(p, {}).get("mask")
        if m is not None:
            local = p.to_local() if hasattr(p, "to_local") else p
            out[name] = (local, opt.get_mask(p, dense=True))
    return out


def _worker(rank, world, out, tmp):
    from mmunlearn import fsdp
    from mmunlearn.distributed import is_sharded
    from mmunlearn.loop import unlearn
    from mmunlearn.params import canonical_parameters
    from mmunlearn.saliency import SaliencyMask

    def sharded():
        model, adapter, data = _setup()
        fsdp.shard_model(model, adapter.block_classes())
        return model, data

    # --- saliency on 2 ranks: files written by rank 0, full-shape masks on every rank
    model, data = sharded()
    assert is_sharded(model)
    masks = _masks(model, data, fisher_dir=f"{tmp}/fisher2")  # every rank: collective
    topk = _masks(model, data, fraction=FRACTION)
    if rank == 0:
        masks["both"].save(f"{tmp}/mask2.safetensors")
        topk["both"].save(f"{tmp}/topk2.safetensors")
        out["thresholds"] = {k: topk[k].meta["threshold"] for k in ("vision", "language")}

    # --- MMUnlearner with the 1-process mask; masked-out weights frozen in forget steps
    mask1 = SaliencyMask.load(f"{tmp}/mask1.safetensors", model=model)
    model, data = sharded()
    holder = {}
    snap = {}
    violations = [0]

    def check(step, kind, loss):
        opt = holder["opt"]
        loc = _local_masks(opt, model)
        if kind == "forget":
            for n, (p, m) in loc.items():
                violations[0] += int((p.detach()[~m] != snap[n][~m]).sum())
        for n, (p, _) in loc.items():
            snap[n] = p.detach().clone()

    import mmunlearn.loop as loop_mod

    orig = loop_mod.MaskedAdamW

    def capture(*a, **kw):
        holder["opt"] = orig(*a, **kw)
        return holder["opt"]

    loop_mod.MaskedAdamW = capture
    try:
        # snapshot the starting weights before the first step (masks are set after creation)
        for n, p in canonical_parameters(model).items():
            snap[n] = (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
        unlearn(
            model,
            "mmunlearner",
            data["unlearn_forget"],
            data["unlearn_retain"],
            masks=mask1.for_model(model),
            config=_cfg(),
            callback=check,
        )
    finally:
        loop_mod.MaskedAdamW = orig
    opt = holder["opt"]
    locs = [p.to_local() for p in model.parameters()]
    out[f"bytes{rank}"] = {
        "weights": sum(t.numel() * t.element_size() for t in locs),
        "moments": sum(
            st[k].numel() * 4
            for st in opt.state.values()
            for k in ("exp_avg", "exp_avg_sq")
            if k in st
        ),
        "mask": sum(st["mask"].numel() for st in opt.state.values() if "mask" in st),
    }
    full = fsdp.full_state_dict(model)
    out[f"violations{rank}"] = violations[0]
    if rank == 0:
        out["unlearned"] = full

    # --- interrupted after the checkpoint at step 2, then resumed from the DCP checkpoint
    class Kill(RuntimeError):
        pass

    def killer(step, kind, loss):
        if step == 2:
            raise Kill

    def run(**kw):
        model, data = sharded()  # a fresh process would rebuild the model the same way
        res = unlearn(
            model,
            "mmunlearner",
            data["unlearn_forget"],
            data["unlearn_retain"],
            masks=mask1.for_model(model),
            config=_cfg(checkpoint_every=2),
            output_dir=f"{tmp}/run",
            **kw,
        )
        return model, res

    try:
        run(callback=killer)
        raise AssertionError("the run was not interrupted")
    except Kill:
        pass
    model, res = run(resume=True)
    full = fsdp.full_state_dict(model)
    if rank == 0:
        out["resumed_from"] = res["resumed_from"]
        out["resumed"] = full


def test_two_ranks_match_one_process(tmp_path):
    from mmunlearn.fisher import load_fisher
    from mmunlearn.kernels import saliency_mask, saliency_threshold_topk
    from mmunlearn.loop import unlearn
    from mmunlearn.saliency import SaliencyMask

    tmp = str(tmp_path)
    model, adapter, data = _setup()
    masks = _masks(model, data, fisher_dir=f"{tmp}/fisher1")
    topk = _masks(model, data, fraction=FRACTION)
    masks["both"].save(f"{tmp}/mask1.safetensors")
    topk["both"].save(f"{tmp}/topk1.safetensors")
    ref_start = {n: p.detach().clone() for n, p in model.named_parameters()}
    unlearn(
        model,
        "mmunlearner",
        data["unlearn_forget"],
        data["unlearn_retain"],
        masks=masks["both"].for_model(model),
        config=_cfg(),
    )

    out = run_ranks(functools.partial(_worker, tmp=tmp))

    # Fisher: sharded accumulation, gathered per tensor by rank 0
    close = 0
    for name in ("forget", "vision_preserve", "language_preserve"):
        f1, _ = load_fisher(f"{tmp}/fisher1/{name}.safetensors")
        f2, _ = load_fisher(f"{tmp}/fisher2/{name}.safetensors")
        assert f1.keys() == f2.keys()
        for n in f1:
            # rtol 1e-5, plus a floor of a few fp32 ulps of the tensor's largest Fisher: the
            # gradient sums are rounded in another order (reduce-scatter, thread count), an
            # O(eps) error of the tensor's gradient scale, so an element far below the tensor's
            # largest (cancellation) carries up to ~eps * max F absolute error, not eps relative
            floor = 1e-12 + 4 * torch.finfo(torch.float32).eps * f1[n].abs().max().item()
            assert_close_verbose(f2[n], f1[n], rtol=1e-5, atol=floor, name=f"{name} {n}")
    # elements whose ratio lies within 1e-5 of gamma may flip; count them (expected 0)
    f1f, _ = load_fisher(f"{tmp}/fisher1/forget.safetensors")
    f1v, _ = load_fisher(f"{tmp}/fisher1/vision_preserve.safetensors")
    f1l, _ = load_fisher(f"{tmp}/fisher1/language_preserve.safetensors")
    for n, ff in f1f.items():
        fp = f1v.get(n, f1l.get(n))
        ratio = (ff + 1e-15) / (fp + 1e-15)
        close += int(((ratio - GAMMA).abs() <= 1e-5 * GAMMA).sum())
    m1 = SaliencyMask.load(f"{tmp}/mask1.safetensors")
    m2 = SaliencyMask.load(f"{tmp}/mask2.safetensors")
    if close == 0:
        assert m1 == m2
        with (
            open(f"{tmp}/mask1.safetensors", "rb") as a,
            open(f"{tmp}/mask2.safetensors", "rb") as b,
        ):
            assert a.read() == b.read(), "mask files differ byte for byte"
    else:  # pragma: no cover - depends on the draw; report how many
        diff = sum(int((m1.dense(n) != m2.dense(n)).sum()) for n in m1.names)
        assert diff <= close, (diff, close)
    # top-k: the threshold over all shards equals, bit for bit, the 1-process top-k over the
    # same Fishers (the 2-rank run's, gathered); against the 1-process run's own Fishers it
    # differs only by their rounding (gradients reduced in another order)
    f2f, _ = load_fisher(f"{tmp}/fisher2/forget.safetensors")
    topk2 = SaliencyMask.load(f"{tmp}/topk2.safetensors")
    for k, pres in (("vision", "vision_preserve"), ("language", "language_preserve")):
        f2p, _ = load_fisher(f"{tmp}/fisher2/{pres}.safetensors")
        names = list(f2p)
        t = saliency_threshold_topk(
            [f2f[n] for n in names], [f2p[n] for n in names], FRACTION, backend="torch"
        )
        assert out["thresholds"][k] == t, k
        rel = abs(out["thresholds"][k] - topk[k].meta["threshold"]) / topk[k].meta["threshold"]
        assert rel < 1e-5, (k, rel)
        for n in names:
            bits = saliency_mask([f2f[n]], [f2p[n]], t, backend="torch")[0][0]
            assert torch.equal(bits, topk2.packed(n).cpu()), n

    # MMUnlearner on 2 ranks (mask made in 1 process) ends where the 1-process run ends
    assert out["violations0"] == 0 and out["violations1"] == 0
    got = out["unlearned"]
    for n, p in model.state_dict().items():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-4, atol=2e-5, msg=n)
    moved = sum(int((model.state_dict()[n] != ref_start[n]).sum()) for n in ref_start)
    assert moved > 0

    # the memory estimate's sharded terms against the bytes each rank really holds (fp32
    # model; the mask covers the masked groups only, the moments the parameters with a grad)
    from mmunlearn.estimate import estimate

    terms = estimate(model.config, 2, "fp32", method="mmunlearner")[1].terms
    for r in (0, 1):
        got_b = out[f"bytes{r}"]
        assert abs(got_b["weights"] - terms["weights (sharded)"]) <= 0.02 * got_b["weights"], r
        assert (
            0.9 * terms["AdamW moments (fp32)"]
            <= got_b["moments"]
            <= terms["AdamW moments (fp32)"] * 1.02
        ), (r, got_b, terms)
        assert got_b["mask"] <= terms["mask (1 bit)"] * 1.05 + 64, (r, got_b, terms)

    # the interrupted + resumed run ends exactly where the uninterrupted 2-rank run ends
    assert out["resumed_from"] == 2
    for n, t in out["unlearned"].items():
        assert torch.equal(out["resumed"][n], t), (n, (out["resumed"][n] - t).abs().max())

    # a mask made on 2 ranks loads in 1 process and drives the same masked step (SGD: the
    # update is the masked gradient itself; k_proj biases have ~0 gradient, so an Adam step
    # would normalise rounding noise)
    from mmunlearn.optim import MaskedSGD

    fresh, _, _ = _setup()
    m2 = SaliencyMask.load(f"{tmp}/mask2.safetensors", model=fresh)
    steps = {}
    for label, mask in (("1", m1), ("2", m2)):
        net, _, d = _setup()
        start = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt = MaskedSGD(net.parameters(), lr=1e-1, backend="torch")
        opt.set_masks(mask.for_model(net))
        net(**d["forget"][0]).loss.neg().backward()
        opt.step(masked=True)
        steps[label] = {n: p.detach().clone() for n, p in net.named_parameters()}
        checked = 0
        for n, p in net.named_parameters():
            if n in mask:
                moved = p.detach() != start[n]
                assert not (moved & ~mask.dense(n)).any(), n  # nothing outside the mask moved
                checked += int(moved.sum())
        assert checked > 0
    for n in steps["1"]:
        torch.testing.assert_close(steps["2"][n], steps["1"][n], rtol=1e-6, atol=1e-9, msg=n)
