"""The data options of ``saliency``, ``unlearn`` and ``eval``: one of the benchmarks
(``--mllmu DIR``, ``--clear DIR``, ``--synthetic``) or the user's own files (``--forget FILE``
with ``--retain FILE``, ``--preserve-text FILE``; ``eval``: ``--forget-test FILE``;
docs/data.md), and how untrusted images are read (``--max-image-pixels``, ``--data-root``).

Combinations are checked before anything is read (UsageError, exit 2, naming the flags); the
files are read, and every image decoded, before a model is loaded (a bad row: DataFormatError,
exit 1, naming file, row and column).
"""

from __future__ import annotations

from pathlib import Path

from mmunlearn.cli.common import UsageError, check_out
from mmunlearn.data.parquet import MAX_IMAGE_PIXELS

# own-data flags per command: dest → help
OWN = {
    "forget": "the forget set: a JSON Lines file, a parquet file / folder or a save_to_disk "
    "folder (docs/data.md); instead of a benchmark",
    "retain": "the retain set (same format); needed for saliency and every method with retain "
    "steps (all but ga and npo)",
    "preserve_text": "text-only rows: the forget concepts' knowledge to keep (the language "
    "mask's preserve set, with --retain)",
    "forget_test": "the forget concepts in new pictures / wordings (non-members of the MIA)",
}
COMMAND_OWN = {
    "saliency": ("forget", "retain", "preserve_text"),
    "unlearn": ("forget", "retain", "preserve_text"),
    "eval": ("forget", "retain", "forget_test"),
    "finetune": ("forget", "retain", "preserve_text"),
    "compare": ("forget", "retain", "preserve_text", "forget_test"),
}


def _pixels(text: str) -> int | None:
    n = int(text)
    if n < 0:
        raise ValueError(f"{text} is negative")
    return n or None


_pixels.__name__ = "pixel count"


def add_own_data(group, command: str) -> None:
    """``--forget``, ``--retain``, ... of ``command`` and the image options, in ``group``."""
    for dest in COMMAND_OWN[command]:
        flag = "--" + dest.replace("_", "-")
        group.add_argument(flag, dest=dest, metavar="FILE", help=OWN[dest])
    group.add_argument(
        "--data-root",
        metavar="DIR",
        help="refuse image paths of data files that resolve (symlinks, ..) outside DIR",
    )
    group.add_argument(
        "--max-image-pixels",
        type=_pixels,
        default=MAX_IMAGE_PIXELS,
        metavar="N",
        help="refuse larger images (decompression bombs); 0: no limit (default "
        f"{MAX_IMAGE_PIXELS:,}, PIL's)",
    )


def add_data_options(c, command: str) -> None:
    """The data options of ``saliency`` / ``unlearn``."""
    d = c.add_argument_group("data (a benchmark, or your own files)")
    d.add_argument("--mllmu", metavar="DIR", help="MLLMU-Bench root (forget_5/, ...)")
    d.add_argument("--clear", metavar="DIR", help="CLEAR root (forget05/, full+tofu/, ...)")
    d.add_argument("--synthetic", action="store_true", help="the built-in benchmark")
    d.add_argument("--split", type=int, default=5, help="forget %%: MLLMU 5|10|15, CLEAR 1|5|10")
    d.add_argument("--people", type=int, default=40, help="synthetic people (default 40)")
    add_own_data(d, command)


def own_files(args) -> dict[str, str]:
    """``{set: path}`` of the own-data flags given."""
    names = COMMAND_OWN.get(args.cmd, ())
    return {k: getattr(args, k) for k in names if getattr(args, k, None)}


def check_own(args, needs_retain: bool) -> dict[str, str]:
    """The own files given, checked: ``--forget`` with them, no benchmark beside them,
    ``--retain`` when ``needs_retain``, every path there. UsageError otherwise."""
    files = own_files(args)
    if not files:
        return files
    flags = {k: "--" + k.replace("_", "-") for k in files}
    if "forget" not in files:
        raise UsageError(f"{', '.join(flags.values())} without --forget FILE (the forget set)")
    bench = [f"--{k}" for k in ("mllmu", "clear") if getattr(args, k, None)]
    bench += ["--synthetic"] if getattr(args, "synthetic", False) else []
    if bench:
        raise UsageError(
            f"{bench[0]} and --forget: give a benchmark or your own files (--forget, --retain), "
            "not both"
        )
    if needs_retain and "retain" not in files:
        raise UsageError(f"--forget without --retain FILE: {needs_retain} needs retain data")
    for k, path in files.items():
        if not Path(path).exists():
            raise UsageError(f"{flags[k]} {path}: no such file or folder")
    if args.data_root and not Path(args.data_root).is_dir():
        raise UsageError(f"--data-root {args.data_root}: no such folder")
    return files


def own_record(args) -> dict[str, str]:
    """What a run's records (unlearn.json, the model card, results.json) say about own files:
    each one's path and content hash."""
    from mmunlearn.data.custom import file_fingerprint

    out = {}
    for k, path in own_files(args).items():
        name = k.replace("_", " ")
        out[f"{name} file"] = str(path)
        out[f"{name} file sha256"] = file_fingerprint(path)
    return out


def image_policy(args):
    """The context in which data files are read: ``--max-image-pixels``, ``--data-root``."""
    from mmunlearn.data.parquet import image_policy as policy

    return policy(args.max_image_pixels, args.data_root)


def choose_source(args, needs_retain) -> str:
    """The one data source of a command (``"mllmu"``, ``"clear"``, ``"synthetic"`` or
    ``"custom"``) checked with the model options beside it: exactly one source, --model or
    --tiny (the tiny model only with --synthetic), a split the benchmark has, enough synthetic
    people, an ``--out`` that can be a folder. ``needs_retain``: why own files need --retain
    (None: they do not). UsageError otherwise."""
    if check_own(args, needs_retain):
        given = ["custom"]
    else:
        given = [k for k in ("mllmu", "clear") if getattr(args, k)]
        given += ["synthetic"] if args.synthetic else []
    if len(given) != 1:
        raise UsageError(
            "give exactly one of --mllmu DIR, --clear DIR or --synthetic, or your own "
            "--forget FILE --retain FILE"
        )
    if bool(args.tiny) == bool(args.model):
        raise UsageError("give --model DIR (a checkpoint) or --tiny (the built-in tiny model)")
    if args.tiny and not args.synthetic:
        raise UsageError("--tiny knows only the --synthetic benchmark's words; use --model")
    from mmunlearn.data.recipe import SPLITS

    splits = SPLITS.get(given[0])
    if splits and args.split not in splits:
        ok = "|".join(map(str, splits))
        raise UsageError(f"--split {args.split}: --{given[0]} has forget splits {ok} (percent)")
    if args.synthetic and args.people < 2:
        raise UsageError(f"--people {args.people}: the synthetic benchmark needs at least 2")
    check_out(args.out)
    return given[0]


def data_source(args) -> str:
    """``saliency`` / ``unlearn``: :func:`choose_source`, and the mask-rule options."""
    from mmunlearn.methods import Method

    method = getattr(args, "method", None)
    needs = "saliency" if args.cmd == "saliency" else None
    if method and Method(method).has_retain:
        needs = f"--method {method}"
    if args.fraction is not None and not 0.0 < args.fraction <= 1.0:
        raise UsageError(f"--fraction {args.fraction}: must be in (0, 1]")
    if not args.gamma > 0 or args.gamma != args.gamma or args.gamma == float("inf"):
        raise UsageError(f"--gamma {args.gamma}: must be a positive finite number")
    return choose_source(args, needs)


def read_sets(args, source: str, cfg):
    """``(UnlearningSets, synthetic benchmark or None)`` of ``source``: every file read and
    every image decoded now, under :func:`image_policy`."""
    from mmunlearn.data.recipe import benchmark_sets, synthetic_sets
    from mmunlearn.data.synthetic import make_benchmark

    if source == "synthetic":
        bench = make_benchmark(n_people=args.people, seed=cfg.seed)
        return synthetic_sets(bench), bench
    try:
        with image_policy(args):
            if source == "custom":
                from mmunlearn.data.custom import custom_sets

                return custom_sets(args.forget, args.retain, args.preserve_text), None
            return benchmark_sets(
                mllmu=args.mllmu,
                clear=args.clear,
                split=args.split,
                language_preserve=cfg.language_preserve,
            ), None
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e


__all__ = [
    "COMMAND_OWN",
    "add_data_options",
    "add_own_data",
    "check_own",
    "data_source",
    "image_policy",
    "own_files",
    "own_record",
    "read_sets",
]
