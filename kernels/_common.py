"""Shared plumbing of the kernel layer: backend choice, multi-tensor chunk tables, bf16 rounding.

Design envelope: every op is elementwise (or a per-chunk reduction) over a *list* of tensors of
mixed sizes. One launch covers the whole list: the grid has one program per chunk of ``BLOCK``
elements of one tensor; a program reads its tensor index and start offset from a chunk table,
then the tensor's base pointers and length from a pointer table. Tables are small int64 device
tensors built once per (pointer set, sizes) and cached: a table holds nothing but pointers and
sizes, so a cache hit is always a correct table, even if the memory was freed and reused.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

try:  # triton is a Linux-only dependency; the torch twins work without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

# triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this package is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# "torch": the reference twins (oracles); "triton": the GPU kernels (or the interpreter);
# "cpu": the compiled multi-tensor C kernels for CPU tensors (kernels/_cpu.py). "auto" picks
# triton for CUDA tensors and cpu for CPU tensors (torch where the C kernels cannot be built).
BACKENDS = ("auto", "torch", "triton", "cpu")

# Elements per program. 4096 = 16 KiB of fp32 per operand per program: large enough to amortise
# the table lookups, small enough for ≥ 1 wave on an H100 at 1 M elements (256 programs), and
# the interpreter's per-program overhead (~5 ms on the 2-core CI box) stays off the test budget.
# Must be a multiple of 8 so every chunk starts on a mask byte.
BLOCK = 4096
NUM_WARPS = 8


def as_list(x) -> list[torch.Tensor]:
    """A tensor or a sequence of tensors → a list (the ops all take lists)."""
    if isinstance(x, torch.Tensor):
        return [x]
    return list(x)


def resolve_backend(backend: str, tensors: Sequence[torch.Tensor]) -> str:
    """Pick "torch", "triton" or "cpu" for an op over ``tensors``.

    auto: Triton for CUDA tensors when triton is importable; the C kernels for CPU tensors when
    they build on this machine (the first call compiles them, ~1 s, then they are cached on disk;
    see kernels/_cpu.py), else the torch twins.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = len(tensors) > 0 and tensors[0].is_cuda
    on_cpu = len(tensors) > 0 and tensors[0].device.type == "cpu"
    if backend == "auto":
        if on_cuda and HAS_TRITON:
            return "triton"
        if on_cpu:
            from ._cpu import available

            if available():
                return "cpu"
        return "torch"
    if backend == "cpu":
        if tensors and not on_cpu:
            raise RuntimeError(f"backend='cpu' needs CPU tensors, got {tensors[0].device}")
        from ._cpu import load

        load()  # raises RuntimeError with the compiler's message if the kernels cannot be built
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' requested but triton is not installed")
        if tensors and not on_cuda and not INTERPRET:
            raise RuntimeError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                "mmunlearn.kernels is imported (CPU interpreter)"
            )
    return backend


def check_same_numel(name_a: str, a: Sequence[torch.Tensor], name_b: str, b) -> None:
    """Raise a ValueError naming the first position where two tensor lists disagree."""
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} tensors but {name_b} has {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.numel() != y.numel():
            raise ValueError(
                f"{name_a}[{i}] has {x.numel()} elements (shape {tuple(x.shape)}) but "
                f"{name_b}[{i}] has {y.numel()} (shape {tuple(y.shape)})"
            )


def check_contiguous(name: str, tensors: Sequence[torch.Tensor]) -> None:
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] must be contiguous (it is updated in place)")


def group_by_dtype(*lists: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices grouped by the dtypes of the given operands (one launch per group)."""
    groups: dict[tuple, list[int]] = {}
    for i in range(len(lists[0])):
        key = tuple(lst[i].dtype for lst in lists)
        groups.setdefault(key, []).append(i)
    return groups


# Pointer tables (a few KiB: operands × tensors × 8 B) cached by pointer set; chunk tables
# (16 B per chunk: up to ~50 KiB for a 25 MiB gradient bucket) cached by sizes alone and shared,
# so that a Fisher pass whose backward fills a few hundred buckets per batch (a 7B model) hits
# both caches from the second batch on instead of paying two host→device copies per bucket.
_TABLE_CACHE: OrderedDict = OrderedDict()
_CHUNK_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 1024


def _lru_put(cache: OrderedDict, key, value) -> None:
    cache[key] = value
    if len(cache) > _TABLE_CACHE_SIZE:
        cache.popitem(last=False)


def _chunk_table(device, numels: tuple, block: int):
    key = (device, block, numels)
    hit = _CHUNK_CACHE.get(key)
    if hit is not None:
        _CHUNK_CACHE.move_to_end(key)
        return hit
    n = np.asarray(numels, dtype=np.int64)
    per = (n + block - 1) // block
    tid = np.repeat(np.arange(len(n), dtype=np.int64), per)
    first = np.repeat(np.cumsum(per) - per, per)
    start = (np.arange(int(per.sum()), dtype=np.int64) - first) * block
    chunks = torch.from_numpy(np.stack([tid, start]))
    if device.type != "cpu":
        chunks = chunks.pin_memory().to(device, non_blocking=True)
    out = (chunks, int(per.sum()))
    _lru_put(_CHUNK_CACHE, key, out)
    return out


def chunk_tables(
    operands: Sequence[Sequence[torch.Tensor]],
    numels: Sequence[int],
    block: int,
    n_vector: int | None = None,
):
    """Tables for a multi-tensor launch.

    Returns ``(ptrs, chunks, n_chunks, aligned)``: ``ptrs`` is int64 [len(operands) + 1, T]
    holding each operand's ``data_ptr()`` per tensor and, in the last row, the element counts;
    ``chunks`` is int64 [2, C] holding (tensor index, start element) of every chunk of ``block``
    elements; ``aligned`` is True when every pointer of the first ``n_vector`` operands (all by
    default: the ones accessed with vectors, not masks or scalars) is 16-byte aligned.
    PyTorch's allocators align storages to ≥ 64 bytes, so only views with a storage offset
    fail this; kernels then take their scalar-access variant (``ALIGNED=False``).
    Tensors with no element get no chunk. Tables live on the operands' device.
    """
    device = operands[0][0].device
    numels = tuple(numels)
    key = (device, block, tuple(tuple(t.data_ptr() for t in op) for op in operands), numels,
           n_vector)  # fmt: skip
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    aligned = all(ptr % 16 == 0 for r in key[2][:n_vector] for ptr in r)
    ptrs = torch.tensor([list(r) for r in key[2]] + [list(numels)], dtype=torch.int64)
    if device.type != "cpu":
        ptrs = ptrs.pin_memory().to(device, non_blocking=True)
    chunks, n_chunks = _chunk_table(device, numels, block)
    out = (ptrs, chunks, n_chunks, aligned)
    _lru_put(_TABLE_CACHE, key, out)
    return out


def tl_dtype(dtype: torch.dtype):
    """torch dtype → triton dtype (for pointer casts)."""
    return {
        torch.float32: tl.float32,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
        torch.uint8: tl.uint8,
    }[dtype]


def device_guard(t: torch.Tensor):
    """Make t's device current for a launch (no-op on CPU / interpreter)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()


if HAS_TRITON:

    @triton.jit
    def load_ptr(ptrs_ptr, row, n_tensors, tid, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
        """Row ``row`` of a pointer table for tensor ``tid``, as a ``DTYPE`` pointer.

        With ``ALIGNED`` (:func:`chunk_tables` found every pointer 16-byte aligned) the compiler is
        told the address is a multiple of 16 bytes, which with a ``start`` multiple of the block
        lets it emit 128-bit loads and stores (PTX ``ld.global.v4``, SASS ``LDG.E.128``).
        """
        p = tl.load(ptrs_ptr + row * n_tensors + tid).to(tl.pointer_type(DTYPE))
        if ALIGNED:
            p = tl.multiple_of(p, 16)
        return p

    @triton.jit
    def to_f32(raw, DTYPE: tl.constexpr):
        """Storage bits (uint16 for bf16/fp16, uint32 for fp32) → fp32 value."""
        if DTYPE == tl.bfloat16:
            return (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        elif DTYPE == tl.float16:
            return raw.to(tl.float16, bitcast=True).to(tl.float32)
        else:
            return raw.to(tl.float32, bitcast=True)

    @triton.jit
    def to_bits(x, DTYPE: tl.constexpr):
        """fp32 ``x`` → the storage bits of ``DTYPE`` (uint16 for bf16/fp16, uint32 for fp32).

        bf16 goes through an explicit round-to-nearest-even on the fp32 bit pattern, so the
        interpreter and the GPU give the same bits (and match ``tensor.to(torch.bfloat16)``);
        NaN becomes 0x7FC0 as in c10. fp16 uses triton's cast (round-to-nearest-even).
        Kernels store these bits through an integer pointer, so an element left unchanged can
        be written back with exactly the bits that were read (``tl.where`` on integers).
        """
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            hi = (bits >> 16).to(tl.uint16)
            return tl.where(x != x, 0x7FC0, hi).to(tl.uint16)
        elif DTYPE == tl.float16:
            return x.to(tl.float16).to(tl.uint16, bitcast=True)
        else:
            return x.to(tl.uint32, bitcast=True)

else:  # pragma: no cover
    load_ptr = to_f32 = to_bits = None


def bits_tl_dtype(dtype: torch.dtype):
    """torch dtype → the triton integer type of its storage bits."""
    return tl.uint32 if dtype == torch.float32 else tl.uint16
