"""Model directories: atomic ``save_pretrained``, and loading real checkpoints with their own
processor and chat template (local folders, or Hub ids already in the local cache: nothing is
ever downloaded).

:func:`load_checkpoint` checks everything it can before the weights are read (the folder, the
model family, a tokenizer, an image processor, a chat template) and says in one line what is
missing and what to pass (``processor=`` / ``--processor``). A model saved by
:func:`save_model` records in ``mmunlearn.json`` whether it uses the built-in hand-written
collation (the tiny models) or a processor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mmunlearn.io import replace_dir, temp_dir_for

MARKER = "mmunlearn.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# every from_pretrained: local files only, and never code from the checkpoint's folder (a
# tokenizer / processor / model class named in an ``auto_map``): transformers refuses such a
# folder with a message instead of running its code (or, with the default, asking on a terminal)
LOCAL = {"local_files_only": True, "trust_remote_code": False}
FAMILIES = {"llava": "llava", "qwen2_vl": "qwen2vl", "qwen2_5_vl": "qwen2vl"}
SUPPORTED_TEXT = (
    "LLaVA-1.5 (llava-hf), Qwen2-VL, Qwen2.5-VL and every other image-text-to-text model "
    "of transformers (docs/models.md)"
)


class VisionModulesError(ValueError):
    """``vision_modules`` (``--vision-modules``) names modules the model does not have: a bad
    option value (the CLI's exit 2), unlike a model whose vision side is not found (exit 1)."""


def save_model(model, tokenizer, directory, state_dict: dict | None = None) -> Path:
    """``save_pretrained`` of model (safetensors) and tokenizer into ``directory``, atomically:
    written to a temporary sibling, then renamed into place (an existing directory is replaced).
    ``tokenizer``: the tokenizer of a built-in tiny model or the processor of a real checkpoint
    (saved beside the weights, so the directory loads with :func:`load_checkpoint`).
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
            builtin = getattr(tokenizer, "image_processor", None) is None
            collation = "builtin" if builtin else "processor"
            (tmp / MARKER).write_text(json.dumps({"collation": collation}) + "\n")
        replace_dir(tmp, final)
    except Exception as e:
        if isinstance(e, OSError) and str(final) in str(e):
            raise
        raise OSError(f"cannot write the model {final}: {type(e).__name__}: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_model(
    path_or_dir, dtype: torch.dtype | str | None = None, device: Any = None, tokenizer: bool = True
):
    """Load a model and its tokenizer from a local directory (never the hub).

    The model through ``AutoModelForImageTextToText``, falling back to the exact class named in
    ``config.architectures``; ``dtype`` (e.g. ``torch.bfloat16``) is passed on if given.
    Returns ``(model, tokenizer)`` (tokenizer None with ``tokenizer=False``), the model in eval
    mode (on ``device`` if given)."""
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    path = Path(path_or_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"not a model directory: {path}")
    kw: dict[str, Any] = dict(LOCAL)
    if dtype is not None:
        kw["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kw)
    except (ValueError, KeyError):
        config = AutoConfig.from_pretrained(path, **LOCAL)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            raise
        model = cls.from_pretrained(path, **kw)
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(path, **LOCAL)
        except (ValueError, OSError):
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tok


def resolve(path_or_id, what: str = "model") -> Path:
    """A local folder for ``path_or_id``: the folder itself, or a Hub id's snapshot in the
    local Hugging Face cache (never downloaded). Raises FileNotFoundError saying which."""
    p = Path(path_or_id)
    if p.is_dir():
        return p
    if p.exists():
        raise FileNotFoundError(f"{what} {path_or_id}: a file, not a checkpoint folder")
    text = str(path_or_id)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, local_files_only=True))
        except Exception as e:  # LocalEntryNotFoundError, offline errors, bad ids
            raise FileNotFoundError(
                f"{what} {text}: no such folder, and not in the local Hugging Face cache "
                f"(nothing is downloaded here: fetch it first, e.g. `hf download {text}`)"
            ) from e
    raise FileNotFoundError(f"{what} {text}: no such folder")


def _image_text_to_text(model_type: str) -> bool:
    """Whether ``AutoModelForImageTextToText`` knows the model type (registered ones too)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    try:
        return CONFIG_MAPPING[model_type] in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    except KeyError:
        return False


def family_of(folder: Path) -> str:
    """``"llava"`` or ``"qwen2vl"`` (the built-in families) or the ``model_type`` of any other
    image-text-to-text model, from a checkpoint's ``config.json``; ValueError naming the
    folder and its model type for anything else."""
    cfg_file = folder / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: no readable config.json ({type(e).__name__}: {e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{folder}: config.json is a JSON {type(cfg).__name__}, not an object")
    mtype = cfg.get("model_type")
    if mtype not in FAMILIES and isinstance(mtype, str) and _image_text_to_text(mtype):
        return mtype
    if mtype not in FAMILIES:
        archs = ", ".join(cfg.get("architectures") or []) or "?"
        raise ValueError(
            f"{folder}: unsupported model family {mtype!r} ({archs}); supported: {SUPPORTED_TEXT}"
        )
    return FAMILIES[mtype]


def _chat_template(folder: Path, *objs) -> str | None:
    for o in objs:
        t = getattr(o, "chat_template", None)
        if isinstance(t, str) and t.strip():
            return t
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = folder / "chat_template.json"
    if js.is_file():
        try:
            return json.loads(js.read_text()).get("chat_template")
        except ValueError:
            return None
    return None


def _processor_without_video(folder: Path):
    """The folder's processor class (``processor_class`` of its processor / preprocessor
    config) built without its video processor (:func:`~mmunlearn.models.processing.
    without_video`): what ``AutoProcessor`` cannot build without torchvision."""
    from transformers.models.auto.processing_auto import processor_class_from_name

    from mmunlearn.models.processing import without_video

    name = None
    for f in IMAGE_PROCESSOR_FILES:
        if (folder / f).is_file():
            name = name or json.loads((folder / f).read_text()).get("processor_class")
    cls = processor_class_from_name(name) if name else None
    if cls is None:
        raise ValueError("AutoProcessor could not build it and no processor_class names one")
    return without_video(cls).from_pretrained(folder, **LOCAL)


def load_processor(folder: Path, family: str, model_config=None, flag: str = "--processor"):
    """``(chat_template, processor)`` of a checkpoint folder: ``AutoProcessor`` when it can
    build the family's processor, else the folder's image processor, tokenizer and chat
    template composed (:class:`~mmunlearn.models.processing.ComposedProcessor`). Raises
    ValueError naming the folder and ``flag`` when a part is missing."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(
            f"{folder} ships no tokenizer ({', '.join(TOKENIZER_FILES)}): pass {flag} DIR "
            "with the base model's processor, e.g. llava-hf/llava-1.5-7b-hf or "
            "Qwen/Qwen2-VL-7B-Instruct"
        )
    if not any((folder / f).is_file() for f in IMAGE_PROCESSOR_FILES):
        raise ValueError(
            f"{folder} has a tokenizer but no image processor ({', '.join(IMAGE_PROCESSOR_FILES)})"
            f": pass {flag} DIR with the base model's processor"
        )
    proc = None
    try:
        p = AutoProcessor.from_pretrained(folder, **LOCAL)
        if getattr(p, "image_processor", None) is not None and getattr(p, "tokenizer", None):
            proc = p
    except Exception:  # e.g. Qwen2-VL's processor needs torchvision (its video processor)
        proc = None
    try:
        if proc is None:
            from mmunlearn.models.processing import ComposedProcessor

            if family != "qwen2vl":
                proc = _processor_without_video(folder)
            else:
                tok = AutoTokenizer.from_pretrained(folder, **LOCAL)
                ip = AutoImageProcessor.from_pretrained(folder, **LOCAL)
                template = _chat_template(folder, tok)
                proc = ComposedProcessor(ip, tok, template or "", "<|image_pad|>")
    except Exception as e:  # (transformers 4.x passes on tokenizers' bare Exception for a bad file)
        msg = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
        if "sentencepiece" in msg.lower() or "tiktoken" in msg.lower():
            msg = (
                "its tokenizer needs sentencepiece (pip install sentencepiece), or pass "
                f"{flag} DIR with a tokenizer.json"
            )
        raise ValueError(f"{folder}: cannot load the processor ({msg})") from e
    template = _chat_template(folder, proc, getattr(proc, "tokenizer", None))
    if not template:
        raise ValueError(
            f"{folder}: no chat template (chat_template.jinja, chat_template.json or "
            f"tokenizer_config.json): pass {flag} DIR with the base model's processor"
        )
    return template, proc


def load_checkpoint(path, *, processor=None, dtype=None, device=None, vision_modules=None):
    """A checkpoint as ``(model, adapter)``: the model (eval mode, on ``device``, ``dtype`` if
    given) and the adapter that builds its batches. A real checkpoint's own processor and chat
    template drive collation (``processor``: a folder or cached Hub id to take them from when
    the checkpoint ships none); a built-in tiny model (``mmunlearn.json`` says so, or a
    tokenizer without an image processor) uses the hand-written template. ``path`` may be a
    Hub id already in the local cache. ``vision_modules`` (``"a,b"`` or a list; the CLI's
    ``--vision-modules``): the vision side by module name, recorded in ``model.config`` (so
    :func:`mmunlearn.params.module_groups`, the adapter and a saved copy use it); without it
    the vision side is found from the model (``adapter.vision_module_names()``), checked
    here. A LoRA adapter folder (``adapter_config.json``) loads its base checkpoint with the
    adapter merged in. Everything but the weights is checked first; errors are ValueError /
    FileNotFoundError naming the folder and what to pass."""
    from mmunlearn.models.generic import adapter_for
    from mmunlearn.models.lora import adapter_base, is_adapter, load_adapter

    folder = resolve(path, "model")
    if is_adapter(folder):  # a LoRA adapter: its base (with the adapter's processor), merged
        own = processor or (
            folder if any((folder / f).is_file() for f in TOKENIZER_FILES) else None
        )
        model, adapter = load_checkpoint(adapter_base(folder), processor=own, dtype=dtype,
                                         device=device, vision_modules=vision_modules)  # fmt: skip
        return load_adapter(model, folder), adapter
    family = family_of(folder)
    marker = {}
    if (folder / MARKER).is_file():
        try:
            marker = json.loads((folder / MARKER).read_text())
        except ValueError:
            marker = {}
    src = resolve(processor, "--processor") if processor else folder
    has_tok = any((src / f).is_file() for f in TOKENIZER_FILES)
    has_ip = any((src / f).is_file() for f in IMAGE_PROCESSOR_FILES)
    builtin = processor is None and (
        marker.get("collation") == "builtin" or (has_tok and not has_ip and not marker)
    )
    if builtin:
        model, tok = _load_weights(folder, dtype, device, tokenizer=True)
        return _vision_side(model, vision_modules, folder), adapter_for(model, tok)
    flag = "--processor" if processor is None else f"--processor {processor}: it"
    chat_proc = load_processor(src, family, flag=flag)
    model = _vision_side(_load_weights(folder, dtype, device), vision_modules, folder)
    return model, adapter_for(model, processor=chat_proc)


def _vision_side(model, vision_modules, folder: Path):
    """``model`` with ``vision_modules`` recorded in its config; its vision side checked."""
    from mmunlearn.params import VISION_MODULES_ATTR, vision_module_names

    if vision_modules:
        given = vision_modules.split(",") if isinstance(vision_modules, str) else vision_modules
        names = [n.strip() for n in given if n.strip()]
        setattr(model.config, VISION_MODULES_ATTR, names)
    try:
        vision_module_names(model)
    except ValueError as e:
        bad_names = VisionModulesError if vision_modules else ValueError
        raise bad_names(f"{folder}: {e}") from e
    return model


def _load_weights(folder: Path, dtype, device, tokenizer: bool = False):
    """``load_model``'s model (and tokenizer when asked), every failure one ValueError naming
    the folder (truncated or corrupt weights included)."""
    try:
        model, tok = load_model(folder, dtype=dtype, device=device, tokenizer=tokenizer)
    except Exception as e:  # safetensors' SafetensorError, torch / transformers errors
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        msg = " ".join(str(e).split())[:300]
        raise ValueError(f"{folder}: cannot load the weights ({type(e).__name__}: {msg})") from e
    return (model, tok) if tokenizer else model


__all__ = ["load_checkpoint", "load_model", "load_processor", "resolve", "save_model"]
