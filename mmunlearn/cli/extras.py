"""``mmunlearn unlearn``'s optional parts: the ``--report-to`` libraries and ``--lora``
(checked before any file is read, each refusal one line naming the option), the LoRA wrap and
the model's save (merged or adapter-only)."""

from __future__ import annotations

import os

from mmunlearn.cli.common import UsageError


def check_extras(args, cfg) -> None:
    """The reporters' libraries are installed; ``--lora`` can apply (UsageError otherwise)."""
    from mmunlearn.reporters import check_installed

    try:
        check_installed(cfg.report_to)
    except ImportError as e:
        raise UsageError(str(e)) from e
    if cfg.lora:
        _check_lora(args, cfg)


def _check_lora(args, cfg) -> None:
    from mmunlearn.models.lora import require_peft

    method = getattr(args, "method", None)
    if method == "mmunlearner":
        raise UsageError("--lora: MMUnlearner's saliency mask selects base weights, which LoRA "
                         "freezes; use --lora with ga, ga_diff, kl_min or npo")  # fmt: skip
    if method in ("smfa", "mip_editor"):  # before PEFT's check: installing it would not help
        raise UsageError(f"--lora: {method} is implemented at full parameter here (its edit "
                         "and merge act on the base weights, which LoRA freezes)")  # fmt: skip
    if cfg.lora_save == "adapter" and args.tiny:
        raise UsageError("--lora-save adapter: the --tiny model has no base folder to load it "
                         "onto; use --lora-save merged")  # fmt: skip
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--lora: not supported under torchrun (one process only)")
    try:
        require_peft()
    except ImportError as e:
        raise UsageError(str(e)) from e


def wrap_lora(args, cfg, model):
    """``model`` wrapped in the run's LoRA; the adapter records the base checkpoint (its
    absolute folder, or the Hub id)."""
    from pathlib import Path

    from mmunlearn.models.lora import apply_lora

    base = args.model or ""
    if base and Path(base).exists():
        base = str(Path(base).resolve())
    try:
        return apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          targets=cfg.lora_targets, base=base, seed=cfg.seed)  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from e


def save_trained(model, proc, directory: str, cfg, state=None, mode: str | None = None):
    """The trained model's folder: plain, or for ``--lora`` merged / the adapter alone
    (``mode``, default ``cfg.lora_save``)."""
    from mmunlearn.models import save_model
    from mmunlearn.models.lora import save_adapter

    if cfg.lora and (mode or cfg.lora_save) == "adapter":
        return save_adapter(model, proc, directory)
    if cfg.lora:  # merged: the adapter folded into the base weights (unwraps the model)
        return save_model(model.merge_and_unload(), proc, directory)
    return save_model(model, proc, directory, state_dict=state)


__all__ = ["check_extras", "save_trained", "wrap_lora"]
