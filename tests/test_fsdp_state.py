"""MaskedAdamW state options under FSDP2 (2 gloo processes): bf16 / compacted state through
a DCP checkpoint, and gradient clipping reduced over the mesh's shard dimension only (HSDP)."""

from __future__ import annotations

import torch

from conftest import needs_cpu_fsdp
from helpers import run_ranks

pytestmark = needs_cpu_fsdp

STEPS = 4


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 37), torch.nn.Tanh(),
        torch.nn.Linear(37, 5),
    )  # fmt: skip


def _masks(model):
    g = torch.Generator().manual_seed(3)
    return {name: torch.rand(p.shape, generator=g) < 0.3 for name, p in model.named_parameters()}


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 13, generator=g), torch.randn(8, 5, generator=g)) for _ in range(n)]


def _run(model, opt, batches):
    for x, y in batches:
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step(max_grad_norm=0.5)
        opt.zero_grad()


def _sharded(mesh=None):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _opt(model, **kw):
    from mmunlearn.optim import MaskedAdamW

    named = dict(model.named_parameters())
    opt = MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend="torch", **kw)
    opt.set_masks({named[n]: m for n, m in _masks(_model()).items()})
    return opt


def _ckpt_worker(rank, world, out):
    from mmunlearn.fsdp import load_sharded_checkpoint, save_sharded_checkpoint

    path = out["path"]
    kw = dict(state_dtype=torch.bfloat16, compact_state=True, seed=4)
    model = _sharded()
    opt = _opt(model, **kw)
    _run(model, opt, _batches(STEPS))
    save_sharded_checkpoint(path, model, opt)
    _run(model, opt, _batches(STEPS, seed=2))
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}

    model2 = _sharded()
    opt2 = _opt(model2, **kw)
    load_sharded_checkpoint(path, model2, opt2)
    for p in model2.parameters():
        st = opt2.state_tensors(p)
        assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg"].dim() == 1
    assert opt2.sr_counters().tolist() == [STEPS]  # the SR counters came back with DCP
    _run(model2, opt2, _batches(STEPS, seed=2))
    full2 = {n: p.full_tensor().detach().clone() for n, p in model2.named_parameters()}
    if rank == 0:
        out["same"] = all(torch.equal(full[n], full2[n]) for n in full)


def test_bf16_compacted_state_through_dcp_checkpoint(tmp_path):
    """Resuming from a DCP checkpoint of bf16, compacted state continues bit for bit."""
    import torch.multiprocessing as mp

    shared = mp.Manager().dict()
    shared["path"] = str(tmp_path / "ckpt")
    out = run_ranks(_ckpt_worker_entry(shared))
    assert out["same"]


def _ckpt_worker_entry(shared):
    return _CkptWorker(shared)


class _CkptWorker:
    def __init__(self, shared):
        self.path = shared["path"]

    def __call__(self, rank, world, out):
        out_local = {"path": self.path}
        _ckpt_worker(rank, world, out_local)
        if rank == 0:
            out["same"] = out_local["same"]


def _hsdp_worker(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    model = _sharded(mesh)
    opt = _opt(model)
    _run(model, opt, _batches(STEPS))
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        out["full"] = full


def test_hsdp_clipping_reduces_over_the_shard_dimension_only():
    """On a (replicate 2, shard 1) mesh every rank holds a whole replica: the clip norm must not
    be summed over the replicate dimension (the default group would double it). Equal to one
    process."""
    ref = _model()
    opt = _opt(ref)
    _run(ref, opt, _batches(STEPS))
    out = run_ranks(_hsdp_worker)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(out["full"][n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
