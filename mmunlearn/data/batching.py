"""Batches: collated lists of samples, and moving batches to a device.

``make_batches`` is how every in-memory path (the demo, the tiny-model CLI runs, tests) turns a
list of :class:`~mmunlearn.data.schema.Sample` into model-ready batches with a model adapter's
``collate``; ``to_device`` moves one batch (a dict) or a list of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def make_batches(adapter, samples, bs: int, rng, n: int | None = None) -> list[dict]:
    """Collated batches over a copy of ``samples`` shuffled by ``rng`` (a ``random.Random``):
    ``n`` batches of ``bs`` (cycling through the items when ``n`` needs more), or one pass
    (the last batch short) when ``n`` is None. ``adapter`` is anything with ``collate``."""
    items = list(samples)
    rng.shuffle(items)
    out = []
    total = n if n is not None else (len(items) + bs - 1) // bs
    for b in range(total):
        chunk = [items[(b * bs + i) % len(items)] for i in range(min(bs, len(items)))]
        out.append(adapter.collate(chunk))
    return out


def to_device(batch, device):
    """A batch (dict) with every tensor on ``device`` (``non_blocking``); a list of batches
    gives a list. Non-tensor values pass through."""
    if isinstance(batch, Mapping):
        return {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }
    return [to_device(b, device) for b in batch]


__all__ = ["make_batches", "to_device"]
