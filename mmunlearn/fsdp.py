"""FSDP2 (``torch.distributed.fsdp.fully_shard``) plumbing: shard a model per block, gather
tensors one at a time for world-size-independent files, and sharded atomic DCP checkpoints.

Everything here is PyTorch's own engine; this module only decides *what* to shard and *how*
to get full-shape, world-size-independent files out of a sharded run. It sits above the
parameter, Fisher, mask and optimizer layers (it checkpoints the optimizer's state); none of
them imports it:

* :func:`shard_model` — ``fully_shard`` on every repeated block the model adapter names
  (vision encoder layer, decoder layer), then on the root; bf16 parameters with fp32
  gradient reduction when ``mixed_precision="bf16"``.
* :func:`full_state_dict` — one tensor at a time (:func:`mmunlearn.distributed.full_tensor`):
  each DTensor is all-gathered, kept on rank 0 (moved to the CPU) and dropped elsewhere, so no
  rank ever holds the whole model on its device.
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

from mmunlearn import distributed as mdist
from mmunlearn.distributed import full_tensor, laid_out_like, local
from mmunlearn.io import atomic_write_json, check_pickle, replace_dir
from mmunlearn.params import canonical_parameters
from mmunlearn.rng import load_rng, save_rng

# FSDP2 on a CPU (gloo) mesh: torch 2.6's fully_shard fails there (torch.cpu.Stream has no
# record_event; past that, backward finds its saved parameters modified); 2.7 works
CPU_FSDP = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 7)


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
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and not CPU_FSDP:
        raise RuntimeError(
            f"FSDP2 on CPU (gloo) needs torch 2.7 or later, this is torch {torch.__version__}"
        )
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


# --------------------------------------------------------------------------------------------
# Sharded checkpoints (DCP)
# --------------------------------------------------------------------------------------------


def _optimizer_dtensors(model, opt, saved_keys=None) -> dict[str, torch.Tensor]:
    """The optimizer's moments as DTensors laid out like their parameters, keyed by canonical
    parameter name (``opt.state_tensors(p, dense=True)``: the live tensors, so a DCP load fills
    the state; compacted state gives dense copies, refilled by :func:`_refill_optimizer`), and
    its stochastic-rounding counters (``sr_counters``; on load only if the checkpoint has
    them: ``saved_keys``)."""
    out: dict[str, torch.Tensor] = {}
    if hasattr(opt, "sr_counters") and (saved_keys is None or "optim.sr_counters" in saved_keys):
        out["sr_counters"] = opt.sr_counters()
    for name, p in canonical_parameters(model).items():
        st = opt.state_tensors(p, dense=True) if hasattr(opt, "state_tensors") else {}
        if "exp_avg" not in st:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{key}"] = laid_out_like(st[key], p)
        out[f"{name}.step"] = st["step"]
    return out


def _init_optimizer_state(model, opt, saved_keys) -> None:
    """Create (zero) optimizer state for the parameters that have state in the checkpoint,
    so DCP has tensors to load into."""
    for name, p in canonical_parameters(model).items():
        if f"optim.{name}.exp_avg" in saved_keys and hasattr(opt, "init_state"):
            opt.init_state(p)


def save_sharded_checkpoint(path: str, model, opt, extra: Mapping | None = None) -> str:
    """Write ``path`` (a directory) atomically from every rank: DCP shards of the model's state
    dict and the optimizer's moments under ``path/dcp``, each rank's RNG state
    (``rng-rank{r}.safetensors``, no pickle), and ``state.json`` (``extra``, JSON-able, plus
    the world size). All ranks call it together.
    Written to ``path``'s temporary sibling first; rank 0 renames it after a barrier (an
    existing checkpoint is first moved to ``path.old``, removed once the new one is in place).
    Returns ``path``."""
    import torch.distributed.checkpoint as dcp

    r = mdist.rank()
    tmp = path + ".tmp"
    if r == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    mdist.barrier()
    state = {"model": model.state_dict(), "optim": _optimizer_dtensors(model, opt)}
    dcp.save(state, checkpoint_id=os.path.join(tmp, "dcp"))
    save_rng(os.path.join(tmp, f"rng-rank{r}.safetensors"))
    mdist.barrier()
    if r == 0:
        meta = dict(extra or {})
        meta["world_size"] = mdist.world_size()
        meta["format"] = "mmunlearn-dcp-checkpoint"
        atomic_write_json(os.path.join(tmp, "state.json"), meta, indent=None)
        replace_dir(tmp, path)
    mdist.barrier()
    return path


def is_sharded_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "dcp"))


def load_sharded_checkpoint(path: str, model, opt) -> tuple[dict, dict | None]:
    """Load a checkpoint written by :func:`save_sharded_checkpoint` into ``model`` and ``opt``
    in place (any world size: DCP reshards). The optimizer's state is created first (zeros),
    then filled. Returns (``state.json`` contents, this rank's RNG state — ``(tensors, meta)``
    of :func:`mmunlearn.rng.load_rng` — or None when the world size changed). DCP's
    ``.metadata`` (a pickle) is checked against :data:`DCP_ALLOWED` before DCP unpickles it.
    Raises ValueError naming ``path`` when it cannot be read."""
    import torch.distributed.checkpoint as dcp

    try:
        with open(os.path.join(path, "state.json")) as f:
            meta = json.load(f)
        check_pickle(os.path.join(path, "dcp", ".metadata"), _dcp_allowed)
        reader = dcp.FileSystemReader(os.path.join(path, "dcp"))
        saved = set(reader.read_metadata().state_dict_metadata)
        _init_optimizer_state(model, opt, saved)
        state = {"model": model.state_dict(), "optim": _optimizer_dtensors(model, opt, saved)}
        dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
    except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot resume from {path}: {type(e).__name__}: {e}") from e
    _refill_optimizer(model, opt, state["optim"])
    rng = None
    rng_file = os.path.join(path, f"rng-rank{mdist.rank()}.safetensors")
    if meta.get("world_size") == mdist.world_size() and os.path.exists(rng_file):
        rng = load_rng(rng_file)
    return meta, rng


# The classes DCP pickles into its .metadata file (torch 2.4–2.13); anything else is refused.
DCP_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex"},
}


def _dcp_allowed(module: str, name: str) -> bool:
    if name in DCP_ALLOWED.get(module, ()):
        return True
    # dtypes and layouts: torch.float32, torch.bfloat16, torch.strided, ...
    return module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))


def _refill_optimizer(model, opt, optim_state: Mapping[str, torch.Tensor]) -> None:
    """Copy loaded moments into the optimizer's state (DCP may have replaced the objects, and
    compacted state was loaded through dense copies)."""
    if "sr_counters" in optim_state:
        opt.load_sr_counters(optim_state["sr_counters"])
    for name, p in canonical_parameters(model).items():
        if f"{name}.exp_avg" not in optim_state:
            continue
        keys = ("exp_avg", "exp_avg_sq", "step")
        opt.load_state_tensors(p, {k: local(optim_state[f"{name}.{k}"]) for k in keys})


__all__ = [
    "broadcast_from_rank0",
    "full_state_dict",
    "load_sharded_checkpoint",
    "save_sharded_checkpoint",
    "shard_model",
]
