"""Diagonal Fisher importance: collection by gradient hooks, files, gathering shards.

``F[i] = mean_batches (∂L_b/∂θ_i)²`` (method.md §2) of every selected parameter. One
``register_post_accumulate_grad_hook`` per parameter squares its gradient into an fp32
accumulator as soon as the gradient is final (queued into ~25 MiB buckets, one
:func:`mmunlearn.kernels.fisher_accumulate_` launch per bucket:
:class:`mmunlearn.kernels.FisherBuckets`) and drops ``param.grad`` at once, so full gradients
never pile up in memory. Fishers are saved as
mmunlearn safetensors files (:func:`save_fisher` / :func:`load_fisher`) so masks can be redone
at other thresholds without a forward pass; under FSDP2 the accumulators are local shards and
:func:`full_fishers` gathers them one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mmunlearn.distributed import (
    all_reduce_sum_,
    full_tensor,
    local,
    rank,
    require_reduced_grads,
    world_size,
)
from mmunlearn.io import read_safetensors, save_safetensors
from mmunlearn.kernels import FisherBuckets
from mmunlearn.losses import batch_loss
from mmunlearn.params import canonical_name, canonical_parameters

FISHER_FORMAT = "mmunlearn.fisher"


def _select_params(model, params) -> dict[str, torch.nn.Parameter]:
    if params is None:
        return canonical_parameters(model, trainable_only=True)
    if isinstance(params, Mapping):
        items = [(canonical_name(n), p) for n, p in params.items()]
    else:
        if isinstance(params, str):
            params = [params]
        available = canonical_parameters(model)
        items = []
        for name in params:
            c = canonical_name(name)
            if c not in available:
                raise ValueError(f"collect_fisher: no parameter named {name!r} in the model")
            items.append((c, available[c]))
    out: dict[str, torch.nn.Parameter] = {}
    owner: dict[int, str] = {}
    for c, p in items:
        if id(p) in owner and owner[id(p)] != c:
            raise ValueError(
                f"collect_fisher: {c!r} and {owner[id(p)]!r} are the same (tied) parameter; "
                "list it once"
            )
        owner[id(p)] = c
        out[c] = p
    return out


def _accumulators(selected, official_parity: bool, sums=None) -> dict[str, torch.Tensor]:
    """Fisher accumulators of the selected parameters (local-shard shapes): fp32 on the
    parameter's device, or the parameter's dtype on the CPU with ``official_parity``; zeroed,
    or copies of ``sums`` (a resumed pass: ValueError naming a missing or misshapen tensor)."""
    accs: dict[str, torch.Tensor] = {}
    for name, p in selected.items():
        if not p.requires_grad:
            raise ValueError(f"collect_fisher: parameter {name!r} does not require grad")
        loc = local(p.detach())
        if official_parity:
            dtype, device = p.dtype, torch.device("cpu")
        else:
            dtype, device = torch.float32, loc.device
        accs[name] = torch.zeros(loc.shape, dtype=dtype, device=device)
        if sums is not None:
            s = sums.get(name)
            if s is None or tuple(s.shape) != tuple(loc.shape) or s.dtype != dtype:
                got = "missing" if s is None else f"{tuple(s.shape)} {s.dtype}"
                raise ValueError(
                    f"collect_fisher: the partial sums of {name!r} are {got}, expected "
                    f"{tuple(loc.shape)} {dtype}"
                )
            accs[name].copy_(s)
    return accs


def _fisher_hook(
    name: str,
    acc: torch.Tensor,
    seen: set[int],
    buckets: FisherBuckets,
    mode: str,
    official_parity: bool,
) -> Callable[[torch.Tensor], None]:
    """The post-accumulate-grad hook of selected parameter ``name``: takes ``p.grad`` (set to
    None at once) into ``acc``; a second firing in one backward (``seen``) raises."""

    def hook(p: torch.Tensor) -> None:
        g = p.grad
        p.grad = None
        if g is None:
            return
        if id(p) in seen:
            raise RuntimeError(
                f"collect_fisher: the gradient hook of {name!r} fired twice in one backward "
                "(reentrant activation checkpointing?); use "
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False})"
            )
        seen.add(id(p))
        g = local(g.detach())
        if official_parity:
            gc = g.to("cpu", p.dtype)
            acc.add_(gc * gc if mode == "sq" else gc.abs())
        else:
            buckets.add(acc, g)

    return hook


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def _fisher_batch_loss(model, batch, loss_fn: Callable | None, device) -> torch.Tensor:
    """``loss_fn(model, batch)``, or :func:`batch_loss`; errors name collect_fisher."""
    if loss_fn is not None:
        loss = loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor):
            raise ValueError("collect_fisher: loss_fn returned no tensor")
        return loss
    try:
        return batch_loss(model, batch, device)
    except ValueError as e:
        raise ValueError(f"collect_fisher: {e}") from e


class FisherInterrupted(Exception):
    """``stop()`` asked :func:`collect_fisher` to stop after batch ``done``: ``sums`` are the
    undivided Fisher sums of batches ``0..done-1`` (pass them back as ``start=done,
    sums=sums`` to continue to the same result, bit for bit)."""

    def __init__(self, done: int, total: int | None, sums: dict[str, torch.Tensor]):
        super().__init__(f"stopped after Fisher batch {done} of {total}")
        self.done, self.total, self.sums = done, total, sums


class NonFiniteFisherError(ValueError):
    """A Fisher accumulator became NaN/inf; the message names the first batch that made it."""


def _finite_flag(accs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One device bool: every accumulator is finite (their largest magnitude, no host sync;
    sums of squares never leave inf / NaN, so the first bad batch is the first False)."""
    if not accs:
        return torch.ones((), dtype=torch.bool)
    peaks = torch._foreach_norm(list(accs.values()), float("inf"))
    return torch.isfinite(torch.stack([p.float().to(peaks[0].device) for p in peaks])).all()


def _check_finite(flags: list, start: int, total, name: str) -> None:
    """Raise :class:`NonFiniteFisherError` naming the first batch whose flag is False."""
    if not flags:
        return
    ok = torch.stack([f.to(flags[-1].device) for f in flags])
    if world_size() > 1:
        ok = all_reduce_sum_((~ok).float()) == 0
    ok = ok.cpu()
    if not bool(ok.all()):
        i = start + int((~ok).nonzero()[0])
        what = f"{name} " if name else ""
        raise NonFiniteFisherError(
            f"non-finite Fisher value after {what}Fisher batch {i} (0-based) of {total}: the "
            "loss or a gradient overflowed there (try fp32 weights, --dtype fp32)"
        )


def _batches_from(batches: Iterable, start: int) -> Iterable:
    """``batches`` from batch ``start`` on (by index when it is indexable, else skipped)."""
    if not start:
        return batches
    if hasattr(batches, "__getitem__") and hasattr(batches, "__len__"):
        return (batches[i] for i in range(start, len(batches)))
    import itertools

    return itertools.islice(batches, start, None)


def _backward_passes(
    model, batches: Iterable, loss_fn, device, seen: set[int], buckets, run: dict
) -> int:
    """One backward per batch (the hooks accumulate), each bucket flushed after it; a finite
    flag per batch, checked at the end and before stopping. Returns the number of batches
    (those skipped by ``start`` included)."""
    from tqdm.auto import tqdm

    start, accs, stop, name = run["start"], run["accs"], run["stop"], run["name"]
    n_batches = start
    total = len(batches) if hasattr(batches, "__len__") else None
    flags: list = []
    desc = f"fisher[{name}]" if name else "fisher"
    todo = _batches_from(batches, start)
    bar = tqdm(todo, total=total, initial=start, desc=desc, disable=not run["progress"])
    for batch in bar:
        seen.clear()
        loss = _fisher_batch_loss(model, batch, loss_fn, device)
        loss.backward()
        buckets.flush()
        n_batches += 1
        flags.append(_finite_flag(accs))
        if stop is not None and (total is None or n_batches < total) and stop():
            _check_finite(flags, start, total, name)
            raise FisherInterrupted(n_batches, total, accs)
    _check_finite(flags, start, total, name)
    return n_batches


def collect_fisher(
    model: torch.nn.Module,
    batches: Iterable,
    params=None,
    *,
    mode: str = "sq",
    loss_fn: Callable | None = None,
    progress: bool = True,
    official_parity: bool = False,
    backend: str = "auto",
    start: int = 0,
    sums: Mapping[str, torch.Tensor] | None = None,
    stop: Callable[[], bool] | None = None,
    name: str = "",
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher ``F[i] = (1/B) Σ_batches (∂L_b/∂θ_i)²`` of the selected parameters.

    ``L_b = model(**batch).loss`` (dict batches; tensors are moved to the parameters' device),
    or ``loss_fn(model, batch)``. ``params``: ``{name: param}`` or a list of names (raw or
    canonical); default: every trainable parameter. ``mode="abs"`` accumulates ``|g|`` instead.
    A post-accumulate-grad hook squares each parameter's final gradient of the batch into an fp32
    accumulator on the parameter's device (bucketed :func:`fisher_accumulate_`, ``backend``)
    and sets
    ``param.grad = None`` at once; gradients of trainable parameters that are not selected are
    dropped the same way. Tied parameters are seen once, with their total gradient. The model's
    train/eval mode is left as it is. Every hook is removed afterwards, even on error, and every
    trainable parameter ends with ``.grad`` None.
    ``official_parity=True`` reproduces the reference code: each gradient is copied to the CPU,
    squared in the parameter's dtype (fp16/bf16 squares underflow) and summed there in that dtype;
    the result is then in the parameter's dtype on the CPU.
    With FSDP2 (DTensor parameters) the accumulators have the *local shard's* shape.
    Activation checkpointing: use ``use_reentrant=False`` (the transformers default); a hook that
    fires twice for one parameter in one backward (reentrant checkpointing of a shared weight)
    raises RuntimeError, because the squares of partial gradients are not the Fisher.
    Stopping and resuming: ``stop()`` is asked after every batch but the last; when it says
    True, :class:`FisherInterrupted` carries the undivided sums so far; ``start=k, sums=those``
    skips the first ``k`` batches and continues from them to the same result, bit for bit.
    A NaN/inf accumulator raises :class:`NonFiniteFisherError` naming the first batch that made
    it (``name``: the data set's name, in messages and the progress bar).
    Returns ``{canonical name: Fisher tensor}`` (fp32 unless ``official_parity``), in the order
    of ``model.named_parameters()`` / of ``params``.
    """
    if mode not in ("sq", "abs"):
        raise ValueError(f"mode must be 'sq' or 'abs', got {mode!r}")
    selected = _select_params(model, params)
    if loss_fn is None:
        require_reduced_grads(model, "the Fisher pass")
    accs = _accumulators(selected, official_parity, sums)
    device = next((local(p.detach()).device for p in selected.values()), None)
    seen: set[int] = set()
    # one accumulate launch per ~25 MiB bucket of gradients, not one per parameter (#16);
    # each gradient is released as soon as its bucket is squared
    buckets = FisherBuckets(mode=mode, backend=backend)
    run = dict(start=start, accs=accs, stop=stop, name=name, progress=progress)
    with _hooks(model, selected, accs, seen, buckets, mode, official_parity):
        n_batches = _backward_passes(model, batches, loss_fn, device, seen, buckets, run)
    if n_batches == 0:
        raise ValueError("collect_fisher: no batches")
    for a in accs.values():
        a.div_(n_batches)
    return accs


@contextmanager
def _hooks(model, selected, accs, seen, buckets, mode: str, official_parity: bool):
    """The Fisher hooks on the selected parameters (and grad-dropping hooks on the other
    trainable ones) while the block runs; removed, and every ``.grad`` cleared, after it."""
    trainable = canonical_parameters(model, trainable_only=True)
    sel_ids = {id(p) for p in selected.values()}
    for p in trainable.values():
        p.grad = None
    handles = []
    try:
        for name, p in selected.items():
            hook = _fisher_hook(name, accs[name], seen, buckets, mode, official_parity)
            handles.append(p.register_post_accumulate_grad_hook(hook))
        for p in trainable.values():
            if id(p) not in sel_ids:
                handles.append(p.register_post_accumulate_grad_hook(_drop_grad))
        yield
    finally:
        buckets.clear()
        for h in handles:
            h.remove()
        for p in [*trainable.values(), *selected.values()]:
            p.grad = None


def save_fisher(path, fishers: Mapping[str, torch.Tensor], metadata: Mapping | None = None) -> Path:
    """Save Fisher tensors (``{name: tensor}``, names canonicalised) to safetensors atomically
    (:func:`mmunlearn.io.save_safetensors`). ``metadata``: JSON-able values. Returns the path."""
    tensors = {canonical_name(k): v for k, v in fishers.items()}
    meta = dict(metadata or {})
    meta["names"] = list(tensors)
    return save_safetensors(path, tensors, FISHER_FORMAT, meta)


def load_fisher(path, device="cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_fisher`. Returns ``(fishers, metadata)`` with the
    tensors in their saved order on ``device`` and the metadata JSON-decoded. Raises ValueError
    naming the path for a missing, corrupt or foreign file."""
    tensors, meta = read_safetensors(path, FISHER_FORMAT, device)
    names = meta.get("names", list(tensors))
    if not isinstance(names, list) or set(names) != set(tensors):
        raise ValueError(f"{path}: tensor names do not match the metadata")
    return {n: tensors[n] for n in names}, meta


def full_fishers(
    fishers: Mapping[str, torch.Tensor], model: torch.nn.Module, *, to_all: bool = False
) -> dict[str, torch.Tensor] | None:
    """Local-shard Fishers (from :func:`collect_fisher` on an FSDP2-sharded model) → full-shape
    Fishers on rank 0's CPU, one tensor at a time (None on other ranks; on every rank with
    ``to_all``). Unsharded Fishers come back as they are. Every rank must call it."""
    params = canonical_parameters(model)
    out = {}
    for name, f in fishers.items():
        full = full_tensor(f, params[name], to_all=to_all)
        if full is not None:
            out[name] = full
    return out if (to_all or rank() == 0) else None


__all__ = [
    "FisherInterrupted",
    "NonFiniteFisherError",
    "collect_fisher",
    "full_fishers",
    "load_fisher",
    "save_fisher",
]
