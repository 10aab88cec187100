"""GradRelease (optimizer step in backward) against the ordinary ``backward(); step()``.

Oracle: the same optimizer stepped after a full backward. Without clipping an fp32-state step
must be bit-identical (the per-element arithmetic is the same kernel's); with clipping the
oracle clips each parameter's gradient by its own norm first. Odd sizes, fresh seeds."""

from __future__ import annotations

import pytest
import torch

from mmunlearn.optim import GradRelease, MaskedAdamW, MaskedSGD


def _model(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(
        torch.nn.Linear(13, 37), torch.nn.GELU(), torch.nn.Linear(37, 29), torch.nn.GELU(),
        torch.nn.Linear(29, 7),
    ).to(dtype)  # fmt: skip
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(dtype) * 0.3)
    return m


def _masks(model, seed, frac=0.3):
    g = torch.Generator().manual_seed(seed + 99)
    ps = list(model.parameters())
    # every other parameter masked; the rest follow the unmasked policy
    return {p: torch.rand(p.shape, generator=g) < frac for p in ps[::2]}


def _batches(seed, n):
    g = torch.Generator().manual_seed(seed + 7)
    return [(torch.randn(11, 13, generator=g), torch.randn(11, 7, generator=g)) for _ in range(n)]


def _loss(model, batch, sign):
    x, y = batch
    dtype = next(model.parameters()).dtype
    return sign * ((model(x.to(dtype)).float() - y) ** 2).mean()


def _pair(seed, opt_cls=MaskedAdamW, dtype=torch.float32, **kw):
    a, b = _model(seed, dtype), _model(seed, dtype)
    oa, ob = opt_cls(a.parameters(), lr=3e-3, **kw), opt_cls(b.parameters(), lr=3e-3, **kw)
    for model, opt in ((a, oa), (b, ob)):
        opt.set_masks(_masks(model, seed))
    return a, oa, b, ob


def _run_pair(a, oa, b, ob, batches, clip=None, flags=None, unmasked_every=3):
    rel = GradRelease(ob)
    for i, batch in enumerate(batches):
        masked = i % unmasked_every != 0
        sign = -1.0 if masked else 1.0
        flag = None if flags is None else flags[i]
        _loss(a, batch, sign).backward()
        if clip is not None:  # the oracle of per-parameter clipping
            for p in a.parameters():
                n = p.grad.float().pow(2).sum().sqrt()
                p.grad.mul_(torch.clamp(clip / (n + 1e-6), max=1.0).to(p.grad.dtype))
        oa.step(masked=masked, found_inf=flag)
        oa.zero_grad(set_to_none=True)
        with rel.armed(masked=masked, max_grad_norm=clip, found_inf=flag):
            _loss(b, batch, sign).backward()
        assert all(p.grad is None for p in b.parameters())
    rel.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("unmasked", ["freeze", "update"])
def test_fp32_state_without_clipping_is_bit_identical(seed, unmasked):
    a, oa, b, ob = _pair(seed, unmasked=unmasked)
    _run_pair(a, oa, b, ob, _batches(seed, 7))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa.state[pa][k], ob.state[pb][k])
        assert float(oa.state[pa]["step"]) == float(ob.state[pb]["step"])


def test_device_flag_path_is_bit_identical_and_a_set_flag_skips_everything():
    a, oa, b, ob = _pair(5)
    flags = [torch.tensor([v]) for v in (0.0, 0.0, 1.0, 0.0, 1.0, 0.0)]
    before = None
    _run_pair(a, oa, b, ob, _batches(5, 6), flags=flags)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
        assert torch.equal(oa.state[pa]["exp_avg_sq"], ob.state[pb]["exp_avg_sq"])
    # one more step with the flag set: nothing at all moves
    before = [(p.clone(), ob.state[p]["exp_avg"].clone(), float(ob.state[p]["step"]))
              for p in b.parameters()]  # fmt: skip
    rel = GradRelease(ob)
    with rel.armed(masked=False, found_inf=torch.tensor([1.0])):
        _loss(b, _batches(9, 1)[0], 1.0).backward()
    for p, (w, m, s) in zip(b.parameters(), before):
        assert torch.equal(p, w) and torch.equal(ob.state[p]["exp_avg"], m)
        assert float(ob.state[p]["step"]) == s


@pytest.mark.parametrize("seed", [3, 4])
def test_clipping_is_per_parameter(seed):
    a, oa, b, ob = _pair(seed, unmasked="update")
    _run_pair(a, oa, b, ob, _batches(seed, 5), clip=0.05)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert not torch.equal(next(b.parameters()), next(_model(seed).parameters()))


def test_at_most_one_parameter_gradient_is_alive():
    m = _model(11)
    opt = MaskedAdamW(m.parameters(), lr=1e-3)
    rel = GradRelease(opt)
    alive = []
    orig = opt._release_step

    def spy(p, gi, pi, armed):
        alive.append(sum(q.grad is not None for q in m.parameters()))
        return orig(p, gi, pi, armed)

    opt._release_step = spy
    with rel.armed(masked=False):
        _loss(m, _batches(11, 1)[0], 1.0).backward()
    assert alive == [1] * len(list(m.parameters()))
    assert all(p.grad is None for p in m.parameters())


def test_outside_armed_gradients_accumulate_as_usual():
    m = _model(12)
    w0 = [p.clone() for p in m.parameters()]
    rel = GradRelease(MaskedAdamW(m.parameters(), lr=1e-3))
    _loss(m, _batches(12, 1)[0], 1.0).backward()
    assert all(p.grad is not None for p in m.parameters())
    assert all(torch.equal(p, w) for p, w in zip(m.parameters(), w0))
    rel.close()


def test_a_non_finite_gradient_skips_only_its_parameter():
    m = _model(13)
    opt = MaskedAdamW(m.parameters(), lr=1e-2)
    rel = GradRelease(opt)
    w0 = [p.clone() for p in m.parameters()]
    bad = list(m.parameters())[0]
    bad.register_hook(lambda g: torch.full_like(g, float("nan")))
    with rel.armed(masked=False, max_grad_norm=1.0, found_inf=torch.tensor([0.0])):
        _loss(m, _batches(13, 1)[0], 1.0).backward()
    moved = [not torch.equal(p, w) for p, w in zip(m.parameters(), w0)]
    assert moved == [False] + [True] * (len(w0) - 1)
    assert torch.isfinite(bad).all()


def test_sgd_step_in_backward_matches_step():
    a, oa, b, ob = _pair(14, opt_cls=MaskedSGD)
    _run_pair(a, oa, b, ob, _batches(14, 4))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_bf16_state_is_reproducible_and_tracks_the_ordinary_step():
    runs = []
    for _ in range(2):
        a, oa, b, ob = _pair(15, dtype=torch.bfloat16, state_dtype=torch.bfloat16)
        _run_pair(a, oa, b, ob, _batches(15, 6))
        runs.append((a, b))
    for p1, p2 in zip(runs[0][1].parameters(), runs[1][1].parameters()):
        assert torch.equal(p1, p2)  # reproducible run to run
    for pa, pb in zip(runs[0][0].parameters(), runs[0][1].parameters()):
        # different stochastic-rounding bits, same expectation: within a few bf16 ulps
        torch.testing.assert_close(pa.float(), pb.float(), rtol=0.05, atol=2e-2)


def test_compacted_state_in_backward_matches_dense():
    a, oa, b, ob = _pair(16, unmasked="freeze", compact_state=False)
    c = _model(16)
    oc = MaskedAdamW(c.parameters(), lr=3e-3, compact_state=True)
    oc.set_masks(_masks(c, 16))
    rel_b, rel_c = GradRelease(ob), GradRelease(oc)
    for batch in _batches(16, 4):
        for model, rel in ((b, rel_b), (c, rel_c)):
            with rel.armed(masked=True):
                _loss(model, batch, -1.0).backward()
    for pb, pc in zip(b.parameters(), c.parameters()):
        assert torch.equal(pb, pc)


def test_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match="MaskedAdamW"):
        GradRelease(torch.optim.SGD(_model(0).parameters(), lr=1e-3))
    m = _model(17)
    opt = MaskedAdamW(m.parameters(), lr=1e-3, compact_state=True)
    rel = GradRelease(opt)
    with pytest.raises(ValueError, match="compact_state"):
        rel.armed(masked=False)
    with pytest.raises(ValueError, match="found_inf"):
        rel.armed(masked=False, found_inf=torch.zeros(2))


# ------------------------------------------------------------------------------------------------
# the unlearning loop with --grad-release
# ------------------------------------------------------------------------------------------------


def _lm_batches(n, seed, bs=3, t=10):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (bs, t), generator=g)
        labels = ids.clone()
        labels[:, : t // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


@pytest.mark.parametrize(("name", "log_every"), [("ga_diff", 1), ("mmunlearner", 2), ("npo", 3)])
def test_loop_with_grad_release_matches_the_ordinary_loop(name, log_every):
    from mmunlearn.config import RunConfig
    from mmunlearn.loop import unlearn

    from helpers import tiny_llama

    forget, retain = _lm_batches(2, 1), _lm_batches(5, 2)
    results = []
    for release in (False, True):
        model = tiny_llama(0)
        g = torch.Generator().manual_seed(3)
        masks = {p: torch.rand(p.shape, generator=g) < 0.4 for p in model.parameters()}
        cfg = RunConfig(lr=1e-3, progress=False, max_grad_norm=None, retain_max_grad_norm=None,
                        log_every=log_every, grad_release=release)  # fmt: skip
        res = unlearn(model, name, forget, retain, masks=masks if name == "mmunlearner" else None,
                      config=cfg)  # fmt: skip
        results.append((model, res))
        assert not any(p._post_accumulate_grad_hooks for p in model.parameters())  # closed
    (m0, r0), (m1, r1) = results
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]
    for p0, p1 in zip(m0.parameters(), m1.parameters()):
        assert torch.equal(p0, p1)


def test_grad_release_settings_are_checked():
    from mmunlearn.config import RunConfig

    with pytest.raises(ValueError, match="grad_accum must be 1"):
        RunConfig(grad_release=True, grad_accum=2)
    with pytest.raises(ValueError, match="masked_step"):
        RunConfig(grad_release=True, mask_mode="zero_grad")
    assert RunConfig(grad_release=True).identity()["grad_release"] is True
