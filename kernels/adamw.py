"""Masked optimizer steps: AdamW (decoupled weight decay) and SGD that only touch masked elements.

An element whose mask bit is 0 keeps its parameter and both moments byte for byte (no weight
decay, no moment update). This is the guarantee the official MMUnlearner code lacks (it zeroes
gradients, so decay and the moments built by retain steps still move "frozen" weights). An
optional clip coefficient is read from a 0-dim device tensor, and an optional ``found_inf``
flag (a 0-dim device tensor, nonzero = skip) turns the whole step into a no-op, so neither a
clipped step nor a guarded one needs a host synchronisation.

Design envelope: memory-bound, one launch per (param dtype, grad dtype) group; per element
(bf16 params and grads, fp32 moments): 2+2 (param r/w) + 2 (grad) + 16 (moments r/w) + 1/8
(mask) = 22.125 bytes. A program owns a chunk of BLOCK = 4096 elements laid out as [512, 8]
(one mask byte per row). Full chunks of 16-byte-aligned tensors take an unmasked path the
compiler turns into 128-bit loads and stores; masked-out elements are then written back with
the integer bits that were read (``tl.where`` on the raw bits), i.e. rewritten with their own
value, never changed. A chunk whose mask bytes are all zero is skipped without touching the
operands. The tail chunk of each tensor takes a predicated path where masked-out elements are
not written at all. The arithmetic is ATen's, operation for operation (``tl.fma`` where ATen's
CPU kernels fuse, ``enable_fp_fusion=False`` elsewhere), so the GPU can match the CPU oracle.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _cpu
from ._common import (
    BLOCK,
    HAS_TRITON,
    NUM_WARPS,
    as_list,
    bits_tl_dtype,
    check_contiguous,
    check_same_numel,
    chunk_tables,
    device_guard,
    group_by_dtype,
    load_ptr,
    resolve_backend,
    tl,
    tl_dtype,
    to_bits,
    to_f32,
    triton,
)
from .bits import check_masks, tl_packed_size, torch_unpack_bits

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 16 warps = 8 elements per thread for the 4096-element chunk: the masked kernel then needs
# 100 (bf16) / 114 (fp32) registers and no spills on sm_90; at 8 warps it took 138 / 194
# (bench/aot.py, triton 3.9, 2026-11-30). SGD stays at the common NUM_WARPS (38-58 registers).
ADAMW_WARPS = 16


def _adam_scalars(lr, beta1, beta2, step):
    if step < 1:
        raise ValueError(f"step must be >= 1 (bias correction), got {step}")
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return lr / bc1, math.sqrt(bc2)


def _split(x: float) -> tuple[float, float]:
    """A float64 as two fp32 values whose sum restores ~48 bits (kernels take fp32 scalars)."""
    hi = float(np.float32(x))
    lo = float(np.float32(x - hi)) if math.isfinite(hi) else 0.0
    return hi, lo


def _is_device_steps(step) -> bool:
    return not isinstance(step, (int, np.integer))


def _step_value(s: torch.Tensor) -> int:
    """A per-tensor step count read on the host (the twins; a sync on CUDA). < 1 acts as 1: a
    count that is still 0 only occurs when ``found_inf`` skipped the first step."""
    return max(1, int(round(float(s))))


def _check_step_inputs(params, grads, masks, states=(), step=None):
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
    if step is not None and _is_device_steps(step):
        if len(step) != len(params):
            raise ValueError(f"got {len(step)} step tensors for {len(params)} params")
        for i, (s, p) in enumerate(zip(step, params)):
            if s.numel() != 1 or s.dtype != torch.float32 or s.device != p.device:
                raise ValueError(
                    f"step[{i}] must be a 1-element float32 tensor on {p.device}, "
                    f"got {s.dtype} {tuple(s.shape)} on {s.device}"
                )


def _scale_tensor(grad_scale, device):
    if grad_scale is None:
        return None
    if not isinstance(grad_scale, torch.Tensor) or grad_scale.numel() != 1:
        raise ValueError("grad_scale must be a 1-element tensor (e.g. a clip coefficient)")
    return grad_scale.reshape(()).to(device=device, dtype=torch.float32)


def _flag_tensor(found_inf, device):
    """found_inf → a 0-dim fp32 tensor on ``device`` (nonzero: skip the step), or None."""
    if found_inf is None:
        return None
    if not isinstance(found_inf, torch.Tensor) or found_inf.numel() != 1:
        raise ValueError("found_inf must be a 1-element tensor (nonzero: skip the step)")
    return found_inf.reshape(()).to(device=device, dtype=torch.float32)


def _cpu_skip(found_inf) -> bool:
    """The cpu backend reads the flag: on the host that is a load, not a device sync."""
    return found_inf is not None and float(_flag_tensor(found_inf, "cpu")) != 0.0


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
    found_inf=None,
    maximize=False,
):
    """Reference: the same math as torch.optim.AdamW in fp32, written back only where masked.

    With per-tensor step tensors the counts are read on the host (a sync on CUDA: this is the
    oracle); ``found_inf`` is applied with ``torch.where`` (no sync).
    """
    dev = params[0].device if params else None
    c = _scale_tensor(grad_scale, dev) if params else None
    skip = _flag_tensor(found_inf, dev) if params else None
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        t = _step_value(step[i]) if _is_device_steps(step) else step
        step_size, bc2_sqrt = _adam_scalars(lr, beta1, beta2, t)
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
        keep = None if masks is None else torch_unpack_bits(masks[i], p.shape)
        if skip is not None:
            keep = (skip == 0) if keep is None else keep & (skip == 0)
        if keep is None:
            p.copy_(p_new), m.copy_(m_new), v.copy_(v_new)
        else:
            p.copy_(torch.where(keep, p_new, p))
            m.copy_(torch.where(keep, m_new, m))
            v.copy_(torch.where(keep, v_new, v))


def cpu_masked_adamw_(
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
    found_inf=None,
    maximize=False,
):
    """C twin of :func:`torch_masked_adamw_` (kernels/_cpu.py): one call per dtype pair (and
    per distinct step count), one pass over every operand, all threads."""
    if not params or _cpu_skip(found_inf):
        return
    lib = _cpu.load()
    c = 1.0 if grad_scale is None else float(_scale_tensor(grad_scale, "cpu"))
    gmul = -c if maximize else c
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        t = _step_value(step[i]) if _is_device_steps(step) else step
        groups.setdefault((p.dtype, g.dtype, t), []).append(i)
    for (pdt, gdt, t), idx in groups.items():
        step_size, bc2_sqrt = _adam_scalars(lr, beta1, beta2, t)
        p = [params[i] for i in idx]
        ops = [
            p,
            [grads[i].contiguous() for i in idx],
            [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx],
            [masks[i] for i in idx] if masks is not None else p,
            p,
        ]
        numels = [x.numel() for x in p]
        ptrs, chunks, n_chunks, _ = chunk_tables(ops, numels, _cpu.CPU_BLOCK)
        if n_chunks == 0:
            continue
        lib.mmu_adamw(
            _cpu.DTYPE_CODE[pdt],
            _cpu.DTYPE_CODE[gdt],
            ptrs.data_ptr(),
            len(p),
            chunks.data_ptr(),
            n_chunks,
            _cpu.CPU_BLOCK,
            _cpu.threads_for(sum(numels)),
            masks is not None,
            gmul,
            1.0 - lr * weight_decay,
            beta2,
            1.0 - beta1,
            1.0 - beta2,
            eps,
            -step_size,
            bc2_sqrt,
        )


if HAS_TRITON:

    @triton.jit
    def _adamw_tile(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        k_ptr,
        scale_ptr,
        byte,
        start,
        numel,
        decay,
        beta2,
        omb1,
        omb2,
        eps,
        neg_step_size,
        bc2_sqrt,
        G_DTYPE: tl.constexpr,
        P_DTYPE: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        LERP_SMALL: tl.constexpr,
        MODE: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        """[ROWS, 8] elements from ``start``. MODE 0: all in bounds (no predicate); 1: whole
        rows in bounds (a per-row predicate, still 128-bit vectors); 2: per element (the last
        numel % 8 elements of a tensor, ROWS = 1; ``byte`` is loaded here)."""
        rows = tl.arange(0, ROWS)
        cols = tl.arange(0, 8)
        offs = start + rows[:, None] * 8 + cols[None, :]
        if MODE == 0:
            p_raw = tl.load(p_ptr + offs)
            g_raw = tl.load(g_ptr + offs)
            m_raw = tl.load(m_ptr + offs)
            v_raw = tl.load(v_ptr + offs)
        else:
            if MODE == 1:
                live = (rows[:, None] < (numel - start) // 8) & (cols[None, :] < 8)
            else:
                live = offs < numel
                if HAS_MASK:
                    byte = tl.load(k_ptr + start // 8 + rows)
            p_raw = tl.load(p_ptr + offs, mask=live, other=0)
            g_raw = tl.load(g_ptr + offs, mask=live, other=0)
            m_raw = tl.load(m_ptr + offs, mask=live, other=0)
            v_raw = tl.load(v_ptr + offs, mask=live, other=0)
        g = to_f32(g_raw, G_DTYPE)
        if HAS_SCALE:
            g = g * tl.load(scale_ptr)
        if MAXIMIZE:
            g = -g
        m = to_f32(m_raw, tl.float32)
        v = to_f32(v_raw, tl.float32)
        # ATen's CPU AdamW, op for op: p.mul_(decay); m.lerp_(g, 1-β1) (an FMA);
        # v.mul(β2).addcmul_(g, g, 1-β2) (an FMA); p.addcdiv_(m, sqrt(v)/bc2 + eps, -step_size).
        # Scalars come from the host in float64, rounded once to fp32 as torch does.
        p = to_f32(p_raw, P_DTYPE) * decay
        if LERP_SMALL:
            m = tl.fma(omb1, g - m, m)
        else:
            m = tl.fma(omb1 - 1.0, g - m, g)
        v = tl.fma(omb2 * g, g, v * beta2)
        denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p + tl.math.div_rn(neg_step_size * m, denom)
        p_new = to_bits(p, P_DTYPE)
        m_new = m.to(tl.uint32, bitcast=True)
        v_new = v.to(tl.uint32, bitcast=True)
        if HAS_MASK:  # read-modify-write: bit 0 stores back the very bits it read
            on = ((byte.to(tl.int32)[:, None] >> cols[None, :]) & 1) != 0
            p_new = tl.where(on, p_new, p_raw)
            m_new = tl.where(on, m_new, m_raw)
            v_new = tl.where(on, v_new, v_raw)
        if MODE == 0:
            tl.store(p_ptr + offs, p_new)
            tl.store(m_ptr + offs, m_new)
            tl.store(v_ptr + offs, v_new)
        else:
            tl.store(p_ptr + offs, p_new, mask=live)
            tl.store(m_ptr + offs, m_new, mask=live)
            tl.store(v_ptr + offs, v_new, mask=live)

    @triton.jit
    def _masked_adamw_kernel(
        ptrs_ptr,
        chunks_ptr,
        scale_ptr,
        found_ptr,
        n_tensors,
        decay,
        beta2,
        omb1,
        omb2,
        eps,
        neg_step_size,
        bc2_sqrt,
        lr_hi,
        lr_lo,
        lnb1_hi,
        lnb1_lo,
        lnb2_hi,
        lnb2_lo,
        P_DTYPE: tl.constexpr,
        PB_DTYPE: tl.constexpr,
        GB_DTYPE: tl.constexpr,
        G_DTYPE: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_FOUND: tl.constexpr,
        DEVICE_STEP: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        LERP_SMALL: tl.constexpr,
        ALIGNED: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # table rows: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 mask, 5 step, 6 numel
        pid = tl.program_id(0).to(tl.int64)
        n_chunks = tl.num_programs(0).to(tl.int64)
        run = True
        if HAS_FOUND:
            run = tl.load(found_ptr) == 0.0
        if run:
            tid = tl.load(chunks_ptr + pid)
            start = tl.load(chunks_ptr + n_chunks + pid)
            if ALIGNED:
                start = tl.multiple_of(start, ROWS * 8)
            numel = tl.load(ptrs_ptr + 6 * n_tensors + tid)
            p_ptr = load_ptr(ptrs_ptr, 0, n_tensors, tid, PB_DTYPE, ALIGNED)
            g_ptr = load_ptr(ptrs_ptr, 1, n_tensors, tid, GB_DTYPE, ALIGNED)
            m_ptr = load_ptr(ptrs_ptr, 2, n_tensors, tid, tl.uint32, ALIGNED)
            v_ptr = load_ptr(ptrs_ptr, 3, n_tensors, tid, tl.uint32, ALIGNED)
            k_ptr = load_ptr(ptrs_ptr, 4, n_tensors, tid, tl.uint8, False)
            nss = neg_step_size
            b2s = bc2_sqrt
            if DEVICE_STEP:  # bias corrections from this tensor's device step count, in fp64
                s_ptr = load_ptr(ptrs_ptr, 5, n_tensors, tid, tl.float32, False)
                t = tl.maximum(tl.load(s_ptr), 1.0).to(tl.float64)
                zero = t * 0.0  # fp64: each fp32 half is promoted before it is added
                lr = zero + lr_hi + lr_lo
                bc1 = 1.0 - tl.exp(t * (zero + lnb1_hi + lnb1_lo))
                bc2 = 1.0 - tl.exp(t * (zero + lnb2_hi + lnb2_lo))
                nss = (-(lr / bc1)).to(tl.float32)
                b2s = tl.sqrt(bc2).to(tl.float32)
            rows = tl.arange(0, ROWS)
            full = start + ROWS * 8 <= numel
            n_rows = tl.minimum((numel - start) // 8, ROWS)  # whole rows in bounds
            if HAS_MASK:
                byte = tl.load(k_ptr + start // 8 + rows, mask=rows < n_rows, other=0)
                todo = tl.max(byte.to(tl.int32), axis=0) > 0  # else nothing is selected here
            else:
                byte = rows
                todo = n_rows > 0
            if todo:
                if full:
                    _adamw_tile(
                        p_ptr, g_ptr, m_ptr, v_ptr, k_ptr, scale_ptr, byte, start, numel,
                        decay, beta2, omb1, omb2, eps, nss, b2s,
                        G_DTYPE, P_DTYPE, HAS_MASK, HAS_SCALE, MAXIMIZE, LERP_SMALL, 0, ROWS,
                    )  # fmt: skip
                else:
                    _adamw_tile(
                        p_ptr, g_ptr, m_ptr, v_ptr, k_ptr, scale_ptr, byte, start, numel,
                        decay, beta2, omb1, omb2, eps, nss, b2s,
                        G_DTYPE, P_DTYPE, HAS_MASK, HAS_SCALE, MAXIMIZE, LERP_SMALL, 1, ROWS,
                    )  # fmt: skip
            if (start + n_rows * 8 < numel) & (n_rows < ROWS):  # the last numel % 8 elements
                _adamw_tile(
                    p_ptr, g_ptr, m_ptr, v_ptr, k_ptr, scale_ptr, byte, start + n_rows * 8, numel,
                    decay, beta2, omb1, omb2, eps, nss, b2s,
                    G_DTYPE, P_DTYPE, HAS_MASK, HAS_SCALE, MAXIMIZE, LERP_SMALL, 2, 1,
                )  # fmt: skip


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
    found_inf=None,
    maximize=False,
):
    """Triton twin of :func:`torch_masked_adamw_`: one launch per (param, grad) dtype group.

    ``step``: an int (bias corrections computed on the host, exactly as torch.optim.AdamW), or
    one 0-dim fp32 device tensor per parameter (computed in the kernel in fp64 from the count,
    within an fp32 rounding of the host value; no sync).
    """
    dev = params[0].device
    c = _scale_tensor(grad_scale, dev)
    f = _flag_tensor(found_inf, dev)
    device_step = _is_device_steps(step)
    if device_step:
        step_size, bc2_sqrt = 0.0, 1.0
        lr_s = _split(lr)
        lnb1 = _split(math.log(beta1) if beta1 > 0 else -math.inf)
        lnb2 = _split(math.log(beta2) if beta2 > 0 else -math.inf)
    else:
        step_size, bc2_sqrt = _adam_scalars(lr, beta1, beta2, step)
        lr_s = lnb1 = lnb2 = (0.0, 0.0)
    for (pdt, gdt), idx in group_by_dtype(params, grads).items():
        p = [params[i] for i in idx]
        ops = [
            p,
            [grads[i].contiguous() for i in idx],
            [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx],
            [masks[i] for i in idx] if masks is not None else p,
            [step[i] for i in idx] if device_step else p,
        ]
        ptrs, chunks, n_chunks, aligned = chunk_tables(ops, [t.numel() for t in p], BLOCK, 4)
        if n_chunks == 0:
            continue
        with device_guard(p[0]):
            _masked_adamw_kernel[(n_chunks,)](
                ptrs,
                chunks,
                c if c is not None else ptrs,
                f if f is not None else ptrs,
                len(p),
                1.0 - lr * weight_decay,
                float(beta2),
                1.0 - beta1,
                1.0 - beta2,
                float(eps),
                -step_size,
                float(bc2_sqrt),
                *lr_s,
                *lnb1,
                *lnb2,
                P_DTYPE=tl_dtype(pdt),
                PB_DTYPE=bits_tl_dtype(pdt),
                GB_DTYPE=bits_tl_dtype(gdt),
                G_DTYPE=tl_dtype(gdt),
                HAS_MASK=masks is not None,
                HAS_SCALE=c is not None,
                HAS_FOUND=f is not None,
                DEVICE_STEP=device_step,
                MAXIMIZE=bool(maximize),
                LERP_SMALL=abs(np.float32(1.0 - beta1)) < 0.5,
                ALIGNED=aligned,
                ROWS=BLOCK // 8,
                num_warps=ADAMW_WARPS,
                enable_fp_fusion=False,
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
    found_inf=None,
    maximize=False,
    backend="auto",
):
    """AdamW step restricted to masked elements, in place.

    Math (fp32, per element with mask bit 1; c = grad_scale or 1, s = -1 if maximize else 1):
    ``g = s·c·grad; p *= 1 - lr·wd; m += (1-β1)(g - m); v = β2·v + (1-β2)·g²;``
    ``p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)`` — torch.optim.AdamW's formula.
    Elements with bit 0: parameter and both moments keep their bytes.
    ``found_inf``: a 1-element device tensor; nonzero turns the call into a no-op on the device
    (nothing is written; no host sync). ``step``: the 1-based step count (int), or one 1-element
    fp32 tensor per parameter on its device, already incremented — as torch's fused AdamW takes
    ``state_steps``; pair it with ``found_inf`` to skip a step without a sync (add ``found_inf
    == 0`` to the counts first, see :class:`mmunlearn.optim.MaskedAdamW`).
    In place on ``params``, ``exp_avgs``, ``exp_avg_sqs``; returns None.
    Dtypes: params fp32 / bf16 / fp16 (bf16 written with round-to-nearest-even), grads
    fp32 / bf16 / fp16, moments fp32; masks packed uint8 (:func:`pack_bits`) or None (all ones);
    ``grad_scale`` a 1-element device tensor (no host sync).
    Bytes per element: 22.125 for bf16 params and grads (8+4+16+0.125 = 28.125 for fp32).
    Determinism: bit-exact run to run; cpu backend vs the torch twin bit-exact on the machines
    measured (ulp-bounded in the tests); triton vs the twin within a few fp32 ulps (interpreter:
    exact), device step counts within an fp32 rounding of the scalars.
    """
    params, grads = as_list(params), as_list(grads)
    exp_avgs, exp_avg_sqs = as_list(exp_avgs), as_list(exp_avg_sqs)
    masks = None if masks is None else as_list(masks)
    if not params:
        return
    if _is_device_steps(step):
        step = as_list(step)
    _check_step_inputs(
        params, grads, masks, (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)), step
    )
    fn = {
        "triton": triton_masked_adamw_,
        "cpu": cpu_masked_adamw_,
        "torch": torch_masked_adamw_,
    }[resolve_backend(backend, params)]
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
        found_inf=found_inf,
        maximize=maximize,
    )


# ------------------------------------------------------------------ masked_sgd_
def torch_masked_sgd_(
    params, grads, masks, *, lr, weight_decay=0.0, grad_scale=None, found_inf=None, maximize=False
):
    """Reference: ``p = p·(1 - lr·wd) - lr·s·c·g`` in fp32, written back only where masked."""
    dev = params[0].device if params else None
    c = _scale_tensor(grad_scale, dev) if params else None
    skip = _flag_tensor(found_inf, dev) if params else None
    for i, (p, g) in enumerate(zip(params, grads)):
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
    params, grads, masks, *, lr, weight_decay=0.0, grad_scale=None, found_inf=None, maximize=False
):
    """C twin of :func:`torch_masked_sgd_` (kernels/_cpu.py)."""
    if not params or _cpu_skip(found_inf):
        return
    lib = _cpu.load()
    c = 1.0 if grad_scale is None else float(_scale_tensor(grad_scale, "cpu"))
    for (pdt, gdt), idx in group_by_dtype(params, grads).items():
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
        pid = tl.program_id(0).to(tl.int64)
        n_chunks = tl.num_programs(0).to(tl.int64)
        run = True
        if HAS_FOUND:
            run = tl.load(found_ptr) == 0.0
        if run:
            tid = tl.load(chunks_ptr + pid)
            start = tl.load(chunks_ptr + n_chunks + pid)
            if ALIGNED:
                start = tl.multiple_of(start, ROWS * 8)
            numel = tl.load(ptrs_ptr + 3 * n_tensors + tid)
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
    params, grads, masks, *, lr, weight_decay=0.0, grad_scale=None, found_inf=None, maximize=False
):
    """Triton twin of :func:`torch_masked_sgd_`."""
    dev = params[0].device
    c = _scale_tensor(grad_scale, dev)
    f = _flag_tensor(found_inf, dev)
    for (pdt, gdt), idx in group_by_dtype(params, grads).items():
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
    grad_scale=None,
    found_inf=None,
    maximize=False,
    backend="auto",
):
    """SGD step restricted to masked elements, in place.

    Math (fp32, mask bit 1; c = grad_scale or 1, s = -1 if maximize else 1):
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
        grad_scale=grad_scale,
        found_inf=found_inf,
        maximize=maximize,
    )
