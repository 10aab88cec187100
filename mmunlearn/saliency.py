"""The saliency mask: 1 bit per parameter element, its rules, its file, its coverage.

:class:`SaliencyMask` holds packed bits per canonical parameter name (bit order of
:mod:`mmunlearn.kernels.bits`), the parameter shapes and JSON-able metadata. Rules:
:meth:`SaliencyMask.from_fisher` (MMUnlearner's ``(F_f + eps)/(F_p + eps) >= gamma``) and
:meth:`SaliencyMask.topk` (an exact top-k fraction, global or per tensor, also across FSDP2
ranks through :func:`topk_threshold`). Masks combine with ``|``, save to / load from
safetensors, report their coverage and bind to a model's parameters for the optimizer.
The method's vision / language / both masks are built in :mod:`mmunlearn.masks`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from mmunlearn.distributed import all_reduce_sum_, is_dtensor, local
from mmunlearn.io import read_safetensors, save_safetensors
from mmunlearn.kernels import pack_bits, saliency_mask, saliency_threshold_topk, unpack_bits
from mmunlearn.kernels.bits import packed_size
from mmunlearn.params import canonical_name, canonical_parameters, unwrap

MASK_FORMAT = "mmunlearn.saliency_mask"
BIT_ORDER = "little"  # element i is bit i % 8 of byte i // 8 (kernels/bits.py)

# Official-code quirk (method.md §2): only names containing one of these survive at unlearning.
OFFICIAL_KEYWORDS = ("proj", "fc", "linear", "mlp", "qkv")


def topk_threshold(
    f_forget, f_preserve, fraction: float, eps: float = 1e-15, backend: str = "auto"
) -> float:
    """Exact k-th largest ratio over the shards held by *all* ranks (k = ceil(fraction·N_global)).

    Each rank passes its local shards; three int64 histograms (16 KiB each) and one count are
    all-reduced. Bit-identical to the single-process threshold over the full tensors.
    """
    n_local = sum(t.numel() for t in f_forget)
    dev = f_forget[0].device if f_forget else torch.device("cpu")
    n = all_reduce_sum_(torch.tensor([n_local], dtype=torch.int64, device=dev))
    return saliency_threshold_topk(
        f_forget,
        f_preserve,
        fraction,
        eps,
        backend=backend,
        n_total=int(n.item()),
        all_reduce=all_reduce_sum_,
        device=dev,
    )


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
_CHUNK = 1 << 24  # bytes per step: bounds the int64 temporary at 128 MiB


def popcount(packed: torch.Tensor) -> int:
    """Set bits of a packed mask (uint8), on its device, in bounded memory."""
    flat = packed.reshape(-1)
    table = _POPCOUNT.to(flat.device)
    return sum(
        int(table[flat[i : i + _CHUNK].long()].sum()) for i in range(0, flat.numel(), _CHUNK)
    )


def _as_fp32_lists(f_forget: Mapping, f_preserve: Mapping):
    names = list(f_forget)
    missing = [n for n in names if n not in f_preserve]
    if missing:
        raise ValueError(f"f_preserve has no tensor named {missing[0]!r}")
    extra = [n for n in f_preserve if n not in f_forget]
    if extra:
        raise ValueError(f"f_forget has no tensor named {extra[0]!r}")
    ff, fp = [], []
    for n in names:
        a, b = f_forget[n], f_preserve[n]
        if a.shape != b.shape:
            raise ValueError(
                f"{n!r}: forget Fisher shape {tuple(a.shape)} vs preserve {tuple(b.shape)}"
            )
        ff.append(a.detach().float().contiguous())
        fp.append(b.detach().float().contiguous().to(a.device))
    return names, ff, fp


def _norm_groups(groups, names) -> dict[str, list[str]]:
    if not groups:
        return {}
    known = set(names)
    return {
        g: [n for n in (canonical_name(x) for x in ns) if n in known] for g, ns in groups.items()
    }


class SaliencyMask:
    """A 1-bit mask per parameter: packed uint8 bits + the parameter shapes + metadata.

    Keys are canonical parameter names (:func:`canonical_name`). Bits are packed as in
    :func:`mmunlearn.kernels.pack_bits` (element ``i`` of the flattened tensor = bit ``i % 8`` of
    byte ``i // 8``). Build with :meth:`from_fisher` (threshold γ, the method's rule) or
    :meth:`topk` (exact fraction); combine with ``|``; save / load with safetensors.
    ``meta``: rule (``"gamma"`` / ``"topk"`` / ``"union"``), gamma / fraction / scope, eps,
    model class, … (JSON-able). ``groups``: ``{group: [names]}`` for per-group coverage.
    """

    def __init__(
        self,
        bits: Mapping[str, torch.Tensor],
        shapes: Mapping[str, Iterable[int]],
        meta: Mapping[str, Any] | None = None,
        groups: Mapping[str, list[str]] | None = None,
    ):
        self._bits: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, torch.Size] = {}
        for name, b in bits.items():
            shape = torch.Size(shapes[name])
            if b.dtype != torch.uint8 or b.numel() != packed_size(shape.numel()):
                raise ValueError(
                    f"mask {name!r}: need uint8 with {packed_size(shape.numel())} bytes for shape "
                    f"{tuple(shape)}, got {b.dtype} with {b.numel()}"
                )
            self._bits[name] = b.reshape(-1)
            self._shapes[name] = shape
        self.meta: dict[str, Any] = dict(meta or {})
        self.groups: dict[str, list[str]] = _norm_groups(groups, self._bits)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_fisher(
        cls,
        f_forget: Mapping[str, torch.Tensor],
        f_preserve: Mapping[str, torch.Tensor],
        gamma: float = 1.0,
        eps: float = 1e-15,
        groups: Mapping[str, list[str]] | None = None,
        *,
        model_class: str | None = None,
        backend: str = "auto",
    ) -> SaliencyMask:
        """MMUnlearner's rule: bit = ``(F_f + eps) / (F_p + eps) >= gamma`` in fp32 (inputs are
        cast to fp32), per element, with :func:`mmunlearn.kernels.saliency_mask`. Both dicts
        need the same names and shapes. Per-group preserve Fishers are the caller's business
        (:func:`build_masks`). Returns a new mask with ``meta["rule"] = "gamma"``."""
        names, ff, fp = _as_fp32_lists(f_forget, f_preserve)
        bits = saliency_mask(ff, fp, gamma, eps, backend=backend)[0] if names else []
        meta = {"rule": "gamma", "gamma": float(gamma), "eps": float(eps)}
        meta["model_class"] = model_class
        return cls(
            dict(zip(names, bits)),
            {n: t.shape for n, t in zip(names, ff)},
            meta,
            groups,
        )

    @classmethod
    def topk(
        cls,
        f_forget: Mapping[str, torch.Tensor],
        f_preserve: Mapping[str, torch.Tensor],
        fraction: float,
        scope: str = "global",
        eps: float = 1e-15,
        groups: Mapping[str, list[str]] | None = None,
        *,
        model_class: str | None = None,
        backend: str = "auto",
        distributed: bool = False,
    ) -> SaliencyMask:
        """Top-k fraction of the ratio ``(F_f + eps)/(F_p + eps)``: the exact k-th largest
        score ``t`` (k = ceil(fraction·N)) from :func:`saliency_threshold_topk`, then bit =
        ``ratio >= t`` (exactly k elements unless scores tie at t; then all tied ones).
        ``scope="global"``: one threshold over all tensors; ``"layer"``: one per tensor.
        ``distributed=True`` (torchrun, FSDP2): the tensors are this rank's shards; k and the
        threshold are over the shards of *all* ranks (histograms all-reduced: the same
        threshold as one process over the full tensors). Every rank must call it together.
        Returns a new mask with ``meta["rule"] = "topk"``."""
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        if not (0.0 < fraction <= 1.0):
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        names, ff, fp = _as_fp32_lists(f_forget, f_preserve)
        bits: list[torch.Tensor] = []
        thresholds: list[float] = []
        if distributed:
            groups_ = [list(range(len(ff)))] if scope == "global" else [[i] for i in range(len(ff))]
            by_index = [None] * len(ff)
            for idx in groups_:
                if not idx:
                    continue
                t = topk_threshold(
                    [ff[i] for i in idx], [fp[i] for i in idx], fraction, eps, backend=backend
                )
                thresholds.append(t)
                sel = saliency_mask(
                    [ff[i] for i in idx], [fp[i] for i in idx], t, eps, backend=backend
                )[0]
                for i, b in zip(idx, sel):
                    by_index[i] = b
            bits = by_index
        elif scope == "global":
            live = [i for i, t in enumerate(ff) if t.numel()]
            if live:
                t = saliency_threshold_topk(
                    [ff[i] for i in live], [fp[i] for i in live], fraction, eps, backend=backend
                )
                bits = saliency_mask(ff, fp, t, eps, backend=backend)[0]
                thresholds = [t]
            else:
                bits = [torch.zeros(0, dtype=torch.uint8, device=x.device) for x in ff]
        else:
            for a, b in zip(ff, fp):
                if a.numel() == 0:
                    bits.append(torch.zeros(0, dtype=torch.uint8, device=a.device))
                    thresholds.append(math.nan)
                    continue
                t = saliency_threshold_topk([a], [b], fraction, eps, backend=backend)
                bits.append(saliency_mask([a], [b], t, eps, backend=backend)[0][0])
                thresholds.append(t)
        meta = {
            "rule": "topk",
            "fraction": float(fraction),
            "scope": scope,
            "eps": float(eps),
            "model_class": model_class,
        }
        if scope == "global" and thresholds:
            meta["threshold"] = thresholds[0]
        return cls(dict(zip(names, bits)), {n: t.shape for n, t in zip(names, ff)}, meta, groups)

    # ------------------------------------------------------------------ access
    @property
    def names(self) -> list[str]:
        """Canonical parameter names covered by the mask, in insertion order."""
        return list(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def __contains__(self, name: str) -> bool:
        return canonical_name(name) in self._bits

    def __repr__(self) -> str:
        c = self.coverage()["total"]
        return (
            f"SaliencyMask({len(self)} tensors, {c['selected']}/{c['total']} selected, "
            f"rule={self.meta.get('rule')})"
        )

    def shape(self, name: str) -> torch.Size:
        """Shape of parameter ``name``."""
        return self._shapes[canonical_name(name)]

    @property
    def shapes(self) -> dict[str, torch.Size]:
        """``{name: shape}`` of every masked parameter."""
        return dict(self._shapes)

    def packed(self, name: str) -> torch.Tensor:
        """The packed bits of ``name``: uint8 ``[ceil(numel/8)]`` (the stored tensor itself)."""
        return self._bits[canonical_name(name)]

    def dense(self, name: str, device=None) -> torch.Tensor:
        """A new bool tensor of the parameter's shape (on ``device``, default the bits')."""
        n = canonical_name(name)
        b = self._bits[n] if device is None else self._bits[n].to(device)
        return unpack_bits(b, self._shapes[n])

    def to(self, device) -> SaliencyMask:
        """A copy with the bits on ``device``."""
        return SaliencyMask(
            {n: b.to(device) for n, b in self._bits.items()}, self._shapes, self.meta, self.groups
        )

    # ------------------------------------------------------------------ algebra
    def union(self, other: SaliencyMask) -> SaliencyMask:
        """Element-wise OR. Names in only one mask are carried over; shared names must have the
        same shape. Groups are merged. Metadata: the common rule and thresholds when both masks
        agree, else ``rule="union"`` with both metadata under ``"parts"``. Returns a new mask."""
        bits = dict(self._bits)
        shapes = dict(self._shapes)
        for n, b in other._bits.items():
            if n in bits:
                if shapes[n] != other._shapes[n]:
                    raise ValueError(
                        f"union: {n!r} has shape {tuple(shapes[n])} vs {tuple(other._shapes[n])}"
                    )
                bits[n] = bits[n] | b.to(bits[n].device)
            else:
                bits[n], shapes[n] = b, other._shapes[n]
        keys = ("rule", "gamma", "fraction", "scope", "eps", "threshold")
        if all(self.meta.get(k) == other.meta.get(k) for k in keys):
            meta = dict(self.meta)
        else:
            meta = {"rule": "union", "parts": [self.meta, other.meta]}
            meta["model_class"] = self.meta.get("model_class") or other.meta.get("model_class")
        groups = {g: list(ns) for g, ns in self.groups.items()}
        for g, ns in other.groups.items():
            cur = groups.setdefault(g, [])
            cur += [n for n in ns if n not in cur]
        return SaliencyMask(bits, shapes, meta, groups)

    __or__ = union

    def official_filter(self) -> SaliencyMask:
        """The reference code's quirk, for parity runs: keep only the entries whose name
        contains ``proj``, ``fc``, ``linear``, ``mlp`` or ``qkv`` (a substring test, as there:
        weights *and* their biases, and e.g. Qwen's ``patch_embed.proj``). Everything else
        (norms, embeddings, ``lm_head``, LLaVA's patch / position embeddings) drops out of the
        mask; the official loop then gives those the full, unmasked ascent
        (``mask_mode="zero_grad"``), while mmunlearn's masked step freezes parameters without
        a mask. Returns a new mask."""
        keep = [n for n in self._bits if any(k in n for k in OFFICIAL_KEYWORDS)]
        meta = dict(self.meta, official_filter=True)
        return SaliencyMask(
            {n: self._bits[n] for n in keep}, {n: self._shapes[n] for n in keep}, meta, self.groups
        )

    # ------------------------------------------------------------------ reporting
    def coverage(self) -> dict[str, Any]:
        """Selected elements. Returns ``{"parameters": {name: {"selected", "total",
        "fraction"}}, "groups": {group: {...}}, "total": {"selected", "total", "fraction"}}``
        (fraction = selected/total, 0.0 for an empty set)."""

        def entry(s: int, t: int) -> dict[str, Any]:
            return {"selected": s, "total": t, "fraction": (s / t) if t else 0.0}

        per = {}
        for n, b in self._bits.items():
            per[n] = entry(popcount(b), self._shapes[n].numel())
        groups = {}
        for g, ns in self.groups.items():
            groups[g] = entry(sum(per[n]["selected"] for n in ns), sum(per[n]["total"] for n in ns))
        total = entry(
            sum(e["selected"] for e in per.values()), sum(e["total"] for e in per.values())
        )
        return {"parameters": per, "groups": groups, "total": total}

    # ------------------------------------------------------------------ model binding
    def check_model(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """Check that every mask name exists in ``model`` (canonicalised) with the same (global)
        shape. Returns ``{name: parameter}``; raises ValueError naming the first mismatch."""
        params = canonical_parameters(model)
        cls = type(unwrap(model)).__name__
        out = {}
        for n in self._bits:
            p = params.get(n)
            if p is None:
                raise ValueError(f"mask parameter {n!r} is not a parameter of the {cls} model")
            if torch.Size(p.shape) != self._shapes[n]:
                raise ValueError(
                    f"mask parameter {n!r}: mask shape {tuple(self._shapes[n])} vs model shape "
                    f"{tuple(p.shape)}"
                )
            out[n] = p
        return out

    def for_model(self, model: torch.nn.Module) -> dict[torch.nn.Parameter, torch.Tensor]:
        """``{parameter object: mask}`` for the optimizer's ``set_masks``, matched by canonical
        name (a mask made on a DDP / compiled / PEFT-wrapped model applies to the bare model).
        Masks are the packed uint8 bits on the parameter's device; for a DTensor (FSDP2)
        parameter, the full-shape bool mask instead (``set_masks`` shards it like the parameter;
        all ranks must call it together). Parameters absent from the mask are absent here.
        Raises ValueError naming the first name or shape that does not fit."""
        out = {}
        for n, p in self.check_model(model).items():
            if is_dtensor(p):
                out[p] = self.dense(n, device=local(p.detach()).device)
            else:
                out[p] = self._bits[n].to(p.device)
        return out

    # ------------------------------------------------------------------ I/O
    def save(self, path) -> Path:
        """Write the mask to safetensors atomically (:func:`mmunlearn.io.save_safetensors`):
        one uint8 tensor per name (1 bit per element) and JSON-string metadata
        (format version, rule, gamma / fraction, eps, groups, model class, shapes, mmunlearn
        version, bit order). Returns the path."""
        meta = {
            "bit_order": BIT_ORDER,
            "shapes": {n: list(s) for n, s in self._shapes.items()},
            "groups": self.groups,
            "meta": self.meta,
        }
        for k in ("rule", "gamma", "fraction", "scope", "eps", "model_class"):
            meta[k] = self.meta.get(k)
        return save_safetensors(path, self._bits, MASK_FORMAT, meta)

    @classmethod
    def load(cls, path, model: torch.nn.Module | None = None, device="cpu") -> SaliencyMask:
        """Read a mask written by :meth:`save`, bits on ``device``. With ``model``, every mask
        name must exist in the model (canonicalised) with the same shape: a ValueError names the
        first mismatch. A missing, corrupt or non-mmunlearn file raises ValueError naming the
        path. Returns the mask."""
        tensors, meta = read_safetensors(path, MASK_FORMAT, device)
        try:
            if meta.get("bit_order", BIT_ORDER) != BIT_ORDER:
                raise ValueError(f"unsupported bit order {meta.get('bit_order')!r}")
            shapes = {n: torch.Size(s) for n, s in meta["shapes"].items()}
            if set(shapes) != set(tensors):
                diff = sorted(set(shapes) ^ set(tensors))
                raise ValueError(f"tensor {diff[0]!r} is not both in the file and its metadata")
            mask = cls(
                {n: tensors[n] for n in shapes}, shapes, meta.get("meta"), meta.get("groups")
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: corrupt mmunlearn mask ({e})") from e
        if model is not None:
            mask.check_model(model)
        return mask

    def __eq__(self, other) -> bool:
        if not isinstance(other, SaliencyMask):
            return NotImplemented
        return self._shapes == other._shapes and all(
            torch.equal(self._bits[n].cpu(), other._bits[n].cpu()) for n in self._bits
        )

    __hash__ = None  # mutable container semantics


def mask_from_dense(
    masks: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None, groups=None
) -> SaliencyMask:
    """A :class:`SaliencyMask` from ``{name: bool tensor}`` (names canonicalised)."""
    bits = {canonical_name(n): pack_bits(m.bool()) for n, m in masks.items()}
    shapes = {canonical_name(n): m.shape for n, m in masks.items()}
    return SaliencyMask(bits, shapes, meta or {"rule": "custom"}, groups)


__all__ = [
    "MASK_FORMAT",
    "OFFICIAL_KEYWORDS",
    "SaliencyMask",
    "mask_from_dense",
    "popcount",
    "topk_threshold",
]
