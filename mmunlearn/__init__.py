"""mmunlearn: multimodal machine unlearning with fused Triton kernels.

The public API, importable from the top level (loaded on first use, so ``import mmunlearn``
stays cheap)::

    from mmunlearn import MaskedAdamW, SaliencyMask, build_masks, unlearn, evaluate

How the package is layered: ``docs/architecture.md`` (its layer table is checked against the
import-graph test's list, the one place the order is written).
"""

from __future__ import annotations

import importlib

from mmunlearn._version import __version__

# public name → module that defines it
_API = {
    # optimizer (usable in any PyTorch training code)
    "MaskedAdamW": "mmunlearn.optim",
    "MaskedSGD": "mmunlearn.optim",
    "GradRelease": "mmunlearn.optim",
    # saliency
    "collect_fisher": "mmunlearn.fisher",
    "save_fisher": "mmunlearn.fisher",
    "load_fisher": "mmunlearn.fisher",
    "SaliencyMask": "mmunlearn.saliency",
    "mask_from_dense": "mmunlearn.saliency",
    "build_masks": "mmunlearn.masks",
    "masks_from_fishers": "mmunlearn.masks",
    "module_groups": "mmunlearn.params",
    "vision_module_names": "mmunlearn.params",
    "canonical_name": "mmunlearn.params",
    # unlearning
    "METHODS": "mmunlearn.methods",
    "Method": "mmunlearn.methods",
    "RunConfig": "mmunlearn.config",
    "resolve_recipe": "mmunlearn.presets",
    "unlearn": "mmunlearn.loop",
    "NonFiniteLossError": "mmunlearn.loop",
    "finetune": "mmunlearn.train",
    # models and data
    "adapter_for": "mmunlearn.models",
    "GenericAdapter": "mmunlearn.models",
    "load_checkpoint": "mmunlearn.models",
    "load_model": "mmunlearn.models",
    "save_model": "mmunlearn.models",
    "tiny_llava": "mmunlearn.models",
    "tiny_qwen2vl": "mmunlearn.models",
    "build_tokenizer": "mmunlearn.models",
    "Sample": "mmunlearn.data.schema",
    "make_benchmark": "mmunlearn.data.synthetic",
    "make_batches": "mmunlearn.data.batching",
    "UnlearningSets": "mmunlearn.data.recipe",
    "mllmu_sets": "mmunlearn.data.recipe",
    "clear_sets": "mmunlearn.data.recipe",
    "read_custom": "mmunlearn.data.custom",
    "custom_sets": "mmunlearn.data.custom",
    # evaluation
    "EvalConfig": "mmunlearn.eval",
    "evaluate": "mmunlearn.eval",
    "evaluate_clear": "mmunlearn.eval",
}

# public names that differ from the defining module's
_ALIASES = {"resolve_recipe": "resolve"}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'mmunlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
