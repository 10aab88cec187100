"""Masked AdamW step: only the selected elements move, with fp32 or bf16 (stochastically
rounded) moments, dense or compacted to the selected elements.

An element whose mask bit is 0 keeps its parameter and both moments byte for byte (no weight
decay, no moment update). This is the guarantee the official MMUnlearner code lacks (it zeroes
gradients, so decay and the moments built by retain steps still move "frozen" weights). An
optional gradient multiplier (``grad_mul``, e.g. the clip coefficient) is read from a 0-dim
device tensor, and an optional ``found_inf`` flag (a 0-dim device tensor, nonzero = skip) turns
the whole step into a no-op, so neither a clipped step nor a guarded one needs a host sync.

Design envelope: memory-bound, one launch per (param, grad, state dtype, device) group. Bytes
per element (bf16 params and grads): 2+2 (param r/w) + 2 (grad) + 16 (fp32 moments r/w) or 8
(bf16 moments) + 1/8 (mask) = 22.125 / 14.125; compacted state moves the moments' bytes only
for selected elements: 6.125 + 16·s (fp32) or 6.125 + 8·s (bf16) at selection fraction s.
A program owns a chunk of ADAMW_BLOCK = 2048 elements laid out as [256, 8] (one mask byte per
row), 8 warps, int32 offsets from per-chunk base pointers: ≤ 128 registers, 2 programs per SM.
Full chunks of 16-byte-aligned tensors take an unmasked path the compiler turns into 128-bit
loads and stores; masked-out elements are then written back with the integer bits that were
read (``tl.where`` on the raw bits), i.e. rewritten with their own value, never changed. With
a :class:`~mmunlearn.kernels.bits.MaskIndex` per tensor the chunks whose mask is all zero are
not launched at all (the table is built once); without one a program skips such a chunk after
reading its mask bytes. The tail chunk of each tensor takes a predicated path where masked-out
elements are not written at all. The arithmetic is ATen's, operation for operation (``tl.fma``
where ATen's CPU kernels fuse, ``enable_fp_fusion=False`` elsewhere), so the GPU can match the
CPU oracle. One exception, in every backend alike: with bf16 moments (rounded anyway, so never
bit-exact with torch.optim.AdamW) the parameter update is the same quotient with one division
instead of two, ``p + (-step_size·bc2)·m / (sqrt(v) + eps·bc2)`` (:func:`bf16_state_scalars`).

Stochastic rounding (``sr_seed``): bf16 moments — and bf16 parameters with ``param_sr`` — are
rounded from fp32 by adding a uniform 16-bit integer to the fp32 bit pattern and truncating
(torchao's ``_fp32_to_bf16_sr``, as an add), so a value rounds away from zero with probability
equal to the dropped fraction: unbiased, and an update below half an ulp of a bf16 weight still
moves it in expectation. The bits come from a counter-based hash of (seed, tensor position,
element index) — no generator state, the same function in all three twins (kernels/_common.py),
so the twins draw identical bits and their results are bit-identical wherever their fp32
arithmetic is. The element index is the parameter's, so compacted and dense state round alike.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _cpu
from ._common import (
    HAS_TRITON,
    as_list,
    bf16_add_round,
    bits_tl_dtype,
    check_contiguous,
    check_same_numel,
    cpu_skip,
    device_guard,
    flag_tensor,
    grad_mul_tensor,
    group_by_dtype,
    load_ptr,
    mix32,
    numels_of,
    open_chunk,
    resolve_backend,
    salt,
    tl,
    tl_dtype,
    tl_mix32,
    to_bits,
    to_f32,
    torch_bf16_add_round,
    torch_sr_bits,
    triton,
)
from .bits import MaskIndex, check_masks, torch_unpack_bits
from .plan import adamw_launches, build_launch

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16)
PARAM_MUL = 0x5BD1E995  # the parameter's 16 random bits: (u * PARAM_MUL mod 2^32) >> 16
# 2048-element chunks over 8 warps = 8 elements per thread. With int32 offsets from per-chunk
# base pointers the masked kernel needs <= 128 registers on sm_90, so two programs (512 threads)
# are resident per SM; the 4096-element chunk over 16 warps (one program per SM) needed
# 100-120 (bench/aot.py, triton 3.9; numbers in bench/NOTES.md).
ADAMW_BLOCK = 2048
ADAMW_WARPS = 8


def launch_options(compact: bool, aligned: bool) -> dict:
    """Extra compile options per variant: the compacted-state variant (120-136 registers
    uncapped) is capped at 128 (``maxnreg``) so it, too, keeps 2 programs per SM without
    spilling (bench/aot.py). The unaligned fallback (143) is not: capped it spills on sm_90,
    and it only runs for views with a storage offset. The interpreter takes no such option."""
    from ._common import INTERPRET

    if INTERPRET or not compact:
        return {}
    return {"maxnreg": 128}


def _adam_scalars(lr, beta1, beta2, step):
    if step < 1:
        raise ValueError(f"step must be >= 1 (bias correction), got {step}")
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return lr / bc1, math.sqrt(bc2)


def bf16_state_scalars(eps: float, step_size: float, bc2_sqrt: float) -> tuple[float, float]:
    """(eps2, nss2) of the bf16-state update ``p + nss2·m / (sqrt(v) + eps2)``: eps and
    -step_size multiplied by sqrt(1-β2^t) in fp32, from the fp32-rounded scalars, as the C and
    Triton kernels compute them. The quotient is torch's ``m / (sqrt(v)/bc2 + eps)`` with
    numerator and denominator multiplied by bc2: one division instead of two (bf16 moments are
    rounded anyway; the update stays within a few fp32 ulps of fp64, see bench/NOTES.md)."""
    f32 = np.float32
    return float(f32(eps) * f32(bc2_sqrt)), float(f32(-step_size) * f32(bc2_sqrt))


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


def _seed32(sr_seed) -> int:
    """The step's seed as the 31-bit scalar every backend hashes (None: no SR)."""
    return mix32(int(sr_seed) & 0xFFFFFFFF) & 0x7FFFFFFF


def _check_step_inputs(params, grads, masks, states=(), step=None, mask_index=None, compact=False):
    """Validate a step's operands (one pass per list: a step over a 7B model's 437 tensors
    pays this on the host every call)."""
    check_same_numel("params", params, "grads", grads)
    bad = [i for i, p in enumerate(params) if p.dtype not in _PARAM_DTYPES]
    if bad:
        raise ValueError(f"params[{bad[0]}] has unsupported dtype {params[bad[0]].dtype}")
    check_contiguous("params", params)
    pn = numels_of(params)
    if masks is not None:
        check_masks(masks, pn)
    if mask_index is not None:
        if masks is None:
            raise ValueError("mask_index needs masks")
        if len(mask_index) != len(params):
            raise ValueError(f"got {len(mask_index)} mask indexes for {len(params)} params")
        for i, (ix, n) in enumerate(zip(mask_index, pn)):
            if not isinstance(ix, MaskIndex) or ix.numel != n:
                raise ValueError(f"mask_index[{i}] is not a MaskIndex of params[{i}]'s mask")
    if compact and mask_index is None:
        raise ValueError("compact state needs masks and a mask_index (the selected elements)")
    for name, st in states:
        if compact:
            if len(st) != len(params):
                raise ValueError(f"{name} has {len(st)} tensors but params has {len(params)}")
            counts = [ix.count for ix in mask_index]
            have = numels_of(st)
            if have != counts:
                i = next(i for i, (a, b) in enumerate(zip(have, counts)) if a != b)
                raise ValueError(
                    f"{name}[{i}] has {have[i]} elements; compacted state of a mask "
                    f"selecting {counts[i]} needs {counts[i]}"
                )
        else:
            check_same_numel("params", params, name, st)
        bad = [i for i, s in enumerate(st) if s.dtype not in STATE_DTYPES]
        if bad:
            got = st[bad[0]].dtype
            raise ValueError(f"{name}[{bad[0]}] must be float32 or bfloat16, got {got}")
        check_contiguous(name, st)
    if len(states) == 2 and any(m.dtype != v.dtype for m, v in zip(states[0][1], states[1][1])):
        for i, (m, v) in enumerate(zip(states[0][1], states[1][1])):
            if m.dtype != v.dtype:
                raise ValueError(f"exp_avgs[{i}] is {m.dtype} but exp_avg_sqs[{i}] {v.dtype}")
    if step is not None and _is_device_steps(step):
        if len(step) != len(params):
            raise ValueError(f"got {len(step)} step tensors for {len(params)} params")
        for i, (s, p) in enumerate(zip(step, params)):
            if s.numel() != 1 or s.dtype != torch.float32 or s.device != p.device:
                raise ValueError(
                    f"step[{i}] must be a 1-element float32 tensor on {p.device}, "
                    f"got {s.dtype} {tuple(s.shape)} on {s.device}"
                )


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
    grad_mul=None,
    found_inf=None,
    maximize=False,
    sr_seed=None,
    param_sr=False,
    mask_index=None,
    compact=False,
):
    """Reference: the same math as torch.optim.AdamW in fp32, written back only where masked.

    With per-tensor step tensors the counts are read on the host (a sync on CUDA: this is the
    oracle); ``found_inf`` is applied with ``torch.where`` (no sync). ``mask_index`` changes
    nothing here but the compacted layout's addressing.
    """
    seed = None if sr_seed is None else _seed32(sr_seed)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        dev = p.device
        c = grad_mul_tensor(grad_mul, dev)
        skip = flag_tensor(found_inf, dev)
        t = _step_value(step[i]) if _is_device_steps(step) else step
        step_size, bc2_sqrt = _adam_scalars(lr, beta1, beta2, t)
        g32 = g.reshape(p.shape).float()
        if c is not None:
            g32 = g32 * c
        if maximize:
            g32 = -g32
        keep = None if masks is None else torch_unpack_bits(masks[i], p.shape)
        if compact:  # the dense moments this compacted state stands for (0 where unselected)
            sel = torch.nonzero(keep.reshape(-1)).flatten()
            m_d = torch.zeros(p.numel(), dtype=m.dtype, device=dev).index_copy_(0, sel, m)
            v_d = torch.zeros(p.numel(), dtype=v.dtype, device=dev).index_copy_(0, sel, v)
            m_d, v_d = m_d.reshape(p.shape), v_d.reshape(p.shape)
        else:
            m_d, v_d = m, v
        # the very ops torch.optim.AdamW (foreach=False) uses, so the twin is also the oracle
        p32 = p.to(torch.float32, copy=True).mul_(1.0 - lr * weight_decay)
        m_new = m_d.float().lerp(g32, 1.0 - beta1)
        v_new = (v_d.float() * beta2).addcmul_(g32, g32, value=1.0 - beta2)
        if m.dtype == torch.bfloat16:  # one division (bf16_state_scalars)
            eps2, nss2 = bf16_state_scalars(eps, step_size, bc2_sqrt)
            p_new = p32.addcdiv_(m_new, v_new.sqrt().add_(eps2), value=nss2)
        else:
            denom = (v_new.sqrt() / bc2_sqrt).add_(eps)
            p_new = p32.addcdiv_(m_new, denom, value=-step_size)
        u = None
        if seed is not None and (m.dtype == torch.bfloat16 or param_sr):
            key = mix32(seed ^ salt(i))
            u = torch_sr_bits(p.numel(), key, dev).reshape(p.shape)
        if m.dtype == torch.bfloat16:
            sr = u is not None
            m_new = torch_bf16_add_round(m_new, (u & 0xFFFF) if sr else None)
            v_new = torch_bf16_add_round(v_new, (u >> 16) if sr else None)
        if p.dtype == torch.bfloat16 and param_sr and u is not None:
            p_new = torch_bf16_add_round(p_new, ((u * PARAM_MUL) & 0xFFFFFFFF) >> 16)
        else:
            p_new = p_new.to(p.dtype)
        if skip is not None:
            keep = (skip == 0) if keep is None else keep & (skip == 0)
        if keep is None:
            p.copy_(p_new), m.copy_(m_new), v.copy_(v_new)
        elif compact:
            p.copy_(torch.where(keep, p_new, p))
            live = keep.reshape(-1)[sel]  # all True unless found_inf skips
            m.copy_(torch.where(live, m_new.reshape(-1)[sel], m))
            v.copy_(torch.where(live, v_new.reshape(-1)[sel], v))
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
    grad_mul=None,
    found_inf=None,
    maximize=False,
    sr_seed=None,
    param_sr=False,
    mask_index=None,
    compact=False,
    _check=None,
):
    """C twin of :func:`torch_masked_adamw_` (kernels/mmu_cpu.c): one call per (dtypes, step
    count) group, one pass over every operand, all threads."""
    if not params:
        return
    if cpu_skip(found_inf):
        if _check is not None:
            _check()
        return
    lib = _cpu.load()
    c = 1.0 if grad_mul is None else float(grad_mul_tensor(grad_mul, "cpu"))
    gmul = -c if maximize else c
    seed = 0 if sr_seed is None else _seed32(sr_seed)
    if _is_device_steps(step):  # one count for all is the usual case; else one launch per count
        try:
            raw = torch.stack(step).reshape(-1).tolist()
        except RuntimeError:  # counts of mixed shapes ([] and [1])
            raw = [float(s) for s in step]
        values = [max(1, int(round(x))) for x in raw] if len(set(raw)) > 1 else None
        step = _step_value(step[0]) if values is None else values
    if isinstance(step, list):
        if _check is not None:
            _check()
        calls = []
        for key, idx in group_by_dtype(params, grads, exp_avgs).items():
            by: dict[int, list[int]] = {}
            for i in idx:
                by.setdefault(step[i], []).append(i)
            calls += [(build_launch(key, sub, params, grads, exp_avgs, exp_avg_sqs, masks,
                                    mask_index, None, _cpu.CPU_BLOCK, 6), t)
                      for t, sub in by.items()]  # fmt: skip
    else:
        launches = adamw_launches(params, grads, exp_avgs, exp_avg_sqs, masks, mask_index, None,
                                  compact=compact, block=_cpu.CPU_BLOCK, n_vector=6,
                                  check=_check)  # fmt: skip
        calls = [(x, step) for x in launches]
    for launch, t in calls:
        if launch.n_chunks == 0:
            continue
        pdt, gdt, sdt, _ = launch.key
        step_size, bc2_sqrt = _adam_scalars(lr, beta1, beta2, t)
        lib.mmu_adamw(
            _cpu.DTYPE_CODE[pdt],
            _cpu.DTYPE_CODE[gdt],
            int(sdt == torch.bfloat16),
            launch.ptrs.data_ptr(),
            len(launch.idx),
            launch.chunks.data_ptr(),
            launch.n_chunks,
            _cpu.CPU_BLOCK,
            _cpu.threads_for(launch.numel),
            masks is not None,
            bool(compact),
            seed,
            int(sr_seed is not None and sdt == torch.bfloat16),
            int(sr_seed is not None and param_sr and pdt == torch.bfloat16),
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
    def _popc8(x):
        """Set bits of int32 values < 256."""
        x = x - ((x >> 1) & 0x55)
        x = (x & 0x33) + ((x >> 2) & 0x33)
        return (x + (x >> 4)) & 0x0F

    @triton.jit
    def _adamw_tile(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        k_ptr,
        scale_ptr,
        byte,
        base,
        rem,
        kb,
        start32,
        key,
        decay,
        beta2,
        omb1,
        omb2,
        eps,
        neg_step_size,
        bc2_sqrt,
        G_DTYPE: tl.constexpr,
        P_DTYPE: tl.constexpr,
        S_DTYPE: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        LERP_SMALL: tl.constexpr,
        SR_STATE: tl.constexpr,
        SR_PARAM: tl.constexpr,
        COMPACT: tl.constexpr,
        MODE: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        """[ROWS, 8] elements from ``base`` (int32, relative to the chunk's start: every
        pointer was advanced to the chunk by the caller, so offsets are 32-bit). ``rem``: the
        chunk's elements in bounds. MODE 0: all in bounds (no predicate); 1: whole rows in
        bounds (a per-row predicate, still 128-bit vectors); 2: per element (the last numel % 8
        elements of a tensor, ROWS = 1; ``byte`` is loaded here); 3: a full chunk whose mask
        selects under a quarter of it: every load and store predicated on the mask bit, so the
        unselected elements cost no traffic (sectors without a selected element are neither
        read nor written). COMPACT: the moments of the
        selected elements sit at ``kb`` + their rank among the selected (``m_ptr`` / ``v_ptr``
        point at the chunk's first selected moment)."""
        rows = tl.arange(0, ROWS)
        cols = tl.arange(0, 8)
        offs = base + rows[:, None] * 8 + cols[None, :]
        if MODE == 2:
            if HAS_MASK:
                byte = tl.load(k_ptr + base // 8 + rows)
        if HAS_MASK:
            on = ((byte.to(tl.int32)[:, None] >> cols[None, :]) & 1) != 0
        if MODE == 2:
            live = offs < rem
        elif MODE == 1:
            live = (rows[:, None] < rem // 8) & (cols[None, :] < 8)
        elif MODE == 3:
            live = on
        else:
            live = offs >= 0  # all true
        if COMPACT:  # rank of each selected element within the tile, row-major
            b32 = byte.to(tl.int32)
            row_n = _popc8(b32)
            if ROWS == 1:  # (triton 3.2's interpreter: tl.cumsum of one 0 is a tuple)
                row_pre = row_n * 0
            else:
                row_pre = tl.cumsum(row_n, 0) - row_n
            below = b32[:, None] & ((1 << cols[None, :]) - 1)
            kidx = kb + row_pre[:, None] + _popc8(below)
            sel = on & live
            m_raw = tl.load(m_ptr + kidx, mask=sel, other=0)
            v_raw = tl.load(v_ptr + kidx, mask=sel, other=0)
        elif MODE == 0:
            m_raw = tl.load(m_ptr + offs)
            v_raw = tl.load(v_ptr + offs)
        else:
            m_raw = tl.load(m_ptr + offs, mask=live, other=0)
            v_raw = tl.load(v_ptr + offs, mask=live, other=0)
        if MODE == 0:
            p_raw = tl.load(p_ptr + offs)
            g_raw = tl.load(g_ptr + offs)
        else:
            p_raw = tl.load(p_ptr + offs, mask=live, other=0)
            g_raw = tl.load(g_ptr + offs, mask=live, other=0)
        g = to_f32(g_raw, G_DTYPE)
        if HAS_SCALE:
            g = g * tl.load(scale_ptr)
        if MAXIMIZE:
            g = -g
        m = to_f32(m_raw, S_DTYPE)
        v = to_f32(v_raw, S_DTYPE)
        # ATen's CPU AdamW, op for op: p.mul_(decay); m.lerp_(g, 1-β1) (an FMA);
        # v.mul(β2).addcmul_(g, g, 1-β2) (an FMA); p.addcdiv_(m, sqrt(v)/bc2 + eps, -step_size)
        # (bf16 moments: the same quotient with one division, bf16_state_scalars).
        # Scalars come from the host in float64, rounded once to fp32 as torch does.
        p = to_f32(p_raw, P_DTYPE) * decay
        if LERP_SMALL:
            m = tl.fma(omb1, g - m, m)
        else:
            m = tl.fma(omb1 - 1.0, g - m, g)
        v = tl.fma(omb2 * g, g, v * beta2)
        if S_DTYPE == tl.bfloat16:  # bf16 moments: one division (bf16_state_scalars)
            denom = tl.sqrt_rn(v) + eps * bc2_sqrt
            p = p + tl.math.div_rn((neg_step_size * bc2_sqrt) * m, denom)
        else:
            denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
            p = p + tl.math.div_rn(neg_step_size * m, denom)
        if SR_STATE or SR_PARAM:  # the shared counter-based bits of element start + offs
            u = tl_mix32((start32 + offs.to(tl.uint32)) ^ key)
        if SR_PARAM:
            p_new = bf16_add_round(p, (u * 0x5BD1E995) >> 16)
        else:
            p_new = to_bits(p, P_DTYPE)
        if SR_STATE:
            m_new = bf16_add_round(m, u & 0xFFFF)
            v_new = bf16_add_round(v, u >> 16)
        else:
            m_new = to_bits(m, S_DTYPE)
            v_new = to_bits(v, S_DTYPE)
        if HAS_MASK:  # read-modify-write: bit 0 stores back the very bits it read
            p_new = tl.where(on, p_new, p_raw)
            if not COMPACT:
                m_new = tl.where(on, m_new, m_raw)
                v_new = tl.where(on, v_new, v_raw)
        if MODE == 0:
            tl.store(p_ptr + offs, p_new)
        else:
            tl.store(p_ptr + offs, p_new, mask=live)
        if COMPACT:
            tl.store(m_ptr + kidx, m_new, mask=sel)
            tl.store(v_ptr + kidx, v_new, mask=sel)
        elif MODE == 0:
            tl.store(m_ptr + offs, m_new)
            tl.store(v_ptr + offs, v_new)
        else:
            tl.store(m_ptr + offs, m_new, mask=live)
            tl.store(v_ptr + offs, v_new, mask=live)

    @triton.jit
    def _masked_adamw_kernel(
        ptrs_ptr,
        chunks_ptr,
        scale_ptr,
        found_ptr,
        n_tensors,
        seed,
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
        S_DTYPE: tl.constexpr,
        SB_DTYPE: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_FOUND: tl.constexpr,
        DEVICE_STEP: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        LERP_SMALL: tl.constexpr,
        SR_STATE: tl.constexpr,
        SR_PARAM: tl.constexpr,
        SPARSE: tl.constexpr,
        COMPACT: tl.constexpr,
        ALIGNED: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # table rows: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 mask, 5 step, 6 numel, 7 salt
        # chunk rows: tensor, start (+ selected elements before the chunk with SPARSE)
        run = True
        if HAS_FOUND:
            run = tl.load(found_ptr) == 0.0
        if run:
            tid, start, numel, n_chunks = open_chunk(
                ptrs_ptr, chunks_ptr, n_tensors, 6, ALIGNED, ROWS * 8
            )
            key = 0
            if SR_STATE or SR_PARAM:
                s = tl.load(ptrs_ptr + 7 * n_tensors + tid).to(tl.uint32)
                key = tl_mix32(seed.to(tl.uint32) ^ s)
            # every pointer advanced to the chunk once (64-bit scalars): offsets are int32
            p_ptr = load_ptr(ptrs_ptr, 0, n_tensors, tid, PB_DTYPE, ALIGNED) + start
            g_ptr = load_ptr(ptrs_ptr, 1, n_tensors, tid, GB_DTYPE, ALIGNED) + start
            m_ptr = load_ptr(ptrs_ptr, 2, n_tensors, tid, SB_DTYPE, ALIGNED and not COMPACT)
            v_ptr = load_ptr(ptrs_ptr, 3, n_tensors, tid, SB_DTYPE, ALIGNED and not COMPACT)
            if COMPACT:
                kbase = tl.load(chunks_ptr + 2 * n_chunks + tl.program_id(0).to(tl.int64))
                m_ptr += kbase
                v_ptr += kbase
            else:
                m_ptr += start
                v_ptr += start
            k_ptr = load_ptr(ptrs_ptr, 4, n_tensors, tid, tl.uint8, False) + start // 8
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
            rem = tl.minimum(numel - start, ROWS * 8).to(tl.int32)  # elements in bounds
            start32 = start.to(tl.uint32)
            rows = tl.arange(0, ROWS)
            n_rows = rem // 8  # whole rows in bounds
            if HAS_MASK:
                byte = tl.load(k_ptr + rows, mask=rows < n_rows, other=0)
                if SPARSE:  # the table holds selecting chunks only: no test here
                    todo = n_rows > 0
                else:
                    todo = tl.max(byte.to(tl.int32), axis=0) > 0  # else nothing selected here
            else:
                byte = rows
                todo = n_rows > 0
            if todo:
                if rem == ROWS * 8:
                    if HAS_MASK:  # a sparse selection: predicated loads and stores instead
                        if tl.sum(_popc8(byte.to(tl.int32)), axis=0) * 4 >= ROWS * 8:
                            _adamw_tile(
                                p_ptr, g_ptr, m_ptr, v_ptr, k_ptr, scale_ptr, byte, 0, rem, 0,
                                start32, key, decay, beta2, omb1, omb2, eps, nss, b2s,
                                G_DTYPE, P_DTYPE, S_DTYPE, HAS_MASK, HAS_SCALE, MAXIMIZE,
                                LERP_SMALL, SR_STATE, SR_PARAM, COMPACT, 0, ROWS,
                            )  # fmt: skip
                        else:
                            _adamw_tile(
                                p_ptr, g_ptr, m_ptr, v_ptr, k_ptr, scale_ptr, byte, 0, rem, 0,
                                start32, key, decay, beta2, omb1, omb2, eps, nss, b2s,
                                G_DTYPE, P_DTYPE, S_DTYPE, HAS_MASK, HAS_SCALE, MAXIMIZE,
                                LERP_SMALL, SR_STATE, SR_PARAM, COMPACT, 3, ROWS,
                            )  # fmt: skip
                    else:
                        _adamw_tile(
                            p_ptr, g_ptr, m_ptr, v_ptr, k_ptr, scale_ptr, byte, 0, rem, 0,
                            start32, key, decay, beta2, omb1, omb2, eps, nss, b2s,
                            G_DTYPE, P_DTYPE, S_DTYPE, HAS_MASK, HAS_SCALE, MAXIMIZE,
                            LERP_SMALL, SR_STATE, SR_PARAM, COMPACT, 0, ROWS,
                        )  # fmt: skip
                else:
                    _adamw_tile(
                        p_ptr, g_ptr, m_ptr, v_ptr, k_ptr, scale_ptr, byte, 0, rem, 0, start32,
                        key, decay, beta2, omb1, omb2, eps, nss, b2s,
                        G_DTYPE, P_DTYPE, S_DTYPE, HAS_MASK, HAS_SCALE, MAXIMIZE, LERP_SMALL,
                        SR_STATE, SR_PARAM, COMPACT, 1, ROWS,
                    )  # fmt: skip
            if n_rows * 8 < rem:  # the last numel % 8 elements
                kb = 0
                if COMPACT:
                    kb = tl.sum(_popc8(byte.to(tl.int32)), axis=0)
                _adamw_tile(
                    p_ptr, g_ptr, m_ptr, v_ptr, k_ptr, scale_ptr, byte, n_rows * 8, rem, kb,
                    start32, key, decay, beta2, omb1, omb2, eps, nss, b2s,
                    G_DTYPE, P_DTYPE, S_DTYPE, HAS_MASK, HAS_SCALE, MAXIMIZE, LERP_SMALL,
                    SR_STATE, SR_PARAM, COMPACT, 2, 1,
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
    grad_mul=None,
    found_inf=None,
    maximize=False,
    sr_seed=None,
    param_sr=False,
    mask_index=None,
    compact=False,
    _check=None,
):
    """Triton twin of :func:`torch_masked_adamw_`: one launch per (param, grad, state dtype,
    device) group.

    ``step``: an int (bias corrections computed on the host, exactly as torch.optim.AdamW), or
    one 0-dim fp32 device tensor per parameter (computed in the kernel in fp64 from the count,
    within an fp32 rounding of the host value; no sync).
    """
    device_step = _is_device_steps(step)
    if device_step:
        step_size, bc2_sqrt = 0.0, 1.0
        lr_s = _split(lr)
        lnb1 = _split(math.log(beta1) if beta1 > 0 else -math.inf)
        lnb2 = _split(math.log(beta2) if beta2 > 0 else -math.inf)
    else:
        step_size, bc2_sqrt = _adam_scalars(lr, beta1, beta2, step)
        lr_s = lnb1 = lnb2 = (0.0, 0.0)
    seed = 0 if sr_seed is None else _seed32(sr_seed)
    launches = adamw_launches(params, grads, exp_avgs, exp_avg_sqs, masks, mask_index,
                              step if device_step else None, compact=compact,
                              block=ADAMW_BLOCK, n_vector=2 if compact else 4,
                              check=_check)  # fmt: skip
    for (pdt, gdt, sdt, dev), idx, ptrs, chunks, n_chunks, aligned, *_ in launches:
        if n_chunks == 0:
            continue
        c = grad_mul_tensor(grad_mul, dev)
        f = flag_tensor(found_inf, dev)
        p = params[idx[0]]
        with device_guard(p):
            _masked_adamw_kernel[(n_chunks,)](
                ptrs,
                chunks,
                c if c is not None else ptrs,
                f if f is not None else ptrs,
                len(idx),
                seed,
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
                S_DTYPE=tl_dtype(sdt),
                SB_DTYPE=bits_tl_dtype(sdt),
                HAS_MASK=masks is not None,
                HAS_SCALE=c is not None,
                HAS_FOUND=f is not None,
                DEVICE_STEP=device_step,
                MAXIMIZE=bool(maximize),
                LERP_SMALL=abs(np.float32(1.0 - beta1)) < 0.5,
                SR_STATE=sr_seed is not None and sdt == torch.bfloat16,
                SR_PARAM=sr_seed is not None and bool(param_sr) and pdt == torch.bfloat16,
                SPARSE=mask_index is not None,
                COMPACT=bool(compact),
                ALIGNED=aligned,
                ROWS=ADAMW_BLOCK // 8,
                num_warps=ADAMW_WARPS,
                enable_fp_fusion=False,
                **launch_options(compact, aligned),
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
    grad_mul=None,
    found_inf=None,
    maximize=False,
    sr_seed=None,
    param_sr=False,
    mask_index=None,
    compact=False,
    backend="auto",
):
    """AdamW step restricted to masked elements, in place.

    Math (fp32, per element with mask bit 1; c = grad_mul or 1, s = -1 if maximize else 1):
    ``g = s·c·grad; p *= 1 - lr·wd; m += (1-β1)(g - m); v = β2·v + (1-β2)·g²;``
    ``p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)`` — torch.optim.AdamW's formula,
    operation for operation with fp32 moments; with bf16 moments the same quotient with one
    division, ``p -= (lr/(1-β1^t)·b) · m / (sqrt(v) + eps·b)``, b = sqrt(1-β2^t) in fp32
    (:func:`bf16_state_scalars`; within a few fp32 ulps of fp64).
    ``grad_mul`` *multiplies* the gradient (a clip coefficient); it is not the divisor that
    torch's fused optimizers call ``grad_scale``.
    Elements with bit 0: parameter and both moments keep their bytes.
    ``found_inf``: a 1-element device tensor; nonzero turns the call into a no-op on the device
    (nothing is written; no host sync). ``step``: the 1-based step count (int), or one 1-element
    fp32 tensor per parameter on its device, already incremented — as torch's fused AdamW takes
    ``state_steps``; pair it with ``found_inf`` to skip a step without a sync (add ``found_inf
    == 0`` to the counts first, see :class:`mmunlearn.optim.MaskedAdamW`).
    ``sr_seed`` (int or None): with a seed, bf16 moments are written with stochastic rounding
    from counter-based bits of (seed, position in the list, element index); without, round to
    nearest even. ``param_sr``: bf16 parameters are stochastically rounded too (needs a seed).
    Use a new seed every step. ``mask_index``: one :class:`MaskIndex` per mask — chunks that
    select nothing are not launched. ``compact``: ``exp_avgs[i]`` / ``exp_avg_sqs[i]`` hold the
    moments of the selected elements only (``mask_index[i].count`` each, in element order);
    bit-identical to the dense step at the same state dtype.
    In place on ``params``, ``exp_avgs``, ``exp_avg_sqs``; returns None.
    Dtypes: params fp32 / bf16 / fp16, grads fp32 / bf16 / fp16, moments fp32 or bf16 (both of
    a tensor alike); masks packed uint8 (:func:`pack_bits`) or None (all ones); ``grad_mul`` a
    1-element device tensor (no host sync). Lists may span devices: one launch per device.
    Bytes per element: 22.125 for bf16 params and grads with fp32 moments, 14.125 with bf16
    moments (28.125 / 20.125 for fp32 params); compacted: 6.125 + 16·s or 6.125 + 8·s at
    selection fraction s (bf16 params).
    Determinism: bit-exact run to run (SR included: the bits depend on the seed only); cpu
    backend vs the torch twin bit-exact on the machines measured for moments and bf16/fp16
    parameters (fp32 parameters ulp-bounded: ATen's sqrt); triton vs the twin within a few
    fp32 ulps (interpreter: exact), device step counts within an fp32 rounding of the scalars.
    All backends draw the same random bits, so SR adds no twin difference of its own (a twin
    difference of an ulp before rounding can still flip a bf16 rounding).
    """
    params, grads = as_list(params), as_list(grads)
    exp_avgs, exp_avg_sqs = as_list(exp_avgs), as_list(exp_avg_sqs)
    masks = None if masks is None else as_list(masks)
    mask_index = None if mask_index is None else list(mask_index)
    if not params:
        return
    if _is_device_steps(step):
        step = as_list(step)
    if param_sr and sr_seed is None:
        raise ValueError("param_sr needs an sr_seed")

    def check():
        _check_step_inputs(
            params,
            grads,
            masks,
            (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)),
            step,
            mask_index,
            compact,
        )

    name = resolve_backend(backend, params)
    if name == "torch":
        check()
    extra = {} if name == "torch" else {"_check": check}  # checked in full when no plan fits
    fn = {
        "triton": triton_masked_adamw_,
        "cpu": cpu_masked_adamw_,
        "torch": torch_masked_adamw_,
    }[name]
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
        grad_mul=grad_mul,
        found_inf=found_inf,
        maximize=maximize,
        sr_seed=sr_seed,
        param_sr=param_sr,
        mask_index=mask_index,
        compact=compact,
        **extra,
    )
