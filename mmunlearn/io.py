"""Atomic file and directory writes, and the mmunlearn safetensors file format.

Every file the product writes goes through here, so a run killed at any moment leaves either
the old file or the new one, never a torn one:

* :func:`atomic_write` — write through a temporary sibling (same directory, so the same file
  system), ``fsync``, then ``os.replace``; :func:`atomic_write_text` / :func:`atomic_write_json`
  on top of it;
* :func:`replace_dir` — put a fully written temporary directory in place of ``final``: the old
  directory is first renamed to ``final + ".old"`` and removed once the new one is in place,
  so between the two renames the ``.old`` copy is complete (:func:`find_complete_dir` finds
  it);
* :func:`save_safetensors` / :func:`read_safetensors` — mmunlearn's own safetensors files
  (masks, Fishers): JSON-string metadata with a ``format_name`` and ``format_version``,
  read back with a ``ValueError`` naming the path for anything missing, corrupt or foreign.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mmunlearn._version import __version__

FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` to produce a temporary sibling of ``path``, then rename it onto
    ``path`` (parents are created). On any error (or a kill) ``path`` keeps its old content and
    the temporary file is removed. Returns ``path`` as a ``Path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as e:
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        except Exception as e:  # writers' own errors (safetensors' SafetensorError, ...)
            raise OSError(f"cannot write {path}: {type(e).__name__}: {e}") from e
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path, obj: Any, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def temp_dir_for(final) -> Path:
    """A fresh, empty temporary directory beside ``final`` (same file system) to build a
    directory in before :func:`replace_dir` puts it in place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def replace_dir(tmp, final) -> Path:
    """Put the complete directory ``tmp`` in place of ``final``.

    An existing ``final`` is renamed to ``final.old`` first and removed only once ``tmp`` is in
    place: a kill between the two renames leaves the complete ``.old`` copy (see
    :func:`find_complete_dir`). Returns ``final``."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_complete_dir(final, marker: str) -> Path | None:
    """``final`` if it holds ``marker`` (a file written last), else its ``.old`` twin left by an
    interrupted :func:`replace_dir` if that holds it, else None."""
    final = Path(final)
    for d in (final, final.with_name(final.name + ".old")):
        if (d / marker).is_file():
            return d
    return None


# --------------------------------------------------------------------------------------------
# mmunlearn safetensors files
# --------------------------------------------------------------------------------------------


def save_safetensors(path, tensors: Mapping, format_name: str, metadata: Mapping) -> Path:
    """Write ``tensors`` (CPU, contiguous) to ``path`` atomically with JSON-encoded
    ``metadata`` plus ``format_name``, ``format_version`` and ``mmunlearn_version``."""
    from safetensors.torch import save_file

    meta = {k: json.dumps(v) for k, v in metadata.items()}
    meta["format_name"] = json.dumps(format_name)
    meta["format_version"] = json.dumps(FORMAT_VERSION)
    meta["mmunlearn_version"] = json.dumps(__version__)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_safetensors(path, expected_format: str, device="cpu") -> tuple[dict, dict]:
    """``(tensors, decoded metadata)`` of a file written by :func:`save_safetensors` with
    ``format_name == expected_format``. Raises ``ValueError`` naming ``path`` for a missing
    file, a file safetensors cannot read, foreign or corrupt metadata, or a newer format."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if raw_meta.get("format_name") is None:
        raise ValueError(f"{path}: not an mmunlearn file (no 'format_name' in its metadata)")
    try:
        meta = {k: json.loads(v) for k, v in raw_meta.items()}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt mmunlearn metadata ({e})") from e
    if meta["format_name"] != expected_format:
        raise ValueError(f"{path}: a {meta['format_name']!r} file, expected {expected_format!r}")
    try:
        version = int(meta.get("format_version", -1))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt format_version {meta.get('format_version')!r}") from e
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {version} is newer than this mmunlearn ({FORMAT_VERSION})"
        )
    return tensors, meta


def check_pickle(path, allowed) -> None:
    """Refuse a pickle file that would import anything ``allowed(module, name)`` rejects,
    without running it: every global it references is checked by a restricted unpickler
    (objects of allowed classes are built and thrown away). For the one pickle we cannot avoid
    reading: DCP's ``.metadata``. Raises ValueError naming the file and the global."""
    import pickle

    class Checked(pickle.Unpickler):
        def find_class(self, module, name):
            if not allowed(module, name):
                raise ValueError(f"{path}: refers to {module}.{name}, not allowed in this file")
            return super().find_class(module, name)

    try:
        with open(path, "rb") as f:
            Checked(f).load()
    except ValueError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: not a readable metadata file ({type(e).__name__}: {e})") from e


__all__ = [
    "atomic_write",
    "check_pickle",
    "atomic_write_json",
    "atomic_write_text",
    "find_complete_dir",
    "read_safetensors",
    "replace_dir",
    "save_safetensors",
    "temp_dir_for",
]
