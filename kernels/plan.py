"""Launch plans: a multi-tensor step's validation, dtype grouping and launch tables, built once
per set of long-lived operands and re-used while they stay what they were.

Why: a masked AdamW step over a 7B model's 437 tensors used to spend 3.8–5.1 ms per call on the
host (issue 21) — validating every list, grouping by dtype, building the cache keys of the
pointer tables — the same for fp32 and bf16 state, which at 4 M elements is as long as the
kernel itself. Parameters, moments, masks and their :class:`~.bits.MaskIndex` stay where they
are step after step; only the gradients are new each backward.

A plan is keyed, like the pointer tables (kernels/_common.py), by what a launch reads: the
``data_ptr`` of every long-lived tensor (parameters, moments, masks, step tensors) and the
masks' index serials — not by Python object identity, so the fresh views an FSDP2 step makes
of the same storage every call (``DTensor.to_local()``) find their plan. A hit re-checks, in
bulk C-level passes, every long-lived tensor's size, dtype and contiguity, and the gradients'
count, sizes, dtypes, devices and contiguity against the parameters: a plan is used only for
tensors that are, byte for byte, what it was built for (memory freed and reused by a tensor of
the same size, dtype and layout gets the same, still correct, tables). Anything else, or an
input that does not even have these attributes, is a miss: the caller's full check runs (and
raises its one-line error), and a new plan is built. New gradient storage swaps one pointer
row.

Only lists of at least :data:`MIN_TENSORS` tensors get a plan (a per-parameter launch, as the
optimizer-in-backward mode makes, has nothing to amortise); at most :data:`MAX_PLANS` plans are
kept (least recently used first out). A plan holds no tensor, only pointer and chunk tables.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ._common import _dev_keys, chunk_tables, group_by_dtype, salts
from .bits import sparse_chunk_table

MIN_TENSORS = 8
MAX_PLANS = 16

_data_ptr, _numel, _contig = torch.Tensor.data_ptr, torch.Tensor.numel, torch.Tensor.is_contiguous
_dtype, _serial = operator.attrgetter("dtype"), operator.attrgetter("serial")
_PLANS: OrderedDict = OrderedDict()


class Launch(NamedTuple):
    """One launch: the group's dtypes and device, the positions it covers, its tables."""

    key: tuple  # (param dtype, grad dtype, state dtype, device)
    idx: list[int]
    ptrs: torch.Tensor
    chunks: torch.Tensor
    n_chunks: int
    aligned: bool
    numel: int  # elements of the tensors covered (selected or not)
    keep: tuple = ()  # contiguous copies of non-contiguous gradients, alive until the launch


class _Plan:
    __slots__ = (
        "numels",
        "dtypes",
        "p_devkeys",
        "g_dtypes",
        "grad_ptrs",
        "launches",
        "hosts",
        "static_aligned",
    )


def build_launch(key, idx, params, grads, exp_avgs, exp_avg_sqs, masks, mask_index, steps,
                 block, n_vector) -> Launch:  # fmt: skip
    """The launch of positions ``idx`` (one dtype/device group) of a call's lists; the random
    stream salts are those of the positions in the whole list."""
    p = [params[i] for i in idx]
    g = [grads[i].contiguous() for i in idx]
    ops = [
        p,
        g,
        [exp_avgs[i] for i in idx],
        [exp_avg_sqs[i] for i in idx],
        [masks[i] for i in idx] if masks is not None else p,
        [steps[i] for i in idx] if steps is not None else p,
    ]
    numels = [t.numel() for t in p]
    ptrs, chunks, n_chunks, aligned = chunk_tables(ops, numels, block, n_vector,
                                                   extra=[salts(idx)])  # fmt: skip
    if mask_index is not None:
        chunks, n_chunks = sparse_chunk_table([mask_index[i] for i in idx], block, key[-1])
    keep = tuple(c for i, c in zip(idx, g) if c is not grads[i])
    return Launch(key, idx, ptrs, chunks, n_chunks, aligned, sum(numels), keep)


def _build_launches(params, grads, exp_avgs, exp_avg_sqs, masks, mask_index, steps, block,
                    n_vector) -> list[Launch]:  # fmt: skip
    return [
        build_launch(
            key,
            idx,
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            masks,
            mask_index,
            steps,
            block,
            n_vector,
        )  # fmt: skip
        for key, idx in group_by_dtype(params, grads, exp_avgs).items()
    ]


def adamw_launches(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor] | None,
    mask_index: Sequence | None,
    steps: Sequence[torch.Tensor] | None,
    *,
    compact: bool,
    block: int,
    n_vector: int,
    check: Callable[[], None] | None = None,
) -> list[Launch]:
    """The launches of one masked-AdamW call: one per (param, grad, state dtype, device) group,
    with pointer rows (params, grads, exp_avgs, exp_avg_sqs, masks or params, steps or params,
    element counts, random-stream salts) and the chunk table (only the chunks that select
    anything when ``mask_index`` is given). ``check``: the full input check, run whenever no
    plan matches (before anything is built from the inputs)."""
    n = len(params)
    plan = key = stable = None
    if n >= MIN_TENSORS:
        try:
            stable = [*params, *exp_avgs, *exp_avg_sqs, *(masks or ()), *(steps or ())]
            key = (block, n_vector, bool(compact), n, masks is None, steps is None,
                   tuple(map(_data_ptr, stable)),
                   None if mask_index is None else tuple(map(_serial, mask_index)))  # fmt: skip
            plan = _PLANS.get(key)
            if plan is not None and not _matches(plan, stable, grads, n):
                plan = None
        except (TypeError, AttributeError):  # not tensors at all: the full check names it
            plan = key = None
    if plan is None:
        if check is not None:
            check()
        launches = _build_launches(params, grads, exp_avgs, exp_avg_sqs, masks, mask_index,
                                   steps, block, n_vector)  # fmt: skip
        if key is not None and all(map(_contig, grads)):
            _store(key, stable, params, grads, launches, n_vector)
        return launches
    _PLANS.move_to_end(key)
    gp = tuple(map(_data_ptr, grads))
    if gp != plan.grad_ptrs:  # new gradient storage (every backward that sets grads to None)
        _regrad(plan, gp)
    return plan.launches


def _regrad(plan: _Plan, gp: tuple) -> None:
    """Swap the gradient row of every launch's pointer table: a new table (a launch in flight
    may still read the old one), the other rows and the chunk tables as they were."""
    out = []
    for launch, host, static in zip(plan.launches, plan.hosts, plan.static_aligned):
        row = gp if len(launch.idx) == len(gp) else [gp[i] for i in launch.idx]
        table = host.clone()
        table[1] = torch.tensor(row, dtype=torch.int64)
        aligned = static and all(p % 16 == 0 for p in row)
        dev = launch.key[-1]
        if dev.type != "cpu":
            table = table.pin_memory().to(dev, non_blocking=True)
        out.append(launch._replace(ptrs=table, aligned=aligned))
    plan.launches = out
    plan.grad_ptrs = gp


def _matches(plan: _Plan, stable, grads, n: int) -> bool:
    """The cheap re-check of a plan against this call's operands (see the module docstring)."""
    return (
        tuple(map(_numel, stable)) == plan.numels
        and tuple(map(_dtype, stable)) == plan.dtypes
        and all(map(_contig, stable))
        and len(grads) == n
        and tuple(map(_numel, grads)) == plan.numels[:n]
        and tuple(map(_dtype, grads)) == plan.g_dtypes
        and all(map(_contig, grads))
        and _dev_keys(grads) == plan.p_devkeys
    )


def _store(key, stable, params, grads, launches, n_vector: int) -> None:
    plan = _Plan()
    plan.numels = tuple(map(_numel, stable))
    plan.dtypes = tuple(map(_dtype, stable))
    plan.p_devkeys = _dev_keys(params)
    plan.g_dtypes = tuple(map(_dtype, grads))
    plan.grad_ptrs = tuple(map(_data_ptr, grads))
    plan.launches = launches
    plan.hosts = [x.ptrs.cpu() for x in launches]
    rows = [0, *range(2, n_vector)]  # the vector-accessed rows but the gradients'
    plan.static_aligned = [bool((h[rows] % 16 == 0).all()) for h in plan.hosts]
    _PLANS[key] = plan
    _PLANS.move_to_end(key)
    while len(_PLANS) > MAX_PLANS:
        _PLANS.popitem(last=False)


def clear_plans() -> None:
    """Forget every plan (tests; a plan is never needed for correctness)."""
    _PLANS.clear()
