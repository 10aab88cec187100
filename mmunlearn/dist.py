"""Process-group plumbing for torchrun / FSDP2 runs (gloo on CPU, NCCL on CUDA).

Only what the rest of the package needs: start from torchrun's environment, know the rank,
sum a tensor across ranks, and the exact distributed top-k threshold (the radix-select
histograms are summed across ranks, so the result equals the single-process threshold).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mmunlearn.kernels import saliency_threshold_topk


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_rank0() -> bool:
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1).

    Returns True when a multi-process group is (now) active. Backend: NCCL when CUDA is
    available, gloo otherwise (override with ``backend``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        be = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if be == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(be)
    return True


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place across ranks (no-op in a single process); returns ``t``."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def topk_threshold(
    f_forget, f_preserve, fraction: float, eps: float = 1e-15, backend: str = "auto"
) -> float:
    """Exact k-th largest ratio over the shards held by *all* ranks (k = ceil(fraction·N_global)).

    Each rank passes its local shards; three int64 histograms (16 KiB each) and one count are
    all-reduced. Bit-identical to the single-process threshold over the full tensors.
    """
    n_local = sum(t.numel() for t in f_forget)
    dev = f_forget[0].device if f_forget else torch.device("cpu")
    n = all_reduce_sum_(torch.tensor([n_local], dtype=torch.int64, device=dev))
    return saliency_threshold_topk(
        f_forget,
        f_preserve,
        fraction,
        eps,
        backend=backend,
        n_total=int(n.item()),
        all_reduce=all_reduce_sum_,
        device=dev,
    )


def shard_batch(batch: dict, rank_: int | None = None, world: int | None = None) -> dict:
    """The slice of a global batch this rank computes (contiguous rows, torch.tensor_split:
    uneven splits allowed). Tensors without a batch dimension are passed through."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if w == 1:
        return batch
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            out[k] = v.tensor_split(w)[r]
        else:
            out[k] = v
    return out


def global_mean(local_sum: torch.Tensor, local_count) -> torch.Tensor:
    """``local_sum / global_count · world_size``: a per-rank loss whose gradient, averaged
    across ranks by FSDP's reduce-scatter, equals the single-process gradient of
    ``Σ_all / N_all`` over the global batch. The count is all-reduced (no gradient flows
    through it). In one process this is ``local_sum / local_count``."""
    count = torch.as_tensor(local_count, dtype=torch.float32, device=local_sum.device).clone()
    w = world_size()
    if w > 1:
        all_reduce_sum_(count)
    return local_sum / count.clamp_min(1) * w
