"""Checkpoints of an unlearning run: atomic save, checked resume, no pickle anywhere.

A checkpoint is a directory ``output_dir/checkpoint``:

- ``model.safetensors``: the weights;
- ``trainer.safetensors``: the optimizer's tensors (moments, step counts, masks) and the RNG
  tensors, with JSON metadata for everything else (param groups, scheduler, Python / NumPy RNG);
- ``state.json`` (written last): step, history, config and the run's *identity*.

It is built in a temporary sibling and renamed into place (:func:`mmunlearn.io.replace_dir`), so
a run killed at any moment leaves the previous complete checkpoint. Nothing is unpickled on
load: a checkpoint from someone else can hold wrong numbers, not code. An FSDP2-sharded model
gets a DCP checkpoint instead (:func:`mmunlearn.fsdp.save_sharded_checkpoint`), whose only
pickle (DCP's ``.metadata``) is checked against an allow-list before DCP reads it.

Resume refuses, naming the difference, when anything that defines the run differs from the
checkpoint's identity (method, loss forms, hyper-parameters, the mask's content hash, the data's
fingerprint, the step plan); world-size-independent settings only.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from mmunlearn import fsdp
from mmunlearn.distributed import is_rank0, is_sharded, local
from mmunlearn.io import (
    atomic_write_json,
    find_complete_dir,
    read_safetensors,
    replace_dir,
    save_safetensors,
    temp_dir_for,
)
from mmunlearn.rng import rng_state, set_rng_state

CKPT = "checkpoint"
TRAINER_FORMAT = "mmunlearn.trainer_state"


class ResumeMismatchError(ValueError):
    """The checkpoint belongs to a different run (its identity differs)."""


# ------------------------------------------------------------------------------------------------
# optimizer + scheduler as tensors + JSON
# ------------------------------------------------------------------------------------------------


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, (list, dict)):
        return json.loads(json.dumps(v))
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"cannot store {type(v).__name__} in a checkpoint's JSON")


def _trainer(opt, sched) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = _jsonable(v)
    groups = [{k: _jsonable(v) for k, v in g.items()} for g in sd["param_groups"]]
    sched_sd = {k: _jsonable(v) for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    rng_t, rng_meta = rng_state()
    tensors.update({f"rng.{k}": v for k, v in rng_t.items()})
    meta = {"param_groups": groups, "scalars": scalars, "scheduler": sched_sd, "rng": rng_meta}
    return tensors, meta


def _restore_trainer(path, opt, sched) -> None:
    tensors, meta = read_safetensors(os.path.join(path, "trainer.safetensors"), TRAINER_FORMAT)
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = meta["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    sched_sd = dict(meta["scheduler"])
    sched_sd["lr_lambdas"] = [None] * len(opt.param_groups)
    sched.load_state_dict(sched_sd)
    rng_t = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    set_rng_state(rng_t, meta["rng"])


# ------------------------------------------------------------------------------------------------
# save / find / load
# ------------------------------------------------------------------------------------------------


def fingerprint(source) -> str:
    """A content hash of a batch source: its own ``fingerprint()`` (a
    :class:`~mmunlearn.data.batching.BatchSource`: the samples), else the tensors of every
    batch (a list of batches)."""
    import hashlib

    if hasattr(source, "fingerprint"):
        return source.fingerprint()
    h = hashlib.sha256()
    for b in source:
        for k in sorted(b):
            v = b[k]
            if isinstance(v, torch.Tensor):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def mask_hash(model, masks) -> str | None:
    """A content hash of the masks given to :func:`unlearn` (in model parameter order)."""
    import hashlib

    from mmunlearn.kernels import pack_bits

    if not masks:
        return None
    h = hashlib.sha256()
    for i, p in enumerate(model.parameters()):
        m = masks.get(p)
        if m is None:
            continue
        bits = m if m.dtype == torch.uint8 else pack_bits(m.reshape(-1).bool(), backend="torch")
        h.update(str(i).encode())
        h.update(local(bits).detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_identity(method, cfg, forget, retain, model, masks) -> dict:
    """The settings that define a run, JSON-able: a resume must match them (the config's
    :meth:`~mmunlearn.config.RunConfig.identity`, the method, the data, the masks)."""
    from dataclasses import asdict

    return {
        "method": asdict(method),
        "config": cfg.identity(),
        "forget": fingerprint(forget),
        "retain": fingerprint(retain) if len(retain) else None,
        "mask": mask_hash(model, masks),
    }


def read_state(path: str) -> dict:
    """``state.json`` of a checkpoint (ValueError naming the path when unreadable)."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        int(state["step"])
        list(state["history"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot resume from {path}: state.json: {type(e).__name__}: {e}") from e
    return state


def check_identity(path: str, saved: dict | None, current: dict | None) -> None:
    """Raise :class:`ResumeMismatchError` naming every setting in which ``current`` differs
    from the checkpoint's ``saved`` identity (both dicts of JSON values)."""
    if saved is None or current is None:
        return
    cur = json.loads(json.dumps(current))
    diffs = [
        f"{k} (checkpoint {saved.get(k)!r}, now {cur.get(k)!r})"
        for k in sorted(set(saved) | set(cur))
        if saved.get(k) != cur.get(k)
    ]
    if diffs:
        raise ResumeMismatchError(
            f"cannot resume from {path}: it is a different run; differs in "
            + "; ".join(diffs)
            + " (start a new output directory, or resume with the same settings)"
        )


class Checkpoints:
    """The checkpoints of one run, in ``output_dir/checkpoint``: plain files (see the module
    docstring) or, for an FSDP2-sharded model, a DCP checkpoint
    (:func:`mmunlearn.fsdp.save_sharded_checkpoint`: every rank writes its shards, rank 0
    renames; masks are not stored there — they come from the mask file given again on resume,
    checked by the identity's mask hash). Which of the two is decided once, here, from the
    model; the loop only calls :meth:`save`, :meth:`latest` and :meth:`restore`.

    ``identity``: the run's defining settings (:func:`run_identity`), stored with every save
    and checked by :meth:`restore`."""

    def __init__(self, output_dir: str, model, identity: dict | None = None):
        self.output_dir = str(output_dir)
        self.path = os.path.join(self.output_dir, CKPT)
        self.model = model
        self.identity = identity
        self.sharded = is_sharded(model)

    def save(self, opt, sched, step: int, history: list, config, extra=None) -> str:
        """Atomically write the checkpoint of ``step``; returns its path. ``config``: the
        run's :class:`~mmunlearn.config.RunConfig` (stored as JSON); ``extra``: more JSON
        state (the loss scaler's), read back with :func:`read_state`."""
        state = {
            "step": step,
            "history": history,
            "config": config.to_dict(),
            "identity": self.identity,
            **(extra or {}),
        }
        if self.sharded:
            return self._save_sharded(opt, sched, state)
        return self._save_plain(opt, sched, state)

    def _save_sharded(self, opt, sched, state: dict) -> str:
        sd = sched.state_dict()
        extra = {
            **state,
            "scheduler": {k: _jsonable(v) for k, v in sd.items() if k != "lr_lambdas"},
            "lr": [g["lr"] for g in opt.param_groups],  # the scheduler does not restore it
        }
        if is_rank0():
            os.makedirs(self.output_dir, exist_ok=True)
        return fsdp.save_sharded_checkpoint(self.path, self.model, opt, extra)

    def _save_plain(self, opt, sched, state: dict) -> str:
        os.makedirs(self.output_dir, exist_ok=True)
        final = self.path
        tmp = temp_dir_for(final)
        try:
            st_save_model(self.model, os.path.join(tmp, "model.safetensors"))
            tensors, meta = _trainer(opt, sched)
            save_safetensors(
                os.path.join(tmp, "trainer.safetensors"), tensors, TRAINER_FORMAT, meta
            )
            atomic_write_json(os.path.join(tmp, "state.json"), state, indent=None)
            # between replace_dir's two renames only the .old copy exists; latest() finds it
            return str(replace_dir(tmp, final))
        except BaseException as e:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Exception) and not isinstance(e, OSError):
                why = f"{type(e).__name__}: {e}"
                raise OSError(f"cannot write the checkpoint {final}: {why}") from e
            if isinstance(e, OSError) and str(final) not in str(e):
                raise OSError(e.errno, f"cannot write the checkpoint {final}: {e}") from e
            raise

    def latest(self) -> str | None:
        """The checkpoint to resume from (or its .old twin after a crash between the two
        renames of a save), or None."""
        found = find_complete_dir(self.path, "state.json")
        return None if found is None else str(found)

    def last_good(self) -> str:
        """The path of the last complete checkpoint, or "none" (for error messages)."""
        return self.path if os.path.isdir(self.path) else "none"

    def restore(self, path: str, opt, sched) -> tuple[int, list]:
        """Load the checkpoint at ``path`` into the model, ``opt`` and ``sched`` after checking
        that it is the same run (:func:`check_identity`); returns (step, history)."""
        state = read_state(path)
        check_identity(path, state.get("identity"), self.identity)
        if self.sharded:
            return self._restore_sharded(path, opt, sched)
        if fsdp.is_sharded_checkpoint(path):
            raise ValueError(f"{path} is a sharded (DCP) checkpoint: resume it under torchrun")
        try:
            st_load_model(self.model, os.path.join(path, "model.safetensors"))
            _restore_trainer(path, opt, sched)
        except Exception as e:  # safetensors' own SafetensorError included
            msg = " ".join(str(e).split())[:300]
            raise ValueError(f"cannot resume from {path}: {type(e).__name__}: {msg}") from e
        return int(state["step"]), list(state["history"])

    def _restore_sharded(self, path: str, opt, sched) -> tuple[int, list]:
        if not fsdp.is_sharded_checkpoint(path):
            raise ValueError(f"cannot resume from {path}: not a sharded (DCP) checkpoint")
        meta, rng = fsdp.load_sharded_checkpoint(path, self.model, opt)
        sd = dict(meta["scheduler"])
        sd["lr_lambdas"] = [None] * len(opt.param_groups)
        sched.load_state_dict(sd)
        for g, lr in zip(opt.param_groups, meta["lr"]):
            g["lr"] = lr
        if rng is not None:
            set_rng_state(*rng)
        return int(meta["step"]), list(meta["history"])


__all__ = [
    "CKPT",
    "Checkpoints",
    "ResumeMismatchError",
    "check_identity",
    "fingerprint",
    "mask_hash",
    "read_state",
    "run_identity",
]
