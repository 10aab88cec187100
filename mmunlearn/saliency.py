"""Saliency engine: diagonal Fisher through grad hooks, module groups, 1-bit saliency masks.

MMUnlearner (method.md §2) lets only the weights that matter far more to the forgotten visual
concept than to what must be preserved move during forgetting. This module computes

- :func:`collect_fisher`: ``F[i] = mean_batches (∂L/∂θ_i)²`` with one
  ``register_post_accumulate_grad_hook`` per parameter: as soon as a parameter's gradient is
  final it is squared into an fp32 accumulator (:func:`mmunlearn.kernels.fisher_accumulate_`) and
  ``param.grad`` is dropped, so full gradients never pile up in memory;
- :func:`module_groups`: vision (LLaVA ``vision_tower`` + ``multi_modal_projector``, Qwen2-VL /
  Qwen2.5-VL ``visual``) vs language (everything else, ``lm_head`` and embeddings included),
  decided by module path components, never by a bare substring such as ``"model"``;
- :class:`SaliencyMask`: ``(F_f + eps)/(F_p + eps) >= gamma`` (or an exact top-k fraction, global
  or per tensor), kept as packed bits (1 bit per element, bit order of
  :mod:`mmunlearn.kernels.bits`), saved to / loaded from safetensors with JSON metadata;
- :func:`build_masks`: the vision, language and union ("both") masks of the method.

Parameter names are canonical everywhere (:func:`canonical_name`): the prefixes added by DDP,
``torch.compile``, PEFT, FSDP1 and activation-checkpoint wrappers are removed, so a mask made on a
wrapped model applies to the bare one and vice versa.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from mmunlearn.dist import image_token_id, shard_batch, world_size
from mmunlearn.kernels import (
    fisher_accumulate_,
    pack_bits,
    saliency_mask,
    saliency_threshold_topk,
    unpack_bits,
)
from mmunlearn.methods import mean_ce


def _require_reduced(model) -> None:
    from mmunlearn.fsdp import require_reduced_grads

    require_reduced_grads(model, "the Fisher pass")


try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = None

log = logging.getLogger(__name__)

MASK_FORMAT = "mmunlearn.saliency_mask"
FISHER_FORMAT = "mmunlearn.fisher"
FORMAT_VERSION = 1
BIT_ORDER = "little"  # element i is bit i % 8 of byte i // 8 (kernels/bits.py)

# Official-code quirk (method.md §2): only names containing one of these survive at unlearning.
OFFICIAL_KEYWORDS = ("proj", "fc", "linear", "mlp", "qkv")

# Module path components of the vision side, per family (class-name pattern → components).
_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Llava", ("vision_tower", "multi_modal_projector")),
    ("Qwen2VL", ("visual",)),
    ("Qwen2_5_VL", ("visual",)),
)


def _version() -> str:
    try:
        from mmunlearn import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

_DROP_ANYWHERE = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_LEADING = (("module",), ("base_model", "model"))


def canonical_name(name: str) -> str:
    """The wrapper-free name of a parameter.

    Removes the path components ``_fsdp_wrapped_module`` (FSDP1), ``_checkpoint_wrapped_module``
    (activation-checkpoint wrapper) and ``_orig_mod`` (``torch.compile``, whole model or a
    submodule) wherever they occur, then repeatedly the leading ``module.`` (DDP /
    DataParallel) and ``base_model.model.`` (PEFT). Returns the canonical name, e.g.
    ``"module._orig_mod.model.layers.0.mlp.up_proj.weight"`` →
    ``"model.layers.0.mlp.up_proj.weight"``.
    """
    parts = [p for p in name.split(".") if p not in _DROP_ANYWHERE]
    changed = True
    while changed:
        changed = False
        for prefix in _LEADING:
            n = len(prefix)
            if len(parts) > n and tuple(parts[:n]) == prefix:
                parts = parts[n:]
                changed = True
    return ".".join(parts)


def canonical_parameters(model: torch.nn.Module, trainable_only: bool = False) -> dict:
    """``{canonical name: parameter}`` of ``model`` (tied parameters once, as in
    ``named_parameters()``). Raises ValueError if two parameters share a canonical name."""
    out: dict[str, torch.nn.Parameter] = {}
    for raw, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        name = canonical_name(raw)
        if name in out and out[name] is not p:
            raise ValueError(f"parameters {raw!r} and another map to the same name {name!r}")
        out[name] = p
    return out


# --------------------------------------------------------------------------------------------
# Module groups
# --------------------------------------------------------------------------------------------


def _unwrap(model):
    """Strip DDP / DataParallel / compile / PEFT / FSDP1 wrappers to reach the HF model (any
    module whose parameters all live under its ``.module`` counts as a DDP-like wrapper)."""
    for _ in range(8):
        cls = type(model).__name__
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif cls in ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel") or (
            isinstance(getattr(model, "module", None), torch.nn.Module)
            and all(n.startswith("module.") for n, _ in model.named_parameters())
        ):
            model = model.module
        elif cls.startswith("Peft") and hasattr(model, "base_model"):
            inner = model.base_model
            model = getattr(inner, "model", inner)
        else:
            return model
    return model


def model_family(model) -> str | None:
    """``"llava"``, ``"qwen2vl"`` or None, from the class names of the (unwrapped) model's MRO."""
    for cls in type(_unwrap(model)).__mro__:
        for pattern, _ in _FAMILIES:
            if pattern in cls.__name__:
                return "llava" if pattern == "Llava" else "qwen2vl"
    return None


def _model_class(model) -> str:
    cls = type(_unwrap(model))
    if cls.__name__.startswith("FSDP") and len(cls.__mro__) > 2:
        # FSDP2's fully_shard swaps the class for FSDP<Name>(FSDPModule, <Name>): the real
        # class is the last base, so files do not depend on whether the run was sharded
        cls = cls.__bases__[-1]
    return f"{cls.__module__}.{cls.__name__}"


def module_groups(
    model: torch.nn.Module, rules: Mapping[str, Iterable[str]] | None = None
) -> dict[str, list[str]]:
    """Canonical names of the trainable parameters, by module group.

    Known families (the class, or a base class, named like ``Llava*``, ``Qwen2VL*``,
    ``Qwen2_5_VL*``; wrappers are looked through): ``"vision"`` = parameters with a path
    component ``vision_tower`` or ``multi_modal_projector`` (LLaVA) / ``visual`` (Qwen), and
    ``"language"`` = every other trainable parameter (language model, embeddings, ``lm_head``).
    ``rules={"group": [regex, ...], ...}``: a name goes to the first group (in dict order) with a
    pattern that ``re.search``-matches its canonical name; names matching none are left out.
    Returns ``{group: [names in model order]}`` (every group of the rules / both groups present,
    possibly empty). Raises ValueError naming the model class for an unknown family without
    ``rules``.
    """
    params = canonical_parameters(model, trainable_only=True)
    if rules is not None:
        compiled = {g: [re.compile(r) for r in pats] for g, pats in rules.items()}
        groups: dict[str, list[str]] = {g: [] for g in compiled}
        for name in params:
            for g, pats in compiled.items():
                if any(p.search(name) for p in pats):
                    groups[g].append(name)
                    break
        return groups
    family = model_family(model)
    if family is None:
        raise ValueError(
            f"module_groups: unknown model family {_model_class(model)}; known: LLaVA, Qwen2-VL, "
            "Qwen2.5-VL. Pass rules={'vision': [regex, ...], 'language': [regex, ...]}"
        )
    comps = dict(_FAMILIES)["Llava" if family == "llava" else "Qwen2VL"]
    groups = {"vision": [], "language": []}
    for name in params:
        is_vision = any(c in comps for c in name.split(".")[:-1])
        groups["vision" if is_vision else "language"].append(name)
    return groups


# --------------------------------------------------------------------------------------------
# Fisher
# --------------------------------------------------------------------------------------------


def _is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _to_device(batch, device):
    if isinstance(batch, Mapping):
        return {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }
    return batch


def _select_params(model, params) -> dict[str, torch.nn.Parameter]:
    if params is None:
        return canonical_parameters(model, trainable_only=True)
    if isinstance(params, Mapping):
        items = [(canonical_name(n), p) for n, p in params.items()]
    else:
        if isinstance(params, str):
            params = [params]
        available = canonical_parameters(model)
        items = []
        for name in params:
            c = canonical_name(name)
            if c not in available:
                raise ValueError(f"collect_fisher: no parameter named {name!r} in the model")
            items.append((c, available[c]))
    out: dict[str, torch.nn.Parameter] = {}
    owner: dict[int, str] = {}
    for c, p in items:
        if id(p) in owner and owner[id(p)] != c:
            raise ValueError(
                f"collect_fisher: {c!r} and {owner[id(p)]!r} are the same (tied) parameter; "
                "list it once"
            )
        owner[id(p)] = c
        out[c] = p
    return out


def collect_fisher(
    model: torch.nn.Module,
    batches: Iterable,
    params=None,
    *,
    mode: str = "sq",
    loss_fn: Callable | None = None,
    progress: bool = True,
    official_parity: bool = False,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher ``F[i] = (1/B) Σ_batches (∂L_b/∂θ_i)²`` of the selected parameters.

    ``L_b = model(**batch).loss`` (dict batches; tensors are moved to the parameters' device),
    or ``loss_fn(model, batch)``. ``params``: ``{name: param}`` or a list of names (raw or
    canonical); default: every trainable parameter. ``mode="abs"`` accumulates ``|g|`` instead.
    A post-accumulate-grad hook squares each parameter's final gradient of the batch into an fp32
    accumulator on the parameter's device (:func:`fisher_accumulate_`, ``backend``) and sets
    ``param.grad = None`` at once; gradients of trainable parameters that are not selected are
    dropped the same way. Tied parameters are seen once, with their total gradient. The model's
    train/eval mode is left as it is. Every hook is removed afterwards, even on error, and every
    trainable parameter ends with ``.grad`` None.
    ``official_parity=True`` reproduces the reference code: each gradient is copied to the CPU,
    squared in the parameter's dtype (fp16/bf16 squares underflow) and summed there in that dtype;
    the result is then in the parameter's dtype on the CPU.
    With FSDP2 (DTensor parameters) the accumulators have the *local shard's* shape.
    Activation checkpointing: use ``use_reentrant=False`` (the transformers default); a hook that
    fires twice for one parameter in one backward (reentrant checkpointing of a shared weight)
    raises RuntimeError, because the squares of partial gradients are not the Fisher.
    Returns ``{canonical name: Fisher tensor}`` (fp32 unless ``official_parity``), in the order
    of ``model.named_parameters()`` / of ``params``.
    """
    from tqdm.auto import tqdm

    if mode not in ("sq", "abs"):
        raise ValueError(f"mode must be 'sq' or 'abs', got {mode!r}")
    selected = _select_params(model, params)
    trainable = canonical_parameters(model, trainable_only=True)
    sel_ids = {id(p) for p in selected.values()}
    accs: dict[str, torch.Tensor] = {}
    for name, p in selected.items():
        if not p.requires_grad:
            raise ValueError(f"collect_fisher: parameter {name!r} does not require grad")
        loc = _local(p.detach())
        if official_parity:
            accs[name] = torch.zeros(loc.shape, dtype=p.dtype, device="cpu")
        else:
            accs[name] = torch.zeros(loc.shape, dtype=torch.float32, device=loc.device)
    device = None
    for p in selected.values():
        device = _local(p.detach()).device
        break

    seen: set[int] = set()

    def make_hook(name: str):
        acc = accs[name]

        def hook(p: torch.Tensor) -> None:
            g = p.grad
            p.grad = None
            if g is None:
                return
            if id(p) in seen:
                raise RuntimeError(
                    f"collect_fisher: the gradient hook of {name!r} fired twice in one backward "
                    "(reentrant activation checkpointing?); use "
                    "gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                    "{'use_reentrant': False})"
                )
            seen.add(id(p))
            g = _local(g.detach())
            if official_parity:
                gc = g.to("cpu", p.dtype)
                acc.add_(gc * gc if mode == "sq" else gc.abs())
            else:
                fisher_accumulate_([acc], [g], mode=mode, backend=backend)

        return hook

    def drop_grad(p: torch.Tensor) -> None:
        p.grad = None

    for p in trainable.values():
        p.grad = None
    handles = []
    n_batches = 0
    try:
        for name, p in selected.items():
            handles.append(p.register_post_accumulate_grad_hook(make_hook(name)))
        for p in trainable.values():
            if id(p) not in sel_ids:
                handles.append(p.register_post_accumulate_grad_hook(drop_grad))
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc="fisher", disable=not progress):
            seen.clear()
            if loss_fn is not None:
                loss = loss_fn(model, batch)
            elif world_size() > 1:
                _require_reduced(model)
                # torchrun: this rank's slice of the global batch, loss normalised by the
                # global label-token count, so the reduced gradient (hence the Fisher) is the
                # 1-process gradient of the whole batch
                local = shard_batch(
                    _to_device(batch, device) if device is not None else batch,
                    image_token_id=image_token_id(model),
                )
                loss = mean_ce(model(**local), local)
            else:
                out = model(**(_to_device(batch, device) if device is not None else batch))
                loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", out)
            if not isinstance(loss, torch.Tensor):
                raise ValueError(
                    "collect_fisher: the model returned no loss (do the batches have labels?)"
                )
            loss.backward()
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for p in trainable.values():
            p.grad = None
        for p in selected.values():
            p.grad = None
    if n_batches == 0:
        raise ValueError("collect_fisher: no batches")
    for a in accs.values():
        a.div_(n_batches)
    return accs


# --------------------------------------------------------------------------------------------
# Safetensors helpers
# --------------------------------------------------------------------------------------------


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _read(path, expected_format: str, device="cpu"):
    """(tensors, decoded metadata) of an mmunlearn safetensors file; ValueError naming path."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    fmt = raw_meta.get("format_name")
    if fmt is None:
        raise ValueError(f"{path}: not an mmunlearn file (no 'format_name' in its metadata)")
    try:
        meta = {k: json.loads(v) for k, v in raw_meta.items()}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt mmunlearn metadata ({e})") from e
    if meta["format_name"] != expected_format:
        raise ValueError(f"{path}: a {meta['format_name']!r} file, expected {expected_format!r}")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {meta.get('format_version')} is newer than this mmunlearn "
            f"({FORMAT_VERSION})"
        )
    return tensors, meta


def save_fisher(path, fishers: Mapping[str, torch.Tensor], metadata: Mapping | None = None) -> Path:
    """Save Fisher tensors (``{name: tensor}``, names canonicalised) to safetensors atomically
    (temporary file in the same directory, then ``os.replace``). ``metadata``: JSON-able values
    stored as JSON strings. Returns the path."""
    tensors = {canonical_name(k): v.detach().contiguous().cpu() for k, v in fishers.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    meta["format_name"] = json.dumps(FISHER_FORMAT)
    meta["format_version"] = json.dumps(FORMAT_VERSION)
    meta["mmunlearn_version"] = json.dumps(_version())
    meta["names"] = json.dumps(list(tensors))
    return _atomic_save(tensors, meta, path)


def load_fisher(path, device="cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_fisher`. Returns ``(fishers, metadata)`` with the
    tensors in their saved order on ``device`` and the metadata JSON-decoded. Raises ValueError
    naming the path for a missing, corrupt or foreign file."""
    tensors, meta = _read(path, FISHER_FORMAT, device)
    names = meta.get("names", list(tensors))
    if set(names) != set(tensors):
        raise ValueError(f"{path}: tensor names do not match the metadata")
    return {n: tensors[n] for n in names}, meta


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _popcount(packed: torch.Tensor) -> int:
    if packed.numel() == 0:
        return 0
    return int(_POPCOUNT.to(packed.device)[packed.long()].sum())


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
            if b.dtype != torch.uint8 or b.numel() != (shape.numel() + 7) // 8:
                raise ValueError(
                    f"mask {name!r}: need uint8 with {(shape.numel() + 7) // 8} bytes for shape "
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
            from mmunlearn.dist import topk_threshold

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
        """The reference code's quirk, for parity runs: keep only entries whose name contains
        ``proj``, ``fc``, ``linear``, ``mlp`` or ``qkv`` (a substring test, as there) and ends
        in ``.weight`` — the Linear weights. Everything else (norms, embeddings, ``lm_head``,
        biases) drops out of the mask; the official code then lets those move freely, while
        mmunlearn's optimizer freezes unmasked parameters by default. Returns a new mask."""
        keep = [
            n
            for n in self._bits
            if n.endswith(".weight") and any(k in n for k in OFFICIAL_KEYWORDS)
        ]
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
            per[n] = entry(_popcount(b), self._shapes[n].numel())
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
        cls = type(_unwrap(model)).__name__
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
            if _is_dtensor(p):
                out[p] = self.dense(n, device=_local(p.detach()).device)
            else:
                out[p] = self._bits[n].to(p.device)
        return out

    # ------------------------------------------------------------------ I/O
    def save(self, path) -> Path:
        """Write the mask to safetensors atomically (temp file in the same directory, then
        ``os.replace``): one uint8 tensor per name (1 bit per element) and JSON-string metadata
        (format version, rule, gamma / fraction, eps, groups, model class, shapes, mmunlearn
        version, bit order). Returns the path."""
        tensors = {n: b.detach().contiguous().cpu() for n, b in self._bits.items()}
        meta = {
            "format_name": MASK_FORMAT,
            "format_version": FORMAT_VERSION,
            "mmunlearn_version": _version(),
            "bit_order": BIT_ORDER,
            "shapes": {n: list(s) for n, s in self._shapes.items()},
            "groups": self.groups,
            "meta": self.meta,
        }
        for k in ("rule", "gamma", "fraction", "scope", "eps", "model_class"):
            meta[k] = self.meta.get(k)
        return _atomic_save(tensors, {k: json.dumps(v) for k, v in meta.items()}, path)

    @classmethod
    def load(cls, path, model: torch.nn.Module | None = None, device="cpu") -> SaliencyMask:
        """Read a mask written by :meth:`save`, bits on ``device``. With ``model``, every mask
        name must exist in the model (canonicalised) with the same shape: a ValueError names the
        first mismatch. A missing, corrupt or non-mmunlearn file raises ValueError naming the
        path. Returns the mask."""
        tensors, meta = _read(path, MASK_FORMAT, device)
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


# --------------------------------------------------------------------------------------------
# The method's masks
# --------------------------------------------------------------------------------------------


def _subset(d: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    return {n: d[n] for n in names}


def masks_from_fishers(
    f_forget: Mapping[str, torch.Tensor],
    f_vision_preserve: Mapping[str, torch.Tensor],
    f_language_preserve: Mapping[str, torch.Tensor],
    groups: Mapping[str, list[str]],
    *,
    gamma: float = 1.0,
    fraction: float | None = None,
    scope: str = "global",
    eps: float = 1e-15,
    model_class: str | None = None,
    backend: str = "auto",
    distributed: bool = False,
) -> dict[str, SaliencyMask]:
    """The vision / language / both masks from saved Fishers (cheap: no forward pass).

    ``f_forget`` covers both groups; ``f_vision_preserve`` the ``groups["vision"]`` names,
    ``f_language_preserve`` the ``groups["language"]`` names. Threshold ``gamma`` unless
    ``fraction`` is given (exact top-k within each group, ``scope`` "global" or "layer").
    ``distributed``: the Fishers are this rank's shards (top-k over all ranks' shards).
    Returns ``{"vision", "language", "both"}`` (both = vision | language)."""
    out: dict[str, SaliencyMask] = {}
    for g, f_pres in (("vision", f_vision_preserve), ("language", f_language_preserve)):
        names = list(groups.get(g, []))
        ff, fp = _subset(f_forget, names), _subset(f_pres, names)
        grp = {g: names}
        if fraction is None:
            m = SaliencyMask.from_fisher(
                ff, fp, gamma, eps, grp, model_class=model_class, backend=backend
            )
        else:
            m = SaliencyMask.topk(
                ff,
                fp,
                fraction,
                scope,
                eps,
                grp,
                model_class=model_class,
                backend=backend,
                distributed=distributed,
            )
        out[g] = m
    out["both"] = out["vision"] | out["language"]
    return out


def build_masks(
    model: torch.nn.Module,
    forget_batches: Iterable,
    vision_preserve_batches: Iterable,
    language_preserve_batches: Iterable,
    *,
    gamma: float = 1.0,
    fraction: float | None = None,
    scope: str = "global",
    eps: float = 1e-15,
    rules: Mapping[str, Iterable[str]] | None = None,
    loss_fn: Callable | None = None,
    mode: str = "sq",
    progress: bool = True,
    official_parity: bool = False,
    backend: str = "auto",
    fisher_dir: str | os.PathLike | None = None,
) -> dict[str, SaliencyMask]:
    """MMUnlearner's masks (method.md §2).

    Groups from :func:`module_groups` (``rules`` for other families). One Fisher pass on
    ``forget_batches`` (multimodal VQA of the forget entities) over both groups; the vision
    group's preserve Fisher on ``vision_preserve_batches`` (multimodal retain) and the language
    group's on ``language_preserve_batches`` (the caller combines text-only QA of the forget
    entities with the multimodal retain batches). Masks by threshold ``gamma`` or, with
    ``fraction``, exact top-k within each group (``scope``). ``fisher_dir``: also save the
    three Fishers there (``forget`` / ``vision_preserve`` / ``language_preserve.safetensors``)
    so that :func:`masks_from_fishers` can redo the masks at other thresholds. Coverage is logged
    (``logging``, this module's logger). Returns ``{"vision", "language", "both"}`` masks
    (both = vision | language).
    """
    groups = module_groups(model, rules)
    vision, language = list(groups.get("vision", [])), list(groups.get("language", []))
    if not vision and not language:
        raise ValueError("build_masks: no trainable parameter in the vision or language group")
    kw = dict(
        mode=mode,
        loss_fn=loss_fn,
        progress=progress,
        official_parity=official_parity,
        backend=backend,
    )
    f_forget = collect_fisher(model, forget_batches, vision + language, **kw)
    f_vp = collect_fisher(model, vision_preserve_batches, vision, **kw) if vision else {}
    f_lp = collect_fisher(model, language_preserve_batches, language, **kw) if language else {}
    cls = _model_class(model)
    sharded = any(_is_dtensor(p) for p in model.parameters())
    if fisher_dir is not None:
        from mmunlearn import fsdp

        meta = {"model_class": cls, "mode": mode, "official_parity": official_parity}
        for fname, f in (
            ("forget", f_forget),
            ("vision_preserve", f_vp),
            ("language_preserve", f_lp),
        ):
            full = fsdp.full_fishers(f, model) if sharded else f  # rank 0 only, per tensor
            if full is not None:
                save_fisher(Path(fisher_dir) / f"{fname}.safetensors", full, dict(meta, set=fname))
    masks = masks_from_fishers(
        f_forget,
        f_vp,
        f_lp,
        {"vision": vision, "language": language},
        gamma=gamma,
        fraction=fraction,
        scope=scope,
        eps=eps,
        model_class=cls,
        backend=backend,
        distributed=sharded,
    )
    if sharded:  # local-shard masks → full-shape masks, the same on every rank
        from mmunlearn import fsdp

        masks = {k: fsdp.full_mask(m, model) for k, m in masks.items()}
    for k, m in masks.items():
        c = m.coverage()["total"]
        log.info(
            "saliency mask %s: %d / %d elements selected (%.2f%%)",
            k,
            c["selected"],
            c["total"],
            100.0 * c["fraction"],
        )
    return masks


__all__ = [
    "SaliencyMask",
    "build_masks",
    "canonical_name",
    "canonical_parameters",
    "collect_fisher",
    "load_fisher",
    "mask_from_dense",
    "masks_from_fishers",
    "model_family",
    "module_groups",
    "save_fisher",
]
