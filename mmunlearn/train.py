"""Ordinary fine-tuning: how a vanilla model learns the benchmark before anything is unlearned
(and how the reference model learns it without the forget set).

Plain AdamW (:class:`~mmunlearn.optim.MaskedAdamW` with no mask), global-norm clipping at 1.0,
the loss of each global batch from :func:`~mmunlearn.losses.batch_loss` (this rank's rows under
FSDP2). :func:`finetune` draws batches with :func:`~mmunlearn.data.batching.make_batches` in
seeded epochs; :func:`finetune_stages` runs a curriculum (the linked world's text → identity →
grounding stages), each stage drawing its batches from weighted pools with its own optimizer
and its own seeded stream, so a stage's result depends only on the model it starts from.
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


def finetune_stages(
    model, adapter, stages, steps, lr, bs, seed, dev, progress=True, callback=None, decay=False
):
    """Fine-tune ``model`` in place through a curriculum.

    ``stages``: ``[(name, [(samples, weight), ...]), ...]`` (e.g.
    :meth:`mmunlearn.data.linked.LinkedWorld.stages`); ``steps``: ``{name: n}``. Every step of
    a stage draws a pool with probability ∝ its weight, then ``bs`` distinct items of it (all
    of them if fewer), collated when drawn. Each stage has a fresh AdamW (lr ``lr``, no weight
    decay, clip 1.0) and a ``random.Random(f"{seed}:{name}")`` stream, so two runs that reach
    a stage with the same weights continue identically (the reference model reuses the
    vanilla model's first stage). ``decay``: the lr falls linearly to 0 over every stage.
    ``callback(name, model)`` runs after each stage. Returns the model, in eval mode."""
    for name, pools in stages:
        pools = [(list(items), w) for items, w in pools if items and w > 0]
        n = int(steps.get(name, 0))
        if n <= 0:
            continue
        if not pools:
            raise ValueError(f"stage {name!r} has no non-empty pool")
        rng = random.Random(f"{seed}:{name}")
        opt = MaskedAdamW(model.parameters(), lr=lr, weight_decay=0.0)
        model.train()
        weights = [w for _, w in pools]
        bar = tqdm(range(n), desc=f"stage {name}", disable=not (progress and is_rank0()))
        for i in bar:
            if decay:
                for g in opt.param_groups:
                    g["lr"] = lr * (1.0 - i / n)
            items = rng.choices(pools, weights)[0][0]
            batch = adapter.collate(rng.sample(items, min(bs, len(items))))
            loss = batch_loss(model, batch, dev)
            loss.backward()
            opt.step(max_grad_norm=1.0)
            opt.zero_grad()
        model.eval()
        if callback is not None:
            callback(name, model)
    model.eval()
    return model


def finetune_twins(
    model, twin, adapter, stages, twin_stages, steps, lr, bs, seed, dev, progress=True, decay=False
):
    """Two curricula from the same initial weights (``twin`` is overwritten with ``model``'s):
    ``model`` through ``stages``, ``twin`` through ``twin_stages``. Their common leading
    stages (same name, same pools, same weights) are trained once and copied, which gives
    exactly what training both would (:func:`finetune_stages` seeds each stage by name).
    Used for the vanilla and reference models of the linked world, which share the text stage.
    ``decay``: as :func:`finetune_stages`.
    Returns ``(model, twin)`` in eval mode."""
    n = 0
    while n < min(len(stages), len(twin_stages)) and _same_stage(stages[n], twin_stages[n]):
        n += 1
    args = (steps, lr, bs, seed, dev, progress)
    finetune_stages(model, adapter, stages[:n], *args, decay=decay)
    twin.load_state_dict(model.state_dict())
    finetune_stages(model, adapter, stages[n:], *args, decay=decay)
    finetune_stages(twin, adapter, twin_stages[n:], *args, decay=decay)
    return model.eval(), twin.eval()


def _same_stage(a, b) -> bool:
    (na, pa), (nb, pb) = a, b
    return na == nb and [(list(map(id, i)), w) for i, w in pa] == [
        (list(map(id, i)), w) for i, w in pb
    ]


__all__ = ["finetune", "finetune_stages", "finetune_twins"]
