"""Own data: forget / retain / preserve-text sets (and their evaluation) from a JSON Lines file,
a parquet file or folder (what ``datasets.Dataset.to_parquet`` writes) or a Hugging Face
``save_to_disk`` folder (``state.json`` + ``*.arrow``), one row per question (docs/data.md).

Columns: ``question`` and ``answer`` (non-empty strings; ``answer`` may be left out of an MCQ
row, whose correct option is then the answer), ``image`` (a path relative to the data file's
folder, a ``data:``/``base64:`` string, raw bytes, or ``{"bytes", "path"}`` as ``datasets``'
``Image`` feature stores it; absent or null: a text-only row), ``id`` (unique in the set),
``entity`` (who / what the row is about), ``options`` (a list, lettered A, B, ...; or a
``{letter: text}`` object) with ``correct`` (a 0-based index, a letter or the option's text),
``task`` (``mcq`` | ``cloze`` | ``gen``: how ``mmunlearn eval`` scores the row; default ``mcq``
with options, else ``gen``) and ``meta`` (an object kept in ``Sample.meta``). Any other column
is an error (a misspelt optional column would otherwise be ignored).

Every error is a :class:`~mmunlearn.data.parquet.DataFormatError` naming the file, the row
(``line N`` of a JSON Lines file, ``row N`` of a table, both counted from 1) and the column.
Images are decoded here, under :func:`~mmunlearn.data.parquet.image_policy` (pixel limit, data
root), so bad data fails before a model is loaded.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmunlearn.data.parquet import (
    DataFormatError,
    open_image,
    parquet_files,
    read_image_file,
)
from mmunlearn.data.recipe import UnlearningSets
from mmunlearn.data.schema import Sample

COLUMNS = ("id", "entity", "image", "question", "answer", "options", "correct", "task", "meta")
TASKS = ("mcq", "cloze", "gen")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ------------------------------------------------------------------------------------------------
# rows of a file: (file, row number from 1, unit "line" | "row", record)
# ------------------------------------------------------------------------------------------------


def _jsonl_rows(f: Path) -> Iterator[tuple[Path, int, str, dict]]:
    with open(f, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise DataFormatError(f, n, "*", f"not UTF-8 text ({e.reason})", "line") from e
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f, n, "*", f"not valid JSON ({e.msg})", "line") from e
            if not isinstance(rec, dict):
                what = type(rec).__name__
                raise DataFormatError(f, n, "*", f"expected a JSON object, got a {what}", "line")
            yield f, n, "line", rec


def _table_rows(f: Path, table_batches) -> Iterator[tuple[Path, int, str, dict]]:
    n = 0
    try:
        for batch in table_batches:
            for rec in batch.to_pylist():
                n += 1
                yield f, n, "row", rec
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError
        raise DataFormatError(f, n + 1, "*", f"cannot read the rows from here ({e})") from e


def _arrow_files(folder: Path) -> list[Path]:
    """The ``*.arrow`` files of a ``save_to_disk`` folder, in ``state.json``'s order."""
    if (folder / "dataset_dict.json").is_file():
        raise DataFormatError(
            folder, None, None, "a DatasetDict folder: pass one split's folder (e.g. train/)"
        )
    try:
        state = json.loads((folder / "state.json").read_text())
        names = [d["filename"] for d in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataFormatError(folder / "state.json", None, None, f"not readable ({e})") from e
    return [folder / n for n in names]


def _arrow_batches(f: Path):
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(f)))
    except (OSError, ValueError):
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(f)))
            return (reader.get_batch(i) for i in range(reader.num_record_batches))
        except (OSError, ValueError) as e:
            raise DataFormatError(f, None, None, f"not a readable arrow file ({e})") from e
    return iter(reader)


def rows(path: str | Path) -> Iterator[tuple[Path, int, str, dict]]:
    """Every row of a data file or folder as ``(file, number from 1, "line" | "row",
    record)``. FileNotFoundError when ``path`` does not exist."""
    from mmunlearn.data.parquet import open_parquet

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such data file or folder")
    if p.is_dir() and any((p / x).is_file() for x in ("state.json", "dataset_dict.json")):
        for f in _arrow_files(p):
            yield from _table_rows(f, _arrow_batches(f))
    elif p.is_dir() or p.suffix == ".parquet":
        for f in parquet_files(p):
            yield from _table_rows(f, open_parquet(f).iter_batches(batch_size=64))
    else:
        yield from _jsonl_rows(p)


# ------------------------------------------------------------------------------------------------
# cells
# ------------------------------------------------------------------------------------------------


def _text(rec: dict, col: str, where: tuple, required: bool = True) -> str | None:
    f, n, unit = where
    v = rec.get(col)
    if v is None:
        if required:
            raise DataFormatError(f, n, col, "missing (or null)", unit)
        return None
    if not isinstance(v, str):
        raise DataFormatError(f, n, col, f"expected a string, got {type(v).__name__}", unit)
    if not v.strip():
        raise DataFormatError(f, n, col, "empty", unit)
    return v


def _b64(text: str, where: tuple) -> bytes:
    f, n, unit = where
    body = text.split(",", 1)[1] if text.startswith("data:") else text.removeprefix("base64:")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataFormatError(f, n, "image", f"bad base64 ({e})", unit) from e


def _image(value: Any, where: tuple):
    """A PIL image from an ``image`` cell (module docstring), or None for a null cell."""
    f, n, unit = where
    data, path = None, None
    if isinstance(value, dict):
        extra = set(value) - {"bytes", "path"}
        if extra:
            raise DataFormatError(f, n, "image", f"unknown keys {sorted(extra)}", unit)
        data, path = value.get("bytes") or None, value.get("path") or None
        if isinstance(data, str):  # JSON has no bytes: base64 text
            data = _b64(data, where)
    elif isinstance(value, str) and value.startswith(("data:", "base64:")):
        data = _b64(value, where)
    elif isinstance(value, str):
        path = value
    elif value is not None:
        data = value
    if data is None and path is None:
        if isinstance(value, str):
            raise DataFormatError(f, n, "image", "empty", unit)
        return None
    if data is None:
        if not isinstance(path, str) or not path.strip():
            raise DataFormatError(f, n, "image", "the image path is not a non-empty string", unit)
        data = read_image_file(path, f, n, "image", unit)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        kind = type(data).__name__
        raise DataFormatError(f, n, "image", f"expected a path, base64 or bytes, got {kind}", unit)
    return open_image(data, f, n, "image", unit)


def _json_cell(value: Any, col: str, where: tuple) -> Any:
    """A nested cell stored as JSON text (parquet) parsed; anything else as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataFormatError(where[0], where[1], col, f"bad JSON ({e.msg})", where[2]) from e


def _options(rec: dict, where: tuple) -> tuple[dict | None, str | None]:
    """``({letter: text}, correct letter)`` of an MCQ row, ``(None, None)`` without options."""
    f, n, unit = where
    opts = rec.get("options")
    if opts is None:
        if rec.get("correct") is not None:
            raise DataFormatError(f, n, "options", "missing, but 'correct' is given", unit)
        return None, None
    opts = _json_cell(opts, "options", where)
    if isinstance(opts, list):
        if len(opts) > len(LETTERS):
            raise DataFormatError(f, n, "options", f"{len(opts)} options; at most 26", unit)
        opts = dict(zip(LETTERS, opts))
    if not isinstance(opts, dict):
        kind = type(opts).__name__
        raise DataFormatError(f, n, "options", f"expected a list or an object, got {kind}", unit)
    opts = {k: v for k, v in opts.items() if v is not None}  # struct cells: absent keys null
    if len(opts) < 2:
        raise DataFormatError(f, n, "options", "an MCQ needs at least 2 options", unit)
    for k, v in opts.items():
        if not isinstance(v, str) or not v.strip():
            raise DataFormatError(f, n, "options", f"option {k} is not a non-empty string", unit)
    c = rec.get("correct")
    letters = list(opts)
    if c is None:
        raise DataFormatError(f, n, "correct", "missing (the MCQ's right option)", unit)
    if isinstance(c, int) and not isinstance(c, bool):
        if not 0 <= c < len(letters):
            why = f"index {c} is not in 0..{len(letters) - 1}"
            raise DataFormatError(f, n, "correct", why, unit)
        return opts, letters[c]
    if isinstance(c, str) and c.strip() in opts:
        return opts, c.strip()
    by_text = [k for k, v in opts.items() if isinstance(c, str) and v.strip() == c.strip()]
    if by_text:
        return opts, by_text[0]
    raise DataFormatError(
        f, n, "correct", f"{c!r} is not an index, letter ({', '.join(letters)}) or option", unit
    )


def _sample(rec: dict, where: tuple, text_only: bool) -> Sample:
    """One row as a :class:`Sample` (see the module docstring)."""
    f, n, unit = where
    unknown = [k for k in rec if k not in COLUMNS]
    if unknown:
        near = difflib.get_close_matches(unknown[0], COLUMNS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; the columns are {', '.join(COLUMNS)}"
        raise DataFormatError(f, n, unknown[0], f"unknown column{hint}", unit)
    question = _text(rec, "question", where)
    opts, correct = _options(rec, where)
    answer = _text(rec, "answer", where, required=opts is None) or opts[correct]
    task = _text(rec, "task", where, required=False) or ("mcq" if opts else "gen")
    if task not in TASKS:
        raise DataFormatError(f, n, "task", f"{task!r} is not one of {', '.join(TASKS)}", unit)
    if task == "mcq" and opts is None:
        raise DataFormatError(f, n, "options", "missing; task 'mcq' needs options", unit)
    image = _image(rec.get("image"), where)
    if text_only and image is not None:
        raise DataFormatError(f, n, "image", "given, but this set is text-only", unit)
    meta = _json_cell(rec.get("meta"), "meta", where) or {}
    if not isinstance(meta, dict):
        raise DataFormatError(f, n, "meta", f"expected an object, got {type(meta).__name__}", unit)
    rid = rec.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise DataFormatError(f, n, "id", f"expected a string or integer, got {rid!r:.40}", unit)
    entity = _text(rec, "entity", where, required=False) or ("" if rid is None else str(rid))
    meta = {**meta, "id": rid, "source": str(f), "row": n, "task": task}
    if opts is not None:
        meta.update(options=opts, correct=correct)
    if task == "cloze":
        meta["ground_truth"] = answer
    kind = "vqa" if image is not None else "text"
    return Sample(question, answer, image=image, entity=entity, kind=kind, meta=meta)


# ------------------------------------------------------------------------------------------------
# sets
# ------------------------------------------------------------------------------------------------


def read_custom(path: str | Path, *, text_only: bool = False) -> list[Sample]:
    """The rows of a JSON Lines file, a parquet file / folder or a ``save_to_disk`` folder as
    samples (module docstring), in file order; ``text_only``: a row with an image is an error
    (the preserve-text set). Images are decoded now, under the current
    :func:`~mmunlearn.data.parquet.image_policy`. Raises DataFormatError naming file, row and
    column; FileNotFoundError when ``path`` does not exist."""
    out: list[Sample] = []
    seen: dict[str, tuple] = {}
    for f, n, unit, rec in rows(path):
        s = _sample(rec, (f, n, unit), text_only)
        key = None if s.meta["id"] is None else str(s.meta["id"])
        if key in seen:
            f0, n0 = seen[key]
            first = f"{unit} {n0}" + ("" if f0 == f else f" of {f0}")
            raise DataFormatError(f, n, "id", f"duplicate id {key!r} (first at {first})", unit)
        if key is not None:
            seen[key] = (f, n)
        out.append(s)
    if not out:
        raise DataFormatError(path, None, None, "no rows (an empty data file)")
    return out


def custom_sets(forget, retain=None, preserve_text=None) -> UnlearningSets:
    """The four sets of a run from own files (paths; see :mod:`mmunlearn.data.recipe`): forget
    and retain as given, vision preserve = retain, language preserve = the text-only
    ``preserve_text`` rows + retain (the MMUnlearner layout of the benchmarks). ``retain`` may
    be None for a method without retain steps (GA, NPO)."""
    f = read_custom(forget)
    r = read_custom(retain) if retain is not None else []
    t = read_custom(preserve_text, text_only=True) if preserve_text is not None else []
    return UnlearningSets(f, r, list(r), t + r)


def eval_tasks(samples: list[Sample]) -> dict[str, list[Sample]]:
    """Samples as one evaluation set ``{"mcq", "cloze", "gen"}`` (by each row's task); an MCQ
    item's answer is its correct option's text."""
    out: dict[str, list[Sample]] = {t: [] for t in TASKS}
    for s in samples:
        task = s.meta.get("task", "gen")
        if task == "mcq":
            s = Sample(s.question, s.meta["options"][s.meta["correct"]], s.image, s.entity,
                       s.kind, s.meta)  # fmt: skip
        out[task].append(s)
    return out


def custom_eval_sets(forget, retain=None, forget_test=None, limit: int | None = None) -> dict:
    """Evaluation sets from own files (paths): ``forget``, and those given of ``retain`` and
    ``forget_test`` (the forget set's concepts in new pictures / wordings: the MIA's
    non-members), each ``{"mcq", "cloze", "gen"}`` with at most ``limit`` items per task."""
    out = {}
    for name, path in (("forget", forget), ("retain", retain), ("forget_test", forget_test)):
        if path is not None:
            tasks = eval_tasks(read_custom(path))
            out[name] = {k: v if limit is None else v[:limit] for k, v in tasks.items()}
    return out


def _path_of(value: Any) -> str | None:
    """The path of an ``image`` cell that names a file (module docstring), else None."""
    if isinstance(value, dict) and not value.get("bytes"):
        value = value.get("path")
    if isinstance(value, str) and value.strip() and not value.startswith(("data:", "base64:")):
        return value
    return None


def file_fingerprint(path: str | Path) -> str:
    """sha256 (first 16 hex digits) of a data file, or of every file of a data folder (their
    relative names and bytes, in sorted order), and of every image file its rows name by
    path: what a run's records cite as the data it saw."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for x in files:
        h.update(str(x.relative_to(p) if p.is_dir() else x.name).encode() + b"\0")
        with open(x, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    for f, n, unit, rec in rows(p):
        image = _path_of(rec.get("image"))
        if image is not None:
            h.update(read_image_file(image, f, n, "image", unit))
    return h.hexdigest()[:16]


__all__ = [
    "COLUMNS",
    "TASKS",
    "custom_eval_sets",
    "custom_sets",
    "eval_tasks",
    "file_fingerprint",
    "read_custom",
    "rows",
]
