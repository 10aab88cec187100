"""Model directories: atomic ``save_pretrained`` and local loading (never the hub)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from mmunlearn.io import replace_dir, temp_dir_for


def save_model(model, tokenizer, directory, state_dict: dict | None = None) -> Path:
    """``save_pretrained`` of model (safetensors) and tokenizer into ``directory``, atomically:
    written to a temporary sibling, then renamed into place (an existing directory is replaced).
    ``state_dict``: full tensors to write instead of the model's own (an FSDP2-sharded model:
    :func:`mmunlearn.fsdp.full_state_dict`); ``config.architectures`` names the real class,
    not FSDP2's ``FSDP<Class>`` wrapper, so the directory loads like any other.

    Returns the directory's ``Path``."""
    final = Path(directory)
    tmp = temp_dir_for(final)
    try:
        cls = type(model)
        fsdp_cls = cls.__name__.startswith("FSDP") and len(cls.__bases__) > 1
        if fsdp_cls:
            # FSDP2 made the class FSDP<Class>(FSDPModule, <Class>); transformers picks the
            # architecture name and the key conversions by class, so save as <Class>
            model.__class__ = cls.__bases__[-1]
        try:
            model.save_pretrained(tmp, state_dict=state_dict)
        finally:
            model.__class__ = cls
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_model(path_or_dir, dtype: torch.dtype | str | None = None, device: Any = None):
    """Load a model and its tokenizer from a local directory (never the hub).

    The model through ``AutoModelForImageTextToText``, falling back to the exact class named in
    ``config.architectures``; ``dtype`` (e.g. ``torch.bfloat16``) is passed on if given.
    Returns ``(model, tokenizer)``, the model in eval mode (on ``device`` if given)."""
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    path = Path(path_or_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"not a model directory: {path}")
    kw: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kw["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kw)
    except (ValueError, KeyError):
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            raise
        model = cls.from_pretrained(path, **kw)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError):
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def load_checkpoint(path, *, processor=None, dtype=None, device=None):
    """A checkpoint directory as ``(model, adapter)``: the model (eval mode, on ``device``) and
    the adapter that collates its batches (``adapter.tokenizer``; the checkpoint's own
    processor and chat template drive collation for real checkpoints). ``processor``: a
    directory to take the processor / tokenizer from when the checkpoint ships none."""
    from mmunlearn.models.adapters import adapter_for

    model, tok = load_model(path, dtype=dtype, device=device)
    return model, adapter_for(model, tok)


__all__ = ["load_checkpoint", "load_model", "save_model"]
