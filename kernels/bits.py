"""1-bit masks: ``pack_bits`` / ``unpack_bits``.

Bit order (the on-disk and in-memory format of every mask in mmunlearn): element ``i`` of the
flattened tensor is bit ``i % 8`` (value ``1 << (i % 8)``) of byte ``i // 8`` — little-endian
within the byte, the same as ``numpy.packbits(..., bitorder="little")``. An n-element tensor
packs to ``ceil(n / 8)`` uint8 bytes; padding bits of the last byte are 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import BLOCK, HAS_TRITON, NUM_WARPS, device_guard, resolve_backend, tl, triton


def packed_size(numel: int) -> int:
    """Bytes of the packed mask of an ``numel``-element tensor: ``ceil(numel / 8)``."""
    return (numel + 7) // 8


def check_masks(masks: Sequence[torch.Tensor], numels: Sequence[int]) -> None:
    """Packed masks must be uint8 with exactly ``packed_size(n)`` bytes for n elements."""
    if len(masks) != len(numels):
        raise ValueError(f"got {len(masks)} masks for {len(numels)} tensors")
    if (
        all(m.dtype == torch.uint8 for m in masks)
        and list(map(torch.Tensor.numel, masks)) == [(n + 7) // 8 for n in numels]
        and all(map(torch.Tensor.is_contiguous, masks))
    ):
        return  # the common case in one bulk pass; the loop below names the first bad mask
    for i, (m, n) in enumerate(zip(masks, numels)):
        if m.dtype != torch.uint8:
            raise ValueError(f"masks[{i}] must be a packed uint8 mask (pack_bits), got {m.dtype}")
        if m.numel() != packed_size(n):
            raise ValueError(
                f"masks[{i}] has {m.numel()} bytes; a tensor of {n} elements needs {packed_size(n)}"
            )
        if not m.is_contiguous():
            raise ValueError(f"masks[{i}] must be contiguous")


def _check_packed(packed: torch.Tensor, shape: torch.Size) -> None:
    n = shape.numel()
    if packed.dtype != torch.uint8 or packed.numel() != packed_size(n):
        raise ValueError(
            f"packed mask must be uint8 with {packed_size(n)} bytes for shape {tuple(shape)}, "
            f"got {packed.dtype} with {packed.numel()}"
        )


_SHIFTS_CACHE: dict = {}


def _shifts(device) -> torch.Tensor:
    t = _SHIFTS_CACHE.get(device)
    if t is None:
        t = _SHIFTS_CACHE[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return t


def torch_pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Reference: bool (or 0/1) tensor of any shape → uint8 [ceil(n/8)], little-endian bits."""
    flat = mask.reshape(-1).to(torch.uint8)
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(-1, 8) << _shifts(flat.device)
    return words.sum(dim=1, dtype=torch.uint8)


def torch_unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Reference: uint8 [ceil(n/8)] → bool tensor of ``shape`` (n = prod(shape))."""
    shape = torch.Size(shape)
    n = shape.numel()
    _check_packed(packed, shape)
    bits = (packed.reshape(-1, 1) >> _shifts(packed.device)) & 1
    return bits.reshape(-1)[:n].to(torch.bool).reshape(shape)


if HAS_TRITON:

    @triton.jit
    def tl_packed_size(numel):
        """:func:`packed_size` inside a kernel."""
        return (numel + 7) // 8

    @triton.jit
    def _pack_bits_kernel(src_ptr, out_ptr, n, ROWS: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, 8)
        offs = rows[:, None] * 8 + cols[None, :]
        b = tl.load(src_ptr + offs, mask=offs < n, other=0).to(tl.int32)
        byte = tl.sum((b != 0).to(tl.int32) << cols[None, :], axis=1)
        tl.store(out_ptr + rows, byte.to(tl.uint8), mask=rows < tl_packed_size(n))

    @triton.jit
    def _unpack_bits_kernel(packed_ptr, out_ptr, n, ROWS: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, 8)
        offs = rows[:, None] * 8 + cols[None, :]
        byte = tl.load(packed_ptr + rows, mask=rows < tl_packed_size(n), other=0).to(tl.int32)
        bit = (byte[:, None] >> cols[None, :]) & 1
        tl.store(out_ptr + offs, bit.to(tl.uint8), mask=offs < n)


else:  # pragma: no cover
    tl_packed_size = None


def triton_pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`torch_pack_bits` (bit-exact)."""
    src = mask.reshape(-1).contiguous()
    if src.dtype == torch.bool:
        src = src.view(torch.uint8)
    n = src.numel()
    out = torch.empty(packed_size(n), dtype=torch.uint8, device=src.device)
    if n:
        rows = BLOCK // 8
        with device_guard(src):
            _pack_bits_kernel[(triton.cdiv(out.numel(), rows),)](
                src, out, n, ROWS=rows, num_warps=NUM_WARPS
            )
    return out


def triton_unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Triton twin of :func:`torch_unpack_bits` (bit-exact)."""
    shape = torch.Size(shape)
    n = shape.numel()
    _check_packed(packed, shape)
    out = torch.empty(n, dtype=torch.uint8, device=packed.device)
    if n:
        rows = BLOCK // 8
        with device_guard(packed):
            _unpack_bits_kernel[(triton.cdiv(packed.numel(), rows),)](
                packed.contiguous(), out, n, ROWS=rows, num_warps=NUM_WARPS
            )
    return out.view(torch.bool).reshape(shape)


def pack_bits(mask: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Pack a boolean mask to 1 bit per element.

    Math: ``out[j] = Σ_{b<8} mask[8j+b] << b`` over the flattened mask (padding bits 0).
    Returns a new uint8 tensor of ``ceil(n/8)`` bytes. Input: bool or any 0/1 integer dtype
    (nonzero counts as 1 on the Triton path). Bytes moved: 1.125 per element. Bit-exact,
    deterministic.
    """
    be = resolve_backend(backend, [mask])  # "cpu": the torch twin is as fast here
    return triton_pack_bits(mask) if be == "triton" else torch_pack_bits(mask)


def unpack_bits(packed: torch.Tensor, shape, *, backend: str = "auto") -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[ceil(n/8)]`` → new bool tensor of ``shape``.

    Bytes moved: 1.125 per element. Bit-exact, deterministic.
    """
    be = resolve_backend(backend, [packed])
    return triton_unpack_bits(packed, shape) if be == "triton" else torch_unpack_bits(packed, shape)


# ------------------------------------------------------------------ where a mask selects
_POPC8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)
# popcounts are summed over granules of this many elements (every kernel block is a multiple)
GRANULE = 2048
_SERIAL = iter(range(1, 1 << 62))


class MaskIndex:
    """Where a packed mask selects, computed once (``MaskedAdamW.set_masks``): the number of
    selected elements per granule of :data:`GRANULE` elements, kept on the host.

    ``count``: selected elements in all. ``chunks(block)``: the starts of the ``block``-element
    chunks that select anything and, per such chunk, the number of selected elements before it
    (the offset of its first moment in compacted state). Kernels given an index launch only
    those chunks: a chunk with an all-zero mask is dropped from the launch table, not tested in
    the kernel. One device→host copy of ``numel / 2048`` int64 values at build time.
    """

    def __init__(self, packed: torch.Tensor, numel: int):
        check_masks([packed], [numel])
        self.numel = int(numel)
        self.serial = next(_SERIAL)  # launch-table cache key (ids are reused after GC)
        per_byte = _POPC8.to(packed.device)[packed.long()]
        nbytes = GRANULE // 8
        pad = (-per_byte.numel()) % nbytes
        if pad:
            per_byte = torch.nn.functional.pad(per_byte, (0, pad))
        self.granules = per_byte.reshape(-1, nbytes).sum(1).to(torch.int64).cpu().numpy()
        self.count = int(self.granules.sum())
        self._chunks: dict = {}

    def chunks(self, block: int):
        """(starts, offsets) as int64 numpy arrays for the selecting ``block``-chunks."""
        hit = self._chunks.get(block)
        if hit is None:
            import numpy as np

            if block % GRANULE:
                raise ValueError(f"block {block} is not a multiple of {GRANULE}")
            per = block // GRANULE
            g = self.granules
            pad = (-len(g)) % per
            counts = np.pad(g, (0, pad)).reshape(-1, per).sum(1)
            before = np.cumsum(counts) - counts
            keep = np.nonzero(counts)[0]
            hit = self._chunks[block] = (keep.astype(np.int64) * block, before[keep])
        return hit

    def __repr__(self) -> str:
        return f"MaskIndex(numel={self.numel}, count={self.count})"


def sparse_chunk_table(indexes: Sequence[MaskIndex], block: int, device):
    """The launch table of the chunks that select anything: int64 [3, C] rows (tensor index,
    start element, selected elements before the chunk), on ``device``; and C. Cached by the
    indexes' serials (built once per list of masks)."""
    import numpy as np

    from ._common import _CHUNK_CACHE, _lru_put

    key = ("sparse", device, block, tuple(ix.serial for ix in indexes))
    hit = _CHUNK_CACHE.get(key)
    if hit is not None:
        _CHUNK_CACHE.move_to_end(key)
        return hit
    parts = [ix.chunks(block) for ix in indexes]
    tid = np.concatenate(
        [np.full(len(s), i, dtype=np.int64) for i, (s, _) in enumerate(parts)] or [np.zeros(0)]
    ).astype(np.int64)
    start = np.concatenate([s for s, _ in parts] or [np.zeros(0)]).astype(np.int64)
    base = np.concatenate([b for _, b in parts] or [np.zeros(0)]).astype(np.int64)
    chunks = torch.from_numpy(np.ascontiguousarray(np.stack([tid, start, base])))
    if torch.device(device).type != "cpu":
        chunks = chunks.pin_memory().to(device, non_blocking=True)
    out = (chunks, len(tid))
    _lru_put(_CHUNK_CACHE, key, out)
    return out
