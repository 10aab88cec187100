"""``mmunlearn eval``'s lmms-eval options: ``--lmms-tasks TASK[,TASK...]`` and ``--lmms-include
DIR`` (docs/eval_protocols.md §7), checked before anything is read or loaded (lmms_eval
importable, the folders there, every name a task: UsageError naming the option otherwise), and
the runner :mod:`mmunlearn.cli.evaluate` calls on every evaluated model
(:func:`mmunlearn.eval.lmms.run_tasks`)."""

from __future__ import annotations

import functools
import os

from mmunlearn.cli.common import UsageError


def add_options(e) -> None:
    """``--lmms-tasks`` / ``--lmms-include``: lmms-eval tasks on every evaluated model."""
    g = e.add_argument_group("lmms-eval capability tasks (pip install 'mmunlearn[lmms]')")
    g.add_argument(
        "--lmms-tasks",
        action="append",
        default=[],
        metavar="TASK[,TASK...]",
        help="also run these lmms-eval tasks (or groups) on every evaluated model; results under "
        "'lmms' in results.json and a table in report.md (--limit, --batch-size, --seed apply)",
    )
    g.add_argument(
        "--lmms-include",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of lmms-eval task YAMLs (lmms-eval's --include_path), e.g. a task on a "
        "local parquet file; repeatable",
    )


def names_of(args) -> list[str]:
    """``--lmms-tasks`` as a list of names (comma-separated and repeatable), in order, once."""
    names: list[str] = []
    for value in args.lmms_tasks or []:
        for n in str(value).split(","):
            if n.strip() and n.strip() not in names:
                names.append(n.strip())
    return names


def check(args):
    """``(task manager, names)`` of ``--lmms-tasks`` checked before anything is read or
    loaded: lmms_eval importable, every include folder there, every name a task (UsageError
    naming the option otherwise); ``(None, [])`` without the option."""
    names = names_of(args)
    if not names:
        if args.lmms_include:
            raise UsageError("--lmms-include without --lmms-tasks: name the tasks to run")
        if args.lmms_tasks:
            raise UsageError(f"--lmms-tasks {','.join(args.lmms_tasks)!r}: no task name given")
        return None, []
    for d in args.lmms_include:
        if not os.path.isdir(d):
            raise UsageError(f"--lmms-include {d}: no such folder")
    from mmunlearn.eval import lmms

    try:
        return lmms.check_tasks(names, args.lmms_include), names
    except lmms.LmmsUnavailable as e:
        raise UsageError(
            f"--lmms-tasks needs the lmms_eval package ({e.__cause__ or e}): {lmms.INSTALL}"
        ) from e
    except lmms.UnknownTask as e:
        raise UsageError(f"--lmms-tasks {e}") from e


def runner(args, manager, names):
    """``run(model, adapter)`` → the lmms-eval tasks' results on that model."""
    from mmunlearn.eval.lmms import run_tasks

    return functools.partial(
        run_tasks,
        tasks=names,
        include=args.lmms_include,
        manager=manager,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens or 256,
        seed=args.seed,
    )


def record(args, names, methods: dict) -> dict:
    """``results["lmms"]``: the run's lmms-eval settings and every model's results."""
    from mmunlearn.eval.lmms import record as settings

    return {**settings(names, args.lmms_include, args.limit, args.seed), "methods": methods}


def print_table(results: dict) -> None:
    """The lmms-eval table of ``results`` on stdout (nothing when no task ran)."""
    if results.get("lmms"):
        from mmunlearn.eval.lmms import lmms_table

        print("\nlmms-eval tasks:\n" + lmms_table(results))


__all__ = ["add_options", "check", "names_of", "print_table", "record", "runner"]
