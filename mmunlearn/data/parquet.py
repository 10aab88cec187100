"""Parquet benchmark files: split folders, row iteration, image cells, JSON cells, and the
error that locates a bad value (file, row, column). Shared by the MLLMU-Bench and CLEAR readers.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

_BATCH_ROWS = 64  # rows decoded per pyarrow batch: bounds memory on image-heavy files


class DataFormatError(ValueError):
    """A benchmark file does not have the documented layout.

    ``file``, ``row`` (``None`` when the whole column is absent) and ``column`` locate it."""

    def __init__(self, file: str | Path, row: int | None, column: str, problem: str):
        self.file, self.row, self.column = str(file), row, column
        where = "every row (column absent)" if row is None else f"row {row}"
        super().__init__(f"{file}: {where}, column {column!r}: {problem}")


def parquet_files(path: str | Path) -> list[Path]:
    """The parquet files of a split: ``[path]`` for a file, else the sorted ``*.parquet`` of the
    folder (searched recursively when the folder itself has none). Raises ``FileNotFoundError``
    if there is nothing to read."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such parquet file or split folder")
    files = sorted(p.glob("*.parquet")) or sorted(p.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{p}: no *.parquet files in this folder")
    return files


def open_parquet(f: str | Path) -> pq.ParquetFile:
    """``pyarrow.parquet.ParquetFile`` of ``f``; a truncated or foreign file raises
    :class:`DataFormatError` naming it."""
    try:
        return pq.ParquetFile(f)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError
        raise DataFormatError(f, None, "*", f"not a readable parquet file ({e})") from e


def schema_names(f: str | Path) -> set[str]:
    """The column names of a parquet file (DataFormatError naming it when unreadable)."""
    return set(open_parquet(f).schema_arrow.names)


def iter_rows(
    path: str | Path, required: Sequence[str], optional: Sequence[str] = ()
) -> Iterator[tuple[Path, int, dict]]:
    """Yield ``(file, row_index, row_dict)`` for every row of every file of a split, reading
    only the ``required`` and (those present of the) ``optional`` columns. Raises
    :class:`DataFormatError` naming the file and column when a required column is absent."""
    for f in parquet_files(path):
        pf = open_parquet(f)
        names = set(pf.schema_arrow.names)
        for col in required:
            if col not in names:
                raise DataFormatError(f, None, col, f"missing; the file has {sorted(names)}")
        cols = list(dict.fromkeys([*required, *(c for c in optional if c in names)]))
        row = 0
        batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=cols)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (OSError, ValueError) as e:  # a corrupt data page
                raise DataFormatError(f, row, "*", f"cannot read the rows from here ({e})") from e
            for rec in batch.to_pylist():
                yield f, row, rec
                row += 1


def decode_image(value: Any, file: str | Path, row: int, column: str) -> Image.Image:
    """An RGB ``PIL`` image from a parquet image cell: a struct ``{bytes[, path]}`` or raw bytes
    (a ``path`` is used, relative to the file's folder, only when ``bytes`` is empty). Raises
    :class:`DataFormatError` for a null cell or bytes PIL cannot decode."""
    data = value
    if isinstance(value, dict):
        data = value.get("bytes")
        if not data and value.get("path"):
            src = Path(value["path"])
            src = src if src.is_absolute() else Path(file).parent / src
            try:
                data = src.read_bytes()
            except OSError as e:
                raise DataFormatError(file, row, column, f"cannot read image path: {e}") from e
    if data is None:
        raise DataFormatError(file, row, column, "image is null")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataFormatError(file, row, column, f"expected image bytes, got {type(data).__name__}")
    try:
        img = Image.open(io.BytesIO(bytes(data)))
        img.load()
        return img.convert("RGB")
    except Exception as e:  # PIL raises several exception types for corrupt data
        raise DataFormatError(file, row, column, f"cannot decode image: {e}") from e


def parse_json(value: Any, file: str | Path, row: int, column: str, expect: type) -> Any:
    """A nested cell as Python data: JSON strings are parsed, structs/lists pass through. Raises
    :class:`DataFormatError` for bad JSON, a null cell or a value that is not ``expect``."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataFormatError(file, row, column, f"bad JSON: {e}") from e
    if not isinstance(value, expect):
        raise DataFormatError(
            file, row, column, f"expected a {expect.__name__}, got {type(value).__name__}"
        )
    return value


__all__ = [
    "DataFormatError",
    "decode_image",
    "iter_rows",
    "open_parquet",
    "parquet_files",
    "parse_json",
    "schema_names",
]
