"""Parameters by name: canonical (wrapper-free) names, model families and module groups.

The one home of two rules every other layer relies on:

- :func:`canonical_name`: the prefixes added by DDP, ``torch.compile``, PEFT, FSDP1 and
  activation-checkpoint wrappers are removed, so a mask or Fisher made on a wrapped model
  applies to the bare one and vice versa;
- :func:`module_groups`: vision (the modules :func:`vision_module_names` finds: the encoder
  built from ``config.vision_config`` and the projector / connector / merger / image_newline
  beside it, e.g. LLaVA ``vision_tower`` + ``multi_modal_projector``, Qwen ``visual``,
  Idefics3 ``vision_model`` + ``connector``) vs language (everything else, ``lm_head`` and
  embeddings included), decided by module paths, never by a bare substring such as
  ``"model"``. Any image-text-to-text model of transformers works; a model whose vision side
  cannot be found names what was looked for and how to pass the module names
  (``--vision-modules``, recorded in its config as :data:`VISION_MODULES_ATTR`).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Iterable, Mapping

import torch

# The families with a built-in prompt template and image preprocessing (the tiny models):
# class-name regex (matched in full against the MRO's names) → (family, module path components
# of the vision side). The vision side of every model, these included, is found by
# :func:`vision_module_names` (tests/test_families.py checks it agrees with these components);
# LLaVA-NeXT / -OneVision are not "llava" here (their image_newline is vision too).
FAMILIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Llava(ForConditionalGeneration|Model|PreTrainedModel)", "llava",
     ("vision_tower", "multi_modal_projector")),
    ("Qwen2VL(ForConditionalGeneration|Model|PreTrainedModel)", "qwen2vl", ("visual",)),
    ("Qwen2_5_VL(ForConditionalGeneration|Model|PreTrainedModel)", "qwen2vl", ("visual",)),
)  # fmt: skip

# Config attribute holding vision module names given by hand (``--vision-modules``); saved in
# config.json with the model, so an unlearned copy loads without the option.
VISION_MODULES_ATTR = "mmunlearn_vision_modules"
# Names of vision encoders (when no submodule was built from ``config.vision_config``) and of
# the modules between the encoder and the language model (projector / connector / merger …).
VISION_ENCODERS = (
    "vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder",
    "vision_embed_tokens",  # (Fuyu: image patches straight into the decoder)
)  # fmt: skip
VISION_CONNECTORS = (
    "multi_modal_projector", "connector", "mm_projector", "image_newline", "merger",
    "projector", "vision_projection", "visual_projection", "vision_proj", "embed_vision",
    "image_projection", "mm_input_projection", "view_seperator", "image_newline_embed",
    "qformer", "query_tokens", "language_projection", "image_to_text_projection",
    "perceiver_resampler", "resampler", "aligner", "vision_adapter",
)  # fmt: skip


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
    """``"llava"``, ``"qwen2vl"`` or None (any other model), from the class names of the
    (unwrapped) model's MRO matched in full against :data:`FAMILIES`."""
    for cls in type(unwrap(model)).__mro__:
        for pattern, family, _ in FAMILIES:
            if re.fullmatch(pattern, cls.__name__):
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

    Any image-text-to-text model (wrappers are looked through): ``"vision"`` = parameters in
    the modules :func:`vision_module_names` finds (LLaVA ``vision_tower`` +
    ``multi_modal_projector``, Qwen ``visual``, Idefics3 ``vision_model`` + ``connector``, …),
    ``"language"`` = every other trainable parameter (language model, embeddings, ``lm_head``).
    ``rules={"group": [regex, ...], ...}``: a name goes to the first group (in dict order) with a
    pattern that ``re.search``-matches its canonical name; names matching none are left out.
    Returns ``{group: [names in model order]}`` (every group of the rules / both groups present,
    possibly empty). Raises ValueError naming the model class, what was looked for and how to
    pass the names when the vision side cannot be found (and there are no ``rules``).
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
    vision = vision_module_names(model)
    groups = {"vision": [], "language": []}
    for name in params:
        is_vision = any(name == v or name.startswith(v + ".") for v in vision)
        groups["vision" if is_vision else "language"].append(name)
    return groups


# --------------------------------------------------------------------------------------------
# The vision side of any image-text-to-text model
# --------------------------------------------------------------------------------------------


def _not_found(model, what: str) -> ValueError:
    return ValueError(
        f"{model_class(model)}: {what}; pass the vision modules by name, e.g. --vision-modules "
        "vision_tower,multi_modal_projector (Python: load_checkpoint(..., vision_modules=[...]))"
    )


def _resolve_names(model, entries: Iterable[str]) -> list[str]:
    """Canonical names of the modules / parameters given by hand: a full dotted name, or the
    last component(s) of a name (every shallowest module so named)."""
    modules = [canonical_name(n) for n, _ in model.named_modules() if n]
    names = modules + [canonical_name(n) for n, _ in model.named_parameters()]
    out: list[str] = []
    for entry in entries:
        entry = entry.strip()
        hits = [n for n in names if n == entry] or [
            n for n in names if n.endswith("." + entry) and entry
        ]
        hits = [h for h in hits if not any(h.startswith(o + ".") for o in hits)]
        if not hits:
            top = ", ".join(n for n in modules if n.count(".") <= 1)
            raise ValueError(
                f"--vision-modules: {model_class(model)} has no module or parameter named "
                f"{entry!r} (its top modules: {top})"
            )
        out += [h for h in hits if h not in out]
    return out


@functools.cache
def _image_path_attrs(cls) -> frozenset[str]:
    """``self.<name>`` attributes read by ``cls.get_image_features`` / ``get_video_features``
    and the methods they call on ``self`` (two levels deep): the image-feature path."""
    seen: set[str] = set()
    attrs: set[str] = set()
    todo = ["get_image_features", "get_video_features"]
    for _ in range(3):
        nxt = []
        for meth in todo:
            fn = getattr(cls, meth, None)
            if meth in seen or not callable(fn):
                continue
            seen.add(meth)
            try:
                src = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            names = set(re.findall(r"self\.(\w+)\b", src))
            attrs |= names
            nxt += [n for n in names if inspect.isfunction(getattr(cls, n, None))]
        todo = nxt
    return frozenset(attrs)


def _vision_encoder(model) -> str | None:
    """Name of the vision encoder: the shallowest submodule built from
    ``config.vision_config`` (same object, else same class), else one named like
    :data:`VISION_ENCODERS`."""
    vc = getattr(getattr(model, "config", None), "vision_config", None)
    mods = [(n, m) for n, m in model.named_modules() if n]
    if vc is not None:
        for test in (lambda c: c is vc, lambda c: type(c) is type(vc)):
            for name, mod in mods:
                if test(getattr(mod, "config", None)):
                    return name
    for name, _ in mods:
        if name.rsplit(".", 1)[-1] in VISION_ENCODERS:
            return name
    return None


def vision_module_names(model) -> list[str]:
    """Canonical dotted names of the vision side's modules (and loose parameters such as
    LLaVA-NeXT's ``image_newline``) of any image-text-to-text model.

    Names given by hand in ``config.mmunlearn_vision_modules`` (``--vision-modules``) win;
    otherwise: the vision encoder (:func:`_vision_encoder`) and, beside it (children of the
    same parent), every module / parameter named like :data:`VISION_CONNECTORS` or read by the
    model's ``get_image_features`` path, but not the language model (built from
    ``config.text_config``) nor ``lm_head``. Raises ValueError (one line: what was looked for,
    how to pass the names) when no encoder is found."""
    m = unwrap(model)
    cfg = getattr(m, "config", None)
    given = getattr(cfg, VISION_MODULES_ATTR, None)
    if given:
        return _resolve_names(m, [given] if isinstance(given, str) else given)
    enc = _vision_encoder(m)
    if enc is None:
        raise _not_found(
            m,
            "cannot find its vision side (looked for a submodule built from "
            f"config.vision_config and for one named {'/'.join(VISION_ENCODERS)})",
        )
    parent = enc.rpartition(".")[0]
    owner = m.get_submodule(parent) if parent else m
    used = set()
    for cls in (type(owner), type(m)):
        used |= _image_path_attrs(cls)
    text_cfg = getattr(cfg, "text_config", None)
    found = [enc]
    for name, child in owner.named_children():
        full = f"{parent}.{name}" if parent else name
        language = getattr(child, "config", None) is text_cfg and text_cfg is not None
        language |= name in ("language_model", "text_model", "lm_head", "model")
        if full != enc and not language and (name in VISION_CONNECTORS or name in used):
            found.append(full)
    for name, _ in owner.named_parameters(recurse=False):
        if name in VISION_CONNECTORS or name in used:
            found.append(f"{parent}.{name}" if parent else name)
    return [canonical_name(n) for n in found]


__all__ = [
    "FAMILIES",
    "VISION_CONNECTORS",
    "VISION_ENCODERS",
    "VISION_MODULES_ATTR",
    "canonical_name",
    "canonical_parameters",
    "model_class",
    "model_family",
    "module_groups",
    "unwrap",
    "vision_components",
    "vision_module_names",
]
