"""CLEAR reader (parquet; every config has one split ``train``; method.md §5).

A config is a folder of parquet shards (``forget05/``, ``full+tofu/``, ...; any layout under
it, e.g. ``forget05/train-00000-of-00001.parquet``) or a single parquet file:

- ``forget01|05|10``, ``retain99|95|90``, ``full``: ``image`` (struct ``{bytes[, path]}``),
  ``caption``, ``name``;
- ``+tofu`` variants: also text-only rows with ``image`` null and ``question`` / ``answer``;
- ``forgetXX_perturbed``, ``retain_perturbed``: also ``perturbed_captions``,
  ``paraphrased_caption``, ``perturbed_names``;
- ``real_faces``, ``real_world``: ``image``, ``question``, ``answer``, ``options`` (the wrong
  options; the answer is inserted among them).

Sample modes of :func:`read_clear`: ``"caption"`` (a caption prompt drawn, seeded, from
:data:`CAPTION_PROMPTS` → ``caption``), ``"recognition"`` (:data:`RECOGNITION_PROMPT` →
``name``), ``"text"`` (the TOFU question/answer rows only). Errors as in
:mod:`mmunlearn.data.mllmu`: a :class:`~mmunlearn.data.mllmu.DataFormatError` (a ``ValueError``)
naming the file, the row and the column.
"""

from __future__ import annotations

import random
from pathlib import Path

from mmunlearn.data.parquet import DataFormatError, decode_image, iter_rows, parse_json
from mmunlearn.data.schema import Sample

__all__ = [
    "CAPTION_PROMPTS",
    "RECOGNITION_PROMPT",
    "NAME_QUESTION",
    "MODES",
    "clear_config",
    "read_clear",
    "read_clear_name_mcq",
    "read_clear_real",
]

# The caption prompts of the CLEAR protocol (one is drawn per item).
CAPTION_PROMPTS = (
    "What can you see in this picture?",
    "Tell me about the content of this image",
    "Can you give a description of the image?",
    "What is depicted in the image?",
    "Explain what you observe in the picture.",
    "Describe the image in detail.",
    "What is the main subject of this image?",
    "Can you describe the scene or objects in the image?",
    "What is happening in this image?",
)
RECOGNITION_PROMPT = "The name of the person on the image is"
NAME_QUESTION = "What is the name of the person in the image?"  # name MCQ without a question
MODES = ("caption", "recognition", "text")
_LETTERS = "ABCDEFGH"


def clear_config(root: str | Path, config: str) -> Path:
    """The folder of a CLEAR config under a dataset root (``root/config``); raises
    ``FileNotFoundError`` when it does not exist."""
    p = Path(root) / config
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such CLEAR config folder")
    return p


def _text(rec: dict, f, row: int, col: str) -> str:
    v = rec.get(col)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise DataFormatError(f, row, col, "empty or null")
    return str(v)


def read_clear(
    path: str | Path, mode: str = "caption", *, seed: int = 0, include_text: bool = True
) -> list[Sample]:
    """Samples of one CLEAR config in ``mode``; returns them in file/row order.

    ``"caption"``: every image row → (a seeded random prompt of :data:`CAPTION_PROMPTS`,
    ``caption``) (a list of captions gives one item each); ``"recognition"``: every image row →
    (:data:`RECOGNITION_PROMPT`, ``name``). In both, rows with a ``question`` (the TOFU rows of
    ``+tofu`` configs) become question/answer items too, as the reference reader does, unless
    ``include_text=False`` (``meta["mode"]`` = "text", or "qa" if the row has an image).
    ``"text"``: only rows with a null image, as (question, answer), ``image=None``,
    ``kind="text"``. Image rows are ``kind="vqa"``; ``entity`` = ``name`` (``""`` if null);
    ``meta = {"mode", "source", "row"}`` plus, when present, ``paraphrased_caption`` /
    ``perturbed_captions`` (caption mode) or ``perturbed_names`` (recognition mode).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rng = random.Random(seed)
    required, optional = _clear_columns(mode)
    out: list[Sample] = []
    for f, row, rec in iter_rows(path, required, optional):
        out += _clear_row(rng, mode, include_text, f, row, rec)
    return out


def _clear_columns(mode: str) -> tuple[list[str], list[str]]:
    """The (required, optional) columns :func:`read_clear` reads in ``mode``."""
    if mode == "text":
        return ["question", "answer"], ["image", "name"]
    if mode == "caption":
        optional = ["name", "question", "answer", "paraphrased_caption", "perturbed_captions"]
        return ["image", "caption"], optional
    return ["image", "name"], ["question", "answer", "perturbed_names"]


def _clear_row(
    rng: random.Random, mode: str, include_text: bool, f, row: int, rec: dict
) -> list[Sample]:
    """The samples of one CLEAR row in ``mode`` (none, one, or one per caption), as
    :func:`read_clear` describes; caption prompts are drawn from ``rng``."""
    entity = str(rec["name"]) if rec.get("name") is not None else ""
    meta = {"mode": mode, "source": str(f), "row": row}
    has_image = rec.get("image") is not None
    question = rec.get("question")
    if mode == "text":
        if has_image:
            return []
        q, a = _text(rec, f, row, "question"), _text(rec, f, row, "answer")
        return [Sample(q, a, image=None, entity=entity, kind="text", meta=meta)]
    if question is not None and str(question).strip():
        return [_clear_qa(rec, f, row, entity, meta)] if include_text else []
    if not has_image:
        raise DataFormatError(f, row, "image", "null, and the row has no question")
    img = decode_image(rec["image"], f, row, "image")
    if mode == "recognition":
        return [_clear_recognition(rec, f, row, img, entity, meta)]
    return _clear_captions(rng, rec, f, row, img, entity, meta)


def _clear_qa(rec: dict, f, row: int, entity: str, meta: dict) -> Sample:
    """A row with a ``question`` as a question/answer item (``"qa"`` with its image, ``"text"``
    without)."""
    has_image = rec.get("image") is not None
    img = decode_image(rec["image"], f, row, "image") if has_image else None
    return Sample(
        str(rec.get("question")),
        _text(rec, f, row, "answer"),
        image=img,
        entity=entity,
        kind="vqa" if has_image else "text",
        meta={**meta, "mode": "qa" if has_image else "text"},
    )


def _clear_recognition(rec: dict, f, row: int, img, entity: str, meta: dict) -> Sample:
    """An image row as (:data:`RECOGNITION_PROMPT`, ``name``), with ``perturbed_names``."""
    extra = {}
    if rec.get("perturbed_names") is not None:
        extra["perturbed_names"] = [str(x) for x in rec["perturbed_names"]]
    name = _text(rec, f, row, "name")
    return Sample(
        RECOGNITION_PROMPT, name, image=img, entity=entity, kind="vqa", meta={**meta, **extra}
    )


def _clear_captions(
    rng: random.Random, rec: dict, f, row: int, img, entity: str, meta: dict
) -> list[Sample]:
    """An image row as one (seeded prompt, caption) item per caption, with
    ``paraphrased_caption`` / ``perturbed_captions``."""
    caps = rec.get("caption")
    caps = caps if isinstance(caps, list) else [_text(rec, f, row, "caption")]
    if not caps or any(c is None or not str(c).strip() for c in caps):
        raise DataFormatError(f, row, "caption", "empty or null caption")
    extra = {}
    if rec.get("paraphrased_caption") is not None:
        extra["paraphrased_caption"] = str(rec["paraphrased_caption"])
    if rec.get("perturbed_captions") is not None:
        extra["perturbed_captions"] = [str(x) for x in rec["perturbed_captions"]]
    return [
        Sample(
            rng.choice(CAPTION_PROMPTS),
            str(c),
            image=img,
            entity=entity,
            kind="vqa",
            meta={**meta, **extra},
        )
        for c in caps
    ]


def _mcq_meta(rng: random.Random, truth: str, wrong: list[str], f, row: int, col: str) -> dict:
    """``{"options", "correct"}`` with ``truth`` inserted at a seeded position among ``wrong``
    (if ``wrong`` already holds it, it is not inserted twice)."""
    opts = [w for w in wrong if w != truth]
    if not opts:
        raise DataFormatError(f, row, col, "no wrong options")
    if len(opts) + 1 > len(_LETTERS):
        raise DataFormatError(f, row, col, f"{len(opts) + 1} options; at most {len(_LETTERS)}")
    k = rng.randint(0, len(opts))
    opts.insert(k, truth)
    return {"options": {_LETTERS[i]: o for i, o in enumerate(opts)}, "correct": _LETTERS[k]}


def _str_list(value, f, row: int, col: str) -> list[str]:
    if value is None:
        raise DataFormatError(f, row, col, "null")
    value = parse_json(value, f, row, col, list)
    return [str(x) for x in value if x is not None]


def read_clear_name_mcq(
    path: str | Path, *, seed: int = 0, question: str | None = None
) -> list[Sample]:
    """Face-recognition MCQs of a perturbed config (``forgetXX_perturbed``,
    ``retain_perturbed``): per row, options = ``name`` + ``perturbed_names`` (the name at a
    seeded position), with the image; ``question`` = the row's ``question`` column if any,
    else ``question`` or :data:`NAME_QUESTION`. ``answer`` = the name, ``entity`` = the name,
    ``meta = {"options", "correct", "source", "row"}``."""
    rng = random.Random(seed)
    out: list[Sample] = []
    for f, row, rec in iter_rows(path, ["image", "name", "perturbed_names"], ["question"]):
        name = _text(rec, f, row, "name")
        wrong = _str_list(rec["perturbed_names"], f, row, "perturbed_names")
        meta = _mcq_meta(rng, name, wrong, f, row, "perturbed_names")
        img = decode_image(rec["image"], f, row, "image")
        q = rec.get("question") or question or NAME_QUESTION
        out.append(
            Sample(
                str(q),
                name,
                image=img,
                entity=name,
                kind="vqa",
                meta={**meta, "source": str(f), "row": row},
            )
        )
    return out


def read_clear_real(path: str | Path, *, seed: int = 0) -> list[Sample]:
    """MCQs of ``real_faces`` / ``real_world``: ``question``, options = ``options`` with the
    ``answer`` inserted at a seeded position, the image attached (``kind="vqa"``; ``None`` and
    ``kind="text"`` if a row has no image). ``answer`` = the answer text, ``entity`` = the
    answer, ``meta = {"options", "correct", "source", "row"}``."""
    rng = random.Random(seed)
    out: list[Sample] = []
    for f, row, rec in iter_rows(path, ["image", "question", "answer", "options"]):
        q, a = _text(rec, f, row, "question"), _text(rec, f, row, "answer")
        meta = _mcq_meta(rng, a, _str_list(rec["options"], f, row, "options"), f, row, "options")
        img = decode_image(rec["image"], f, row, "image") if rec["image"] is not None else None
        out.append(
            Sample(
                q,
                a,
                image=img,
                entity=a,
                kind="vqa" if img is not None else "text",
                meta={**meta, "source": str(f), "row": row},
            )
        )
    return out
