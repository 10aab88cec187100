"""The compact unlearning loop: one optimizer, forget/retain steps interleaved as the official
MMUnlearner code does, clipping, masked steps, streamed batches, a JSON-lines log, periodic
evaluation, atomic checkpoints, resume, NaN guard.

Schedule (deterministic given the seed): per epoch walk the (shuffled) retain batches; before
every ``forget_freq``-th retain step (``forget_freq = len(retain) // len(forget)`` by default)
take one forget step on the next forget batch (``forget_cap``: each forget batch at most once
per epoch, as the official loop whose forget iterator runs dry). Methods without a retain step
(GA, NPO) walk the forget batches only. A step consumes ``grad_accum`` batches.

Forget steps of MMUnlearner are masked. ``mask_mode="masked_step"`` (ours): only salient weights
move, everything else (weights, moments) is untouched. ``"zero_grad"`` (the official code): the
gradient is clipped, multiplied by the mask and a plain AdamW step follows, so masked-out
weights still move by the momentum of earlier retain steps. The global gradient norm is clipped
to ``max_grad_norm`` before the mask is applied (the official order); ``retain_max_grad_norm``
clips retain steps (``"same"``: ``max_grad_norm``).

Batches come from any sized, indexable source (a list of batches, or a
:class:`~mmunlearn.data.batching.BatchSource` that collates on demand) through a
``DataLoader`` over the planned indices (``workers`` processes, pinned memory on CUDA), so only
the batches in flight exist, and a resumed run starts exactly where the checkpoint stopped.
"""

from __future__ import annotations

import copy
import inspect
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from mmunlearn.checkpoint import (
    CKPT,
    find_checkpoint,
    load_checkpoint,
    run_identity,
    save_checkpoint,
)
from mmunlearn.data.batching import to_device
from mmunlearn.distributed import (
    all_reduce_sum_,
    is_rank0,
    is_sharded,
    local,
    require_reduced_grads,
    world_size,
)
from mmunlearn.losses import local_batch
from mmunlearn.methods import Method
from mmunlearn.optim import MaskedAdamW
from mmunlearn.runlog import RunLog, grad_norm, mask_fraction


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the step was not applied and the last checkpoint is intact."""


@dataclass
class UnlearnConfig:
    """Hyper-parameters of :func:`unlearn` (defaults: the paper's runs)."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8  # Adam ε (the official code: transformers' AdamW, 1e-6)
    max_grad_norm: float | None = 1.0  # forget steps (and retain steps with "same")
    retain_max_grad_norm: float | str | None = "same"
    epochs: int = 1
    forget_freq: int | None = None
    forget_cap: bool = False  # each forget batch at most once per epoch (official)
    lr_schedule: str = "linear"  # "linear" decay to 0 or "constant"
    schedule_unit: str = "step"  # the scheduler steps every "step" or every "epoch" (official)
    mask_mode: str = "masked_step"  # or "zero_grad" (official: grad *= mask, plain step)
    clip_order: str = "clip_then_mask"
    unmasked: str = "freeze"
    seed: int = 0
    grad_accum: int = 1  # batches per optimizer step
    max_steps: int | None = None  # stop after this many steps (smoke tests)
    checkpoint_every: int = 0  # steps; 0 = only at the end (when output_dir is given)
    log_every: int = 1  # steps between reading the loss back (a host sync) and logging it
    eval_every: int = 0  # steps between monitor() calls (0: never)
    workers: int = 0  # DataLoader worker processes
    report_to: str | None = None  # "tensorboard"
    grad_checkpointing: bool = False
    progress: bool = True
    backend: str = "auto"

    def __post_init__(self):
        checks = (
            ("lr_schedule", self.lr_schedule, ("linear", "constant")),
            ("schedule_unit", self.schedule_unit, ("step", "epoch")),
            ("mask_mode", self.mask_mode, ("masked_step", "zero_grad")),
        )
        for name, v, ok in checks:
            if v not in ok:
                raise ValueError(f"{name} must be one of {ok}, got {v!r}")
        if self.report_to not in (None, "none", "tensorboard"):
            raise ValueError(f"report_to must be 'tensorboard' or None, got {self.report_to!r}")
        for name in ("epochs", "grad_accum", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")

    @property
    def retain_clip(self) -> float | None:
        r = self.retain_max_grad_norm
        return self.max_grad_norm if r == "same" else r


def build_schedule(
    method: Method,
    n_forget: int,
    n_retain: int,
    epochs: int = 1,
    forget_freq: int | None = None,
    seed: int = 0,
    forget_cap: bool = False,
) -> list[tuple[str, int]]:
    """The list of (kind, step index) steps, kind "forget" or "retain" (see the module
    docstring; ``forget_cap``: a forget step only while the epoch's forget batches last)."""
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
            if step % freq == 0 and not (forget_cap and fi >= n_forget):
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


def _epoch_ends(plan, method: Method, n_forget: int, n_retain: int) -> set[int]:
    """Indices of the last step of every epoch of ``plan``."""
    kind, per = ("retain", n_retain) if method.has_retain else ("forget", n_forget)
    ends, seen = set(), 0
    for i, (k, _) in enumerate(plan):
        if k == kind:
            seen += 1
            if seen % per == 0:
                ends.add(i)
    return ends


def _stream(source, indices: list[int], workers: int, pin: bool):
    """Batches ``source[i]`` for ``i`` in ``indices``, in order, through a DataLoader."""
    if not indices:
        return iter(())
    loader = torch.utils.data.DataLoader(
        source,
        batch_size=None,
        sampler=indices,
        num_workers=workers,
        pin_memory=pin,
        collate_fn=lambda b: b,
    )
    return iter(loader)


def _zero_grad_mask_step(opt, params, max_grad_norm, found_inf=None) -> None:
    """The official forget step: clip the unmasked gradient, multiply by the masks (parameters
    without a mask keep their whole gradient), then a plain AdamW step over everything
    (skipped on the device where ``found_inf`` is set)."""
    if max_grad_norm is not None:
        grads = [p for p in params if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, max_grad_norm)
    for p in params:
        if p.grad is not None and opt.get_mask(p) is not None:
            local(p.grad).mul_(opt.get_mask(p, dense=True).to(local(p.grad).dtype))
    if found_inf is None:
        opt.step(masked=False, max_grad_norm=None)
    else:
        opt.step(masked=False, max_grad_norm=None, found_inf=found_inf)


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
    monitor: Callable | None = None,
    on_best: Callable | None = None,
) -> dict:
    """Unlearn ``forget`` from ``model`` in place with ``method``.

    ``forget`` / ``retain``: sized, indexable sources of model-ready batches (dicts with
    ``labels``): lists, or :class:`~mmunlearn.data.batching.BatchSource`; batches are moved
    to the model's device as they are used. ``masks``: ``{param: bool or packed mask}`` for
    MMUnlearner (required for it). ``ref_model``: the frozen reference for KL_Min / NPO
    (default: a frozen copy of ``model`` taken before the first step). ``output_dir``: where
    checkpoints and ``log.jsonl`` go; ``resume=True`` continues from
    ``output_dir/checkpoint`` when present. ``callback(step, kind, loss)`` runs after every
    applied step whose loss is read back (every ``log_every`` steps). ``monitor(model, step)``
    (every ``eval_every`` steps and at the end) returns a metrics dict with a ``"score"``
    (higher is better); ``on_best(model, step, metrics)`` runs when the score improves.
    Returns ``{"history": [{"step", "kind", "loss"}...], "steps": n, "resumed_from": k,
    "evals": [...], "best": {...} | None, "finished": bool}`` (``finished``: ``resume`` found
    the run already complete and did nothing). A resume whose settings, data or masks differ
    from the checkpoint's raises :class:`~mmunlearn.checkpoint.ResumeMismatchError`. Raises
    :class:`NonFiniteLossError` on a NaN/inf loss (that step is not applied; with
    ``log_every > 1`` the step after which it is read).
    """
    cfg = config or UnlearnConfig()
    method = Method(method) if isinstance(method, str) else method
    if method.uses_mask and not masks:
        raise ValueError("MMUnlearner needs saliency masks (masks={param: mask})")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        unmasked=cfg.unmasked,
        clip_order=cfg.clip_order,
        backend=cfg.backend,
    )
    if masks:
        opt.set_masks(masks)
    ga = int(cfg.grad_accum)
    n_f, n_r = len(forget) // ga, len(retain) // ga
    if len(forget) and not n_f:
        raise ValueError(f"{len(forget)} forget batches for grad_accum {ga}")
    plan = build_schedule(
        method, n_f, n_r, cfg.epochs, cfg.forget_freq, cfg.seed, forget_cap=cfg.forget_cap
    )
    if cfg.max_steps is not None:
        plan = plan[: int(cfg.max_steps)]
    total = len(plan)
    epoch_ends = _epoch_ends(plan, method, n_f, n_r)
    if cfg.lr_schedule == "linear":
        lam = lambda s: max(0.0, 1.0 - s / max(1, total))  # noqa: E731
    else:
        lam = lambda s: 1.0  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)

    start, history = 0, []
    ckpt = os.path.join(output_dir, CKPT) if output_dir else None
    identity = run_identity(method, cfg, forget, retain, model, masks) if output_dir else None
    found = find_checkpoint(output_dir) if (resume and output_dir) else None
    if found:
        start, history = load_checkpoint(found, model, opt, sched, identity)
    resumed_from = start
    if found and start >= total:
        model.eval()
        return {
            "history": history,
            "steps": total,
            "resumed_from": start,
            "evals": [],
            "best": None,
            "finished": True,
        }
    if sharded and cfg.progress and not is_rank0():
        cfg = replace(cfg, progress=False)  # one progress bar per run, rank 0's

    dev = next((local(p).device for p in params), torch.device("cpu"))
    pin = dev.type == "cuda"
    micro = {
        k: [m * ga + j for kind, m in plan[start:] if kind == k for j in range(ga)]
        for k in ("forget", "retain")
    }
    streams = {
        "forget": _stream(forget, micro["forget"], cfg.workers, pin),
        "retain": _stream(retain, micro["retain"], cfg.workers, pin),
    }
    # a device-side non-finite flag instead of a host sync, when the loss is not read anyway
    takes_flag = cfg.log_every > 1 and "found_inf" in inspect.signature(opt.step).parameters
    log = RunLog(output_dir, cfg.report_to)
    fraction = mask_fraction(opt) if method.uses_mask else None
    evals: list[dict] = []
    best: dict | None = None
    pending: list = []  # (step, kind, batch, device flag) of steps whose loss is not read yet

    def run_monitor(step: int) -> None:
        nonlocal best
        model.eval()
        with torch.no_grad():
            metrics = dict(monitor(model, step))
        model.train()
        row = {"step": step, "phase": "eval", **metrics}
        evals.append(row)
        log.write(row)
        if best is None or metrics["score"] > best["score"]:
            best = row
            if on_best is not None:
                on_best(model, step, metrics)

    bar = tqdm(
        total=total,
        initial=start,
        desc=f"unlearn[{method.name}]",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            kind, idx = plan[step]
            loss_sum = None
            for _ in range(ga):
                # under torchrun every rank computes its slice of the same global batch
                batch = local_batch(model, to_device(next(streams[kind]), dev))
                if kind == "forget":
                    loss = method.forget_loss(model, batch, ref_model)
                else:
                    loss = method.retain_loss(model, batch, ref_model)
                (loss / ga).backward()
                d = loss.detach() / ga
                loss_sum = d if loss_sum is None else loss_sum + d
            logged = (step + 1) % cfg.log_every == 0 or step + 1 == total
            value = None
            flag = None
            if takes_flag:  # this step's non-finite flag, on the device (every rank agrees)
                flag = ~torch.isfinite(loss_sum.reshape(1))
                if world_size() > 1:
                    flag = all_reduce_sum_(flag.float()) > 0
                pending.append((step, kind, idx, flag))
            if logged and pending:  # one read for every flag since the last log
                bad = torch.cat([f.reshape(1) for *_, f in pending]).cpu()
                if bool(bad.any()):
                    s0, k0, i0, _ = pending[int(bad.nonzero()[0])]
                    opt.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(
                        f"non-finite {k0} loss at step {s0} of {total} (method {method.name}, "
                        f"{k0} batch {i0}); that step and every non-finite one up to step "
                        f"{step} were not applied; last good checkpoint: "
                        f"{ckpt if ckpt and os.path.isdir(ckpt) else 'none'}"
                    )
                pending.clear()
            if logged or not takes_flag:
                # the global loss (all ranks agree, so a NaN stops every rank at the same step)
                value = _global_value(loss_sum)
                if not np.isfinite(value):
                    opt.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(
                        f"non-finite {kind} loss ({value}) at step {step} of {total} "
                        f"(method {method.name}, {kind} batch {idx}); the step was not "
                        "applied; last good checkpoint: "
                        f"{ckpt if ckpt and os.path.isdir(ckpt) else 'none'}"
                    )
            gnorm = grad_norm(params) if logged else None
            clip = cfg.max_grad_norm if kind == "forget" else cfg.retain_clip
            masked = kind == "forget" and method.uses_mask
            if masked and cfg.mask_mode == "zero_grad":
                _zero_grad_mask_step(opt, params, clip, flag)
            elif takes_flag:
                opt.step(masked=masked, max_grad_norm=clip, found_inf=flag)
            else:
                opt.step(masked=masked, max_grad_norm=clip)
            opt.zero_grad(set_to_none=True)
            lr = opt.param_groups[0]["lr"]
            if cfg.schedule_unit == "step" or step in epoch_ends:
                sched.step()
            if value is not None:
                history.append({"step": step, "kind": kind, "loss": value})
                bar.set_postfix({kind: f"{value:.3f}"}, refresh=False)
            bar.update(1)
            if logged:
                row = {"step": step, "epoch": sum(1 for e in epoch_ends if e < step)}
                row.update(phase=kind, loss=value, lr=lr, grad_norm=gnorm)
                row.update(masked_fraction=fraction if masked else None)
                row["seconds"] = round(time.perf_counter() - t0, 4)
                log.write(row)
            if monitor is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                run_monitor(step)
            if ckpt and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                save_checkpoint(output_dir, model, opt, sched, step + 1, history, cfg, identity)
            if logged and callback is not None:
                callback(step, kind, value)
        if monitor is not None and (not evals or evals[-1]["step"] != total - 1) and total:
            run_monitor(total - 1)
    finally:
        bar.close()
        log.close()
    if ckpt:
        save_checkpoint(output_dir, model, opt, sched, total, history, cfg, identity)
    model.eval()
    return {
        "history": history,
        "steps": total,
        "resumed_from": resumed_from,
        "evals": evals,
        "best": best,
        "finished": False,
    }
