"""Process-group plumbing for torchrun / FSDP2 runs (gloo on CPU, NCCL on CUDA).

Only what the rest of the package needs, below every other layer (imports torch only): start
from torchrun's environment, know the rank, sum a tensor across ranks, this rank's local
tensor of a maybe-``DTensor`` and the full tensor of a sharded one, this rank's rows of a
global batch (:func:`shard_batch`) and the world-size-independent mean (:func:`global_mean`).
Named ``distributed`` so that ``import torch.distributed as dist`` keeps its usual name.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = None


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


def finish() -> bool:
    """End a torchrun process cleanly: every rank waits at a barrier (so none leaves while
    another still runs collectives, e.g. rank 0 evaluating and writing), then the group is
    destroyed. Returns True when there was a group to end."""
    if not dist.is_initialized():
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def is_dtensor(t) -> bool:
    """True for a ``DTensor`` (an FSDP2-sharded parameter, gradient or state tensor)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor``; any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def is_sharded(model: torch.nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor (FSDP2-sharded)."""
    return any(is_dtensor(p) for p in model.parameters())


def reduces_grads(model: torch.nn.Module) -> bool:
    """True when ``model`` averages its gradients across ranks (FSDP2-sharded, or DDP)."""
    return is_sharded(model) or isinstance(model, torch.nn.parallel.DistributedDataParallel)


def require_reduced_grads(model: torch.nn.Module, what: str) -> None:
    """Under torchrun (world size > 1) ``model`` must average its gradients across ranks
    (FSDP2-sharded, or DDP): every rank computes only its slice of each global batch, so an
    unsharded model would silently train on a different gradient per rank."""
    if world_size() <= 1 or reduces_grads(model):
        return
    raise ValueError(
        f"{what} under torchrun (world size {world_size()}) needs a model whose "
        "gradients are reduced across ranks: shard it with mmunlearn.fsdp.shard_model (FSDP2) "
        "or wrap it in DistributedDataParallel"
    )


def laid_out_like(local_: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local_`` (this rank's shard) as a DTensor laid out like DTensor ``like``, sharing
    storage; ``local_`` itself when ``like`` is a plain tensor."""
    if not is_dtensor(like):
        return local_
    return DTensor.from_local(
        local_, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    )


def full_tensor(t: torch.Tensor, like: torch.Tensor | None = None, *, to_all: bool = False):
    """The full tensor of a DTensor, or of a local shard laid out like DTensor ``like``
    (e.g. a Fisher accumulator of a sharded parameter). Returned on the CPU on rank 0 (on every
    rank with ``to_all``), None on the other ranks. Plain tensors come back as they are (CPU).
    Every rank must call it, in the same order."""
    if like is not None and not is_dtensor(t):
        t = laid_out_like(t, like)
    full = t.full_tensor() if is_dtensor(t) else t
    if to_all or rank() == 0:
        return full.detach().cpu()
    return None


def all_reduce_sum_(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` in place across the ranks of ``group`` (default: all ranks; no-op in a single
    process); returns ``t``."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def shard_groups(t) -> tuple:
    """The process groups a sum over a DTensor's local shards must be reduced over: one per
    mesh dimension on which ``t`` is sharded (FSDP: the shard group; HSDP's 2-D mesh: the shard
    dimension only, not the replicate one). () for a plain tensor or a replicated DTensor."""
    if not is_dtensor(t):
        return ()
    mesh = t.device_mesh
    return tuple(
        mesh.get_group(i)
        for i, pl in enumerate(t.placements)
        if getattr(pl, "is_shard", None) and pl.is_shard()
    )


def image_token_id(model) -> int | None:
    """The id of the image placeholder token of a multimodal model's config (LLaVA, Qwen2-VL),
    or None for a text-only model."""
    cfg = getattr(model, "config", None)
    for attr in ("image_token_id", "image_token_index"):
        v = getattr(cfg, attr, None)
        if v is not None:
            return int(v)
    return None


def _row_images(batch: dict, image_token: int | None):
    """Per row, the list of its pixel_values row indices (and of its image indices).

    Images are assigned to rows in order by their placeholder-token counts (every image of a
    LLaVA batch has the same number of tokens; a Qwen2-VL image has prod(grid_thw)/merge²,
    i.e. proportional to its patch rows)."""
    ids = batch["input_ids"]
    pix = batch["pixel_values"]
    grid = batch.get("image_grid_thw")
    n = ids.shape[0]
    if grid is None and pix.shape[0] == n:
        return [[i] for i in range(n)], [[i] for i in range(n)]
    if image_token is None:
        raise ValueError(
            f"shard_batch: {pix.shape[0]} pixel rows for {n} rows (text-only rows, several "
            "images per row or patch rows): pass image_token_id= to find each row's images"
        )
    per_row = (ids == image_token).sum(1).tolist()
    weights = grid.prod(-1).tolist() if grid is not None else [1] * pix.shape[0]
    total_tok, total_w = sum(per_row), sum(weights)
    if total_w == 0 or (total_tok * weights[0]) % total_w:
        raise ValueError(
            f"shard_batch: {total_tok} image tokens do not split over {len(weights)} images"
        )
    pix_off = [0]
    for w in weights:
        pix_off.append(pix_off[-1] + w)
    rows_pix, rows_img, img = [], [], 0
    for c in per_row:
        imgs = []
        while c > 0 and img < len(weights):
            imgs.append(img)
            used = weights[img] * total_tok // total_w
            c -= used
            img += 1
        if c != 0:
            raise ValueError("shard_batch: image placeholder tokens do not match the images")
        rows_img.append(imgs)
        rows_pix.append([r for i in imgs for r in range(pix_off[i], pix_off[i + 1])])
    return rows_pix, rows_img


def shard_batch(
    batch: dict,
    rank_: int | None = None,
    world: int | None = None,
    *,
    image_token_id: int | None = None,
    short: str = "replicate",
) -> dict:
    """The rows of a global batch this rank computes.

    Text-only batches: contiguous rows (``torch.tensor_split`` sizes, uneven splits allowed).
    Batches with images: the rows that carry images are dealt round-robin first, then the
    text-only rows, so every rank runs the vision tower (FSDP2 all-gathers its weights on
    every rank; a rank that skipped it would deadlock the others). Images follow their rows;
    when ``pixel_values`` does not have one entry per row (text rows mixed in, Qwen2-VL's patch
    rows) each row's images are found from the ``image_token_id`` placeholders in
    ``input_ids`` (pass :func:`image_token_id` of the model). The loss is normalised by global
    counts (:func:`global_mean`), so which rank takes which row does not change the gradient.
    Tensors without a batch dimension are passed through.

    A batch that cannot give every rank a row (fewer rows than ranks) or, when it has images,
    an image row (1 ≤ image rows < ranks): with ``short="replicate"`` (default) every rank
    takes the whole batch. That is still exact: the all-reduced count is then ``world × n``,
    so :func:`global_mean` gives each rank the plain batch mean and FSDP's average of ``world``
    equal gradients is the 1-process gradient; it only costs redundant compute on such
    batches. ``short="error"`` raises ValueError instead."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if w == 1:
        return batch
    if short not in ("replicate", "error"):
        raise ValueError(f"shard_batch: short must be 'replicate' or 'error', got {short!r}")
    ref = batch.get("input_ids")
    if ref is None:
        ref = next(v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    n = ref.shape[0]
    image_keys = ("pixel_values", "image_grid_thw", "image_sizes")
    if n < w:
        if short == "replicate":
            return batch
        raise ValueError(f"shard_batch: {n} rows for {w} ranks: use larger global batches")
    if not isinstance(batch.get("pixel_values"), torch.Tensor):
        rows = torch.arange(n).tensor_split(w)[r]
        return {
            k: (v[rows[0] : rows[-1] + 1] if len(rows) else v[:0])
            if isinstance(v, torch.Tensor) and v.dim() > 0
            else v
            for k, v in batch.items()
        }
    rows_pix, rows_img = _row_images(batch, image_token_id)
    with_img = [i for i in range(n) if rows_img[i]]
    without = [i for i in range(n) if not rows_img[i]]
    if len(with_img) < w:
        if short == "replicate":
            return batch
        raise ValueError(
            f"shard_batch: {len(with_img)} rows with images for {w} ranks; every rank must "
            "get one (FSDP runs the vision tower on every rank): use larger global batches"
        )
    order = with_img + without
    mine = sorted(order[r::w])
    pix = sorted(p for i in mine for p in rows_pix[i])
    imgs = sorted(j for i in mine for j in rows_img[i])
    idx = torch.tensor(mine, dtype=torch.long)
    out = {}
    for k, v in batch.items():
        if not (isinstance(v, torch.Tensor) and v.dim() > 0):
            out[k] = v
        elif k == "pixel_values":
            out[k] = v[torch.tensor(pix, dtype=torch.long, device=v.device)]
        elif k in image_keys:
            out[k] = v[torch.tensor(imgs, dtype=torch.long, device=v.device)]
        else:
            out[k] = v[idx.to(v.device)]
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
