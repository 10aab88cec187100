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

How it reads: :func:`unlearn` sets up (optimizer, plan, scheduler, the run's
:class:`~mmunlearn.checkpoint.Checkpoints`, resume) and then loops over a :class:`Stepper`
(one forget or retain step and the non-finite guard) followed by hooks (:class:`LogHook`,
:class:`EvalHook`, :class:`CheckpointHook`, :class:`CallbackHook`), each readable and
testable on its own.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from mmunlearn.checkpoint import Checkpoints, read_state, run_identity
from mmunlearn.config import RunConfig
from mmunlearn.distributed import is_rank0, is_sharded, require_reduced_grads
from mmunlearn.methods import Method
from mmunlearn.optim import MaskedAdamW
from mmunlearn.runlog import RunLog, mask_fraction
from mmunlearn.stepper import (
    CallbackHook,
    CheckpointHook,
    EvalHook,
    LogHook,
    NonFiniteLossError,
    PreemptHook,
    Stepper,
)


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


# ------------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------------


def epoch_ends(plan, method: Method, n_forget: int, n_retain: int) -> set[int]:
    """Indices of the last step of every epoch of ``plan`` (``n_forget`` / ``n_retain``
    steps' batches per epoch)."""
    kind, per = ("retain", n_retain) if method.has_retain else ("forget", n_forget)
    ends, seen = set(), 0
    for i, (k, _) in enumerate(plan):
        if k == kind:
            seen += 1
            if seen % per == 0:
                ends.add(i)
    return ends


def _prepare_model(model, method: Method, masks, ref_model, cfg: RunConfig):
    """Seeds, gradient checkpointing, checks; the frozen reference model (or None)."""
    if method.uses_mask and not masks:
        raise ValueError("MMUnlearner needs saliency masks (masks={param: mask})")
    if method.uses_mask and cfg.lora:
        raise ValueError("lora: MMUnlearner's saliency mask selects base weights, which LoRA "
                         "freezes; use LoRA with ga, ga_diff, kl_min or npo")  # fmt: skip
    method.check_model(model)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    require_reduced_grads(model, "unlearn")
    if method.needs_reference and ref_model is None:
        if is_sharded(model):
            raise ValueError(
                f"{method.name} on an FSDP2-sharded model needs ref_model= (a second sharded "
                "copy of the vanilla model); a sharded model cannot be deep-copied"
            )
        ref_model = copy.deepcopy(model)
    if ref_model is not None:
        ref_model.eval().requires_grad_(False)
    model.train()
    return ref_model


def _optimizer(model, method: Method, cfg: RunConfig, masks) -> MaskedAdamW:
    if cfg.grad_release and is_sharded(model):
        raise ValueError(
            "grad_release needs plain parameters: FSDP2 reduce-scatters gradients outside the "
            "hooks that step them; run without --grad-release under torchrun"
        )
    if cfg.compact_state and (method.has_retain or not method.uses_mask):
        raise ValueError(
            f"compact_state keeps moments for masked elements only, but method {method.name} "
            "takes unmasked steps (retain steps, or no mask); use it where every step is masked"
        )
    opt = MaskedAdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        unmasked=cfg.unmasked,
        clip_order=cfg.clip_order,
        backend=cfg.backend,
        state_dtype=torch.bfloat16 if cfg.state_dtype == "bf16" else torch.float32,
        param_sr=cfg.param_sr,
        compact_state=cfg.compact_state,
        seed=cfg.seed,
    )
    if masks:
        opt.set_masks(masks)
    return opt


def _plan(method: Method, forget, retain, cfg: RunConfig) -> tuple[list, set[int]]:
    """The run's steps (:func:`build_schedule` over whole ``grad_accum`` groups) and the
    indices of each epoch's last step."""
    ga = cfg.grad_accum
    n_f, n_r = len(forget) // ga, len(retain) // ga
    if len(forget) and not n_f:
        raise ValueError(f"{len(forget)} forget batches for grad_accum {ga}")
    plan = build_schedule(
        method, n_f, n_r, cfg.epochs, cfg.forget_freq, cfg.seed, forget_cap=cfg.forget_cap
    )
    if cfg.max_steps is not None:
        plan = plan[: cfg.max_steps]
    return plan, epoch_ends(plan, method, n_f, n_r)


def _scheduler(opt, cfg: RunConfig, total: int):
    if cfg.lr_schedule == "linear":
        lam = lambda s: max(0.0, 1.0 - s / max(1, total))  # noqa: E731
    else:
        lam = lambda s: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, lam)


def _streams(sources: Mapping, plan, start: int, cfg: RunConfig, device) -> dict:
    """The batches of steps ``start..`` of ``plan``, per kind (``sources``: ``{kind:
    source}``), through DataLoaders."""
    ga, pin = cfg.grad_accum, device.type == "cuda"
    out = {}
    for k, source in sources.items():
        micro = [m * ga + j for kind, m in plan[start:] if kind == k for j in range(ga)]
        out[k] = _stream(source, micro, cfg.workers, pin)
    return out


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------


def unlearn(
    model,
    method: Method | str,
    forget: Sequence[Mapping],
    retain: Sequence[Mapping] = (),
    *,
    masks: Mapping | None = None,
    ref_model=None,
    config: RunConfig | None = None,
    output_dir: str | None = None,
    resume: bool = False,
    callback=None,
    monitor: Callable | None = None,
    on_best: Callable | None = None,
    preemption=None,
) -> dict:
    """Unlearn ``forget`` from ``model`` in place with ``method`` (a name, whose loss forms
    come from ``config``, or a :class:`~mmunlearn.methods.Method`). MANU is one edit without
    steps (:func:`_one_shot`: no optimizer, no checkpoint; ``"manu"`` in the result);
    MIP-Editor edits its paths first (``"mip"`` in the result); SMFA is three runs and a
    merge (:func:`_smfa`; ``"smfa"`` in the result).

    ``forget`` / ``retain``: sized, indexable sources of model-ready batches (dicts with
    ``labels``): lists, or :class:`~mmunlearn.data.batching.BatchSource`; batches are moved
    to the model's device as they are used (SMFA: a BatchSource or ``make_batches``' batches,
    whose samples it relabels). ``masks``: ``{param: bool or packed mask}`` for
    MMUnlearner (required for it). ``ref_model``: the frozen reference for KL_Min / NPO / RMU /
    UNDIAL (default: a frozen copy of ``model`` taken before the first step). ``config``: the
    :class:`~mmunlearn.config.RunConfig` (default: ours). ``output_dir``: where checkpoints and
    ``log.jsonl`` go; ``resume=True`` continues from ``output_dir/checkpoint`` when present.
    ``callback(step, kind, loss)`` runs after every applied step whose loss is read back
    (every ``log_every`` steps). ``monitor(model, step)`` (every ``eval_every`` steps and at
    the end) returns a metrics dict with a ``"score"`` (higher is better); ``on_best(model,
    step, metrics)`` runs when the score improves. ``preemption``: a
    :class:`~mmunlearn.runctl.Preemption`; a signal it caught stops the run after the current
    step with a checkpoint (:class:`~mmunlearn.runctl.PreemptedError`).
    Returns ``{"history": [{"step", "kind", "loss"}...], "steps": n, "resumed_from": k,
    "evals": [...], "best": {...} | None, "finished": bool}`` (``finished``: ``resume`` found
    the run already complete and did nothing). A resume whose settings, data or masks differ
    from the checkpoint's raises :class:`~mmunlearn.checkpoint.ResumeMismatchError`. Raises
    :class:`NonFiniteLossError` on a NaN/inf loss (that step is not applied; with
    ``log_every > 1`` the step after which it is read).
    """
    cfg = config or RunConfig()
    method = cfg.method_for(method) if isinstance(method, str) else method
    if method.one_shot:
        return _one_shot(model, method, forget, retain, cfg, output_dir)
    if method.phased:
        if monitor is not None:
            raise ValueError("eval_every: SMFA's model exists only once its three runs are "
                             "merged; evaluate the result instead")  # fmt: skip
        return _smfa(model, method, forget, retain, cfg, output_dir, resume, callback,
                     preemption)  # fmt: skip
    _refuse_edit(model, method, cfg)
    ref_model = _prepare_model(model, method, masks, ref_model, cfg)
    plan, ends = _plan(method, forget, retain, cfg)
    identity = run_identity(method, cfg, forget, retain, model, masks) if output_dir else None
    edit = _edit_paths(model, method, forget, output_dir) if method.edits_paths else None
    if edit is not None and identity is not None:
        identity["mip_paths"] = edit.digest  # a resume must edit the same paths
    try:
        out = run_plan(
            model, method, {"forget": forget, "retain": retain}, plan, ends, cfg,
            masks=masks, ref_model=ref_model, identity=identity, output_dir=output_dir,
            resume=resume, desc=f"unlearn[{method.name}]", callback=callback, monitor=monitor,
            on_best=on_best, preemption=preemption,
        )  # fmt: skip
    finally:
        if edit is not None:
            edit.remove()  # the model keeps no hooks of this run
    if edit is not None:
        out["mip"] = edit.report
    return out


def _refuse_edit(model, method: Method, cfg: RunConfig) -> None:
    """ValueError where a method that edits or snapshots whole weights cannot run."""
    if not (method.edits_paths or method.phased):
        return
    if is_sharded(model):
        raise ValueError(f"{method.name} edits whole weight tensors: run it in one process "
                         "(no FSDP2)")  # fmt: skip
    if cfg.lora:
        raise ValueError(f"lora: {method.name} is implemented at full parameter here (its "
                         "edit and merge act on the base weights, which LoRA freezes)")  # fmt: skip


def _edit_paths(model, method: Method, forget, output_dir):
    """MIP-Editor's path edit on ``model`` (scored on the first forget batches), its columns
    held at zero; one ``log.jsonl`` row (phase ``mip_paths``)."""
    from mmunlearn.methods.mip import PathEdit

    edit = PathEdit(model, forget, method.mip_topk, method.mip_batches).apply()
    log = RunLog(output_dir, None)
    try:
        log.write({"step": 0, "phase": "mip_paths", **edit.report})
    finally:
        log.close()
    model.train()
    return edit


def _smfa_plan(phase: str, sources: Mapping, method: Method, cfg: RunConfig):
    """The steps of one SMFA update over ``sources`` (``{kind: source}``, two kinds): the
    forget updates interleave their refusal steps with retain steps as GA_Diff does
    (:func:`build_schedule`); the anchor takes a step on each retain batch, then one on its
    text-only twin."""
    ga = cfg.grad_accum
    kinds = list(sources)
    n = [len(sources[k]) // ga for k in kinds]
    if phase == "anchor":
        if n[0] < 1:
            raise ValueError(f"{len(sources[kinds[0]])} retain batches for grad_accum {ga}")
        rng = random.Random(cfg.seed)
        plan, ends = [], set()
        for _ in range(cfg.epochs):
            order = list(range(n[0]))
            rng.shuffle(order)
            plan += [(k, i) for i in order for k in kinds]
            ends.add(len(plan) - 1)
    else:
        if len(sources[kinds[0]]) and not n[0]:
            raise ValueError(f"{len(sources[kinds[0]])} forget batches for grad_accum {ga}")
        base = build_schedule(method, n[0], n[1], cfg.epochs, cfg.forget_freq, cfg.seed,
                              forget_cap=cfg.forget_cap)  # fmt: skip
        ends = epoch_ends(base, method, n[0], n[1])
        plan = [(kinds[0] if k == "forget" else kinds[1], i) for k, i in base]
    if cfg.max_steps is not None:
        plan = plan[: cfg.max_steps]
    return plan, {e for e in ends if e < len(plan)}


def _smfa(model, method: Method, forget, retain, cfg: RunConfig, output_dir, resume, callback,
          preemption) -> dict:  # fmt: skip
    """SMFA (:mod:`mmunlearn.methods.smfa`): the anchor, multimodal and text updates, each a
    run of :func:`run_plan` from the start weights (its own optimizer, schedule, log and
    checkpoints in ``output_dir/smfa_<phase>``, so an interrupted phase resumes and a finished
    one is read back), then the merge. ``steps`` counts the three runs' steps; ``"smfa"`` in
    the result says what the sculpting zeroed; one ``log.jsonl`` row (phase ``smfa_merge``)."""
    from mmunlearn.checkpoint import fingerprint
    from mmunlearn.methods import smfa

    _refuse_edit(model, method, cfg)
    sources = smfa.views(forget, retain, cfg.seed)
    _prepare_model(model, method, None, None, cfg)
    sculptor = smfa.Sculptor({n: p for n, p in model.named_parameters() if p.requires_grad})
    out = {"history": [], "steps": 0, "resumed_from": 0, "evals": [], "best": None}
    report: dict = {"multi_k": method.smfa_multi_k, "text_k": method.smfa_text_k}
    finished = True
    for phase in smfa.PHASES:
        sculptor.reset()
        src = sources[phase]
        plan, ends = _smfa_plan(phase, src, method, cfg)
        sub = os.path.join(output_dir, f"smfa_{phase}") if output_dir else None
        identity = None
        if sub:
            identity = {"method": asdict(method), "phase": phase, "config": cfg.identity(),
                        "data": {k: fingerprint(v) for k, v in src.items()}}  # fmt: skip
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        r = run_plan(model, smfa.PhaseLoss(phase=phase), src, plan, ends, cfg,
                     identity=identity, output_dir=sub, resume=resume, desc=f"smfa[{phase}]",
                     callback=callback, preemption=preemption)  # fmt: skip
        model.train()
        out["history"] += r["history"]
        out["steps"] += r["steps"]
        out["resumed_from"] += r["resumed_from"]
        finished = finished and r["finished"]
        if phase == "anchor":
            sculptor.take_anchor()
        else:
            k = method.smfa_multi_k if phase == "multi" else method.smfa_text_k
            report[phase] = sculptor.add(k)
    sculptor.apply()
    log = RunLog(output_dir, cfg.report_to)
    try:
        log.write({"step": out["steps"], "phase": "smfa_merge", **report})
    finally:
        log.close()
    model.eval()
    return {**out, "finished": finished, "smfa": report}


def run_plan(model, method, sources: Mapping, plan, ends, cfg: RunConfig, *, masks=None,
             ref_model=None, identity=None, output_dir=None, resume=False, desc="train",
             callback=None, monitor=None, on_best=None, preemption=None) -> dict:  # fmt: skip
    """The steps of ``plan`` (``[(kind, batch index), ...]``, ``ends``: each epoch's last step)
    on ``sources`` (``{kind: source}``) with ``method``'s losses: the optimizer, the lr
    schedule, the run's :class:`~mmunlearn.checkpoint.Checkpoints` (``identity``: what a resume
    must match) and resume, the :class:`Stepper` and its hooks. What :func:`unlearn` and
    :func:`mmunlearn.train.train` share; their docstrings say what the arguments mean and
    what is returned."""
    opt = _optimizer(model, method, cfg, masks)
    sched = _scheduler(opt, cfg, len(plan))
    ckpts = Checkpoints(output_dir, model, identity) if output_dir else None
    found = ckpts.latest() if (resume and ckpts) else None
    start, history = ckpts.restore(found, opt, sched) if found else (0, [])
    out = {"history": history, "steps": len(plan), "resumed_from": start, "evals": []}
    out.update(best=None, finished=bool(found) and start >= len(plan))
    if not out["finished"]:
        if is_sharded(model) and not is_rank0():
            cfg = replace(cfg, progress=False)  # one progress bar per run, rank 0's
        steps = Stepper(model, method, opt, sched, cfg, ref_model, plan, ends, ckpts)
        scaled = read_state(found).get("grad_scaler") if found else None
        if steps.scaler is not None and scaled:
            steps.scaler.load_state_dict(scaled)  # the fp16 loss scale where it stopped
        hooks = (callback, monitor, on_best, preemption)
        try:
            out.update(_run(steps, start, history, sources, desc, *hooks))
        finally:
            if steps.release is not None:
                steps.release.close()  # the model's parameters keep no hooks of this run
    model.eval()
    return out


def _one_shot(model, method: Method, forget, retain, cfg: RunConfig, output_dir) -> dict:
    """MANU: one edit of ``model`` from activation statistics, no gradient step; its report
    is the one row of ``log.jsonl`` (phase "manu") and the result's ``"manu"``."""
    from mmunlearn.methods import manu

    torch.manual_seed(cfg.seed)
    report = manu.prune(model, forget, retain, method.manu_percent, method.manu_layers)
    log = RunLog(output_dir, cfg.report_to)
    try:
        log.write({"step": 0, "phase": "manu", **report})
    finally:
        log.close()
    model.eval()
    out = {"history": [], "steps": 0, "resumed_from": 0, "evals": [], "best": None}
    return {**out, "finished": False, "manu": report}


def _run(steps: Stepper, start, history, sources, desc, callback, monitor, on_best,
         preemption) -> dict:  # fmt: skip
    """Steps ``start..`` of the plan through the stepper and the hooks; the final checkpoint."""
    model, opt, cfg, ckpts = steps.model, steps.opt, steps.cfg, steps.checkpoints
    total = steps.total
    steps.streams = _streams(sources, steps.plan, start, cfg, steps.device)
    config = {"method": steps.method.name, **cfg.to_dict()}
    log = RunLog(ckpts.output_dir if ckpts else None, cfg.report_to, config)
    fraction = mask_fraction(opt) if steps.method.uses_mask else None
    bar = tqdm(total=total, initial=start, desc=desc, disable=not cfg.progress,
               dynamic_ncols=True)  # fmt: skip
    hooks: list = [LogHook(log, history, bar, steps.epoch_ends, fraction)]
    evals = EvalHook(model, monitor, cfg.eval_every, log, on_best) if monitor else None
    saver = CheckpointHook(ckpts, opt, steps.sched, cfg, history, steps.scaler) if ckpts else None
    hooks += [h for h in (evals, saver) if h] + ([CallbackHook(callback)] if callback else [])
    if preemption is not None:
        hooks.append(PreemptHook(preemption, saver, total, steps.device))
    try:
        for step in range(start, total):
            r = steps(step)
            for hook in hooks:
                hook.after_step(r)
        if evals:
            evals.finish(total)
            log.table("evals", evals.evals, total - 1)
    finally:
        bar.close()
        log.close()
    if saver:
        saver.save(total)
    return {"evals": evals.evals if evals else [], "best": evals.best if evals else None}


__all__ = ["NonFiniteLossError", "RunConfig", "build_schedule", "epoch_ends", "run_plan", "unlearn"]
