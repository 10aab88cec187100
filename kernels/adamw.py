"""Masked optimizer steps: AdamW (decoupled weight decay) and SGD that only touch masked elements.

An element whose mask bit is 0 is not read-modify-written at all: its parameter and both moments
keep their exact bytes (no weight decay, no moment update). This is the guarantee the official
MMUnlearner code lacks (it zeroes gradients, so decay and the moments built by retain steps still
move "frozen" weights). An optional clip coefficient is read from a 0-dim device tensor, so a
clipped step needs no host synchronisation.

Design envelope: memory-bound, one launch per (param dtype, grad dtype) group; per element
(bf16 params and grads, fp32 moments): 2+2 (param r/w) + 2 (grad) + 16 (moments r/w) + 1/8
(mask) = 22.125 bytes.
"""

from __future__ import annotations

import math

import torch

from ._common import (
    BLOCK,
    HAS_TRITON,
    NUM_WARPS,
    as_list,
    check_contiguous,
    check_masks,
    check_same_numel,
    chunk_tables,
    device_guard,
    group_by_dtype,
    resolve_backend,
    round_store,
    tl,
    tl_dtype,
    triton,
)
from .bits import torch_unpack_bits

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _adam_scalars(lr, beta1, beta2, step):
    if step < 1:
        raise ValueError(f"step must be >= 1 (bias correction), got {step}")
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return lr / bc1, math.sqrt(bc2)


def _check_step_inputs(params, grads, masks, states=()):
    check_same_numel("params", params, "grads", grads)
    for name, st in states:
        check_same_numel("params", params, name, st)
        for i, s in enumerate(st):
            if s.dtype != torch.float32:
                raise ValueError(f"{name}[{i}] must be float32, got {s.dtype}")
        check_contiguous(name, st)
    for i, p in enumerate(params):
        if p.dtype not in _PARAM_DTYPES:
            raise ValueError(f"params[{i}] has unsupported dtype {p.dtype}")
    check_contiguous("params", params)
    if masks is not None:
        check_masks(masks, [p.numel() for p in params])


def _scale_tensor(grad_scale, device):
    if grad_scale is None:
        return None
    if not isinstance(grad_scale, torch.Tensor) or grad_scale.numel() != 1:
        raise ValueError("grad_scale must be a 1-element tensor (e.g. a clip coefficient)")
    return grad_scale.reshape(()).to(device=device, dtype=torch.float32)


# ------------------------------------------------------------------ masked_adamw_
def torch_masked_adamw_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    masks,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    grad_scale=None,
    maximize=False,
):
    """Reference: the same math as torch.optim.AdamW in fp32, written back only where masked."""
    step_size, bc2_sqrt = _adam_scalars(lr, beta1, beta2, step)
    c = _scale_tensor(grad_scale, params[0].device) if params else None
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        g32 = g.reshape(p.shape).float()
        if c is not None:
            g32 = g32 * c
        if maximize:
            g32 = -g32
        # the very ops torch.optim.AdamW (foreach=False) uses, so the twin is also the oracle
        p32 = p.to(torch.float32, copy=True).mul_(1.0 - lr * weight_decay)
        m_new = m.lerp(g32, 1.0 - beta1)
        v_new = (v * beta2).addcmul_(g32, g32, value=1.0 - beta2)
        denom = (v_new.sqrt() / bc2_sqrt).add_(eps)
        p_new = p32.addcdiv_(m_new, denom, value=-step_size).to(p.dtype)
        if masks is None:
            p.copy_(p_new), m.copy_(m_new), v.copy_(v_new)
        else:
            keep = torch_unpack_bits(masks[i], p.shape)
            p.copy_(torch.where(keep, p_new, p))
            m.copy_(torch.where(keep, m_new, m))
            v.copy_(torch.where(keep, v_new, v))


if HAS_TRITON:

    @triton.jit
    def _masked_adamw_kernel(
        ptrs_ptr,
        chunks_ptr,
        scale_ptr,
        n_tensors,
        decay,
        beta2,
        one_minus_beta1,
        one_minus_beta2,
        eps,
        neg_step_size,
        bc2_sqrt,
        P_DTYPE: tl.constexpr,
        G_DTYPE: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        n_chunks = tl.num_programs(0).to(tl.int64)
        tid = tl.load(chunks_ptr + pid)
        start = tl.load(chunks_ptr + n_chunks + pid)
        p_ptr = tl.load(ptrs_ptr + tid).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(ptrs_ptr + n_tensors + tid).to(tl.pointer_type(G_DTYPE))
        m_ptr = tl.load(ptrs_ptr + 2 * n_tensors + tid).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(ptrs_ptr + 3 * n_tensors + tid).to(tl.pointer_type(tl.float32))
        numel = tl.load(ptrs_ptr + 5 * n_tensors + tid)
        rows = tl.arange(0, ROWS)
        cols = tl.arange(0, 8)
        offs = start + rows[:, None] * 8 + cols[None, :]
        live = offs < numel
        if HAS_MASK:
            k_ptr = tl.load(ptrs_ptr + 4 * n_tensors + tid).to(tl.pointer_type(tl.uint8))
            brow = start // 8 + rows
            byte = tl.load(k_ptr + brow, mask=brow < (numel + 7) // 8, other=0).to(tl.int32)
            live = live & (((byte[:, None] >> cols[None, :]) & 1) != 0)
        g = tl.load(g_ptr + offs, mask=live, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g * tl.load(scale_ptr)
        if MAXIMIZE:
            g = -g
        p = tl.load(p_ptr + offs, mask=live, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=live, other=0.0)
        v = tl.load(v_ptr + offs, mask=live, other=0.0)
        # torch.optim.AdamW's order of operations; the scalar factors are computed on the host in
        # float64 and rounded once to fp32, as torch does (1 - fp32(0.9) != fp32(1 - 0.9)).
        p = p * decay
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + (one_minus_beta2 * g) * g
        denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p + neg_step_size * tl.math.div_rn(m, denom)
        tl.store(m_ptr + offs, m, mask=live)
        tl.store(v_ptr + offs, v, mask=live)
        round_store(p_ptr + offs, p, live, OUT_BF16=(P_DTYPE == tl.bfloat16))


def triton_masked_adamw_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    masks,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    grad_scale=None,
    maximize=False,
):
    """Triton twin of :func:`torch_masked_adamw_`: one launch per (param, grad) dtype group."""
    step_size, bc2_sqrt = _adam_scalars(lr, beta1, beta2, step)
    c = _scale_tensor(grad_scale, params[0].device)
    for (pdt, gdt), idx in group_by_dtype(params, grads).items():
        p = [params[i] for i in idx]
        ops = [
            p,
            [grads[i].contiguous() for i in idx],
            [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx],
            [masks[i] for i in idx] if masks is not None else p,
        ]
        ptrs, chunks, n_chunks = chunk_tables(ops, [t.numel() for t in p], BLOCK)
        if n_chunks == 0:
            continue
        with device_guard(p[0]):
            _masked_adamw_kernel[(n_chunks,)](
                ptrs,
                chunks,
                c if c is not None else ptrs,
                len(p),
                1.0 - lr * weight_decay,
                float(beta2),
                1.0 - beta1,
                1.0 - beta2,
                float(eps),
                -step_size,
                float(bc2_sqrt),
                P_DTYPE=tl_dtype(pdt),
                G_DTYPE=tl_dtype(gdt),
                HAS_MASK=masks is not None,
                HAS_SCALE=c is not None,
                MAXIMIZE=bool(maximize),
                ROWS=BLOCK // 8,
                num_warps=NUM_WARPS,
            )


def masked_adamw_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    masks,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    grad_scale=None,
    maximize=False,
    backend="auto",
):
    """AdamW step restricted to masked elements, in place.

    Math (fp32, per element with mask bit 1; c = grad_scale or 1, s = -1 if maximize else 1):
    ``g = s·c·grad; p *= 1 - lr·wd; m += (1-β1)(g - m); v = β2·v + (1-β2)·g²;``
    ``p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)`` — torch.optim.AdamW's formula.
    Elements with bit 0: parameter and both moments are not written (byte-identical).
    In place on ``params``, ``exp_avgs``, ``exp_avg_sqs``; returns None.
    Dtypes: params fp32 / bf16 / fp16 (bf16 written with round-to-nearest-even), grads
    fp32 / bf16 / fp16, moments fp32; masks packed uint8 (:func:`pack_bits`) or None (all ones);
    ``grad_scale`` a 1-element device tensor (no host sync), ``step`` the 1-based step count.
    Bytes per element: 22.125 for bf16 params and grads (4+4+16+0.125 = 24.125 for fp32).
    Determinism: bit-exact run to run; vs the torch twin within a few fp32 ulps (division and
    sqrt are IEEE-rounded on both, FMA contraction may differ).
    """
    params, grads = as_list(params), as_list(grads)
    exp_avgs, exp_avg_sqs = as_list(exp_avgs), as_list(exp_avg_sqs)
    masks = None if masks is None else as_list(masks)
    if not params:
        return
    _check_step_inputs(params, grads, masks, (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)))
    fn = (
        triton_masked_adamw_
        if resolve_backend(backend, params) == "triton"
        else torch_masked_adamw_
    )
    fn(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        masks,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
        grad_scale=grad_scale,
        maximize=maximize,
    )


# ------------------------------------------------------------------ masked_sgd_
def torch_masked_sgd_(
    params, grads, masks, *, lr, weight_decay=0.0, grad_scale=None, maximize=False
):
    """Reference: ``p = p·(1 - lr·wd) - lr·s·c·g`` in fp32, written back only where masked."""
    c = _scale_tensor(grad_scale, params[0].device) if params else None
    for i, (p, g) in enumerate(zip(params, grads)):
        g32 = g.reshape(p.shape).float()
        if c is not None:
            g32 = g32 * c
        if maximize:
            g32 = -g32
        p_new = (p.float() * (1.0 - lr * weight_decay) - lr * g32).to(p.dtype)
        if masks is None:
            p.copy_(p_new)
        else:
            p.copy_(torch.where(torch_unpack_bits(masks[i], p.shape), p_new, p))


if HAS_TRITON:

    @triton.jit
    def _masked_sgd_kernel(
        ptrs_ptr,
        chunks_ptr,
        scale_ptr,
        n_tensors,
        lr,
        decay,
        P_DTYPE: tl.constexpr,
        G_DTYPE: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        n_chunks = tl.num_programs(0).to(tl.int64)
        tid = tl.load(chunks_ptr + pid)
        start = tl.load(chunks_ptr + n_chunks + pid)
        p_ptr = tl.load(ptrs_ptr + tid).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(ptrs_ptr + n_tensors + tid).to(tl.pointer_type(G_DTYPE))
        numel = tl.load(ptrs_ptr + 3 * n_tensors + tid)
        rows = tl.arange(0, ROWS)
        cols = tl.arange(0, 8)
        offs = start + rows[:, None] * 8 + cols[None, :]
        live = offs < numel
        if HAS_MASK:
            k_ptr = tl.load(ptrs_ptr + 2 * n_tensors + tid).to(tl.pointer_type(tl.uint8))
            brow = start // 8 + rows
            byte = tl.load(k_ptr + brow, mask=brow < (numel + 7) // 8, other=0).to(tl.int32)
            live = live & (((byte[:, None] >> cols[None, :]) & 1) != 0)
        g = tl.load(g_ptr + offs, mask=live, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g * tl.load(scale_ptr)
        if MAXIMIZE:
            g = -g
        p = tl.load(p_ptr + offs, mask=live, other=0.0).to(tl.float32)
        p = p * decay - lr * g
        round_store(p_ptr + offs, p, live, OUT_BF16=(P_DTYPE == tl.bfloat16))


def triton_masked_sgd_(
    params, grads, masks, *, lr, weight_decay=0.0, grad_scale=None, maximize=False
):
    """Triton twin of :func:`torch_masked_sgd_`."""
    c = _scale_tensor(grad_scale, params[0].device)
    for (pdt, gdt), idx in group_by_dtype(params, grads).items():
        p = [params[i] for i in idx]
        ops = [
            p,
            [grads[i].contiguous() for i in idx],
            [masks[i] for i in idx] if masks is not None else p,
        ]
        ptrs, chunks, n_chunks = chunk_tables(ops, [t.numel() for t in p], BLOCK)
        if n_chunks == 0:
            continue
        with device_guard(p[0]):
            _masked_sgd_kernel[(n_chunks,)](
                ptrs,
                chunks,
                c if c is not None else ptrs,
                len(p),
                float(lr),
                1.0 - lr * weight_decay,
                P_DTYPE=tl_dtype(pdt),
                G_DTYPE=tl_dtype(gdt),
                HAS_MASK=masks is not None,
                HAS_SCALE=c is not None,
                MAXIMIZE=bool(maximize),
                ROWS=BLOCK // 8,
                num_warps=NUM_WARPS,
            )


def masked_sgd_(
    params, grads, masks, *, lr, weight_decay=0.0, grad_scale=None, maximize=False, backend="auto"
):
    """SGD step restricted to masked elements, in place.

    Math (fp32, mask bit 1; c = grad_scale or 1, s = -1 if maximize else 1):
    ``p = p·(1 - lr·wd) - lr·s·c·grad``. Bit-0 elements are not written.
    In place on ``params``; returns None. Dtypes: params fp32 / bf16 (RNE) / fp16, grads
    fp32 / bf16 / fp16, masks packed uint8 or None. Bytes per element: 6.125 (bf16).
    Determinism: bit-exact run to run; vs the torch twin within 1 ulp (FMA contraction).
    """
    params, grads = as_list(params), as_list(grads)
    masks = None if masks is None else as_list(masks)
    if not params:
        return
    _check_step_inputs(params, grads, masks)
    fn = triton_masked_sgd_ if resolve_backend(backend, params) == "triton" else torch_masked_sgd_
    fn(
        params,
        grads,
        masks,
        lr=lr,
        weight_decay=weight_decay,
        grad_scale=grad_scale,
        maximize=maximize,
    )
