"""Checkpoints of an unlearning run: atomic save, resume, and the RNG state they carry.

A checkpoint is a directory ``output_dir/checkpoint``: the model weights (safetensors), the
optimizer's state (masks included), the LR schedule and the RNG states, plus ``state.json``
(step, history, config) written last. It is built in a temporary sibling and renamed into
place (:func:`mmunlearn.io.replace_dir`), so a run killed at any moment leaves the previous
complete checkpoint. An FSDP2-sharded model gets a DCP checkpoint instead
(:func:`mmunlearn.fsdp.save_sharded_checkpoint`).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict

import numpy as np
import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from mmunlearn import fsdp
from mmunlearn.distributed import all_reduce_sum_, is_rank0, is_sharded, local, world_size
from mmunlearn.io import atomic_write_json, find_complete_dir, replace_dir, temp_dir_for
from mmunlearn.saliency import popcount

CKPT = "checkpoint"


def rng_state() -> dict:
    st = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(output_dir: str, model, opt, sched, step: int, history: list, config) -> str:
    """Atomically write ``output_dir/checkpoint``: model weights (safetensors), optimizer state
    (masks included), LR schedule, RNG states, step and history. Returns the path.

    An FSDP2-sharded model gets a sharded DCP checkpoint instead
    (:func:`mmunlearn.fsdp.save_sharded_checkpoint`: every rank writes its shards, rank 0
    renames; masks are not stored there — they come from the mask file given again on resume,
    checked by their selected-element count)."""
    if is_sharded(model):
        extra = {
            "step": step,
            "history": history,
            "config": asdict(config),
            "scheduler": sched.state_dict(),
            "lr": [g["lr"] for g in opt.param_groups],  # the scheduler does not restore it
            "mask_selected": _mask_selected(opt),
        }
        if is_rank0():
            os.makedirs(output_dir, exist_ok=True)
        return fsdp.save_sharded_checkpoint(
            os.path.join(output_dir, CKPT), model, opt, extra, rng_state()
        )
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, CKPT)
    tmp = temp_dir_for(final)
    st_save_model(model, os.path.join(tmp, "model.safetensors"))
    torch.save(
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state()},
        os.path.join(tmp, "trainer.pt"),
    )
    state = {"step": step, "history": history, "config": asdict(config)}
    atomic_write_json(os.path.join(tmp, "state.json"), state, indent=None)
    # between replace_dir's two renames only the .old copy exists; find_checkpoint finds it
    return str(replace_dir(tmp, final))


def _mask_selected(opt) -> int:
    """Selected elements over every mask set on ``opt``, summed over ranks."""
    n = 0
    for group in opt.param_groups:
        for p in group["params"]:
            m = opt.state.get(p, {}).get("mask")
            if m is not None:
                n += popcount(m)
    t = torch.tensor([n], dtype=torch.int64)
    if world_size() > 1:
        dev = next(iter(opt.param_groups[0]["params"]))
        dev = local(dev).device
        t = all_reduce_sum_(t.to(dev)).cpu()
    return int(t.item())


def find_checkpoint(output_dir: str) -> str | None:
    """The checkpoint to resume from in ``output_dir`` (or its .old twin after a crash
    between the two renames of :func:`save_checkpoint`), or None."""
    found = find_complete_dir(os.path.join(output_dir, CKPT), "state.json")
    return None if found is None else str(found)


def load_checkpoint(path: str, model, opt, sched) -> tuple[int, list]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns (step, history)."""
    if is_sharded(model):
        if not fsdp.is_sharded_checkpoint(path):
            raise ValueError(f"cannot resume from {path}: not a sharded (DCP) checkpoint")
        meta, rng = fsdp.load_sharded_checkpoint(path, model, opt)
        selected = _mask_selected(opt)
        if meta.get("mask_selected") != selected:
            raise ValueError(
                f"cannot resume from {path}: the masks now set select {selected} elements, "
                f"the checkpointed run's {meta.get('mask_selected')} (give the same --mask)"
            )
        sched.load_state_dict(meta["scheduler"])
        for g, lr in zip(opt.param_groups, meta["lr"]):
            g["lr"] = lr
        if rng is not None:
            set_rng_state(rng)
        return int(meta["step"]), list(meta["history"])
    if fsdp.is_sharded_checkpoint(path):
        raise ValueError(f"{path} is a sharded (DCP) checkpoint: resume it under torchrun")
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        st_load_model(model, os.path.join(path, "model.safetensors"))
        blob = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot resume from {path}: {type(e).__name__}: {e}") from e
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return int(state["step"]), list(state["history"])


__all__ = ["CKPT", "find_checkpoint", "load_checkpoint", "save_checkpoint"]
