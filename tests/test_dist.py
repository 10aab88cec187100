"""Distributed primitives on 2 gloo processes (CPU): exact top-k over shards."""

from __future__ import annotations

import torch

from mmunlearn.kernels import saliency_threshold_topk

from helpers import run_ranks


def _inputs():
    g = torch.Generator().manual_seed(5)
    shapes = [(1000,), (37, 41), (4097,)]
    ff = [torch.rand(s, generator=g) ** 4 for s in shapes]
    fp = [torch.rand(s, generator=g) ** 4 for s in shapes]
    return ff, fp


def _worker(rank, world, out):
    from mmunlearn import dist as mdist

    ff, fp = _inputs()
    # each rank holds an uneven row-shard of every tensor, as FSDP2 would
    loc_f = [t.reshape(-1).tensor_split(world)[rank] for t in ff]
    loc_p = [t.reshape(-1).tensor_split(world)[rank] for t in fp]
    out[rank] = [mdist.topk_threshold(loc_f, loc_p, f, backend="torch") for f in (0.001, 0.1, 0.5)]
    # a rank with no shard at all (more ranks than rows) still joins the three all-reduces
    whole_f = [t.reshape(-1) for t in ff] if rank == 0 else []
    whole_p = [t.reshape(-1) for t in fp] if rank == 0 else []
    out[f"empty{rank}"] = mdist.topk_threshold(whole_f, whole_p, 0.1, backend="torch")


def test_distributed_topk_equals_single_process_bit_for_bit():
    ff, fp = _inputs()
    want = [saliency_threshold_topk(ff, fp, f, backend="torch") for f in (0.001, 0.1, 0.5)]
    out = run_ranks(_worker)
    assert out[0] == want and out[1] == want
    assert out["empty0"] == out["empty1"] == want[1]
