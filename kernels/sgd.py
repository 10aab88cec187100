"""Masked SGD step: ``p = p·(1 - lr·wd) - lr·g`` on the selected elements only.

Same contract as :mod:`mmunlearn.kernels.adamw` (bit-0 elements keep their bytes; ``grad_mul``
and ``found_inf`` are 0-dim device tensors, no host sync; one launch per dtype pair and
device) without moments. Bytes per element: 6.125 for bf16 params and grads.
"""

from __future__ import annotations

import torch

from . import _cpu
from ._common import (
    BLOCK,
    HAS_TRITON,
    NUM_WARPS,
    as_list,
    bits_tl_dtype,
    chunk_tables,
    cpu_skip,
    device_guard,
    flag_tensor,
    grad_mul_tensor,
    group_by_dtype,
    load_ptr,
    open_chunk,
    resolve_backend,
    tl,
    tl_dtype,
    to_bits,
    to_f32,
    triton,
)
from .adamw import _check_step_inputs
from .bits import tl_packed_size, torch_unpack_bits


def torch_masked_sgd_(
    params, grads, masks, *, lr, weight_decay=0.0, grad_mul=None, found_inf=None, maximize=False
):
    """Reference: ``p = p·(1 - lr·wd) - lr·s·c·g`` in fp32, written back only where masked."""
    for i, (p, g) in enumerate(zip(params, grads)):
        c = grad_mul_tensor(grad_mul, p.device)
        skip = flag_tensor(found_inf, p.device)
        g32 = g.reshape(p.shape).float()
        if c is not None:
            g32 = g32 * c
        if maximize:
            g32 = -g32
        p_new = (p.float() * (1.0 - lr * weight_decay) - lr * g32).to(p.dtype)
        keep = None if masks is None else torch_unpack_bits(masks[i], p.shape)
        if skip is not None:
            keep = (skip == 0) if keep is None else keep & (skip == 0)
        p.copy_(p_new if keep is None else torch.where(keep, p_new, p))


def cpu_masked_sgd_(
    params, grads, masks, *, lr, weight_decay=0.0, grad_mul=None, found_inf=None, maximize=False
):
    """C twin of :func:`torch_masked_sgd_` (kernels/_cpu.py)."""
    if not params or cpu_skip(found_inf):
        return
    lib = _cpu.load()
    c = 1.0 if grad_mul is None else float(grad_mul_tensor(grad_mul, "cpu"))
    for (pdt, gdt, _dev), idx in group_by_dtype(params, grads).items():
        p = [params[i] for i in idx]
        ops = [
            p,
            [grads[i].contiguous() for i in idx],
            [masks[i] for i in idx] if masks is not None else p,
        ]
        numels = [x.numel() for x in p]
        ptrs, chunks, n_chunks, _ = chunk_tables(ops, numels, _cpu.CPU_BLOCK)
        if n_chunks == 0:
            continue
        lib.mmu_sgd(
            _cpu.DTYPE_CODE[pdt],
            _cpu.DTYPE_CODE[gdt],
            ptrs.data_ptr(),
            len(p),
            chunks.data_ptr(),
            n_chunks,
            _cpu.CPU_BLOCK,
            _cpu.threads_for(sum(numels)),
            masks is not None,
            -c if maximize else c,
            lr,
            1.0 - lr * weight_decay,
        )


if HAS_TRITON:

    @triton.jit
    def _sgd_tile(
        p_ptr,
        g_ptr,
        scale_ptr,
        byte,
        start,
        numel,
        lr,
        decay,
        k_ptr,
        P_DTYPE: tl.constexpr,
        G_DTYPE: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        FULL: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        rows = tl.arange(0, ROWS)
        cols = tl.arange(0, 8)
        offs = start + rows[:, None] * 8 + cols[None, :]
        if FULL:
            p_raw = tl.load(p_ptr + offs)
            g_raw = tl.load(g_ptr + offs)
        else:
            live = offs < numel
            if HAS_MASK:
                brow = start // 8 + rows
                tail = tl.load(k_ptr + brow, mask=brow < tl_packed_size(numel), other=0)
                live = live & (((tail.to(tl.int32)[:, None] >> cols[None, :]) & 1) != 0)
            p_raw = tl.load(p_ptr + offs, mask=live, other=0)
            g_raw = tl.load(g_ptr + offs, mask=live, other=0)
        g = to_f32(g_raw, G_DTYPE)
        if HAS_SCALE:
            g = g * tl.load(scale_ptr)
        if MAXIMIZE:
            g = -g
        p_new = to_bits(to_f32(p_raw, P_DTYPE) * decay - lr * g, P_DTYPE)
        if FULL:
            if HAS_MASK:
                on = ((byte.to(tl.int32)[:, None] >> cols[None, :]) & 1) != 0
                p_new = tl.where(on, p_new, p_raw)
            tl.store(p_ptr + offs, p_new)
        else:
            tl.store(p_ptr + offs, p_new, mask=live)

    @triton.jit
    def _masked_sgd_kernel(
        ptrs_ptr,
        chunks_ptr,
        scale_ptr,
        found_ptr,
        n_tensors,
        lr,
        decay,
        P_DTYPE: tl.constexpr,
        PB_DTYPE: tl.constexpr,
        GB_DTYPE: tl.constexpr,
        G_DTYPE: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_FOUND: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        ALIGNED: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # table rows: 0 param, 1 grad, 2 mask, 3 numel
        run = True
        if HAS_FOUND:
            run = tl.load(found_ptr) == 0.0
        if run:
            tid, start, numel, _ = open_chunk(ptrs_ptr, chunks_ptr, n_tensors, 3, ALIGNED, ROWS * 8)
            p_ptr = load_ptr(ptrs_ptr, 0, n_tensors, tid, PB_DTYPE, ALIGNED)
            g_ptr = load_ptr(ptrs_ptr, 1, n_tensors, tid, GB_DTYPE, ALIGNED)
            k_ptr = load_ptr(ptrs_ptr, 2, n_tensors, tid, tl.uint8, False)
            rows = tl.arange(0, ROWS)
            if start + ROWS * 8 <= numel:
                if HAS_MASK:
                    byte = tl.load(k_ptr + start // 8 + rows)
                    if tl.max(byte.to(tl.int32), axis=0) > 0:
                        _sgd_tile(
                            p_ptr, g_ptr, scale_ptr, byte, start, numel, lr, decay, k_ptr,
                            P_DTYPE, G_DTYPE, HAS_MASK, HAS_SCALE, MAXIMIZE, True, ROWS,
                        )  # fmt: skip
                else:
                    _sgd_tile(
                        p_ptr, g_ptr, scale_ptr, rows, start, numel, lr, decay, k_ptr,
                        P_DTYPE, G_DTYPE, HAS_MASK, HAS_SCALE, MAXIMIZE, True, ROWS,
                    )  # fmt: skip
            else:
                _sgd_tile(
                    p_ptr, g_ptr, scale_ptr, rows, start, numel, lr, decay, k_ptr,
                    P_DTYPE, G_DTYPE, HAS_MASK, HAS_SCALE, MAXIMIZE, False, ROWS,
                )  # fmt: skip


def triton_masked_sgd_(
    params, grads, masks, *, lr, weight_decay=0.0, grad_mul=None, found_inf=None, maximize=False
):
    """Triton twin of :func:`torch_masked_sgd_`."""
    for (pdt, gdt, dev), idx in group_by_dtype(params, grads).items():
        c = grad_mul_tensor(grad_mul, dev)
        f = flag_tensor(found_inf, dev)
        p = [params[i] for i in idx]
        ops = [
            p,
            [grads[i].contiguous() for i in idx],
            [masks[i] for i in idx] if masks is not None else p,
        ]
        ptrs, chunks, n_chunks, aligned = chunk_tables(ops, [t.numel() for t in p], BLOCK, 2)
        if n_chunks == 0:
            continue
        with device_guard(p[0]):
            _masked_sgd_kernel[(n_chunks,)](
                ptrs,
                chunks,
                c if c is not None else ptrs,
                f if f is not None else ptrs,
                len(p),
                float(lr),
                1.0 - lr * weight_decay,
                P_DTYPE=tl_dtype(pdt),
                PB_DTYPE=bits_tl_dtype(pdt),
                GB_DTYPE=bits_tl_dtype(gdt),
                G_DTYPE=tl_dtype(gdt),
                HAS_MASK=masks is not None,
                HAS_SCALE=c is not None,
                HAS_FOUND=f is not None,
                MAXIMIZE=bool(maximize),
                ALIGNED=aligned,
                ROWS=BLOCK // 8,
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )


def masked_sgd_(
    params,
    grads,
    masks,
    *,
    lr,
    weight_decay=0.0,
    grad_mul=None,
    found_inf=None,
    maximize=False,
    backend="auto",
):
    """SGD step restricted to masked elements, in place.

    Math (fp32, mask bit 1; c = grad_mul (multiplies the gradient) or 1, s = -1 if maximize else 1):
    ``p = p·(1 - lr·wd) - lr·s·c·grad``. Bit-0 elements keep their bytes. ``found_inf``: a
    1-element device tensor, nonzero = no-op (no host sync).
    In place on ``params``; returns None. Dtypes: params fp32 / bf16 (RNE) / fp16, grads
    fp32 / bf16 / fp16, masks packed uint8 or None. Bytes per element: 6.125 (bf16).
    Determinism: bit-exact run to run; cpu backend bit-exact vs the torch twin; triton within
    1 ulp (interpreter: exact).
    """
    params, grads = as_list(params), as_list(grads)
    masks = None if masks is None else as_list(masks)
    if not params:
        return
    _check_step_inputs(params, grads, masks)
    fn = {
        "triton": triton_masked_sgd_,
        "cpu": cpu_masked_sgd_,
        "torch": torch_masked_sgd_,
    }[resolve_backend(backend, params)]
    fn(
        params,
        grads,
        masks,
        lr=lr,
        weight_decay=weight_decay,
        grad_mul=grad_mul,
        found_inf=found_inf,
        maximize=maximize,
    )
