"""FSDP2 (``torch.distributed.fsdp.fully_shard``) plumbing: shard a model per block, gather
tensors one at a time for world-size-independent files, and sharded atomic DCP checkpoints.

Everything here is PyTorch's own engine; this module only decides *what* to shard and *how*
to get full-shape, world-size-independent files out of a sharded run:

* :func:`shard_model` — ``fully_shard`` on every repeated block the model adapter names
  (vision encoder layer, decoder layer), then on the root; bf16 parameters with fp32
  gradient reduction when ``mixed_precision="bf16"``.
* :func:`full_tensor` / :func:`full_state_dict` — one tensor at a time: each DTensor is
  all-gathered, kept on rank 0 (moved to the CPU) and dropped elsewhere, so no rank ever holds
  the whole model on its device.
* :func:`full_mask` — a mask computed on local shards becomes the full-shape mask (the packed
  file written by rank 0 is byte-identical to a 1-process run's).
* :func:`save_sharded_checkpoint` / :func:`load_sharded_checkpoint` —
  ``torch.distributed.checkpoint`` (DCP) of the parameters and the optimizer's moments as
  DTensors: written to a temporary directory by every rank, then renamed by rank 0 after a
  barrier; DCP reshards on load, so a checkpoint written on N ranks resumes on M.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist

from mmunlearn import dist as mdist

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch < 2.4
    from torch.distributed._tensor import DTensor


def is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor (FSDP2-sharded)."""
    return any(is_dtensor(p) for p in model.parameters())


def require_reduced_grads(model: torch.nn.Module, what: str) -> None:
    """Under torchrun (world size > 1) ``model`` must average its gradients across ranks
    (FSDP2-sharded, or DDP): every rank computes only its slice of each global batch, so an
    unsharded model would silently train on a different gradient per rank."""
    if mdist.world_size() <= 1 or is_sharded(model):
        return
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return
    raise ValueError(
        f"{what} under torchrun (world size {mdist.world_size()}) needs a model whose "
        "gradients are reduced across ranks: shard it with mmunlearn.fsdp.shard_model (FSDP2) "
        "or wrap it in DistributedDataParallel"
    )


def shard_model(
    model: torch.nn.Module,
    block_classes: Iterable[type] = (),
    *,
    mixed_precision: str | None = None,
    reshard_after_forward: bool = True,
) -> torch.nn.Module:
    """``fully_shard`` every module whose class is in ``block_classes`` (per-block units: one
    all-gather per block in forward and backward), then the root. ``mixed_precision="bf16"``:
    bf16 parameters in forward/backward, fp32 gradient reduction (the sharded fp32 master
    weights are what the optimizer steps). Needs an initialised process group. Returns
    ``model`` (sharded in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group (run under torchrun)")
    if mixed_precision not in (None, "none", "bf16"):
        raise ValueError(f"mixed_precision must be 'bf16' or 'none', got {mixed_precision!r}")
    kw = {"reshard_after_forward": reshard_after_forward}
    if mixed_precision == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    classes = tuple(block_classes)
    blocks = [m for m in model.modules() if classes and isinstance(m, classes)]
    for m in blocks:
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    return model


def broadcast_from_rank0(model: torch.nn.Module) -> None:
    """Copy rank 0's (unsharded) parameters and buffers to every rank, before sharding."""
    if mdist.world_size() == 1:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def _laid_out_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's shard) as a DTensor laid out like DTensor ``like``, sharing
    storage; ``local`` itself when ``like`` is a plain tensor."""
    if not is_dtensor(like):
        return local
    return DTensor.from_local(
        local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    )


def full_tensor(t: torch.Tensor, like: torch.Tensor | None = None, *, to_all: bool = False):
    """The full tensor of a DTensor, or of a local shard laid out like DTensor ``like``
    (e.g. a Fisher accumulator of a sharded parameter). Returned on the CPU on rank 0 (on every
    rank with ``to_all``), None on the other ranks. Plain tensors come back as they are (CPU).
    Every rank must call it, in the same order."""
    if like is not None and not is_dtensor(t):
        t = _laid_out_like(t, like)
    if is_dtensor(t):
        full = t.full_tensor()
    else:
        full = t
    if to_all or mdist.rank() == 0:
        return full.detach().cpu()
    return None


def full_state_dict(
    model: torch.nn.Module, *, to_all: bool = False
) -> dict[str, torch.Tensor] | None:
    """The model's state dict with full tensors on the CPU of rank 0 (of every rank with
    ``to_all``), gathered one tensor at a time (None on other ranks). Keys are the model's own
    (what ``save_pretrained`` and ``load_state_dict`` of the unsharded class expect)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        full = full_tensor(t, to_all=to_all)
        if full is not None:
            out[name] = full
    return out if (to_all or mdist.rank() == 0) else None


def full_fishers(
    fishers: Mapping[str, torch.Tensor], model: torch.nn.Module, *, to_all: bool = False
) -> dict[str, torch.Tensor] | None:
    """Local-shard Fishers (from :func:`mmunlearn.saliency.collect_fisher` on a sharded model)
    → full-shape Fishers on rank 0's CPU, one tensor at a time (None on other ranks)."""
    from mmunlearn.saliency import canonical_parameters

    params = canonical_parameters(model)
    out = {}
    for name, f in fishers.items():
        full = full_tensor(f, params[name], to_all=to_all)
        if full is not None:
            out[name] = full
    return out if (to_all or mdist.rank() == 0) else None


def full_mask(local, model: torch.nn.Module):
    """A :class:`~mmunlearn.saliency.SaliencyMask` over local shards (shapes of the local
    shards) → the full-shape mask, identical on every rank (packed bits on the CPU). Gathers
    one tensor at a time as uint8 (1 byte per element, transiently)."""
    from mmunlearn.kernels import pack_bits
    from mmunlearn.saliency import SaliencyMask, canonical_parameters

    params = canonical_parameters(model)
    bits, shapes = {}, {}
    for name in local.names:
        p = params[name]
        dense = local.dense(name).to(torch.uint8)
        full = full_tensor(dense, p, to_all=True)
        bits[name] = pack_bits(full.reshape(-1).bool(), backend="torch").cpu()
        shapes[name] = tuple(p.shape)
    return SaliencyMask(bits, shapes, dict(local.meta), local.groups)


# --------------------------------------------------------------------------------------------
# Sharded checkpoints (DCP)
# --------------------------------------------------------------------------------------------


def _optimizer_dtensors(model, opt) -> dict[str, torch.Tensor]:
    """The optimizer's moments as DTensors laid out like their parameters, keyed by canonical
    parameter name (local tensors shared, so a DCP load fills the optimizer's state)."""
    from mmunlearn.saliency import canonical_parameters

    out: dict[str, torch.Tensor] = {}
    for name, p in canonical_parameters(model).items():
        st = opt.state.get(p)
        if not st or "exp_avg" not in st:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{key}"] = _laid_out_like(st[key], p)
        out[f"{name}.step"] = st["step"]
    return out


def _init_optimizer_state(model, opt, saved_keys) -> None:
    """Create (zero) optimizer state for the parameters that have state in the checkpoint,
    so DCP has tensors to load into."""
    from mmunlearn.saliency import canonical_parameters

    for name, p in canonical_parameters(model).items():
        if f"optim.{name}.exp_avg" in saved_keys and hasattr(opt, "_init_state"):
            opt._init_state(p)


def save_sharded_checkpoint(
    path: str, model, opt, extra: Mapping | None = None, rng: Mapping | None = None
) -> str:
    """Write ``path`` (a directory) atomically from every rank: DCP shards of the model's state
    dict and the optimizer's moments under ``path/dcp``, each rank's RNG state, and
    ``state.json`` (``extra``, JSON-able, plus the world size). All ranks call it together.
    Written to ``path``'s temporary sibling first; rank 0 renames it after a barrier (an
    existing checkpoint is first moved to ``path.old``, removed once the new one is in place).
    Returns ``path``."""
    import torch.distributed.checkpoint as dcp

    r = mdist.rank()
    tmp = path + ".tmp"
    if r == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    state = {"model": model.state_dict(), "optim": _optimizer_dtensors(model, opt)}
    dcp.save(state, checkpoint_id=os.path.join(tmp, "dcp"))
    if rng is not None:
        torch.save(dict(rng), os.path.join(tmp, f"rng-rank{r}.pt"))
    _barrier()
    if r == 0:
        meta = dict(extra or {})
        meta["world_size"] = mdist.world_size()
        meta["format"] = "mmunlearn-dcp-checkpoint"
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(meta, f)
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def is_sharded_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "dcp"))


def load_sharded_checkpoint(path: str, model, opt) -> tuple[dict, dict | None]:
    """Load a checkpoint written by :func:`save_sharded_checkpoint` into ``model`` and ``opt``
    in place (any world size: DCP reshards). The optimizer's state is created first (zeros),
    then filled. Returns (``state.json`` contents, this rank's RNG state or None when the world
    size changed). Raises ValueError naming ``path`` when it cannot be read."""
    import torch.distributed.checkpoint as dcp

    try:
        with open(os.path.join(path, "state.json")) as f:
            meta = json.load(f)
        reader = dcp.FileSystemReader(os.path.join(path, "dcp"))
        _init_optimizer_state(model, opt, set(reader.read_metadata().state_dict_metadata))
        state = {"model": model.state_dict(), "optim": _optimizer_dtensors(model, opt)}
        dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
    except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot resume from {path}: {type(e).__name__}: {e}") from e
    _refill_optimizer(model, opt, state["optim"])
    rng = None
    rng_file = os.path.join(path, f"rng-rank{mdist.rank()}.pt")
    if meta.get("world_size") == mdist.world_size() and os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=False)
    return meta, rng


def _refill_optimizer(model, opt, optim_state: Mapping[str, torch.Tensor]) -> None:
    """Copy loaded moments into the optimizer's state (DCP may have replaced the objects)."""
    from mmunlearn.saliency import canonical_parameters

    for name, p in canonical_parameters(model).items():
        st = opt.state.get(p)
        if not st or "exp_avg" not in st:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            t = optim_state[f"{name}.{key}"]
            t = t.to_local() if is_dtensor(t) else t
            if t.data_ptr() != st[key].data_ptr():
                st[key].copy_(t)
        step = optim_state[f"{name}.step"]
        if step.data_ptr() != st["step"].data_ptr():
            st["step"].copy_(step)


def _barrier() -> None:
    if mdist.world_size() > 1:
        dist.barrier()


__all__ = [
    "broadcast_from_rank0",
    "full_fishers",
    "full_mask",
    "full_state_dict",
    "full_tensor",
    "is_sharded",
    "load_sharded_checkpoint",
    "save_sharded_checkpoint",
    "shard_model",
]
