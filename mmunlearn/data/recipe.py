"""The four data sets of an MMUnlearner run (method.md §2–3), built in one place for every
benchmark (the synthetic one, MLLMU-Bench, CLEAR):

- ``forget``: multimodal VQA of the forget entities (ascended; the mask's forget Fisher);
- ``retain``: the retain training set (descended between forget steps);
- ``vision_preserve``: the vision group's preserve set (multimodal retain data);
- ``language_preserve``: the language group's preserve set (text-only QA of the forget
  entities, their knowledge to keep, plus multimodal retain data).

And the fine-tuning sets before unlearning (:func:`training_set`): the vanilla model's (every
person) and the reference model's (without the forget set).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmunlearn.data.schema import Sample


@dataclass
class UnlearningSets:
    """Sample lists of one run (see the module docstring)."""

    forget: list[Sample]
    retain: list[Sample]
    vision_preserve: list[Sample]
    language_preserve: list[Sample]

    def sizes(self) -> dict[str, int]:
        """Items per set, for logs and reports."""
        return {k: len(v) for k, v in vars(self).items()}


def synthetic_sets(bench) -> UnlearningSets:
    """The sets of the built-in synthetic benchmark (:class:`~mmunlearn.data.synthetic.
    SyntheticBenchmark`): forget = the forget people's picture questions; retain = the retain
    people's picture and by-name questions; vision preserve = the retain people's picture
    questions; language preserve = the forget people's by-name questions + the retain people's
    picture questions."""
    return UnlearningSets(
        forget=list(bench.forget_vqa),
        retain=list(bench.retain_vqa) + list(bench.retain_text),
        vision_preserve=list(bench.retain_vqa),
        language_preserve=list(bench.forget_text) + list(bench.retain_vqa),
    )


LANGUAGE_PRESERVE = ("forget_text", "all_text")
SPLITS = {"mllmu": (5, 10, 15), "clear": (1, 5, 10)}  # forget percentages each benchmark ships
_NAMES = {"mllmu": "MLLMU-Bench", "clear": "CLEAR"}


def _root(root, benchmark: str, split: int, language_preserve: str) -> Path:
    """The checked dataset root (split offered, language-preserve choice known, folder there)."""
    name = _NAMES[benchmark]
    if split not in SPLITS[benchmark]:
        ok = ", ".join(map(str, SPLITS[benchmark]))
        raise ValueError(f"{name} split must be one of {ok} (forget %), got {split}")
    if language_preserve not in LANGUAGE_PRESERVE:
        raise ValueError(f"language_preserve must be one of {LANGUAGE_PRESERVE}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{name} root {root}: no such folder")
    return root


def _checked(forget, retain, text, forget_dir, retain_dir, text_dir, what) -> UnlearningSets:
    for name, items, d in (("forget", forget, forget_dir), ("retain", retain, retain_dir)):
        if not items:
            raise ValueError(f"{d}: the {name} split has no {what}")
    if not text:
        raise ValueError(f"{text_dir}: no text items for the language-preserve set")
    return UnlearningSets(forget, retain, list(retain), text + retain)


def _split_dir(root: Path, name: str, what: str) -> Path:
    d = root / name
    if not d.is_dir():
        raise FileNotFoundError(f"{what} {root}: no split folder {d}")
    return d


def mllmu_sets(root, split: int = 5, *, language_preserve: str = "forget_text") -> UnlearningSets:
    """The four sets from an MLLMU-Bench root (method.md §5, docs/reference/official_recipe.md
    §4.1): forget = the training QA of ``forget_{split}`` with the profile image, retain = the
    same of ``retain_{100-split}``, vision preserve = retain. Language preserve = the pure-text
    MCQs as (question, correct option) pairs, plus retain: of the forget profiles
    (``"forget_text"``, ours: the forget entities' textual knowledge to keep) or of every
    profile of ``Full_Set`` (``"all_text"``, the official driver). Every file is read and every
    image decoded here, so bad data fails before a model is loaded (DataFormatError naming
    file, row and column)."""
    from mmunlearn.data.mllmu import read_mllmu_split, text_preserve_set

    root = _root(root, "mllmu", split, language_preserve)
    forget_dir = _split_dir(root, f"forget_{split}", "MLLMU-Bench root")
    retain_dir = _split_dir(root, f"retain_{100 - split}", "MLLMU-Bench root")
    text_dir = (
        _split_dir(root, "Full_Set", "MLLMU-Bench root")
        if language_preserve == "all_text"
        else forget_dir
    )
    forget = read_mllmu_split(forget_dir)
    retain = read_mllmu_split(retain_dir)
    text = text_preserve_set(text_dir)
    return _checked(forget, retain, text, forget_dir, retain_dir, text_dir, "training QA pairs")


def clear_sets(root, split: int = 5, *, language_preserve: str = "forget_text") -> UnlearningSets:
    """The four sets from a CLEAR root (docs/reference/official_recipe.md §4.2): forget = the
    caption items of ``forget{split:02d}`` (a seeded caption prompt → ``caption``), retain = the
    same of ``retain{100-split}``, vision preserve = retain. Language preserve = the TOFU text
    rows of ``full+tofu`` (``"all_text"``: every person, the official driver; ``"forget_text"``:
    the forget persons' rows when the rows name their person, else every row) plus retain."""
    from mmunlearn.data.clear import read_clear

    root = _root(root, "clear", split, language_preserve)
    forget_dir = _split_dir(root, f"forget{split:02d}", "CLEAR root")
    retain_dir = _split_dir(root, f"retain{100 - split:02d}", "CLEAR root")
    text_dir = _split_dir(root, "full+tofu", "CLEAR root")
    forget = read_clear(forget_dir, "caption", include_text=False)
    retain = read_clear(retain_dir, "caption", include_text=False)
    text = read_clear(text_dir, "text")
    if language_preserve == "forget_text":
        names = {s.entity for s in forget if s.entity}
        mine = [s for s in text if s.entity in names]
        text = mine or text
    return _checked(forget, retain, text, forget_dir, retain_dir, text_dir, "image rows")


TRAIN_SETS = ("vanilla", "reference")


def training_set(which: str, *, mllmu=None, clear=None, bench=None, split: int = 5
                 ) -> tuple[list[Sample], str]:  # fmt: skip
    """The fine-tuning set of a ``"vanilla"`` model (it knows every person) or of the
    ``"reference"`` (the vanilla set without the forget set of ``split``), from an MLLMU-Bench
    root, a CLEAR root or a synthetic benchmark ``bench``; returns ``(samples, where they came
    from)``.

    - MLLMU-Bench: vanilla = ``ft_Data`` when the root has it (the official fine-tune set), else
      ``forget_{split}`` + ``retain_{100-split}`` (every profile's training QA); reference =
      ``retain_{100-split}`` (as the official MLLMU reference).
    - CLEAR: vanilla = ``full+tofu``: a caption item per image row and the TOFU QA rows (once;
      the official fine-tune reads them twice); reference = the same without the
      forget persons' image rows (their TOFU text stays, as unlearning keeps it; the official
      CLEAR reference trains on the retain captions only).
    - synthetic: vanilla = ``bench.train``; reference = without the forget people's pictures
      (the demo's reference)."""
    if which not in TRAIN_SETS:
        raise ValueError(f"the training set must be one of {', '.join(TRAIN_SETS)}, got {which!r}")
    if bench is not None:
        gone = {id(s) for s in bench.forget_vqa}
        if which == "vanilla":
            return list(bench.train), "synthetic: every training item"
        return [s for s in bench.train if id(s) not in gone], "synthetic: without forget pictures"
    if mllmu is not None:
        return _mllmu_training_set(which, mllmu, split)
    from mmunlearn.data.clear import read_clear

    root = _root(clear, "clear", split, "forget_text")
    full = read_clear(_split_dir(root, "full+tofu", "CLEAR root"), "caption")
    if which == "vanilla":
        return full, "CLEAR full+tofu (captions + TOFU QA)"
    forget_dir = _split_dir(root, f"forget{split:02d}", "CLEAR root")
    names = {s.entity for s in read_clear(forget_dir, "caption", include_text=False)}
    if "" in names or not names:
        raise ValueError(f"{forget_dir}: forget rows without a name; cannot tell them apart")
    kept = [s for s in full if s.image is None or s.entity not in names]
    if len(kept) == len(full):
        raise ValueError(
            f"{root / 'full+tofu'}: no image row of the forget persons {sorted(names)}"
        )
    return kept, f"CLEAR full+tofu without the image rows of {forget_dir.name}"


def _mllmu_training_set(which: str, root, split: int) -> tuple[list[Sample], str]:
    from mmunlearn.data.mllmu import read_mllmu_split

    root = _root(root, "mllmu", split, "forget_text")
    retain_dir = _split_dir(root, f"retain_{100 - split}", "MLLMU-Bench root")
    if which == "reference":
        return read_mllmu_split(retain_dir), f"MLLMU-Bench {retain_dir.name}"
    if (root / "ft_Data").is_dir():
        return read_mllmu_split(root / "ft_Data"), "MLLMU-Bench ft_Data"
    forget_dir = _split_dir(root, f"forget_{split}", "MLLMU-Bench root")
    items = read_mllmu_split(forget_dir) + read_mllmu_split(retain_dir)
    return items, f"MLLMU-Bench {forget_dir.name} + {retain_dir.name}"


def benchmark_sets(
    *, mllmu=None, clear=None, split: int = 5, language_preserve: str = "forget_text"
) -> UnlearningSets:
    """One entry point for the files on disk: ``mllmu=ROOT`` or ``clear=ROOT``."""
    if (mllmu is None) == (clear is None):
        raise ValueError("give exactly one of mllmu=ROOT or clear=ROOT")
    if mllmu is not None:
        return mllmu_sets(mllmu, split, language_preserve=language_preserve)
    return clear_sets(clear, split, language_preserve=language_preserve)


__all__ = [
    "LANGUAGE_PRESERVE",
    "SPLITS",
    "TRAIN_SETS",
    "UnlearningSets",
    "benchmark_sets",
    "clear_sets",
    "mllmu_sets",
    "synthetic_sets",
    "training_set",
]
