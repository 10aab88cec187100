"""Any image-text-to-text model of transformers: what the toolkit needs from a family, read
from the model itself.

- the vision side: :func:`mmunlearn.params.vision_module_names` (the encoder built from
  ``config.vision_config`` and the projector / connector / merger / image_newline beside it;
  the language side is the rest);
- the block classes for FSDP2 (:func:`block_classes`): the classes of the repeated layers
  (the elements of the model's ``ModuleList``\\ s: vision encoder layers, decoder layers);
- the batches: the checkpoint's own processor and chat template
  (:class:`~mmunlearn.models.processing.ChatCollator`), passing every processor output the
  model's ``forward`` names (:func:`forward_keys`: ``pixel_values``, ``image_grid_thw``,
  ``image_sizes``, ``pixel_attention_mask``, ``aspect_ratio_ids``, ``token_type_ids``,
  ``mm_token_type_ids`` …).

:func:`adapter_for` picks the adapter of a model: the built-in LLaVA / Qwen2-VL ones (they
also have a hand-written template for the tiny models), else :class:`GenericAdapter`.
"""

from __future__ import annotations

import inspect

import torch

from mmunlearn.models.adapters import (
    SUPPORTED,
    LlavaAdapter,
    ModelAdapter,
    Qwen2VLAdapter,
)
from mmunlearn.params import unwrap, vision_module_names


def forward_keys(model) -> frozenset[str]:
    """The named inputs of the model's ``forward`` (``**kwargs`` not counted)."""
    sig = inspect.signature(type(unwrap(model)).forward)
    skip = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    return frozenset(n for n, p in sig.parameters.items() if p.kind not in skip and n != "self")


def block_classes(model) -> tuple[type, ...]:
    """The repeated transformer block classes of a model, vision side first: the classes of
    the elements of its ``ModuleList``\\ s (not plain ``torch.nn`` layers, not blocks nested in
    another such block). ``_no_split_modules`` is not used: some models list attention modules
    there (Idefics3, SmolVLM), not their layers."""
    m = unwrap(model)
    found: list[type] = []
    for mod in m.modules():
        if isinstance(mod, torch.nn.ModuleList):
            for child in mod:
                cls = type(child)
                builtin = cls.__module__.startswith("torch.nn")
                if not builtin and any(True for _ in child.children()) and cls not in found:
                    found.append(cls)
    nested: set[type] = set()
    for mod in m.modules():
        if type(mod) in found:
            nested |= {type(s) for s in mod.modules() if s is not mod and type(s) in found}
    classes = [c for c in found if c not in nested]
    if not classes:
        raise ValueError(f"{type(m).__name__}: cannot find its transformer blocks")
    vision = tuple(vision_module_names(m))

    def on_vision_side(cls) -> bool:
        name = next(n for n, x in m.named_modules() if type(x) is cls)
        return any(name == v or name.startswith(v + ".") for v in vision)

    return tuple(sorted(classes, key=lambda c: not on_vision_side(c)))


def _image_token_id(config, processor) -> int:
    for key in ("image_token_id", "image_token_index"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    proc = processor[1] if isinstance(processor, tuple) else processor
    v = getattr(proc, "image_token_id", None)
    if isinstance(v, int):
        return v
    tok = getattr(proc, "tokenizer", None)
    token = getattr(proc, "image_token", None)
    if tok is not None and isinstance(token, str):
        return int(tok.convert_tokens_to_ids(token))
    raise ValueError(f"{type(config).__name__}: no image_token_id in the config or processor")


class GenericAdapter(ModelAdapter):
    """The adapter of any image-text-to-text model loaded with its processor and chat template
    (``processor=(chat_template, processor)``); ``family`` is the config's ``model_type``.
    Batches are the processor's, restricted to the inputs ``forward`` names."""

    family = "generic"

    def __init__(self, model, tokenizer=None, image_size: int | None = None, processor=None):
        if processor is None:
            raise TypeError(
                f"{type(model).__name__} has no built-in template (only "
                f"{', '.join(SUPPORTED)} do): load it with its processor and chat template "
                "(load_checkpoint)"
            )
        config = getattr(model, "config", model)
        self.family = str(getattr(config, "model_type", None) or "generic")
        self._image_token = _image_token_id(config, processor)
        super().__init__(model, tokenizer, image_size, processor)
        self.collator.input_keys = forward_keys(model)

    @property
    def image_token_id(self) -> int:
        return self._image_token

    def default_image_size(self) -> int:
        size = getattr(getattr(self.config, "vision_config", None), "image_size", 0) or 0
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def vision_attrs(self) -> tuple[str, ...]:
        return tuple(n.rsplit(".", 1)[-1] for n in self.vision_module_names())

    def vision_module_names(self) -> list[str]:
        """:func:`mmunlearn.params.vision_module_names` of the model."""
        return vision_module_names(self._model())

    def block_classes(self) -> tuple[type, ...]:
        return block_classes(self._model())


def _adapter_classes() -> list[tuple[type, type[ModelAdapter]]]:
    import transformers

    pairs = []
    for cls_name, adapter in zip(SUPPORTED, (LlavaAdapter, Qwen2VLAdapter, Qwen2VLAdapter)):
        cls = getattr(transformers, cls_name, None)
        if cls is not None:
            pairs.append((cls, adapter))
    return pairs


def adapter_for(
    model, tokenizer=None, image_size: int | None = None, processor=None
) -> ModelAdapter:
    """The adapter for ``model``, chosen by its class (subclasses too, e.g. FSDP2-wrapped).
    ``processor``: ``(chat_template, processor)`` of a real checkpoint (then they build the
    batches); without it the built-in hand-written template and image preprocessing are used,
    which only LLaVA and Qwen2-VL / Qwen2.5-VL have.

    Returns a :class:`~mmunlearn.models.adapters.LlavaAdapter`,
    :class:`~mmunlearn.models.adapters.Qwen2VLAdapter` or (any other model, with its
    processor) :class:`GenericAdapter`; raises ``TypeError`` naming the class for another
    model without a processor."""
    for cls, adapter in _adapter_classes():
        if isinstance(model, cls):
            return adapter(model, tokenizer, image_size, processor)
    if processor is None:
        raise TypeError(
            f"no built-in model adapter for {type(model).__module__}.{type(model).__name__} "
            f"(those: {', '.join(SUPPORTED)}): load it with its processor and chat template"
        )
    return GenericAdapter(model, tokenizer, image_size, processor)


__all__ = ["GenericAdapter", "adapter_for", "block_classes", "forward_keys"]
