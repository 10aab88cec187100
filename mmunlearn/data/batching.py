"""Batches: collated lists of samples, and moving batches to a device.

``make_batches`` is how every in-memory path (the demo, the tiny-model CLI runs, tests) turns a
list of :class:`~mmunlearn.data.schema.Sample` into model-ready batches with a model adapter's
``collate``; :class:`BatchSource` is the same batches built on demand (a ``Dataset`` a
``DataLoader`` streams, with workers, so a 7B run never holds every batch); ``to_device`` moves
one batch (a dict) or a list of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class Batches(list):
    """A list of collated batches that remembers each batch's samples, so the same batches
    can be remade from changed samples (:meth:`view`). Everything else treats it as the list
    of batch dicts it is."""

    def __init__(self, batches, chunks, collate, device=None):
        super().__init__(batches)
        self.chunks, self.collate, self.device = chunks, collate, device

    def view(self, fn) -> Batches:
        """The same batches (same samples, same order) collated from ``fn(sample)`` for each
        sample, on this list's device."""
        chunks = [[fn(s) for s in chunk] for chunk in self.chunks]
        out = [self.collate(c) for c in chunks]
        if self.device is not None:
            out = [to_device(b, self.device) for b in out]
        return Batches(out, chunks, self.collate, self.device)


def make_batches(adapter, samples, bs: int, rng, n: int | None = None) -> Batches:
    """Collated batches over a copy of ``samples`` shuffled by ``rng`` (a ``random.Random``):
    ``n`` batches of ``bs`` (cycling through the items when ``n`` needs more), or one pass
    (the last batch short) when ``n`` is None. ``adapter`` is anything with ``collate``.
    Returns a :class:`Batches` (a list of batch dicts)."""
    items = list(samples)
    rng.shuffle(items)
    chunks = []
    total = n if n is not None else (len(items) + bs - 1) // bs
    for b in range(total):
        chunks.append([items[(b * bs + i) % len(items)] for i in range(min(bs, len(items)))])
    return Batches([adapter.collate(c) for c in chunks], chunks, adapter.collate)


class BatchSource(torch.utils.data.Dataset):
    """``source[i]`` = the collated batch ``i`` of ``samples`` shuffled once by ``seed``
    (``batch_size`` items; the last batch short unless ``drop_last``). ``collate`` is called
    with ``collate_kw`` (e.g. ``loss_tokens="all_with_image"``) in the process that asks, so a
    DataLoader's workers collate in parallel."""

    def __init__(
        self, samples, collate, batch_size: int, seed: int = 0, drop_last=False, **collate_kw
    ):
        import random

        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.samples = list(samples)
        if not self.samples:
            raise ValueError("BatchSource needs at least one sample")
        random.Random(seed).shuffle(self.samples)
        self.collate = collate
        self.batch_size = int(batch_size)
        self.collate_kw = collate_kw
        n = len(self.samples)
        self.n = n // self.batch_size if drop_last else -(-n // self.batch_size)
        if self.n == 0:
            raise ValueError(f"{n} samples make no full batch of {batch_size}")

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> str:
        """A content hash of the samples in batch order (texts, entities, image sizes and a
        16×16 thumbnail of each image): a resumed run must see the same data."""
        import hashlib

        h = hashlib.sha256(f"{self.batch_size}|{self.collate_kw}".encode())
        for s in self.samples:
            h.update(f"{s.question}\x00{s.answer}\x00{s.entity}\x00{s.kind}".encode())
            if s.image is not None:
                h.update(str(s.image.size).encode())
                h.update(s.image.convert("RGB").resize((16, 16)).tobytes())
        return h.hexdigest()[:16]

    def view(self, fn) -> BatchSource:
        """The same batches (same samples, same order, same collate options) made from
        ``fn(sample)`` for each sample."""
        import copy

        out = copy.copy(self)
        out.samples = [fn(s) for s in self.samples]
        return out

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        chunk = self.samples[i * self.batch_size : (i + 1) * self.batch_size]
        return self.collate(chunk, **self.collate_kw)


def to_device(batch, device):
    """A batch (dict) with every tensor on ``device`` (``non_blocking``); a list of batches
    gives a list (a :class:`Batches` a :class:`Batches` whose views land there too).
    Non-tensor values pass through."""
    if isinstance(batch, Batches):
        return Batches([to_device(b, device) for b in batch], batch.chunks, batch.collate, device)
    if isinstance(batch, Mapping):
        return {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }
    return [to_device(b, device) for b in batch]


__all__ = ["BatchSource", "Batches", "make_batches", "to_device"]
