"""Every random number generator's state (torch CPU and CUDA, Python, NumPy) as tensors + JSON,
and as an mmunlearn safetensors file: checkpoints carry it without pickle."""

from __future__ import annotations

import random

import numpy as np
import torch

from mmunlearn.io import read_safetensors, save_safetensors

RNG_FORMAT = "mmunlearn.rng_state"


def rng_state() -> tuple[dict, dict]:
    """``(tensors, meta)`` of every RNG (torch CPU and CUDA, Python, NumPy), JSON-able meta."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    meta = {
        "python": [version, list(state), gauss],
        "numpy": [name, int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where CUDA is there)."""
    torch.set_rng_state(tensors["torch"].to(torch.uint8).cpu())
    version, state, gauss = meta["python"]
    random.setstate((int(version), tuple(int(x) for x in state), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    keys = tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state((str(name), keys, int(pos), int(has_gauss), float(cached)))
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([c.to(torch.uint8).cpu() for c in cuda])


def save_rng(path) -> None:
    tensors, meta = rng_state()
    save_safetensors(path, tensors, RNG_FORMAT, meta)


def load_rng(path) -> tuple[dict, dict]:
    """``(tensors, meta)`` of a file written by :func:`save_rng` (ValueError naming it)."""
    tensors, meta = read_safetensors(path, RNG_FORMAT)
    if "torch" not in tensors or "python" not in meta or "numpy" not in meta:
        raise ValueError(f"{path}: incomplete RNG state")
    return tensors, meta


__all__ = ["RNG_FORMAT", "load_rng", "rng_state", "save_rng", "set_rng_state"]
