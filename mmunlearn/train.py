"""Ordinary fine-tuning: how a vanilla model learns the benchmark before anything is unlearned
(and how the reference model learns it without the forget set).

Plain AdamW (:class:`~mmunlearn.optim.MaskedAdamW` with no mask), global-norm clipping at 1.0,
batches drawn by :func:`~mmunlearn.data.batching.make_batches` in seeded epochs, the loss of
each global batch from :func:`~mmunlearn.losses.batch_loss` (this rank's rows under FSDP2).
"""

from __future__ import annotations

import random

from tqdm.auto import tqdm

from mmunlearn.data.batching import make_batches
from mmunlearn.distributed import is_rank0
from mmunlearn.losses import batch_loss
from mmunlearn.optim import MaskedAdamW


def finetune(model, adapter, samples, steps, lr, bs, seed, dev, progress=True):
    """Fine-tune ``model`` in place for ``steps`` AdamW steps (lr ``lr``, batch ``bs``) on
    ``samples`` (collated by ``adapter``), on device ``dev``; batch order from ``seed``.

    On an FSDP2-sharded model (under torchrun) every rank takes its rows of each global batch
    and the loss is normalised by the global label-token count, so the reduced gradient is the
    1-process gradient of the same batch. An unsharded model takes the whole batch (also under
    torchrun: every rank then trains the same model). Returns the model, in eval mode."""
    rng = random.Random(seed)
    opt = MaskedAdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    per_epoch = max(1, len(samples) // bs)
    batches = []
    for _ in range((steps + per_epoch - 1) // per_epoch):
        batches += make_batches(adapter, samples, bs, rng)
    for b in tqdm(batches[:steps], desc="vanilla fine-tune", disable=not (progress and is_rank0())):
        loss = batch_loss(model, b, dev)
        loss.backward()
        opt.step(max_grad_norm=1.0)
        opt.zero_grad()
    model.eval()
    return model


__all__ = ["finetune"]
