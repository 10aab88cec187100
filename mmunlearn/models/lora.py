"""LoRA for the baselines, through PEFT (``pip install 'mmunlearn[lora]'``, imported lazily).

MLLMU-Bench's own baselines (GA, GA_Difference, KL_Min, NPO; ``franciscoliu/MLLMU-Bench``
``baselines/*.py`` at ``0e3098e5ea7e4878ce4f19cdf873de1410b4d427``) train a LoRA with ``r=16,
lora_alpha=16, lora_dropout=0.05, init_lora_weights="gaussian"`` on the target names of
``find_all_linear_names``: the last name component of every ``nn.Linear`` outside
``multi_modal_projector`` / ``vision_model``, minus ``lm_head``. PEFT matches those names as
suffixes, so on LLaVA ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` / ``fc1`` / ``fc2``
also wrap the CLIP tower's layers (docs/reference/official_recipe.md §7): :func:`mllmu_targets`
returns exactly the ``nn.Linear`` modules that suffix match selects. Not reproduced: their
``prepare_model_for_kbit_training`` call, which casts every weight to fp32.

A LoRA run saves the merged model (``merge_and_unload``, a plain checkpoint folder) or the
adapter alone (``adapter_config.json`` naming the base folder, plus the processor);
:func:`load_adapter` loads the latter onto its base and merges it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

MLLMU_SKIP = ("multi_modal_projector", "vision_model")
ADAPTER_CONFIG = "adapter_config.json"


def require_peft(flag: str = "--lora") -> None:
    """ImportError (one line naming the extra) when PEFT is missing."""
    if importlib.util.find_spec("peft") is None:
        raise ImportError(f"{flag} needs the peft package: pip install 'mmunlearn[lora]'")


def mllmu_targets(model) -> list[str]:
    """The ``nn.Linear`` modules MLLMU-Bench's LoRA wraps (module docstring), by full name."""
    import torch

    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    suffixes = {n.split(".")[-1] for n in linear if not any(k in n for k in MLLMU_SKIP)}
    suffixes.discard("lm_head")
    return [n for n in linear if n.split(".")[-1] in suffixes]


def apply_lora(model, *, r: int, alpha: float, dropout: float, targets: str, base: str = "",
               seed: int = 0):  # fmt: skip
    """``model`` wrapped in a PEFT LoRA (only the adapter trains; the base weights are
    frozen). ``targets``: ``"mllmu"`` (:func:`mllmu_targets`) or comma-separated module
    names, matched by PEFT as suffixes. ``base``: the base checkpoint, recorded in the
    adapter's config so that an adapter-only save loads onto it. ``seed``: of the adapter's
    Gaussian initialisation (the same run draws the same adapter)."""
    require_peft()
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    names = mllmu_targets(model) if targets == "mllmu" else [
        t.strip() for t in targets.split(",") if t.strip()
    ]  # fmt: skip
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                        init_lora_weights="gaussian")  # fmt: skip
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as e:  # no module matched, or an unsupported module type
        raise ValueError(f"--lora-targets {targets}: {' '.join(str(e).split())[:200]}") from e
    wrapped.peft_config["default"].base_model_name_or_path = base or None  # PEFT overwrites it
    return wrapped


def save_adapter(model, processor, directory) -> Path:
    """Write the adapter of a LoRA-wrapped ``model`` alone (PEFT's files, whose config names
    the base) and the processor, atomically. (The merged save is ``model.merge_and_unload()``
    then :func:`~mmunlearn.models.loading.save_model`.) Returns the folder."""
    from mmunlearn.io import replace_dir, temp_dir_for

    final = Path(directory)
    tmp = temp_dir_for(final)
    model.save_pretrained(tmp)
    if processor is not None:
        processor.save_pretrained(tmp)
    return replace_dir(tmp, final)


def is_adapter(folder) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_base(folder) -> str:
    """The base checkpoint an adapter folder names (ValueError when it names none)."""
    base = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder}: a LoRA adapter that names no base model "
                         "(base_model_name_or_path in adapter_config.json)")  # fmt: skip
    return base


def load_adapter(model, folder):
    """``model`` (the base) with the adapter of ``folder`` loaded and merged into it."""
    try:
        require_peft(f"{folder} (a LoRA adapter)")
    except ImportError as e:
        raise ValueError(str(e)) from e
    from peft import PeftModel

    # no download, no code from the folder (as every loader of mmunlearn.models.loading)
    kw = {"local_files_only": True, "trust_remote_code": False}
    return PeftModel.from_pretrained(model, str(folder), **kw).merge_and_unload()


__all__ = ["adapter_base", "apply_lora", "is_adapter", "load_adapter", "mllmu_targets"]
__all__ += ["require_peft", "save_adapter"]
