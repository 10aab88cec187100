"""Ordinary fine-tuning: how a vanilla model learns the benchmark before anything is unlearned
(and how the reference model learns it without the forget set).

:func:`train` is the fine-tuning run of ``mmunlearn finetune``: the unlearning loop's machinery
(:func:`mmunlearn.loop.run_plan`: the optimizer and lr schedule of a
:class:`~mmunlearn.config.RunConfig`, gradient accumulation, streamed batches, the non-finite
guard, ``log.jsonl``, checkpoints with a checked resume, preemption, FSDP2 under torchrun) with
one kind of step, descent on the mean token cross-entropy (:data:`DESCENT`), over a seeded
shuffle of the batches in every epoch.

Plain AdamW (:class:`~mmunlearn.optim.MaskedAdamW` with no mask), global-norm clipping at 1.0,
the loss of each global batch from :func:`~mmunlearn.losses.batch_loss` (this rank's rows under
FSDP2). :func:`finetune` draws batches with :func:`~mmunlearn.data.batching.make_batches` in
seeded epochs; :func:`finetune_stages` runs a curriculum (the linked world's text → identity →
grounding stages), each stage drawing its batches from weighted pools with its own optimizer
and its own seeded stream, so a stage's result depends only on the model it starts from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from mmunlearn.checkpoint import fingerprint
from mmunlearn.config import RunConfig
from mmunlearn.data.batching import make_batches
from mmunlearn.distributed import is_rank0, require_reduced_grads
from mmunlearn.loop import run_plan
from mmunlearn.losses import batch_loss, mean_ce
from mmunlearn.optim import MaskedAdamW


@dataclass(frozen=True)
class Descent:
    """Fine-tuning as the loop's :class:`~mmunlearn.stepper.Stepper` sees a method: every step
    is a ``train`` step minimising the mean token cross-entropy of the batch's label tokens."""

    name: str = "finetune"
    uses_mask: bool = False
    has_retain: bool = True  # unmasked steps (so no compact optimizer state)
    needs_reference: bool = False

    def retain_loss(self, model, batch, ref_model=None) -> torch.Tensor:
        return mean_ce(model(**batch), batch)

    def forget_loss(self, model, batch, ref_model=None) -> torch.Tensor:
        raise ValueError("fine-tuning has no forget steps")


DESCENT = Descent()


def train_plan(n_batches: int, cfg: RunConfig) -> tuple[list, set[int]]:
    """The steps of a fine-tuning run over ``n_batches`` batches: ``cfg.epochs`` passes, each
    over the ``n_batches // grad_accum`` steps in an order drawn from ``random.Random(seed)``;
    cut at ``max_steps``. Returns ``([("train", i), ...], indices of each epoch's last step)``."""
    per = n_batches // cfg.grad_accum
    if per < 1:
        raise ValueError(f"{n_batches} batches make no step of grad_accum {cfg.grad_accum}")
    rng = random.Random(cfg.seed)
    plan: list = []
    for _ in range(cfg.epochs):
        order = list(range(per))
        rng.shuffle(order)
        plan += [("train", i) for i in order]
    if cfg.max_steps is not None:
        plan = plan[: cfg.max_steps]
    ends = {(e + 1) * per - 1 for e in range(cfg.epochs)}
    return plan, {i for i in ends if i < len(plan)}


def train(model, source, *, config: RunConfig | None = None, output_dir: str | None = None,
          resume: bool = False, identity: dict | None = None, callback=None,
          preemption=None) -> dict:  # fmt: skip
    """Fine-tune ``model`` in place on ``source`` (a sized, indexable source of model-ready
    batches: a list, or a :class:`~mmunlearn.data.batching.BatchSource`) with the optimizer,
    schedule, clipping (``max_grad_norm``) and system settings of ``config``
    (:func:`train_plan` says which batches each step takes).

    ``output_dir``: checkpoints (every ``checkpoint_every`` steps and at the end) and
    ``log.jsonl``; ``resume=True`` continues from its checkpoint when it holds the same run:
    the config's :meth:`~mmunlearn.config.RunConfig.identity`, the data's fingerprint and
    ``identity`` (more settings a resume must match, e.g. which training set) — else
    :class:`~mmunlearn.checkpoint.ResumeMismatchError`. ``callback`` and ``preemption`` as in
    :func:`mmunlearn.loop.unlearn`; on an FSDP2-sharded model every rank takes its rows of each
    global batch. Returns :func:`mmunlearn.loop.unlearn`'s dict (``history`` rows have kind
    ``"train"``); the model is left in eval mode."""
    cfg = config or RunConfig()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    require_reduced_grads(model, "finetune")
    model.train()
    plan, ends = train_plan(len(source), cfg)
    ident = None
    if output_dir:
        ident = {"task": "finetune", "config": cfg.identity(), "data": fingerprint(source)}
        ident.update(identity or {})
    return run_plan(model, DESCENT, {"train": source}, plan, ends, cfg, identity=ident,
                    output_dir=output_dir, resume=resume, desc="finetune", callback=callback,
                    preemption=preemption)  # fmt: skip


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


__all__ = ["DESCENT", "finetune", "finetune_stages", "finetune_twins", "train", "train_plan"]
