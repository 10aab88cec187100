"""Fisher accumulation ``F += s·g²`` (or ``s·|g|``) and the multi-tensor ``Σ g²`` for clipping.

Design envelope: memory-bound elementwise passes over every gradient of a model, one launch per
(accumulator dtype, grad dtype) group. Fast once a group holds ≥ 1 M elements; below that the
launch and table lookup dominate (a few µs).
"""

from __future__ import annotations

import torch

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


if HAS_TRITON:

    @triton.jit
    def _fisher_accumulate_kernel(
        ptrs_ptr,
        chunks_ptr,
        n_tensors,
        scale,
        G_DTYPE: tl.constexpr,
        ABS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        n_chunks = tl.num_programs(0).to(tl.int64)
        tid = tl.load(chunks_ptr + pid)
        start = tl.load(chunks_ptr + n_chunks + pid)
        acc_ptr = tl.load(ptrs_ptr + tid).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(ptrs_ptr + n_tensors + tid).to(tl.pointer_type(G_DTYPE))
        numel = tl.load(ptrs_ptr + 2 * n_tensors + tid)
        offs = start + tl.arange(0, BLOCK)
        m = offs < numel
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        a = tl.load(acc_ptr + offs, mask=m, other=0.0)
        if ABS:
            a = a + scale * tl.abs(g)
        else:
            a = a + scale * (g * g)
        tl.store(acc_ptr + offs, a, mask=m)


def triton_fisher_accumulate_(accs, grads, scale: float = 1.0, mode: str = "sq") -> None:
    """Triton twin of :func:`torch_fisher_accumulate_`: one launch per grad dtype."""
    for (_, gdt), idx in group_by_dtype(accs, grads).items():
        a = [accs[i] for i in idx]
        g = [grads[i].contiguous() for i in idx]
        ptrs, chunks, n_chunks = chunk_tables([a, g], [t.numel() for t in a], BLOCK)
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
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )


def fisher_accumulate_(accs, grads, scale: float = 1.0, mode: str = "sq", *, backend="auto"):
    """Accumulate a diagonal Fisher estimate in place.

    Math: ``acc[i] += scale · g[i]²`` (``mode="sq"``) or ``acc[i] += scale · |g[i]|``
    (``mode="abs"``), computed as ``acc + scale * (g*g)`` in fp32.
    In place on ``accs``; returns None.
    Dtypes: ``accs`` fp32 (contiguous); ``grads`` fp32 / bf16 / fp16, same numel as their
    accumulator (shape may differ, e.g. a flat accumulator).
    Bytes per element: 8 (fp32 acc read+write) + grad size (2 or 4): 10 for bf16 grads.
    Determinism: bit-exact run to run; vs the torch twin within 1 ulp (FMA contraction).
    """
    accs, grads = as_list(accs), as_list(grads)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    check_same_numel("accs", accs, "grads", grads)
    for i, a in enumerate(accs):
        if a.dtype != torch.float32:
            raise ValueError(f"accs[{i}] must be float32, got {a.dtype}")
    check_contiguous("accs", accs)
    if resolve_backend(backend, accs) == "triton":
        triton_fisher_accumulate_(accs, grads, scale, mode)
    else:
        torch_fisher_accumulate_(accs, grads, scale, mode)


# ------------------------------------------------------------------ grad_sq_norm
def torch_grad_sq_norm(grads) -> torch.Tensor:
    """Reference: ``Σ_tensors Σ_i g[i]²`` in fp32, as a 0-dim tensor on the grads' device."""
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for g in grads:
        g32 = g.float()
        total += (g32 * g32).sum()
    return total


if HAS_TRITON:

    @triton.jit
    def _grad_sq_norm_kernel(
        ptrs_ptr, chunks_ptr, partial_ptr, n_tensors, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr
    ):
        pid = tl.program_id(0).to(tl.int64)
        n_chunks = tl.num_programs(0).to(tl.int64)
        tid = tl.load(chunks_ptr + pid)
        start = tl.load(chunks_ptr + n_chunks + pid)
        g_ptr = tl.load(ptrs_ptr + tid).to(tl.pointer_type(G_DTYPE))
        numel = tl.load(ptrs_ptr + n_tensors + tid)
        offs = start + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
        tl.store(partial_ptr + pid, tl.sum(g * g, axis=0))


def triton_grad_sq_norm(grads) -> torch.Tensor:
    """Triton twin of :func:`torch_grad_sq_norm`: per-chunk partial sums, then one torch sum."""
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for (gdt,), idx in group_by_dtype(grads).items():
        g = [grads[i].contiguous() for i in idx]
        ptrs, chunks, n_chunks = chunk_tables([g], [t.numel() for t in g], BLOCK)
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
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
        total += partial.sum()
    return total


def grad_sq_norm(grads, *, backend: str = "auto") -> torch.Tensor:
    """Squared global L2 norm of a list of tensors, on their device (no host sync).

    Math: ``Σ_t Σ_i g_t[i]²`` in fp32. Returns a new 0-dim fp32 tensor (take ``.sqrt()`` for
    the norm). Dtypes: fp32 / bf16 / fp16, mixed lists allowed. Bytes per element: the grad's
    size (2 for bf16). Determinism: bit-exact run to run (per-chunk partials, fixed-order sum,
    no atomics); vs the torch twin equal up to summation order (~1e-6 relative).
    """
    grads = as_list(grads)
    if not grads:
        raise ValueError("grad_sq_norm needs at least one tensor")
    if resolve_backend(backend, grads) == "triton":
        return triton_grad_sq_norm(grads)
    return torch_grad_sq_norm(grads)
