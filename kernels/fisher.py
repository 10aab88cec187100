"""Fisher accumulation ``F += s·g²`` (or ``s·|g|``) and the multi-tensor ``Σ g²`` for clipping.

Design envelope: memory-bound elementwise passes over every gradient of a model, one launch per
(accumulator dtype, grad dtype) group. Fast once a group holds ≥ 1 M elements; below that the
launch and table lookup dominate (a few µs). Gradients arrive one parameter at a time from
backward hooks: :class:`FisherBuckets` queues them and accumulates a whole bucket per launch
(not one launch per parameter), releasing the gradients bucket by bucket.
A program owns BLOCK = 4096 elements; full chunks of 16-byte-aligned tensors are read and
written with 128-bit accesses, the last chunk of a tensor in two parts (its whole 8-element
groups, still vectorised, then the remaining numel % 8 elements).
"""

from __future__ import annotations

import torch

from . import _cpu
from ._common import (
    BLOCK,
    HAS_TRITON,
    NUM_WARPS,
    as_list,
    check_contiguous,
    check_same_numel,
    chunk_tables,
    device_guard,
    group_by_dtype,
    load_ptr,
    open_chunk,
    resolve_backend,
    tl,
    tl_dtype,
    triton,
)

_MODES = ("sq", "abs")


# ------------------------------------------------------------------ fisher_accumulate_
def torch_fisher_accumulate_(accs, grads, scale: float = 1.0, mode: str = "sq") -> None:
    """Reference: ``acc += scale * (g*g)`` (``mode="sq"``) or ``scale * |g|`` in fp32."""
    for a, g in zip(accs, grads):
        g32 = g.reshape(a.shape).float()
        if mode == "sq":
            a.add_(g32 * g32, alpha=scale)
        else:
            a.add_(g32.abs(), alpha=scale)


def cpu_fisher_accumulate_(accs, grads, scale: float = 1.0, mode: str = "sq") -> None:
    """C twin of :func:`torch_fisher_accumulate_` (kernels/_cpu.py): one call per grad dtype."""
    lib = _cpu.load()
    for (_, gdt, _dev), idx in group_by_dtype(accs, grads).items():
        a = [accs[i] for i in idx]
        g = [grads[i].contiguous() for i in idx]
        numels = [t.numel() for t in a]
        ptrs, chunks, n_chunks, _ = chunk_tables([a, g], numels, _cpu.CPU_BLOCK)
        if n_chunks == 0:
            continue
        lib.mmu_fisher(
            _cpu.DTYPE_CODE[gdt],
            ptrs.data_ptr(),
            len(a),
            chunks.data_ptr(),
            n_chunks,
            _cpu.CPU_BLOCK,
            _cpu.threads_for(sum(numels)),
            scale,
            mode == "abs",
        )


if HAS_TRITON:

    @triton.jit
    def _fisher_tile(acc_ptr, g_ptr, offs, live, scale, ABS: tl.constexpr, MASKED: tl.constexpr):
        if MASKED:
            g = tl.load(g_ptr + offs, mask=live, other=0.0).to(tl.float32)
            a = tl.load(acc_ptr + offs, mask=live, other=0.0)
        else:
            g = tl.load(g_ptr + offs).to(tl.float32)
            a = tl.load(acc_ptr + offs)
        # ATen: acc.add_(g * g, alpha=scale) is one FMA
        if ABS:
            a = tl.fma(scale, tl.abs(g), a)
        else:
            a = tl.fma(scale, g * g, a)
        if MASKED:
            tl.store(acc_ptr + offs, a, mask=live)
        else:
            tl.store(acc_ptr + offs, a)

    @triton.jit
    def _fisher_accumulate_kernel(
        ptrs_ptr,
        chunks_ptr,
        n_tensors,
        scale,
        G_DTYPE: tl.constexpr,
        ABS: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # table rows: 0 accumulator, 1 grad, 2 numel
        tid, start, numel, _ = open_chunk(ptrs_ptr, chunks_ptr, n_tensors, 2, ALIGNED, BLOCK)
        acc_ptr = load_ptr(ptrs_ptr, 0, n_tensors, tid, tl.float32, ALIGNED)
        g_ptr = load_ptr(ptrs_ptr, 1, n_tensors, tid, G_DTYPE, ALIGNED)
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= numel:
            _fisher_tile(acc_ptr, g_ptr, offs, offs, scale, ABS, False)
        else:
            # whole 8-element groups: a predicate constant over each group keeps 128-bit access
            _fisher_tile(acc_ptr, g_ptr, offs, offs < numel // 8 * 8, scale, ABS, True)
            if numel % 8 != 0:
                rest = numel // 8 * 8 + tl.arange(0, 8)
                _fisher_tile(acc_ptr, g_ptr, rest, rest < numel, scale, ABS, True)


def triton_fisher_accumulate_(accs, grads, scale: float = 1.0, mode: str = "sq") -> None:
    """Triton twin of :func:`torch_fisher_accumulate_`: one launch per grad dtype."""
    for (_, gdt, _dev), idx in group_by_dtype(accs, grads).items():
        a = [accs[i] for i in idx]
        g = [grads[i].contiguous() for i in idx]
        ptrs, chunks, n_chunks, aligned = chunk_tables([a, g], [t.numel() for t in a], BLOCK)
        if n_chunks == 0:
            continue
        with device_guard(a[0]):
            _fisher_accumulate_kernel[(n_chunks,)](
                ptrs,
                chunks,
                len(a),
                float(scale),
                G_DTYPE=tl_dtype(gdt),
                ABS=(mode == "abs"),
                ALIGNED=aligned,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )


def fisher_accumulate_(accs, grads, scale: float = 1.0, mode: str = "sq", *, backend="auto"):
    """Accumulate a diagonal Fisher estimate in place.

    Math: ``acc[i] += scale · g[i]²`` (``mode="sq"``) or ``acc[i] += scale · |g[i]|``
    (``mode="abs"``), computed as ``fma(scale, g*g, acc)`` in fp32 (ATen's ``add_(alpha=)``).
    In place on ``accs``; returns None.
    Dtypes: ``accs`` fp32 (contiguous); ``grads`` fp32 / bf16 / fp16, same numel as their
    accumulator (shape may differ, e.g. a flat accumulator).
    Bytes per element: 8 (fp32 acc read+write) + grad size (2 or 4): 10 for bf16 grads.
    Determinism: bit-exact run to run; cpu backend bit-exact vs the torch twin; triton within
    1 ulp (interpreter: exact).
    """
    accs, grads = as_list(accs), as_list(grads)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    check_same_numel("accs", accs, "grads", grads)
    for i, a in enumerate(accs):
        if a.dtype != torch.float32:
            raise ValueError(f"accs[{i}] must be float32, got {a.dtype}")
    check_contiguous("accs", accs)
    if not accs:
        return
    fn = {
        "triton": triton_fisher_accumulate_,
        "cpu": cpu_fisher_accumulate_,
        "torch": torch_fisher_accumulate_,
    }[resolve_backend(backend, accs)]
    fn(accs, grads, scale, mode)


class FisherBuckets:
    """Fisher accumulation for gradients that arrive one parameter at a time (backward hooks).

    :meth:`add` queues ``(accumulator, gradient)``; once the queued gradients of one (device,
    grad dtype) reach ``bucket_bytes``, one :func:`fisher_accumulate_` call — one kernel launch
    — squares the whole bucket into its accumulators and the queue lets the gradients go.
    :meth:`flush` does the same for what is left (call it after every ``backward()``).
    Memory: at most ``bucket_bytes`` of gradients are kept alive per (device, dtype) beyond
    what backward itself holds, so gradients are still freed early (drop ``param.grad`` in the
    hook after :meth:`add`; a gradient must not be modified before its bucket is flushed).
    ``launches`` counts the accumulate calls made (one launch each on the triton/cpu backends).
    The 25 MiB default is DDP's bucket size: every launch but a backward's last covers at
    least that much gradient (≥ 13 M bf16 elements), so launch and table costs stay negligible
    however many small parameters a model has; a backward refills the same buckets batch after
    batch, so their tables come from the table cache (kernels/_common.py) from the second batch.
    """

    def __init__(
        self,
        scale: float = 1.0,
        mode: str = "sq",
        *,
        bucket_bytes: int = 25 << 20,
        backend: str = "auto",
    ):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if bucket_bytes < 0:
            raise ValueError(f"bucket_bytes must be >= 0, got {bucket_bytes}")
        self.scale, self.mode, self.backend = scale, mode, backend
        self.bucket_bytes = bucket_bytes
        self._queues: dict[tuple, tuple[list, list, list]] = {}
        self.launches = 0

    def add(self, acc: torch.Tensor, grad: torch.Tensor) -> None:
        """Queue ``acc += scale·grad²``; accumulates the bucket when it is full."""
        if acc.dtype != torch.float32 or not acc.is_contiguous():
            raise ValueError(f"accumulator must be contiguous float32, got {acc.dtype}")
        if acc.numel() != grad.numel():
            raise ValueError(f"accumulator has {acc.numel()} elements, grad {grad.numel()}")
        key = (grad.device, grad.dtype)
        q = self._queues.setdefault(key, ([], [], [0]))
        q[0].append(acc)
        q[1].append(grad)
        q[2][0] += grad.numel() * grad.element_size()
        if q[2][0] >= self.bucket_bytes:
            self._flush(key)

    def _flush(self, key) -> None:
        accs, grads, size = self._queues.pop(key)
        if accs:
            fisher_accumulate_(accs, grads, self.scale, self.mode, backend=self.backend)
            self.launches += 1

    def flush(self) -> None:
        """Accumulate every queued gradient (one call per device and grad dtype)."""
        for key in list(self._queues):
            self._flush(key)

    def clear(self) -> None:
        """Drop queued gradients without accumulating them (e.g. after a failed backward)."""
        self._queues.clear()

    @property
    def pending_bytes(self) -> int:
        return sum(q[2][0] for q in self._queues.values())


# ------------------------------------------------------------------ grad_sq_norm
def torch_grad_sq_norm(grads) -> torch.Tensor:
    """Reference: ``Σ_tensors Σ_i g[i]²`` in fp32, as a 0-dim tensor on the grads' device."""
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for g in grads:
        g32 = g.float()
        total += (g32 * g32).sum()
    return total


def cpu_grad_sq_norm(grads) -> torch.Tensor:
    """C twin of :func:`torch_grad_sq_norm`: fp64 per-chunk sums in chunk order (independent of
    the thread count), rounded once to fp32."""
    lib = _cpu.load()
    total = 0.0
    for (gdt, _dev), idx in group_by_dtype(grads).items():
        g = [grads[i].contiguous() for i in idx]
        numels = [t.numel() for t in g]
        ptrs, chunks, n_chunks, _ = chunk_tables([g], numels, _cpu.CPU_BLOCK)
        if n_chunks:
            total += lib.mmu_sqnorm(
                _cpu.DTYPE_CODE[gdt],
                ptrs.data_ptr(),
                len(g),
                chunks.data_ptr(),
                n_chunks,
                _cpu.CPU_BLOCK,
                _cpu.threads_for(sum(numels)),
            )
    return torch.tensor(total, dtype=torch.float32)


if HAS_TRITON:

    @triton.jit
    def _grad_sq_norm_kernel(
        ptrs_ptr,
        chunks_ptr,
        partial_ptr,
        n_tensors,
        G_DTYPE: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # table rows: 0 grad, 1 numel
        pid = tl.program_id(0).to(tl.int64)
        tid, start, numel, _ = open_chunk(ptrs_ptr, chunks_ptr, n_tensors, 1, ALIGNED, BLOCK)
        g_ptr = load_ptr(ptrs_ptr, 0, n_tensors, tid, G_DTYPE, ALIGNED)
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= numel:
            g = tl.load(g_ptr + offs).to(tl.float32)
            total = tl.sum(g * g, axis=0)
        else:
            g = tl.load(g_ptr + offs, mask=offs < numel // 8 * 8, other=0.0).to(tl.float32)
            total = tl.sum(g * g, axis=0)
            rest = numel // 8 * 8 + tl.arange(0, 8)
            r = tl.load(g_ptr + rest, mask=rest < numel, other=0.0).to(tl.float32)
            total += tl.sum(r * r, axis=0)
        tl.store(partial_ptr + pid, total)


def triton_grad_sq_norm(grads) -> torch.Tensor:
    """Triton twin of :func:`torch_grad_sq_norm`: per-chunk partial sums, then one torch sum."""
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for (gdt, _dev), idx in group_by_dtype(grads).items():
        g = [grads[i].contiguous() for i in idx]
        ptrs, chunks, n_chunks, aligned = chunk_tables([g], [t.numel() for t in g], BLOCK)
        if n_chunks == 0:
            continue
        partial = torch.empty(n_chunks, dtype=torch.float32, device=g[0].device)
        with device_guard(g[0]):
            _grad_sq_norm_kernel[(n_chunks,)](
                ptrs,
                chunks,
                partial,
                len(g),
                G_DTYPE=tl_dtype(gdt),
                ALIGNED=aligned,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
        total += partial.sum().to(total.device)  # a list spanning devices: one launch each
    return total


def grad_sq_norm(grads, *, backend: str = "auto") -> torch.Tensor:
    """Squared global L2 norm of a list of tensors, on their device (no host sync).

    Math: ``Σ_t Σ_i g_t[i]²`` in fp32 (cpu backend: fp64 partials, rounded once). Returns a
    new 0-dim fp32 tensor (take ``.sqrt()`` for the norm). Dtypes: fp32 / bf16 / fp16, mixed
    lists allowed. Bytes per element: the grad's size (2 for bf16). Determinism: bit-exact run
    to run and for any thread count (per-chunk partials, fixed-order sum, no atomics); vs the
    torch twin equal up to summation order (~1e-6 relative).
    """
    grads = as_list(grads)
    if not grads:
        raise ValueError("grad_sq_norm needs at least one tensor")
    be = resolve_backend(backend, grads)
    if be == "triton":
        return triton_grad_sq_norm(grads)
    if be == "cpu":
        return cpu_grad_sq_norm(grads)
    return torch_grad_sq_norm(grads)
