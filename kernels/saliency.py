"""Saliency: thresholded forget/preserve Fisher ratio → 1-bit mask, and exact top-k thresholds.

The score of element i is ``r[i] = (F_f[i] + eps) / (F_p[i] + eps)`` in fp32, with an
IEEE-rounded division on every backend (``tl.math.div_rn``), so masks, counts and thresholds are
bit-identical between the Triton kernels, their torch twins and plain torch formulas.

Exact top-k by radix select: the fp32 bits of r are mapped to an order-preserving uint32 key
(flip all bits of negatives, the sign bit of the rest); three histogram passes over the key's
11/11/10-bit digits find the key of the k-th largest score. Each pass moves 8 bytes/element and
produces one int64 histogram (16 KiB) that can be all-reduced across ranks, so the threshold over
sharded tensors equals the single-process threshold bit for bit. Nothing is ever concatenated:
memory beyond the inputs is O(BLOCK) per program (torch twin: O(chunk) per tensor).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

from . import _cpu
from ._common import (
    BLOCK,
    HAS_TRITON,
    NUM_WARPS,
    as_list,
    check_same_numel,
    chunk_tables,
    device_guard,
    load_ptr,
    open_chunk,
    resolve_backend,
    tl,
    triton,
)
from .bits import packed_size, tl_packed_size, torch_pack_bits

# Radix-select digit layout over the 32-bit key: (shift, bits) per level.
RADIX_LEVELS = ((21, 11), (10, 11), (0, 10))
# torch twin: scores are computed this many elements at a time (bounds its scratch memory).
_TORCH_CHUNK = 1 << 22
# Histogram pass: tl.histogram(mask=) where this triton has it (the GPU image's 3.6 and 3.9 do):
# 2048 bins instead of 4096 with a dropped overflow half. Registers per thread, level 0, sm_90
# (bench/aot.py, 2026-11-30): overflow half, 8 warps — triton 3.6: 255 and 1.6 KB spilled,
# 3.9: 64; mask=, 16 warps — 3.6: 128, no spill; 3.9: 62 (8 warps: 189 / 80).
HIST_MASK = HAS_TRITON and "mask" in inspect.signature(tl.histogram).parameters
HIST_BLOCK = BLOCK
HIST_WARPS = 16


def _check_fishers(f_forget, f_preserve):
    """Validate two fp32 lists of matching sizes; return contiguous copies of both lists."""
    f_forget, f_preserve = as_list(f_forget), as_list(f_preserve)
    check_same_numel("f_forget", f_forget, "f_preserve", f_preserve)
    for name, lst in (("f_forget", f_forget), ("f_preserve", f_preserve)):
        for i, t in enumerate(lst):
            if t.dtype != torch.float32:
                raise ValueError(f"{name}[{i}] must be float32, got {t.dtype}")
    return [t.contiguous() for t in f_forget], [t.contiguous() for t in f_preserve]


def saliency_ratio(f_forget: torch.Tensor, f_preserve: torch.Tensor, eps: float = 1e-15):
    """The score ``(F_f + eps) / (F_p + eps)`` of one tensor, fp32 (reference formula)."""
    e = torch.tensor(eps, dtype=torch.float32, device=f_forget.device)
    return (f_forget + e) / (f_preserve + e)


def float_to_key(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving map of fp32 values to non-negative int64 keys in [0, 2^32)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    flip = torch.where(bits < 0, 0xFFFFFFFF, 0x80000000)
    return (bits ^ flip) & 0xFFFFFFFF


def key_to_float(key: int) -> float:
    """Inverse of :func:`float_to_key` for one key; returns the fp32 value as a Python float."""
    bits = key ^ 0x80000000 if key & 0x80000000 else key ^ 0xFFFFFFFF
    signed = bits - (1 << 32) if bits & 0x80000000 else bits
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32).item()


# ------------------------------------------------------------------ saliency_mask
def torch_saliency_mask(f_forget, f_preserve, gamma: float, eps: float = 1e-15):
    """Reference: packed ``ratio >= gamma`` per tensor and int64 per-tensor counts."""
    bits, counts = [], []
    g = torch.tensor(gamma, dtype=torch.float32)
    for ff, fp in zip(f_forget, f_preserve):
        sel = saliency_ratio(ff, fp, eps) >= g.to(ff.device)
        bits.append(torch_pack_bits(sel))
        counts.append(sel.sum(dtype=torch.int64))
    return bits, torch.stack(counts) if counts else torch.zeros(0, dtype=torch.int64)


def cpu_saliency_mask(f_forget, f_preserve, gamma: float, eps: float = 1e-15):
    """C twin of :func:`torch_saliency_mask` (bit-exact): one pass, bits packed as computed."""
    lib = _cpu.load()
    bits = [torch.empty(packed_size(t.numel()), dtype=torch.uint8) for t in f_forget]
    counts = torch.zeros(len(bits), dtype=torch.int64)
    numels = [t.numel() for t in f_forget]
    ptrs, chunks, n_chunks, _ = chunk_tables([f_forget, f_preserve, bits], numels, _cpu.CPU_BLOCK)
    if n_chunks:
        lib.mmu_mask(
            ptrs.data_ptr(),
            len(bits),
            chunks.data_ptr(),
            n_chunks,
            _cpu.CPU_BLOCK,
            _cpu.threads_for(sum(numels)),
            gamma,
            eps,
            counts.data_ptr(),
        )
    return bits, counts


if HAS_TRITON:

    @triton.jit
    def _mask_tile(ff_ptr, fp_ptr, out_ptr, start, numel, gamma, eps, MODE: tl.constexpr,
                   ROWS: tl.constexpr):  # fmt: skip
        """[ROWS, 8] scores from ``start`` → ROWS mask bytes; returns the selected count.
        MODE 0: all in bounds; 1: whole rows (per-row predicate, 128-bit loads kept);
        2: per element (the last numel % 8 elements, ROWS = 1)."""
        rows = tl.arange(0, ROWS)
        cols = tl.arange(0, 8)
        offs = start + rows[:, None] * 8 + cols[None, :]
        brow = start // 8 + rows
        if MODE == 0:
            ff = tl.load(ff_ptr + offs)
            fp = tl.load(fp_ptr + offs)
            sel = tl.math.div_rn(ff + eps, fp + eps) >= gamma
        else:
            if MODE == 1:
                live = (rows[:, None] < (numel - start) // 8) & (cols[None, :] < 8)
            else:
                live = offs < numel
            ff = tl.load(ff_ptr + offs, mask=live, other=0.0)
            fp = tl.load(fp_ptr + offs, mask=live, other=0.0)
            sel = (tl.math.div_rn(ff + eps, fp + eps) >= gamma) & live
        sel = sel.to(tl.int32)
        byte = tl.sum(sel << cols[None, :], axis=1).to(tl.uint8)
        if MODE == 0:
            tl.store(out_ptr + brow, byte)
        elif MODE == 1:
            tl.store(out_ptr + brow, byte, mask=rows < (numel - start) // 8)
        else:
            tl.store(out_ptr + brow, byte, mask=brow < tl_packed_size(numel))
        return tl.sum(tl.sum(sel, axis=1), axis=0)

    @triton.jit
    def _saliency_mask_kernel(
        ptrs_ptr, chunks_ptr, count_ptr, n_tensors, gamma, eps, ALIGNED: tl.constexpr,
        ROWS: tl.constexpr,
    ):  # fmt: skip
        # table rows: 0 F_forget, 1 F_preserve, 2 packed output, 3 numel
        pid = tl.program_id(0).to(tl.int64)
        tid, start, numel, _ = open_chunk(ptrs_ptr, chunks_ptr, n_tensors, 3, ALIGNED, ROWS * 8)
        ff_ptr = load_ptr(ptrs_ptr, 0, n_tensors, tid, tl.float32, ALIGNED)
        fp_ptr = load_ptr(ptrs_ptr, 1, n_tensors, tid, tl.float32, ALIGNED)
        out_ptr = load_ptr(ptrs_ptr, 2, n_tensors, tid, tl.uint8, False)
        if start + ROWS * 8 <= numel:
            count = _mask_tile(ff_ptr, fp_ptr, out_ptr, start, numel, gamma, eps, 0, ROWS)
        else:
            count = _mask_tile(ff_ptr, fp_ptr, out_ptr, start, numel, gamma, eps, 1, ROWS)
            if numel % 8 != 0:
                count += _mask_tile(
                    ff_ptr, fp_ptr, out_ptr, numel // 8 * 8, numel, gamma, eps, 2, 1
                )
        tl.store(count_ptr + pid, count.to(tl.int64))


def triton_saliency_mask(f_forget, f_preserve, gamma: float, eps: float = 1e-15):
    """Triton twin of :func:`torch_saliency_mask` (bit-exact): one launch for all tensors."""
    dev = f_forget[0].device
    bits = [torch.empty(packed_size(t.numel()), dtype=torch.uint8, device=dev) for t in f_forget]
    numels = [t.numel() for t in f_forget]
    ptrs, chunks, n_chunks, aligned = chunk_tables([f_forget, f_preserve, bits], numels, BLOCK, 2)
    partial = torch.zeros(max(n_chunks, 1), dtype=torch.int64, device=dev)
    if n_chunks:
        with device_guard(f_forget[0]):
            _saliency_mask_kernel[(n_chunks,)](
                ptrs,
                chunks,
                partial,
                len(bits),
                float(gamma),
                float(eps),
                ALIGNED=aligned,
                ROWS=BLOCK // 8,
                num_warps=NUM_WARPS,
            )
    counts = torch.zeros(len(bits), dtype=torch.int64, device=dev)
    if n_chunks:
        counts.index_add_(0, chunks[0], partial)
    return bits, counts


def saliency_mask(f_forget, f_preserve, gamma: float, eps: float = 1e-15, *, backend="auto"):
    """Saliency mask of MMUnlearner: ``bit = (F_f + eps) / (F_p + eps) >= gamma``.

    Math per element, in fp32 with IEEE division (identical to the torch expression
    ``(f_f + eps) / (f_p + eps) >= gamma`` on fp32 tensors).
    Returns ``(bits, counts)``: ``bits`` a new list of packed uint8 masks (``ceil(n/8)`` bytes,
    little-endian bit order, see :mod:`mmunlearn.kernels.bits`), ``counts`` a new int64 tensor
    [T] of selected elements per tensor (on the device; ``counts.sum()`` is the total).
    Dtypes: fp32 Fishers, matching numel pairwise. Bytes per element: 8.125.
    Determinism: bit-exact (integer counts, no float reductions).
    """
    ff, fp = _check_fishers(f_forget, f_preserve)
    if not ff:
        return [], torch.zeros(0, dtype=torch.int64)
    be = resolve_backend(backend, ff)
    if be == "triton":
        return triton_saliency_mask(ff, fp, gamma, eps)
    if be == "cpu":
        return cpu_saliency_mask(ff, fp, gamma, eps)
    return torch_saliency_mask(ff, fp, gamma, eps)


# ------------------------------------------------------------------ saliency_histogram
def _level(level: int):
    if level not in (0, 1, 2):
        raise ValueError(f"radix level must be 0, 1 or 2, got {level}")
    shift, nbits = RADIX_LEVELS[level]
    # elements take part when the key bits above this level's digit equal `prefix`
    prefix_shift = shift + nbits
    return shift, nbits, prefix_shift


def torch_saliency_histogram(f_forget, f_preserve, level: int, prefix: int, eps: float = 1e-15):
    """Reference radix-select histogram (int64 [2^bits]) of the keys matching ``prefix``."""
    shift, nbits, prefix_shift = _level(level)
    hist = torch.zeros(1 << nbits, dtype=torch.int64, device=f_forget[0].device)
    for ff, fp in zip(f_forget, f_preserve):
        ff, fp = ff.reshape(-1), fp.reshape(-1)
        for s in range(0, ff.numel(), _TORCH_CHUNK):
            key = float_to_key(
                saliency_ratio(ff[s : s + _TORCH_CHUNK], fp[s : s + _TORCH_CHUNK], eps)
            )
            if level > 0:
                key = key[(key >> prefix_shift) == prefix]
            digit = (key >> shift) & ((1 << nbits) - 1)
            hist += torch.bincount(digit, minlength=1 << nbits)
    return hist


def cpu_saliency_histogram(f_forget, f_preserve, level: int, prefix: int, eps: float = 1e-15):
    """C twin of :func:`torch_saliency_histogram` (bit-exact: per-thread integer histograms)."""
    shift, nbits, _ = _level(level)
    lib = _cpu.load()
    hist = torch.zeros(1 << nbits, dtype=torch.int64)
    numels = [t.numel() for t in f_forget]
    ptrs, chunks, n_chunks, _ = chunk_tables([f_forget, f_preserve], numels, _cpu.CPU_BLOCK)
    if n_chunks:
        lib.mmu_hist(
            ptrs.data_ptr(),
            len(f_forget),
            chunks.data_ptr(),
            n_chunks,
            _cpu.CPU_BLOCK,
            _cpu.threads_for(sum(numels)),
            eps,
            shift,
            nbits,
            level == 0,
            int(prefix),
            hist.data_ptr(),
        )
    return hist


if HAS_TRITON:

    @triton.jit
    def _saliency_histogram_kernel(
        ptrs_ptr,
        chunks_ptr,
        hist_ptr,
        n_tensors,
        eps,
        prefix,
        SHIFT: tl.constexpr,
        NBITS: tl.constexpr,
        LEVEL0: tl.constexpr,
        ALIGNED: tl.constexpr,
        HIST_MASK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # table rows: 0 F_forget, 1 F_preserve, 2 numel
        tid, start, numel, _ = open_chunk(ptrs_ptr, chunks_ptr, n_tensors, 2, ALIGNED, BLOCK)
        ff_ptr = load_ptr(ptrs_ptr, 0, n_tensors, tid, tl.float32, ALIGNED)
        fp_ptr = load_ptr(ptrs_ptr, 1, n_tensors, tid, tl.float32, ALIGNED)
        offs = start + tl.arange(0, BLOCK)
        m = offs < numel
        if start + BLOCK <= numel:
            ff = tl.load(ff_ptr + offs)
            fp = tl.load(fp_ptr + offs)
        else:
            ff = tl.load(ff_ptr + offs, mask=m, other=0.0)
            fp = tl.load(fp_ptr + offs, mask=m, other=0.0)
        r = tl.math.div_rn(ff + eps, fp + eps)
        bits = r.to(tl.int32, bitcast=True)
        flip = (bits >> 31) | -2147483648  # all ones for negatives, the sign bit otherwise
        key = (bits ^ flip).to(tl.uint32, bitcast=True)
        digit = ((key >> SHIFT) & ((1 << NBITS) - 1)).to(tl.int32)
        if LEVEL0:
            take = m
        else:
            take = m & ((key >> (SHIFT + NBITS)) == prefix.to(tl.uint32))
        if HIST_MASK:
            h = tl.histogram(digit, 1 << NBITS, mask=take)
            bins = tl.arange(0, 1 << NBITS)
            live = h > 0
        else:  # triton without histogram(mask=): non-members go to a dropped overflow half
            h = tl.histogram(tl.where(take, digit, digit + (1 << NBITS)), 2 << NBITS)
            bins = tl.arange(0, 2 << NBITS)
            live = (bins < (1 << NBITS)) & (h > 0)
        # one atomic per non-empty bin: a chunk of Fisher ratios fills a few dozen of the 2048
        # level-0 bins, and at levels 1-2 most elements fall outside the prefix
        tl.atomic_add(hist_ptr + bins, h.to(tl.int64), mask=live, sem="relaxed")


def triton_saliency_histogram(f_forget, f_preserve, level: int, prefix: int, eps: float = 1e-15):
    """Triton twin of :func:`torch_saliency_histogram` (bit-exact: integer atomics)."""
    shift, nbits, _ = _level(level)
    dev = f_forget[0].device
    hist = torch.zeros(1 << nbits, dtype=torch.int64, device=dev)
    ptrs, chunks, n_chunks, aligned = chunk_tables(
        [f_forget, f_preserve], [t.numel() for t in f_forget], HIST_BLOCK
    )
    if n_chunks:
        with device_guard(f_forget[0]):
            _saliency_histogram_kernel[(n_chunks,)](
                ptrs,
                chunks,
                hist,
                len(f_forget),
                float(eps),
                int(prefix),
                SHIFT=shift,
                NBITS=nbits,
                LEVEL0=(level == 0),
                ALIGNED=aligned,
                HIST_MASK=HIST_MASK,
                BLOCK=HIST_BLOCK,
                num_warps=HIST_WARPS,
            )
    return hist


def saliency_histogram(
    f_forget,
    f_preserve,
    level: int,
    prefix: int = 0,
    eps: float = 1e-15,
    *,
    backend: str = "auto",
    device=None,
) -> torch.Tensor:
    """One radix-select pass over the scores ``(F_f + eps)/(F_p + eps)`` of all tensors.

    Level 0 counts every element by key bits 31..21 (2048 bins); level 1 counts elements whose
    bits 31..21 equal ``prefix`` by bits 20..10 (2048 bins); level 2 counts elements whose
    bits 31..10 equal ``prefix`` by bits 9..0 (1024 bins). Keys as in :func:`float_to_key`.
    Returns a new int64 histogram on the device (sum it across ranks for sharded inputs; with
    empty lists, zeros on ``device``). Dtypes: fp32. Bytes per element: 8.
    Determinism: bit-exact (integer counts).
    """
    ff, fp = _check_fishers(f_forget, f_preserve)
    if not ff:  # a rank that holds no shard still takes part in the all-reduce
        return torch.zeros(1 << _level(level)[1], dtype=torch.int64, device=device)
    be = resolve_backend(backend, ff)
    if be == "triton":
        return triton_saliency_histogram(ff, fp, level, prefix, eps)
    if be == "cpu":
        return cpu_saliency_histogram(ff, fp, level, prefix, eps)
    return torch_saliency_histogram(ff, fp, level, prefix, eps)


def _select_digit(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Digit holding the k-th largest element, and k within that digit (1-based)."""
    h = hist.tolist()
    above = 0
    for d in range(len(h) - 1, -1, -1):
        if above + h[d] >= k:
            return d, k - above
        above += h[d]
    raise RuntimeError("radix select ran out of elements (histograms inconsistent?)")


def topk_count(fraction: float, n: int) -> int:
    """k = ceil(fraction · n), clamped to [1, n]; fraction must lie in (0, 1]."""
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return min(n, max(1, math.ceil(fraction * n)))


def saliency_threshold_topk(
    f_forget,
    f_preserve,
    fraction: float,
    eps: float = 1e-15,
    *,
    backend: str = "auto",
    n_total: int | None = None,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
    device=None,
) -> float:
    """Exact score of the k-th largest ratio over all given tensors, k = ceil(fraction·N).

    Math: the k-th largest of ``(F_f + eps)/(F_p + eps)`` in fp32; selecting ``ratio >= t``
    then keeps at least k elements (more only on exact ties at t).
    Returns a Python float (an fp32 value). Three histogram passes (8 bytes/element each) and
    three small device→host reads; never materialises or concatenates the scores, so it works
    beyond ``torch.quantile``'s 2^24-element limit.
    Distributed: pass ``all_reduce`` (sums an int64 tensor in place across ranks) and
    ``n_total`` (the global element count); the result equals the single-process threshold.
    ``device``: where a rank holding no element makes its (zero) histograms.
    Determinism: bit-exact on every backend.
    """
    ff, fp = _check_fishers(f_forget, f_preserve)
    n = n_total if n_total is not None else sum(t.numel() for t in ff)
    if n == 0:
        raise ValueError("saliency_threshold_topk needs at least one element")
    k = topk_count(fraction, n)
    prefix = 0
    for level, (_, nbits) in enumerate(RADIX_LEVELS):
        hist = saliency_histogram(ff, fp, level, prefix, eps, backend=backend, device=device)
        if all_reduce is not None:
            all_reduce(hist)
        digit, k = _select_digit(hist, k)
        prefix = (prefix << nbits) | digit
    return key_to_float(prefix)
