"""MMUnlearner's masks (method.md §2): the vision, language and union masks of a model.

One Fisher pass on the forget set over both module groups (:func:`mmunlearn.params.
module_groups`), the vision group's preserve Fisher on multimodal retain data, the language
group's on text QA of the forget entities plus multimodal retain data; each group thresholded
by γ or an exact top-k fraction; ``both`` = vision | language. :func:`masks_from_fishers` redoes
the masks from saved Fishers (no forward pass); :func:`full_mask` gathers a mask made on FSDP2
shards into the full-shape mask every rank holds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from mmunlearn.distributed import full_tensor, is_sharded
from mmunlearn.fisher import FisherInterrupted, collect_fisher, full_fishers, save_fisher
from mmunlearn.kernels import pack_bits
from mmunlearn.params import canonical_parameters, model_class, module_groups
from mmunlearn.saliency import SaliencyMask

log = logging.getLogger(__name__)


def full_mask(local_mask: SaliencyMask, model: torch.nn.Module) -> SaliencyMask:
    """A mask computed on this rank's FSDP2 shards (shapes of the local shards) → the
    full-shape mask, identical on every rank (packed bits on the CPU). Gathers one tensor at a
    time as uint8 (1 byte per element, transiently). Every rank must call it."""
    params = canonical_parameters(model)
    bits, shapes = {}, {}
    for name in local_mask.names:
        p = params[name]
        dense = local_mask.dense(name).to(torch.uint8)
        full = full_tensor(dense, p, to_all=True)
        bits[name] = pack_bits(full.reshape(-1).bool(), backend="torch").cpu()
        shapes[name] = tuple(p.shape)
    return SaliencyMask(bits, shapes, dict(local_mask.meta), local_mask.groups)


def _subset(d: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    return {n: d[n] for n in names}


def masks_from_fishers(
    f_forget: Mapping[str, torch.Tensor],
    f_vision_preserve: Mapping[str, torch.Tensor],
    f_language_preserve: Mapping[str, torch.Tensor],
    groups: Mapping[str, list[str]],
    *,
    gamma: float = 1.0,
    fraction: float | None = None,
    scope: str = "global",
    eps: float = 1e-15,
    model_class: str | None = None,
    backend: str = "auto",
    distributed: bool = False,
) -> dict[str, SaliencyMask]:
    """The vision / language / both masks from saved Fishers (cheap: no forward pass).

    ``f_forget`` covers both groups; ``f_vision_preserve`` the ``groups["vision"]`` names,
    ``f_language_preserve`` the ``groups["language"]`` names. Threshold ``gamma`` unless
    ``fraction`` is given (exact top-k within each group, ``scope`` "global" or "layer").
    ``distributed``: the Fishers are this rank's shards (top-k over all ranks' shards).
    Returns ``{"vision", "language", "both"}`` (both = vision | language)."""
    out: dict[str, SaliencyMask] = {}
    for g, f_pres in (("vision", f_vision_preserve), ("language", f_language_preserve)):
        names = list(groups.get(g, []))
        ff, fp = _subset(f_forget, names), _subset(f_pres, names)
        grp = {g: names}
        if fraction is None:
            m = SaliencyMask.from_fisher(
                ff, fp, gamma, eps, grp, model_class=model_class, backend=backend
            )
        else:
            m = SaliencyMask.topk(
                ff,
                fp,
                fraction,
                scope,
                eps,
                grp,
                model_class=model_class,
                backend=backend,
                distributed=distributed,
            )
        out[g] = m
    out["both"] = out["vision"] | out["language"]
    return out


def _to_cpu(f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``offload``: a finished Fisher on the CPU (pinned when CUDA is available)."""
    pin = torch.cuda.is_available()
    return {k: (v.cpu().pin_memory() if pin and v.is_cuda else v.cpu()) for k, v in f.items()}


FISHER_SETS = ("forget", "vision_preserve", "language_preserve")


def _mask_fishers(
    model: torch.nn.Module, batches: tuple, vision: list[str], language: list[str], kw, offload,
    resume: Mapping | None = None,
) -> tuple[dict, dict, dict]:  # fmt: skip
    """The forget Fisher over both groups, then the vision and language preserve Fishers
    (``{}`` for an empty group), each moved to the CPU as soon as it is done with ``offload``.
    ``resume``: ``{"finished": {set: Fisher}, "set": name, "start": k, "sums": {...}}`` of an
    interrupted pass. A stop (:class:`~mmunlearn.fisher.FisherInterrupted`) leaves with
    ``.set`` (the set it stopped in) and ``.finished`` (the finished sets' Fishers) added."""
    resume = resume or {}
    done: dict[str, dict] = dict(resume.get("finished", {}))
    names = {"forget": vision + language, "vision_preserve": vision, "language_preserve": language}
    for set_name, set_batches in zip(FISHER_SETS, batches):
        if set_name in done or not names[set_name]:
            done.setdefault(set_name, {})
            continue
        at = {}
        if resume.get("set") == set_name:
            at = {"start": resume["start"], "sums": resume["sums"]}
        try:
            f = collect_fisher(model, set_batches, names[set_name], name=set_name, **kw, **at)
        except FisherInterrupted as e:
            e.set, e.finished = set_name, done
            raise
        done[set_name] = _to_cpu(f) if offload else f
    return done["forget"], done["vision_preserve"], done["language_preserve"]


def _save_fishers(
    fisher_dir, model: torch.nn.Module, fishers: Mapping[str, Mapping], meta: dict, sharded: bool
) -> None:
    """Save each ``{set name: Fisher}`` to ``fisher_dir/<set name>.safetensors`` (sharded:
    gathered to rank 0 one tensor at a time, saved there)."""
    for fname, f in fishers.items():
        full = full_fishers(f, model) if sharded else f  # rank 0 only, per tensor
        if full is not None:
            save_fisher(Path(fisher_dir) / f"{fname}.safetensors", full, dict(meta, set=fname))


def _log_coverage(masks: Mapping[str, SaliencyMask]) -> None:
    for k, m in masks.items():
        c = m.coverage()["total"]
        log.info(
            "saliency mask %s: %d / %d elements selected (%.2f%%)",
            k,
            c["selected"],
            c["total"],
            100.0 * c["fraction"],
        )


def build_masks(
    model: torch.nn.Module,
    forget_batches: Iterable,
    vision_preserve_batches: Iterable,
    language_preserve_batches: Iterable,
    *,
    gamma: float = 1.0,
    fraction: float | None = None,
    scope: str = "global",
    eps: float = 1e-15,
    rules: Mapping[str, Iterable[str]] | None = None,
    loss_fn: Callable | None = None,
    mode: str = "sq",
    progress: bool = True,
    official_parity: bool = False,
    backend: str = "auto",
    fisher_dir: str | os.PathLike | None = None,
    offload: bool = False,
    stop: Callable[[], bool] | None = None,
    resume: Mapping | None = None,
) -> dict[str, SaliencyMask]:
    """MMUnlearner's masks (method.md §2).

    Groups from :func:`module_groups` (``rules`` for other families). One Fisher pass on
    ``forget_batches`` (multimodal VQA of the forget entities) over both groups; the vision
    group's preserve Fisher on ``vision_preserve_batches`` (multimodal retain) and the language
    group's on ``language_preserve_batches`` (the caller combines text-only QA of the forget
    entities with the multimodal retain batches). Masks by threshold ``gamma`` or, with
    ``fraction``, exact top-k within each group (``scope``). ``fisher_dir``: also save the
    three Fishers there (``forget`` / ``vision_preserve`` / ``language_preserve.safetensors``)
    so that :func:`masks_from_fishers` can redo the masks at other thresholds. ``offload``
    (unsharded models): each finished Fisher moves to the CPU (pinned) and the masks are
    computed there, so only one set of fp32 accumulators is ever on the GPU (a 7B model:
    26 GiB instead of 53). ``stop()`` (asked after every Fisher batch) interrupts the passes
    with :class:`~mmunlearn.fisher.FisherInterrupted` (``.set``, ``.done``, ``.sums`` of the
    set it stopped in, ``.finished``: the finished sets' Fishers); ``resume`` (those, as
    ``{"finished", "set", "start", "sums"}``) continues to the same masks, bit for bit.
    Coverage is logged (``logging``, this module's logger). Returns ``{"vision", "language",
    "both"}`` masks (both = vision | language).
    """
    groups = module_groups(model, rules)
    vision, language = list(groups.get("vision", [])), list(groups.get("language", []))
    if not vision and not language:
        raise ValueError("build_masks: no trainable parameter in the vision or language group")
    kw = dict(
        mode=mode,
        loss_fn=loss_fn,
        progress=progress,
        official_parity=official_parity,
        backend=backend,
        stop=stop,
    )
    sharded = is_sharded(model)
    if offload and sharded:
        raise ValueError("build_masks: offload is for unsharded models (FSDP2 shards the Fisher)")
    batches = (forget_batches, vision_preserve_batches, language_preserve_batches)
    f_forget, f_vp, f_lp = _mask_fishers(model, batches, vision, language, kw, offload, resume)
    cls = model_class(model)
    if fisher_dir is not None:
        meta = {"model_class": cls, "mode": mode, "official_parity": official_parity}
        sets = {"forget": f_forget, "vision_preserve": f_vp, "language_preserve": f_lp}
        _save_fishers(fisher_dir, model, sets, meta, sharded)
    masks = masks_from_fishers(
        f_forget,
        f_vp,
        f_lp,
        {"vision": vision, "language": language},
        gamma=gamma,
        fraction=fraction,
        scope=scope,
        eps=eps,
        model_class=cls,
        backend=backend,
        distributed=sharded,
    )
    if sharded:  # local-shard masks → full-shape masks, the same on every rank
        masks = {k: full_mask(m, model) for k, m in masks.items()}
    _log_coverage(masks)
    return masks


__all__ = ["FISHER_SETS", "build_masks", "full_mask", "masks_from_fishers"]
