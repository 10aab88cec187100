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

import json
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from tqdm.auto import tqdm

from mmunlearn import fsdp
from mmunlearn.dist import all_reduce_sum_, image_token_id, is_rank0, shard_batch, world_size
from mmunlearn.methods import Method
from mmunlearn.optim import MaskedAdamW

CKPT = "checkpoint"


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


def _rng_state() -> dict:
    st = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _global_value(loss: torch.Tensor) -> float:
    """The loss of the whole global batch as a float (under torchrun each rank's loss is its
    share, ``local_sum / global_count · world``: the mean over ranks is the global loss)."""
    w = world_size()
    if w == 1:
        return loss.item()
    t = loss.detach().float().reshape(1).clone()
    return all_reduce_sum_(t).item() / w


def save_checkpoint(output_dir: str, model, opt, sched, step: int, history: list, config) -> str:
    """Atomically write ``output_dir/checkpoint``: model weights (safetensors), optimizer state
    (masks included), LR schedule, RNG states, step and history. Returns the path.

    An FSDP2-sharded model gets a sharded DCP checkpoint instead
    (:func:`mmunlearn.fsdp.save_sharded_checkpoint`: every rank writes its shards, rank 0
    renames; masks are not stored there — they come from the mask file given again on resume,
    checked by their selected-element count)."""
    if fsdp.is_sharded(model):
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
            os.path.join(output_dir, CKPT), model, opt, extra, _rng_state()
        )
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, CKPT)
    tmp = os.path.join(output_dir, f".{CKPT}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    st_save_model(model, os.path.join(tmp, "model.safetensors"))
    torch.save(
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state()},
        os.path.join(tmp, "trainer.pt"),
    )
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step, "history": history, "config": asdict(config)}, f)
    old = final + ".old"  # between the two renames only the .old copy exists; resume finds it
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _mask_selected(opt) -> int:
    """Selected elements over every mask set on ``opt``, summed over ranks."""
    from mmunlearn.kernels import unpack_bits

    n = 0
    for group in opt.param_groups:
        for p in group["params"]:
            m = opt.state.get(p, {}).get("mask")
            if m is not None:
                local = p.to_local() if hasattr(p, "to_local") else p
                n += int(unpack_bits(m, local.shape, backend="torch").sum())
    t = torch.tensor([n], dtype=torch.int64)
    if world_size() > 1:
        dev = next(iter(opt.param_groups[0]["params"]))
        dev = (dev.to_local() if hasattr(dev, "to_local") else dev).device
        t = all_reduce_sum_(t.to(dev)).cpu()
    return int(t.item())


def find_checkpoint(output_dir: str) -> str | None:
    """The checkpoint to resume from in ``output_dir`` (or its .old twin after a crash
    between the two renames of :func:`save_checkpoint`), or None."""
    for name in (CKPT, CKPT + ".old"):
        path = os.path.join(output_dir, name)
        if os.path.isfile(os.path.join(path, "state.json")):
            return path
    return None


def load_checkpoint(path: str, model, opt, sched) -> tuple[int, list]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns (step, history)."""
    if fsdp.is_sharded(model):
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
            _set_rng_state(rng)
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
    _set_rng_state(blob["rng"])
    return int(state["step"]), list(state["history"])


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
    import copy

    cfg = config or UnlearnConfig()
    method = Method(method) if isinstance(method, str) else method
    if method.uses_mask and not masks:
        raise ValueError("MMUnlearner needs saliency masks (masks={param: mask})")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    sharded = fsdp.is_sharded(model)
    fsdp.require_reduced_grads(model, "unlearn")
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
    itok = image_token_id(model)
    try:
        for step in range(start, total):
            kind, idx = plan[step]
            # under torchrun every rank computes its slice of the same global batch
            if kind == "forget":
                loss = method.forget_loss(
                    model, shard_batch(forget[idx], image_token_id=itok), ref_model
                )
            else:
                loss = method.retain_loss(
                    model, shard_batch(retain[idx], image_token_id=itok), ref_model
                )
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
