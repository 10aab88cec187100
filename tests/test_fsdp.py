"""MaskedAdamW on FSDP2-sharded (DTensor) parameters, 2 gloo processes vs 1 process."""

from __future__ import annotations

import torch

from conftest import needs_cpu_fsdp
from helpers import run_ranks, tiny_llama

pytestmark = needs_cpu_fsdp

STEPS = 6


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(13, 37),
        torch.nn.Tanh(),
        torch.nn.Linear(37, 37),
        torch.nn.Tanh(),
        torch.nn.Linear(37, 5),
    )


def _masks(model):
    g = torch.Generator().manual_seed(3)
    return {name: torch.rand(p.shape, generator=g) < 0.4 for name, p in model.named_parameters()}


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 13, generator=g), torch.randn(8, 5, generator=g)) for _ in range(STEPS)]


def _run(model, opt):
    for i, (x, y) in enumerate(_batches()):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step(masked=(i % 2 == 0), max_grad_norm=0.5)  # masked ascent-like and plain steps
        opt.zero_grad()


def _worker(rank, world, out):
    from torch.distributed.fsdp import fully_shard

    from mmunlearn.optim import MaskedAdamW

    model = _model()
    masks = _masks(model)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    named = dict(model.named_parameters())
    assert all(hasattr(p, "to_local") for p in named.values())
    opt = MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend="torch")
    opt.set_masks({named[n]: m for n, m in masks.items()})
    _run(model, opt)
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        out["full"] = full


def test_fsdp2_masked_steps_match_single_process():
    from mmunlearn.optim import MaskedAdamW

    ref = _model()
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    masks = _masks(ref)
    named = dict(ref.named_parameters())
    opt = MaskedAdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, backend="torch")
    opt.set_masks({named[n]: m for n, m in masks.items()})
    _run(ref, opt)

    out = run_ranks(_worker)
    full = out["full"]
    for n, p in ref.named_parameters():
        torch.testing.assert_close(full[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
        assert not torch.equal(full[n], start[n]), n


def _llama():
    return tiny_llama(0).train()


def _global_batch():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 64, (5, 10), generator=g)  # 5 rows: ranks get 3 and 2 rows
    labels = ids.clone()
    labels[0, :8] = -100  # very uneven label-token counts across the two halves
    labels[1:3, :2] = -100
    labels[3:, :6] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _sharded_llama():
    """``_llama()`` under FSDP2: every decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    model = _llama()
    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _grad_worker(rank, world, out):
    from mmunlearn import distributed as mdist
    from mmunlearn.losses import mean_ce

    model = _sharded_llama()
    batch = mdist.shard_batch(_global_batch())
    mean_ce(model(**batch), batch).backward()
    grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
    if rank == 0:
        out["grads"] = grads


def test_global_token_normalisation_makes_gradients_world_size_invariant():
    model = _llama()
    batch = _global_batch()
    model(**batch).loss.backward()
    out = run_ranks(_grad_worker)
    for n, p in model.named_parameters():
        torch.testing.assert_close(out["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


CASES = [("ga", "forget"), ("npo", "forget"), ("kl_min", "retain")]


def _method_grads(model, ref, batches, shard):
    """Gradients of every (method, phase) loss over ``batches``: 5 rows (ranks get 3 + 2) and
    1 row (short: every rank takes it whole, ``shard_batch``'s "replicate")."""
    from mmunlearn import distributed as mdist
    from mmunlearn.methods import Method

    grads = {}
    for name, phase in CASES:
        m = Method(name)
        for i, b in enumerate(batches):
            model.zero_grad(set_to_none=True)
            b = mdist.shard_batch(b) if shard else b
            loss = (m.forget_loss if phase == "forget" else m.retain_loss)(model, b, ref)
            loss.backward()
            grads[(name, i)] = {
                n: (p.grad.full_tensor() if shard else p.grad).clone()
                for n, p in model.named_parameters()
            }
    return grads


def _ref_model():
    return tiny_llama(1).eval()  # a different model, so NPO's log-ratio and KL are not 0


def _short_batches():
    b = _global_batch()
    return [b, {k: v[3:4] for k, v in b.items()}]


def _method_worker(rank, world, out):
    grads = _method_grads(_sharded_llama(), _ref_model(), _short_batches(), shard=True)
    if rank == 0:
        out["grads"] = grads


def test_every_loss_gradient_is_world_size_invariant_including_short_batches():
    """GA, NPO (sequence log-ratio, per-sample mean) and KL_Min (token KL) on 2 FSDP2 ranks give
    the 1-process gradient of the same batch — also for a 1-row batch both ranks take whole."""
    expect = _method_grads(_llama(), _ref_model(), _short_batches(), shard=False)
    got = run_ranks(_method_worker)["grads"]
    assert set(got) == set(expect)
    for key, g in expect.items():
        for n, e in g.items():
            torch.testing.assert_close(got[key][n], e, rtol=1e-4, atol=1e-6, msg=f"{key} {n}")
