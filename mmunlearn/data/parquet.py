"""Parquet benchmark files: split folders, row iteration, image cells, JSON cells, and the
error that locates a bad value (file, row, column). Shared by the MLLMU-Bench and CLEAR readers
and the own-data reader (``data/custom.py``).

Images are untrusted input: every image any reader decodes goes through :func:`open_image`,
which refuses one of more than :data:`MAX_IMAGE_PIXELS` pixels (a decompression bomb; PIL's own
warning and error become the same one-line :class:`DataFormatError`), and an image *path* read
from a data file is refused when it resolves (symlinks, ``..``) outside the data root.
:func:`image_policy` sets both for the reads inside it (the CLI's ``--max-image-pixels`` and
``--data-root``).
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

_BATCH_ROWS = 64  # rows decoded per pyarrow batch: bounds memory on image-heavy files
MAX_IMAGE_PIXELS = 89_478_485  # PIL's default limit (Image.MAX_IMAGE_PIXELS): ~ 9,459²
_POLICY = contextvars.ContextVar("image_policy", default=(MAX_IMAGE_PIXELS, None))


class DataFormatError(ValueError):
    """A benchmark file does not have the documented layout.

    ``file``, ``row`` (``None`` when the whole column is absent) and ``column`` (``None``: the
    whole file) locate it; ``unit`` names the row ("row", or "line" of a JSON Lines file)."""

    def __init__(
        self, file: str | Path, row: int | None, column: str | None, problem: str, unit="row"
    ):
        self.file, self.row, self.column = str(file), row, column
        if column is None:  # the whole file (e.g. no rows at all)
            super().__init__(f"{file}: {problem}")
            return
        where = "every row (column absent)" if row is None else f"{unit} {row}"
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


@contextlib.contextmanager
def image_policy(max_pixels: int | None = MAX_IMAGE_PIXELS, data_root: str | Path | None = None):
    """Within the block, every image decoded by a reader is refused above ``max_pixels``
    pixels (``None``: no limit) and every image path read from a data file must resolve
    (symlinks and ``..`` followed) inside ``data_root`` (``None``: anywhere)."""
    root = None if data_root is None else Path(data_root).resolve()
    token = _POLICY.set((max_pixels, root))
    try:
        yield
    finally:
        _POLICY.reset(token)


def image_path(path: str | Path, file: str | Path, row: int, column: str, unit: str = "row"):
    """``path`` (from ``column`` of ``file``) resolved: relative to the data file's folder,
    symlinks and ``..`` followed; DataFormatError when it lands outside :func:`image_policy`'s
    data root."""
    p = Path(path)
    p = (p if p.is_absolute() else Path(file).parent / p).resolve()
    root = _POLICY.get()[1]
    if root is not None and not p.is_relative_to(root):
        raise DataFormatError(
            file, row, column, f"image path {str(path)!r} resolves to {p}, outside "
            f"--data-root {root}", unit,
        )  # fmt: skip
    return p


def read_image_file(path, file, row: int, column: str, unit: str = "row") -> bytes:
    """The bytes of image ``path`` (checked by :func:`image_path`), or a DataFormatError."""
    p = image_path(path, file, row, column, unit)
    try:
        return p.read_bytes()
    except OSError as e:
        why = "no such file" if not p.exists() else (e.strerror or str(e))
        raise DataFormatError(file, row, column, f"cannot read image path {str(path)!r}: {why}",
                              unit) from e  # fmt: skip


def open_image(data: bytes, file, row: int, column: str, unit: str = "row") -> Image.Image:
    """An RGB image decoded from ``data``; DataFormatError for bytes PIL cannot decode or an
    image over :func:`image_policy`'s pixel limit (checked from the header, before the pixels
    are decoded; PIL's own DecompressionBombWarning / Error are the same refusal)."""
    limit = _POLICY.get()[0]

    def too_big(what: str):
        return DataFormatError(
            file, row, column, f"image of {what} is over the limit of {limit:,} pixels "
            "(--max-image-pixels; a decompression bomb?)", unit,
        )  # fmt: skip

    saved = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = limit  # PIL's own check uses the same limit
            img = Image.open(io.BytesIO(bytes(data)))
            w, h = img.size
            if limit is not None and w * h > limit:
                raise too_big(f"{w}×{h} = {w * h:,} pixels")
            img.load()
            return img.convert("RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        n = re.search(r"\((\d+) pixels\)", str(e))
        raise too_big(f"{int(n.group(1)):,} pixels" if n else "this size") from e
    except DataFormatError:
        raise
    except Exception as e:  # PIL raises several exception types for corrupt data
        raise DataFormatError(file, row, column, f"cannot decode image: {e}", unit) from e
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def decode_image(value: Any, file: str | Path, row: int, column: str) -> Image.Image:
    """An RGB ``PIL`` image from a parquet image cell: a struct ``{bytes[, path]}`` or raw bytes
    (a ``path`` is used, relative to the file's folder, only when ``bytes`` is empty). Raises
    :class:`DataFormatError` for a null cell, bytes PIL cannot decode, an image over the pixel
    limit or a path outside the data root (:func:`image_policy`)."""
    data = value
    if isinstance(value, dict):
        data = value.get("bytes")
        if not data and value.get("path"):
            data = read_image_file(value["path"], file, row, column)
    if data is None:
        raise DataFormatError(file, row, column, "image is null")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataFormatError(file, row, column, f"expected image bytes, got {type(data).__name__}")
    return open_image(data, file, row, column)


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
    "MAX_IMAGE_PIXELS",
    "DataFormatError",
    "decode_image",
    "image_path",
    "image_policy",
    "open_image",
    "read_image_file",
    "iter_rows",
    "open_parquet",
    "parquet_files",
    "parse_json",
    "schema_names",
]
