"""MLLMU-Bench reader (parquet, one row per profile; method.md §5).

A *split* is a folder holding one or more parquet shards (``forget_5/``,
``Test_Set/``, ...; normally ``train-00000-of-00001.parquet``) or a single parquet file. Rows:

- ``ID``; ``image`` = struct ``{bytes[, path]}`` (``Test_Set``: ``images``, a list of them);
- training QA either in ``metadata`` (a JSON array of ``{Question, Answer}``) or in plain
  ``question`` / ``answer`` columns;
- ``biography``: JSON object (Name, Employment, Born, ...);
- ``Classification_Task`` = ``{Image_Textual_Questions, Pure_Text_Questions}``, each a list of
  ``{Question, Options: {A, B, C, D}, Correct_Answer}``;
- ``Mask_Task`` (cloze): list of ``{Question (with "__"), Ground_Truth, Type}``;
- ``Generation_Task``: list of ``{Question, Ground_Truth, Type}``.

Nested columns may be stored as parquet structs/lists or as JSON strings; both are read.
A ``Type`` containing "pure" (``Pure_Text``) or equal to "text" makes a text-only item
(``image=None``, ``kind="text"``); everything else is image-grounded (``kind="vqa"``).

Errors: a missing column, bad JSON, a malformed entry or an undecodable image raises
:class:`DataFormatError` (a ``ValueError``) whose message names the file, the row index
(0-based, within the file) and the column. A QA entry without its Question/Answer key is an
error; pairs whose question or answer is an empty string are skipped, as the reference reader
does.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from mmunlearn.data.parquet import (
    DataFormatError,
    decode_image,
    iter_rows,
    parquet_files,
    parse_json,
    schema_names,
)
from mmunlearn.data.schema import Sample

__all__ = [
    "DataFormatError",
    "parquet_files",
    "iter_rows",
    "decode_image",
    "read_mllmu_split",
    "read_mllmu_classification",
    "read_mllmu_cloze",
    "read_mllmu_generation",
    "read_mllmu_biographies",
    "read_mllmu_eval",
    "text_preserve_set",
]


def _field(entry: Any, key: str, file, row, column, idx: int) -> Any:
    """``entry[key]`` of the ``idx``-th entry of a nested column, or a DataFormatError."""
    if not isinstance(entry, dict):
        raise DataFormatError(file, row, column, f"entry {idx} is not an object: {entry!r:.80}")
    if entry.get(key) is None:
        raise DataFormatError(file, row, column, f"entry {idx} has no {key!r}")
    return entry[key]


def _is_text_type(t: Any) -> bool:
    s = str(t or "").lower()
    return "pure" in s or s in ("text", "pure_text", "qa")


# ---------------------------------------------------------------------------------------------
# Images of a row
# ---------------------------------------------------------------------------------------------


def _row_image(rec: dict, file, row: int, rng: random.Random, image_choice: str):
    """The images of a row for its image-grounded items: a list (one image, or all of
    ``images`` with ``image_choice="all"``)."""
    if "image" in rec and rec["image"] is not None:
        return [decode_image(rec["image"], file, row, "image")]
    if "images" in rec:
        imgs = rec["images"]
        if not isinstance(imgs, list) or not imgs:
            raise DataFormatError(file, row, "images", "expected a non-empty list of images")
        if image_choice == "all":
            return [decode_image(v, file, row, f"images[{i}]") for i, v in enumerate(imgs)]
        i = 0 if image_choice == "first" else rng.randrange(len(imgs))
        return [decode_image(imgs[i], file, row, f"images[{i}]")]
    raise DataFormatError(file, row, "image", "image is null and there is no 'images' column")


def _image_columns(path) -> list[str]:
    """Which image column(s) the split's first file has: ``["image"]`` or ``["images"]``."""
    f = parquet_files(path)[0]
    names = schema_names(f)
    if "image" in names:
        return ["image"]
    if "images" in names:
        return ["images"]
    raise DataFormatError(f, None, "image", "missing (and no 'images' column either)")


def _check_choice(image_choice: str) -> None:
    if image_choice not in ("first", "random", "all"):
        raise ValueError(f"image_choice must be 'first', 'random' or 'all', got {image_choice!r}")


def _entity(rec: dict, row: int) -> str:
    return str(rec["ID"]) if rec.get("ID") is not None else f"row{row}"


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def read_mllmu_split(
    path: str | Path, *, image_choice: str = "first", seed: int = 0
) -> list[Sample]:
    """Training VQA items of a split (forget/retain/ft_Data/...): one ``Sample`` per
    ``{Question, Answer}`` of ``metadata``, or per row of ``question`` / ``answer`` (layout
    detected per file; a file with neither raises). Every item carries the row's image
    (``kind="vqa"``), ``entity`` = the row's ``ID``, ``meta = {"id", "source", "row"}``.
    ``image_choice`` ("first", "random" seeded by ``seed``, "all") picks among ``images``
    when a row has a list instead of one ``image``. Returns the list in file/row order."""
    _check_choice(image_choice)
    rng = random.Random(seed)
    out: list[Sample] = []
    for f in parquet_files(path):
        names = schema_names(f)
        if "metadata" in names:
            qa_cols = ["metadata"]
        elif {"question", "answer"} <= names:
            qa_cols = ["question", "answer"]
        else:
            col = "question" if "answer" in names else "answer" if "question" in names else None
            raise DataFormatError(
                f,
                None,
                col or "metadata",
                "training QA needs a 'metadata' column or both 'question' and 'answer'",
            )
        img_cols = _image_columns(f)
        for _, row, rec in iter_rows(f, [*qa_cols, *img_cols], ["ID"]):
            if qa_cols == ["metadata"]:
                items = parse_json(rec["metadata"], f, row, "metadata", list)
                pairs = [
                    (
                        _field(e, "Question", f, row, "metadata", i),
                        _field(e, "Answer", f, row, "metadata", i),
                    )
                    for i, e in enumerate(items)
                ]
            else:
                pairs = [(rec["question"], rec["answer"])]
            pairs = [(str(q), str(a)) for q, a in pairs if q and a]
            if not pairs:
                continue
            images = _row_image(rec, f, row, rng, image_choice)
            meta = {"id": rec.get("ID"), "source": str(f), "row": row}
            for img in images:
                out += [
                    Sample(q, a, image=img, entity=_entity(rec, row), kind="vqa", meta=dict(meta))
                    for q, a in pairs
                ]
    return out


def read_mllmu_biographies(path: str | Path) -> dict[str, dict]:
    """``{ID: biography}`` of a split, each biography parsed from its JSON (a dict with Name,
    Employment, Born, ...)."""
    out = {}
    for f, row, rec in iter_rows(path, ["ID", "biography"]):
        out[str(rec["ID"])] = parse_json(rec["biography"], f, row, "biography", dict)
    return out


def _options(entry: dict, f, row: int, col: str, i: int) -> tuple[dict, str]:
    """``(options, correct_letter)`` of one MCQ entry; the letter may be given as the option
    text, which is mapped back to its letter."""
    opts = _field(entry, "Options", f, row, col, i)
    if isinstance(opts, str):
        opts = parse_json(opts, f, row, col, dict)
    if not isinstance(opts, dict) or not opts:
        raise DataFormatError(f, row, col, f"entry {i}: 'Options' is not a letter → text map")
    opts = {str(k): str(v) for k, v in opts.items() if v is not None}
    correct = str(_field(entry, "Correct_Answer", f, row, col, i)).strip()
    if correct not in opts:
        letter = correct.split(".")[0].split(":")[0].strip()
        by_text = [k for k, v in opts.items() if v.strip() == correct]
        if letter in opts:
            correct = letter
        elif by_text:
            correct = by_text[0]
        else:
            raise DataFormatError(
                f, row, col, f"entry {i}: Correct_Answer {correct!r} is not one of {list(opts)}"
            )
    return opts, correct


def read_mllmu_classification(
    path: str | Path, *, image_choice: str = "random", seed: int = 0
) -> list[Sample]:
    """MCQ items of ``Classification_Task``: ``Image_Textual_Questions`` with the row's image
    (``kind="vqa"``) and ``Pure_Text_Questions`` without (``kind="text"``). ``answer`` = the
    correct option's text; ``meta = {"options": {"A": ..}, "correct": "B", "task":
    "classification", "type", "id", "source", "row"}``. Rows with an ``images`` list
    (``Test_Set``) use one image picked by ``image_choice`` ("random" seeded by ``seed``, as
    the reference protocol picks a random pose; "first"; "all" = one item per image)."""
    _check_choice(image_choice)
    rng = random.Random(seed)
    col = "Classification_Task"
    out: list[Sample] = []
    for f, row, rec in iter_rows(path, [col, *_image_columns(path)], ["ID"]):
        task = parse_json(rec[col], f, row, col, dict)
        base = {"task": "classification", "id": rec.get("ID"), "source": str(f), "row": row}
        groups = (("Image_Textual_Questions", "vqa"), ("Pure_Text_Questions", "text"))
        images = None
        for key, kind in groups:
            entries = task.get(key) or []
            if not isinstance(entries, list):
                raise DataFormatError(f, row, col, f"{key!r} is not a list")
            if kind == "vqa" and entries and images is None:
                images = _row_image(rec, f, row, rng, image_choice)
            for i, e in enumerate(entries):
                q = str(_field(e, "Question", f, row, col, i))
                opts, correct = _options(e, f, row, col, i)
                meta = {**base, "type": key, "options": opts, "correct": correct}
                for img in images if kind == "vqa" else [None]:
                    out.append(
                        Sample(
                            q,
                            opts[correct],
                            image=img,
                            entity=_entity(rec, row),
                            kind=kind,
                            meta=dict(meta),
                        )
                    )
    return out


def _gt_items(path, col: str, task: str, image_choice: str, seed: int, cloze: bool) -> list[Sample]:
    """Items of ``Mask_Task`` / ``Generation_Task`` (lists of {Question, Ground_Truth, Type})."""
    _check_choice(image_choice)
    rng = random.Random(seed)
    out: list[Sample] = []
    for f, row, rec in iter_rows(path, [col, *_image_columns(path)], ["ID"]):
        entries = parse_json(rec[col], f, row, col, list)
        images = None
        for i, e in enumerate(entries):
            q = str(_field(e, "Question", f, row, col, i))
            gt = str(_field(e, "Ground_Truth", f, row, col, i))
            typ = e.get("Type")
            text = _is_text_type(typ)
            if not text and images is None:
                images = _row_image(rec, f, row, rng, image_choice)
            meta = {"task": task, "type": typ, "id": rec.get("ID"), "source": str(f), "row": row}
            if cloze:
                meta["ground_truth"] = gt
            for img in [None] if text else images:
                out.append(
                    Sample(
                        q,
                        gt,
                        image=img,
                        entity=_entity(rec, row),
                        kind="text" if text else "vqa",
                        meta=dict(meta),
                    )
                )
    return out


def read_mllmu_cloze(
    path: str | Path, *, image_choice: str = "random", seed: int = 0
) -> list[Sample]:
    """Fill-in-the-blank items of ``Mask_Task``: ``question`` contains ``__``, ``answer`` =
    ``meta["ground_truth"]`` = ``Ground_Truth``; ``Type`` Image_Textual → with the row's image
    (``kind="vqa"``), Pure_Text → ``image=None`` (``kind="text"``). ``meta`` also has
    ``task="cloze"``, ``type``, ``id``, ``source``, ``row``. ``image_choice`` as in
    :func:`read_mllmu_classification`."""
    return _gt_items(path, "Mask_Task", "cloze", image_choice, seed, cloze=True)


def read_mllmu_generation(
    path: str | Path, *, image_choice: str = "random", seed: int = 0
) -> list[Sample]:
    """Generation items of ``Generation_Task``: ``answer`` = ``Ground_Truth`` (the ROUGE/BLEU
    reference); image-grounded or text-only by ``Type`` as for cloze; ``meta`` = ``task=
    "generation"``, ``type``, ``id``, ``source``, ``row``."""
    return _gt_items(path, "Generation_Task", "generation", image_choice, seed, cloze=False)


def read_mllmu_eval(
    path: str | Path, *, image_choice: str = "random", seed: int = 0
) -> dict[str, list[Sample]]:
    """One evaluation set in the layout of :func:`mmunlearn.eval.evaluate`:
    ``{"mcq": classification, "cloze": Mask_Task, "gen": Generation_Task}`` (a task whose
    column the split lacks gives an empty list)."""
    names: set[str] = set()
    for f in parquet_files(path):
        names |= schema_names(f)
    kw = {"image_choice": image_choice, "seed": seed}
    return {
        "mcq": read_mllmu_classification(path, **kw) if "Classification_Task" in names else [],
        "cloze": read_mllmu_cloze(path, **kw) if "Mask_Task" in names else [],
        "gen": read_mllmu_generation(path, **kw) if "Generation_Task" in names else [],
    }


def text_preserve_set(full_set_dir: str | Path) -> list[Sample]:
    """MMUnlearner's text-knowledge preserve set: every pure-text MCQ of ``Full_Set`` as a
    ``(question, correct option text)`` pair, ``image=None``, ``kind="text"``, ``entity`` =
    the profile ID, ``meta = {"id", "source", "row", "options", "correct"}``. Reads no image."""
    col = "Classification_Task"
    out: list[Sample] = []
    for f, row, rec in iter_rows(full_set_dir, [col], ["ID"]):
        task = parse_json(rec[col], f, row, col, dict)
        entries = task.get("Pure_Text_Questions") or []
        if not isinstance(entries, list):
            raise DataFormatError(f, row, col, "'Pure_Text_Questions' is not a list")
        for i, e in enumerate(entries):
            q = str(_field(e, "Question", f, row, col, i))
            opts, correct = _options(e, f, row, col, i)
            meta = {
                "id": rec.get("ID"),
                "source": str(f),
                "row": row,
                "options": opts,
                "correct": correct,
            }
            out.append(
                Sample(
                    q, opts[correct], image=None, entity=_entity(rec, row), kind="text", meta=meta
                )
            )
    return out
