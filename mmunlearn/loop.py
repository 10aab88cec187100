"""The compact unlearning loop: one optimizer, forget/retain steps interleaved as the official
MMUnlearner code does, clipping, masked steps, atomic checkpoints, resume, NaN guard.

Schedule (deterministic given the seed): per epoch walk the (shuffled) retain batches; before
every ``forget_freq``-th retain step (``forget_freq = len(retain) // len(forget)`` by default)
take one forget step on the next forget batch. Methods without a retain step (GA, NPO) walk the
forget batches only. Forget steps of MMUnlearner are masked (only salient weights move); every
other step is a plain AdamW step. The global gradient norm is clipped to ``max_grad_norm``
before the mask is applied (the official order).
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from mmunlearn.checkpoint import CKPT, find_checkpoint, load_checkpoint, save_checkpoint
from mmunlearn.distributed import (
    all_reduce_sum_,
    is_rank0,
    is_sharded,
    require_reduced_grads,
    world_size,
)
from mmunlearn.losses import local_batch
from mmunlearn.methods import Method
from mmunlearn.optim import MaskedAdamW


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the step was not applied and the last checkpoint is intact."""


@dataclass
class UnlearnConfig:
    """Hyper-parameters of :func:`unlearn` (defaults: the paper's runs)."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    epochs: int = 1
    forget_freq: int | None = None
    lr_schedule: str = "linear"  # "linear" decay to 0 or "constant"
    clip_order: str = "clip_then_mask"
    unmasked: str = "freeze"
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at the end (when output_dir is given)
    grad_checkpointing: bool = False
    progress: bool = True
    backend: str = "auto"


def build_schedule(
    method: Method,
    n_forget: int,
    n_retain: int,
    epochs: int = 1,
    forget_freq: int | None = None,
    seed: int = 0,
) -> list[tuple[str, int]]:
    """The list of (kind, batch index) steps, kind "forget" or "retain"."""
    if n_forget < 1:
        raise ValueError("unlearning needs at least one forget batch")
    rng = random.Random(seed)
    steps: list[tuple[str, int]] = []
    for _ in range(epochs):
        f_order = list(range(n_forget))
        rng.shuffle(f_order)
        if not method.has_retain:
            steps += [("forget", i) for i in f_order]
            continue
        if n_retain < 1:
            raise ValueError(f"method {method.name} needs retain batches")
        r_order = list(range(n_retain))
        rng.shuffle(r_order)
        freq = forget_freq or max(1, n_retain // n_forget)
        fi = 0
        for step, ri in enumerate(r_order):
            if step % freq == 0:
                steps.append(("forget", f_order[fi % n_forget]))
                fi += 1
            steps.append(("retain", ri))
    return steps


def _global_value(loss: torch.Tensor) -> float:
    """The loss of the whole global batch as a float (under torchrun each rank's loss is its
    share, ``local_sum / global_count · world``: the mean over ranks is the global loss)."""
    w = world_size()
    if w == 1:
        return loss.item()
    t = loss.detach().float().reshape(1).clone()
    return all_reduce_sum_(t).item() / w


def unlearn(
    model,
    method: Method | str,
    forget: Sequence[Mapping],
    retain: Sequence[Mapping] = (),
    *,
    masks: Mapping | None = None,
    ref_model=None,
    config: UnlearnConfig | None = None,
    output_dir: str | None = None,
    resume: bool = False,
    callback=None,
) -> dict:
    """Unlearn ``forget`` from ``model`` in place with ``method``.

    ``forget`` / ``retain``: sequences of model-ready batches (dicts with ``labels``).
    ``masks``: ``{param: bool or packed mask}`` for MMUnlearner (required for it).
    ``ref_model``: the frozen reference for KL_Min / NPO (default: a frozen copy of ``model``
    taken before the first step). ``output_dir``: where checkpoints go; ``resume=True`` continues
    from ``output_dir/checkpoint`` when present. ``callback(step, kind, loss)`` runs after
    every applied step.
    Returns ``{"history": [{"step", "kind", "loss"}...], "steps": n, "resumed_from": k}``.
    Raises :class:`NonFiniteLossError` on a NaN/inf loss (the step is not applied).
    """
    cfg = config or UnlearnConfig()
    method = Method(method) if isinstance(method, str) else method
    if method.uses_mask and not masks:
        raise ValueError("MMUnlearner needs saliency masks (masks={param: mask})")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    sharded = is_sharded(model)
    require_reduced_grads(model, "unlearn")
    if method.needs_reference and ref_model is None:
        if sharded:
            raise ValueError(
                f"{method.name} on an FSDP2-sharded model needs ref_model= (a second sharded "
                "copy of the vanilla model); a sharded model cannot be deep-copied"
            )
        ref_model = copy.deepcopy(model)
    if ref_model is not None:
        ref_model.eval().requires_grad_(False)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    opt = MaskedAdamW(
        params,
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        unmasked=cfg.unmasked,
        clip_order=cfg.clip_order,
        backend=cfg.backend,
    )
    if masks:
        opt.set_masks(masks)
    plan = build_schedule(method, len(forget), len(retain), cfg.epochs, cfg.forget_freq, cfg.seed)
    total = len(plan)
    if cfg.lr_schedule == "linear":
        lam = lambda s: max(0.0, 1.0 - s / max(1, total))  # noqa: E731
    elif cfg.lr_schedule == "constant":
        lam = lambda s: 1.0  # noqa: E731
    else:
        raise ValueError(f"lr_schedule must be 'linear' or 'constant', got {cfg.lr_schedule!r}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)

    start, history = 0, []
    ckpt = os.path.join(output_dir, CKPT) if output_dir else None
    found = find_checkpoint(output_dir) if (resume and output_dir) else None
    if found:
        start, history = load_checkpoint(found, model, opt, sched)
    resumed_from = start
    if sharded and cfg.progress and not is_rank0():
        cfg = replace(cfg, progress=False)  # one progress bar per run, rank 0's

    bar = tqdm(
        total=total,
        initial=start,
        desc=f"unlearn[{method.name}]",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    try:
        for step in range(start, total):
            kind, idx = plan[step]
            # under torchrun every rank computes its slice of the same global batch
            if kind == "forget":
                loss = method.forget_loss(model, local_batch(model, forget[idx]), ref_model)
            else:
                loss = method.retain_loss(model, local_batch(model, retain[idx]), ref_model)
            # the global loss (all ranks agree, so a NaN stops every rank at the same step)
            value = _global_value(loss)
            if not np.isfinite(value):
                raise NonFiniteLossError(
                    f"non-finite {kind} loss ({value}) at step {step} of {total} "
                    f"(method {method.name}, {kind} batch {idx}); the step was not applied; "
                    f"last good checkpoint: {ckpt if ckpt and os.path.isdir(ckpt) else 'none'}"
                )
            loss.backward()
            opt.step(
                masked=(kind == "forget" and method.uses_mask), max_grad_norm=cfg.max_grad_norm
            )
            opt.zero_grad(set_to_none=True)
            sched.step()
            history.append({"step": step, "kind": kind, "loss": value})
            bar.update(1)
            bar.set_postfix({kind: f"{value:.3f}"}, refresh=False)
            if ckpt and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                save_checkpoint(output_dir, model, opt, sched, step + 1, history, cfg)
            if callback is not None:
                callback(step, kind, value)
    finally:
        bar.close()
    if ckpt:
        save_checkpoint(output_dir, model, opt, sched, total, history, cfg)
    model.eval()
    return {"history": history, "steps": total, "resumed_from": resumed_from}
