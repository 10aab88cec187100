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

For the benchmarks' own protocols: :func:`mllmu_rows` / :func:`mllmu_exemplars` give the rows of
MLLMU-Bench as its ``eval.py`` reads them (``--protocol mllmu``), and :func:`clear_protocol_sets`
the six tasks of CLEAR's ``config/mm/eval.yaml`` as likelihood items (``--protocol clear``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from mmunlearn.data.clear import (
    CAPTION_PROMPTS,
    read_clear,
    read_clear_name_mcq,
    read_clear_real,
)
from mmunlearn.data.mllmu import read_mllmu_eval
from mmunlearn.data.parquet import DataFormatError, decode_image, iter_rows, parse_json
from mmunlearn.data.schema import Sample

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


def _not_empty(tasks: dict, folder, what: str) -> None:
    """An unlearning report needs its forget items: a split whose files hold none is an error
    naming it (not a table without the forget columns)."""
    if not any(len(v) for v in tasks.values()):
        raise ValueError(
            f"{folder}: the {what} has no items (its files hold no rows); an unlearning report "
            "needs the forget set"
        )


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
    _not_empty(sets["forget"], forget_dir, "MLLMU-Bench forget split")
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
        if s and name == "forget":
            _not_empty(s, root / (faces if (root / faces).is_dir() else caps), "CLEAR forget split")
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


# ---------------------------------------------------------------------------------------------
# MLLMU-Bench rows, as its eval.py reads them
# ---------------------------------------------------------------------------------------------

_TASKS = ("Classification_Task", "Mask_Task", "Generation_Task")


def _task(rec: dict, f, row: int, col: str, expect: type):
    if rec.get(col) is None:
        return None
    value = parse_json(rec[col], f, row, col, expect)
    if col == "Classification_Task":  # struct options may hold nulls for absent keys
        for key in ("Image_Textual_Questions", "Pure_Text_Questions"):
            for q in value.get(key) or []:
                opts = q.get("Options")
                if isinstance(opts, str):
                    opts = parse_json(opts, f, row, col, dict)
                if isinstance(opts, dict):
                    q["Options"] = {k: v for k, v in opts.items() if v is not None}
    return value


def mllmu_rows(path, ids=None) -> list[dict]:
    """The rows of an MLLMU-Bench split (a folder of shards, read in sorted order, or a file)
    as ``eval.py`` reads them: ``{"ID", "image": PIL | None, "images": [PIL, ...],
    "Classification_Task": dict | None, "Mask_Task": list | None, "Generation_Task": list |
    None}`` (JSON or struct cells; an absent column gives ``None``), in file order. ``ids``:
    keep only the rows whose ``ID`` is in it (their images alone are decoded). Errors name the
    file, row and column (:class:`DataFormatError`)."""
    keep = None if ids is None else {str(i) for i in ids}
    out = []
    for f, row, rec in _read(
        lambda p: list(iter_rows(p, ["ID"], ["image", "images", *_TASKS])), path
    ):
        if keep is not None and str(rec["ID"]) not in keep:
            continue
        image = rec.get("image")
        imgs = rec.get("images") or []
        if image is None and not imgs:
            raise DataFormatError(f, row, "image", "null, and no 'images' either")
        out.append(
            {
                "ID": rec["ID"],
                "image": None if image is None else decode_image(image, f, row, "image"),
                "images": [decode_image(v, f, row, f"images[{i}]") for i, v in enumerate(imgs)],
                "Classification_Task": _task(rec, f, row, "Classification_Task", dict),
                "Mask_Task": _task(rec, f, row, "Mask_Task", list),
                "Generation_Task": _task(rec, f, row, "Generation_Task", list),
            }
        )
    return out


def mllmu_exemplars(full_set):
    """``exemplars(ids)``: the ``Full_Set`` rows (:func:`mllmu_rows`) whose ``ID`` is in
    ``ids``, in file order -- ``eval.py``'s ``few_shot_df[few_shot_df['ID'].isin(ids)]``. The
    folder is read once per call, images decoded for those rows only."""

    def exemplars(ids) -> list[dict]:
        return mllmu_rows(full_set, ids=ids) if ids else []

    return exemplars


def unique_ids(rows: list[dict]) -> list:
    """``df['ID'].unique().tolist()``: the IDs in first-seen order."""
    return list(dict.fromkeys(r["ID"] for r in rows))


# ---------------------------------------------------------------------------------------------
# CLEAR's own evaluation tasks (somvy/multimodal_unlearning config/mm/eval.yaml)
# ---------------------------------------------------------------------------------------------

FACES_QUESTION = "The name of the person on the image is "  # mm/dataset.py:120, trailing space
CLEAR_DS_SIZE = 300  # eval.yaml ds_size: the first 300 rows of every task


def _items(samples, answer_of, para_of, pert_of, question=None) -> list[Sample]:
    out = []
    for s in samples:
        meta = {
            **s.meta,
            "paraphrased": para_of(s),
            "perturbed": [str(x) for x in pert_of(s)],
        }
        q = s.question if question is None else question
        out.append(Sample(q, answer_of(s), s.image, s.entity, s.kind, meta))
    return out


def clear_protocol_sets(root, split: int = 10, seed: int = 0, limit: int | None = CLEAR_DS_SIZE):
    """CLEAR's six evaluation tasks (``config/mm/eval.yaml``) as likelihood items
    (``meta["paraphrased"]``, ``meta["perturbed"]``), first ``limit`` rows each (``ds_size``
    300; ``None`` = all):

    - ``real_faces``: ``real_faces``, question ``"The name of the person on the image is "``
      (``random_faces``), answer / paraphrase ``answer``, perturbed ``options``;
    - ``real_world``: ``real_world``, its ``question`` column, ``answer``, ``options``;
    - ``forget`` (``eval_log_forget``) / ``retain`` (``eval_log``): ``forgetRR_perturbed`` /
      ``retain_perturbed``, a caption prompt (seeded draw of the nine), ``caption``,
      ``paraphrased_caption``, ``perturbed_captions``;
    - ``forget_facerec`` / ``retain_facerec``: the same configs, the ``random_faces`` question,
      ``name``, ``name``, ``perturbed_names``.

    Raises ``FileNotFoundError`` naming ``forgetRR_perturbed`` when it is absent; other missing
    configs are skipped with a warning."""
    root = _dir(root, "CLEAR root")
    forget = root / f"forget{split:02d}_perturbed"
    if not forget.is_dir():
        raise FileNotFoundError(f"CLEAR root {root}: no {forget} (CLEAR's forget task)")
    sets: dict = {}
    for name in ("real_faces", "real_world"):
        if not (root / name).is_dir():
            log.warning("%s not found; task %r skipped", root / name, name)
            continue
        rows = _read(read_clear_real, root / name, seed=seed)
        sets[name] = _items(
            rows,
            lambda s: s.answer,
            lambda s: s.answer,
            lambda s: [v for k, v in s.meta["options"].items() if k != s.meta["correct"]],
            FACES_QUESTION if name == "real_faces" else None,
        )
    for prefix, folder in (("forget", forget), ("retain", root / "retain_perturbed")):
        if not folder.is_dir():
            log.warning("%s not found; tasks %r skipped", folder, prefix)
            continue
        caps = _read(read_clear, folder, "caption", seed=seed, include_text=False)
        for s in caps:
            for key in ("paraphrased_caption", "perturbed_captions"):
                if key not in s.meta:
                    raise DataFormatError(s.meta["source"], s.meta["row"], key, "missing")
        sets[prefix] = _items(
            caps,
            lambda s: s.answer,
            lambda s: s.meta["paraphrased_caption"],
            lambda s: s.meta["perturbed_captions"],
        )
        faces = _read(read_clear, folder, "recognition", seed=seed, include_text=False)
        sets[f"{prefix}_facerec"] = _items(
            faces,
            lambda s: s.answer,
            lambda s: s.answer,
            lambda s: s.meta.get("perturbed_names") or [],
            FACES_QUESTION,
        )
    return {n: _limit(v, limit) for n, v in sets.items()}


__all__ = [
    "CAPTION_PROMPTS",
    "CLEAR_DS_SIZE",
    "FACES_QUESTION",
    "clear_protocol_sets",
    "clear_sets",
    "mllmu_exemplars",
    "mllmu_rows",
    "mllmu_sets",
    "synthetic_eval_sets",
    "unique_ids",
]
