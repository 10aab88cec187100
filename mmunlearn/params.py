"""Parameters by name: canonical (wrapper-free) names, model families and module groups.

The one home of two rules every other layer relies on:

- :func:`canonical_name`: the prefixes added by DDP, ``torch.compile``, PEFT, FSDP1 and
  activation-checkpoint wrappers are removed, so a mask or Fisher made on a wrapped model
  applies to the bare one and vice versa;
- :func:`module_groups`: vision (LLaVA ``vision_tower`` + ``multi_modal_projector``, Qwen2-VL /
  Qwen2.5-VL ``visual``) vs language (everything else, ``lm_head`` and embeddings included),
  decided by module path components (:data:`FAMILIES`), never by a bare substring such as
  ``"model"``. The model adapters use the same table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

# Class-name pattern → (family, module path components of the vision side).
FAMILIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Llava", "llava", ("vision_tower", "multi_modal_projector")),
    ("Qwen2VL", "qwen2vl", ("visual",)),
    ("Qwen2_5_VL", "qwen2vl", ("visual",)),
)


def vision_components(family: str) -> tuple[str, ...]:
    """Module path components of the vision side of a family (``"llava"``, ``"qwen2vl"``)."""
    for _, fam, comps in FAMILIES:
        if fam == family:
            return comps
    raise ValueError(f"unknown model family {family!r}; known: llava, qwen2vl")


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


def unwrap(model):
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
    for cls in type(unwrap(model)).__mro__:
        for pattern, family, _ in FAMILIES:
            if pattern in cls.__name__:
                return family
    return None


def model_class(model) -> str:
    cls = type(unwrap(model))
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
            f"module_groups: unknown model family {model_class(model)}; known: LLaVA, Qwen2-VL, "
            "Qwen2.5-VL. Pass rules={'vision': [regex, ...], 'language': [regex, ...]}"
        )
    comps = vision_components(family)
    groups = {"vision": [], "language": []}
    for name in params:
        is_vision = any(c in comps for c in name.split(".")[:-1])
        groups["vision" if is_vision else "language"].append(name)
    return groups


__all__ = [
    "FAMILIES",
    "canonical_name",
    "canonical_parameters",
    "model_class",
    "model_family",
    "module_groups",
    "unwrap",
    "vision_components",
]
