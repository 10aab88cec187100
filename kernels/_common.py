"""Shared plumbing of the kernel layer: backend choice, multi-tensor chunk tables, bf16 rounding.

Design envelope: every op is elementwise (or a per-chunk reduction) over a *list* of tensors of
mixed sizes. One launch covers the whole list: the grid has one program per chunk of ``BLOCK``
elements of one tensor; a program reads its tensor index and start offset from a chunk table,
then the tensor's base pointers and length from a pointer table. Tables are small int64 device
tensors built once per (pointer set, sizes) and cached: a table holds nothing but pointers and
sizes, so a cache hit is always a correct table, even if the memory was freed and reused.
"""

from __future__ import annotations

import operator
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


# Host-side checks run on every step over every tensor (437 for a 7B model): each is one bulk
# pass with the C-level methods (``map(torch.Tensor.numel, ...)``), and only a failing check
# walks the list again to name the first bad position. (Attribute access per tensor in a Python
# loop cost ~4 ms per 437-tensor step on a 2-core CPU, more than the kernel at 1 % selection.)
_numel, _contig = torch.Tensor.numel, torch.Tensor.is_contiguous
_dev_index, _data_ptr = torch.Tensor.get_device, torch.Tensor.data_ptr


def numels_of(tensors: Sequence[torch.Tensor]) -> list[int]:
    """``[t.numel() for t in tensors]``, in one C-level pass."""
    return list(map(_numel, tensors))


def check_same_numel(name_a: str, a: Sequence[torch.Tensor], name_b: str, b) -> None:
    """Raise a ValueError naming the first position where two tensor lists disagree."""
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} tensors but {name_b} has {len(b)}")
    if numels_of(a) == numels_of(b):
        return
    for i, (x, y) in enumerate(zip(a, b)):
        if x.numel() != y.numel():
            raise ValueError(
                f"{name_a}[{i}] has {x.numel()} elements (shape {tuple(x.shape)}) but "
                f"{name_b}[{i}] has {y.numel()} (shape {tuple(y.shape)})"
            )


def check_contiguous(name: str, tensors: Sequence[torch.Tensor]) -> None:
    if all(map(_contig, tensors)):
        return
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] must be contiguous (it is updated in place)")


def group_by_dtype(*lists: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices grouped by the device and the dtypes of the given operands (one launch per
    group). The key is ``(dtype of list 0, dtype of list 1, ..., device)``: a launch table
    holds pointers of one device only.

    Raises ValueError naming the position when the operands of one index disagree on their
    device (a parameter on one device, its gradient or state on another)."""
    # (device index, is CUDA) compared in bulk (-1: CPU); device objects only name the groups
    idx0 = _dev_keys(lists[0])
    for k, lst in enumerate(lists[1:], 1):
        if _dev_keys(lst) != idx0:
            devs, odevs = [t.device for t in lists[0]], [t.device for t in lst]
            i = next(i for i, (a, b) in enumerate(zip(devs, odevs)) if a != b)
            raise ValueError(f"tensor {i}: operand {k} is on {odevs[i]} but operand 0 on {devs[i]}")
    cols = [[t.dtype for t in lst] for lst in lists]
    first: dict = {}
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(*cols, idx0)):
        dev = first.get(key[-1])
        if dev is None:
            dev = first[key[-1]] = lists[0][i].device
        groups.setdefault((*key[:-1], dev), []).append(i)
    return groups


_is_cuda, _is_cpu = operator.attrgetter("is_cuda"), operator.attrgetter("is_cpu")


def _dev_keys(tensors) -> list:
    """One hashable per tensor that differs when the devices differ (CPU, meta, cuda:k, another
    accelerator's device k), computed without building device objects."""
    return list(zip(map(_dev_index, tensors), map(_is_cuda, tensors), map(_is_cpu, tensors)))


def group_by_device(tensors: Sequence[torch.Tensor]) -> dict[torch.device, list[int]]:
    """Indices of ``tensors`` grouped by device, in first-seen order."""
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return groups


# ------------------------------------------------------------------ step operands
def grad_mul_tensor(grad_mul, device):
    """``grad_mul`` (a 1-element tensor multiplying the gradient, e.g. a clip coefficient) as
    a 0-dim fp32 tensor on ``device``, or None."""
    if grad_mul is None:
        return None
    if not isinstance(grad_mul, torch.Tensor) or grad_mul.numel() != 1:
        raise ValueError("grad_mul must be a 1-element tensor (e.g. a clip coefficient)")
    return grad_mul.reshape(()).to(device=device, dtype=torch.float32)


def flag_tensor(found_inf, device):
    """found_inf → a 0-dim fp32 tensor on ``device`` (nonzero: skip the step), or None."""
    if found_inf is None:
        return None
    if not isinstance(found_inf, torch.Tensor) or found_inf.numel() != 1:
        raise ValueError("found_inf must be a 1-element tensor (nonzero: skip the step)")
    return found_inf.reshape(()).to(device=device, dtype=torch.float32)


def cpu_skip(found_inf) -> bool:
    """The cpu backend reads the flag: on the host that is a load, not a device sync."""
    return found_inf is not None and float(flag_tensor(found_inf, "cpu")) != 0.0


# ------------------------------------------------------------------ stochastic rounding
# Counter-based random bits (no generator state): a 32-bit xor-shift-multiply hash whose
# multipliers are < 2^31, so the torch twin evaluates it exactly in int64. One definition in
# three languages: mix32 here (host scalars), torch_mix32 (torch twin), tl_mix32 (Triton), and
# mix32 in mmu_cpu.c. Element j of tensor i (its position in the call's list) at a step with
# seed s draws u = mix32(j ^ key_i), key_i = mix32(s ^ salt_i), salt_i = mix32(i·φ + c):
# the low 16 bits round exp_avg, the high 16 exp_avg_sq, the high half of u·0x5BD1E995 mod 2^32
# the parameter (one multiply more). Every backend draws the same bits, so their results are
# bit-identical wherever their fp32 arithmetic is.
MASK32 = 0xFFFFFFFF
MIX_M1 = 0x7FEB352D
MIX_M2 = 0x21F0AAAD
PARAM_MUL = 0x5BD1E995


def mix32(x: int) -> int:
    """The shared 32-bit hash on a Python int."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_M1) & MASK32
    x ^= x >> 15
    x = (x * MIX_M2) & MASK32
    x ^= x >> 15
    return x


def salt(i: int) -> int:
    """The random-stream salt of the tensor at position ``i`` of a call's list."""
    return mix32((i * 0x9E3779B9 + 0x632BE5AB) & MASK32)


_SALTS: list[int] = []


def salts(idx: Sequence[int]) -> list[int]:
    """:func:`salt` of each position (memoised: a step calls this once per launch)."""
    top = max(idx, default=-1)
    if top >= len(_SALTS):
        _SALTS.extend(salt(i) for i in range(len(_SALTS), top + 1))
    return [_SALTS[i] for i in idx]


def torch_mix32(x: torch.Tensor) -> torch.Tensor:
    """:func:`mix32` elementwise on an int64 tensor of values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * MIX_M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_M2) & MASK32
    return x ^ (x >> 15)


def torch_bf16_add_round(x: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``x`` → bf16 by adding ``add`` (int64, < 2^16) to the bit pattern and truncating
    the low 16 bits (stochastic rounding with uniform ``add``); ``add=None``: round to nearest
    even (``x.to(torch.bfloat16)``). NaN → 0x7FC0 as c10."""
    if add is None:
        return x.to(torch.bfloat16)
    bits = x.contiguous().view(torch.int32).to(torch.int64) & MASK32
    hi = ((bits + add) >> 16) & 0xFFFF
    hi = torch.where(torch.isnan(x), 0x7FC0, hi)
    return torch.where(hi >= 0x8000, hi - 0x10000, hi).to(torch.int16).view(torch.bfloat16)


def torch_sr_bits(numel: int, key: int, device) -> torch.Tensor:
    """u = mix32(j ^ key) for j in [0, numel) as int64 (the per-element random word)."""
    j = torch.arange(numel, dtype=torch.int64, device=device) & MASK32
    return torch_mix32(j ^ key)


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
    extra: Sequence[Sequence[int]] = (),
):
    """Tables for a multi-tensor launch.

    Returns ``(ptrs, chunks, n_chunks, aligned)``: ``ptrs`` is int64 [len(operands) + 1, T]
    holding each operand's ``data_ptr()`` per tensor and, in the last row, the element counts;
    ``chunks`` is int64 [2, C] holding (tensor index, start element) of every chunk of ``block``
    elements; ``aligned`` is True when every pointer of the first ``n_vector`` operands (all by
    default: the ones accessed with vectors, not masks or scalars) is 16-byte aligned.
    PyTorch's allocators align storages to ≥ 64 bytes, so only views with a storage offset
    fail this; kernels then take their scalar-access variant (``ALIGNED=False``).
    Tensors with no element get no chunk. Tables live on the operands' device. ``extra``: more
    per-tensor int64 rows appended after the element counts (e.g. random-stream salts).
    Raises ValueError when an operand lies on another device than the first (a launch table
    must never hold another device's pointer): group the lists by device first
    (:func:`group_by_device`).
    """
    device = operands[0][0].device
    numels = tuple(numels)
    extra = tuple(tuple(int(x) for x in r) for r in extra)
    key = (device, block, tuple(tuple(map(_data_ptr, op)) for op in operands), numels,
           n_vector, extra)  # fmt: skip
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        # the same pointers were checked to lie on one device when the entry was made, and a
        # pointer names its device (CUDA's unified virtual addressing keeps host and every
        # device's allocations disjoint), so a hit needs no second walk over the tensors
        _TABLE_CACHE.move_to_end(key)
        return hit
    want = _dev_keys(operands[0][:1])[0]
    for k, op in enumerate(operands):
        keys = _dev_keys(op)
        if any(x != want for x in keys):
            i = next(i for i, x in enumerate(keys) if x != want)
            raise ValueError(
                f"operand {k}, tensor {i} is on {op[i].device}, the launch is on {device}: "
                "one launch table per device (group the tensors by device first)"
            )
    aligned = all(ptr % 16 == 0 for r in key[2][:n_vector] for ptr in r)
    ptrs = torch.tensor(
        [list(r) for r in key[2]] + [list(numels)] + [list(r) for r in extra], dtype=torch.int64
    )
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

    @triton.jit
    def open_chunk(ptrs_ptr, chunks_ptr, n_tensors, NUMEL_ROW: tl.constexpr, ALIGNED: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
        """This program's chunk: (tensor index, start element, the tensor's element count, the
        number of chunks). The chunk table is int64 [rows, C] (tensor index; start; ...), the
        element counts are row ``NUMEL_ROW`` of the pointer table (:func:`chunk_tables`)."""
        pid = tl.program_id(0).to(tl.int64)
        n_chunks = tl.num_programs(0).to(tl.int64)
        tid = tl.load(chunks_ptr + pid)
        start = tl.load(chunks_ptr + n_chunks + pid)
        if ALIGNED:
            start = tl.multiple_of(start, BLOCK)
        numel = tl.load(ptrs_ptr + NUMEL_ROW * n_tensors + tid)
        return tid, start, numel, n_chunks

    @triton.jit
    def tl_mix32(x):
        """The shared 32-bit hash (kernels/_common.py) on uint32 values."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x21F0AAAD
        return x ^ (x >> 15)

    @triton.jit
    def bf16_add_round(x, add):
        """fp32 ``x`` → bf16 bits by adding ``add`` (uint32 < 2^16) to the bit pattern and
        truncating: uniform random ``add`` is stochastic rounding. NaN → 0x7FC0."""
        bits = x.to(tl.uint32, bitcast=True) + add
        return tl.where(x != x, 0x7FC0, (bits >> 16).to(tl.uint16)).to(tl.uint16)

else:  # pragma: no cover
    load_ptr = to_f32 = to_bits = tl_mix32 = bf16_add_round = None


def bits_tl_dtype(dtype: torch.dtype):
    """torch dtype → the triton integer type of its storage bits."""
    return tl.uint32 if dtype == torch.float32 else tl.uint16
