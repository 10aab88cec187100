"""Evaluation sets of each benchmark, assembled from its files (or built in).

Sets, each ``{"mcq": [...], "cloze": [...], "gen": [...]}`` for :func:`mmunlearn.eval.evaluate`
(CLEAR: ``{"faces", "captions", "mcq"}`` for :func:`mmunlearn.eval.evaluate_clear`):

- synthetic: ``forget``, ``forget_test``, ``forget_link``, ``retain``, ``retain_test``,
  ``retain_link`` (:meth:`SyntheticBenchmark.eval_sets`);
- MLLMU-Bench (``split`` R): ``forget`` = ``forget_R``, ``forget_test`` = ``Test_Set`` rows of
  the forget profiles (by ``ID``), ``retain`` = ``retain_{100-R}``, ``retain_celebrity`` =
  ``Retain_Set`` (a missing split other than ``forget_R`` is skipped with a warning);
- CLEAR (``split`` R, e.g. 5 → ``forget05``): ``forget`` / ``retain`` = name MCQ of
  ``forgetRR_perturbed`` / ``retain_perturbed`` (face recognition) + captions of ``forgetRR`` /
  ``retain{100-R}``; ``real_faces``, ``real_world`` MCQs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mmunlearn.data.clear import read_clear, read_clear_name_mcq, read_clear_real
from mmunlearn.data.mllmu import read_mllmu_eval
from mmunlearn.data.parquet import DataFormatError

log = logging.getLogger(__name__)


def _dir(path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} {path}: no such directory")
    return p


def _read(fn, path, *args, **kw):
    """``fn(path, ...)``; an unreadable file (not parquet, truncated, ...) becomes a
    :class:`DataFormatError` naming ``path``; one that already names file, row and column
    passes through."""
    try:
        return fn(path, *args, **kw)
    except DataFormatError:
        raise
    except (ValueError, OSError) as e:
        raise DataFormatError(path, None, "*", f"cannot read it ({type(e).__name__}: {e})") from e


def _limit(items, n):
    return list(items) if n is None else list(items)[:n]


def mllmu_sets(root, split: int = 5, seed: int = 0, limit: int | None = None) -> dict:
    """Evaluation sets of an MLLMU-Bench root (see the module docstring); raises
    ``FileNotFoundError`` naming the folder when ``forget_{split}`` is absent."""
    root = _dir(root, "MLLMU-Bench root")
    forget_dir = root / f"forget_{split}"
    if not forget_dir.is_dir():
        raise FileNotFoundError(f"MLLMU-Bench root {root}: no forget split folder {forget_dir}")
    kw = {"image_choice": "random", "seed": seed}
    sets = {"forget": _read(read_mllmu_eval, forget_dir, **kw)}
    forget_ids = {s.meta.get("id") for v in sets["forget"].values() for s in v} - {None}
    for name, folder in (
        ("forget_test", "Test_Set"),
        ("retain", f"retain_{100 - split}"),
        ("retain_celebrity", "Retain_Set"),
    ):
        if not (root / folder).is_dir():
            log.warning("%s not found; set %r skipped", root / folder, name)
            continue
        s = _read(read_mllmu_eval, root / folder, **kw)
        if name == "forget_test" and forget_ids:
            s = {k: [x for x in v if x.meta.get("id") in forget_ids] for k, v in s.items()}
        sets[name] = s
    return {n: {k: _limit(v, limit) for k, v in s.items()} for n, s in sets.items()}


def clear_sets(root, split: int = 5, seed: int = 0, limit: int | None = None) -> dict:
    """Evaluation sets of a CLEAR root for :func:`mmunlearn.eval.evaluate_clear` (see the
    module docstring); raises ``FileNotFoundError`` naming the folder when neither
    ``forgetRR`` nor ``forgetRR_perturbed`` exists."""
    root = _dir(root, "CLEAR root")
    f, r = f"forget{split:02d}", f"retain{100 - split:02d}"
    if not (root / f).is_dir() and not (root / f"{f}_perturbed").is_dir():
        raise FileNotFoundError(
            f"CLEAR root {root}: neither {root / f} nor {root / (f + '_perturbed')}"
        )
    sets: dict = {}
    for name, caps, faces in (("forget", f, f"{f}_perturbed"), ("retain", r, "retain_perturbed")):
        s = {}
        if (root / faces).is_dir():
            s["faces"] = _read(read_clear_name_mcq, root / faces, seed=seed)
        if (root / caps).is_dir():
            s["captions"] = _read(read_clear, root / caps, "caption", seed=seed, include_text=False)
        if s:
            sets[name] = s
        else:
            log.warning("neither %s nor %s found; set %r skipped", root / caps, root / faces, name)
    for name in ("real_faces", "real_world"):
        if (root / name).is_dir():
            sets[name] = {"mcq": _read(read_clear_real, root / name, seed=seed)}
    return {n: {k: _limit(v, limit) for k, v in s.items()} for n, s in sets.items()}


def synthetic_eval_sets(bench, limit: int | None = None) -> dict:
    """The synthetic benchmark's evaluation sets (at most ``limit`` items per task)."""
    return {n: {k: _limit(v, limit) for k, v in s.items()} for n, s in bench.eval_sets().items()}


__all__ = ["clear_sets", "mllmu_sets", "synthetic_eval_sets"]
