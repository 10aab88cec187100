"""``mmunlearn compare --world linked``: the demo's comparison (the linked world, every method to
matched forgetting, its table) kept one folder per method and resumable —
:func:`mmunlearn.demo_linked.run_linked_demo` with ``resume`` under the run lock. Its options
are registered on ``compare``'s parser (:func:`world_options`); every option that does not apply
must keep its default."""

from __future__ import annotations

import os

from mmunlearn.cli.common import Parser, UsageError, add_fast, check_out

# options that apply with --world linked (every other one must keep its default)
LINKED_OPTIONS = {"world", "methods", "seed", "gamma", "fraction", "state_dtype", "device", "out",
                  "no_progress", "config", "threads", "fast", "fn", "cmd", "debug"}  # fmt: skip


LINKED_ONLY = {"world", "threads", "fast"}  # not in a model-and-data compare's identity


def world_options(c) -> None:
    w = c.add_argument_group(
        "the demo's world (--world linked: the options that apply are --methods, --seed, "
        "--gamma / --fraction, --state-dtype, --device, --threads, --fast, --no-progress, --out)"
    )
    w.add_argument(
        "--world",
        choices=["linked"],
        default=None,
        help="linked: `mmunlearn demo`'s comparison instead of a model and data set — its tiny "
        "LLaVA trained in stages on the linked world, every method run to matched forgetting, "
        "its table — kept one folder per method and resumable (--methods defaults to the "
        "demo's five; all: every method)",
    )
    w.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="--world linked: torch CPU threads (default 2, as the demo: the table depends on it)",
    )
    add_fast(w, " of --world linked (6 people, few steps; gates reported, not enforced)")


def run_linked(args, parser: Parser) -> int:
    """``--world linked`` (``parser``: a fresh ``compare`` parser, for the defaults and flag names):
    the demo's comparison (:func:`mmunlearn.demo_linked.run_linked_demo`
    with ``resume``) under the run lock; only :data:`LINKED_OPTIONS` may differ from their
    defaults."""
    from dataclasses import replace

    from mmunlearn.cli.demo import FAST, _methods
    from mmunlearn.demo_linked import ResumeMismatch, run_linked_demo
    from mmunlearn.runctl import RunLock
    from mmunlearn.tinyrun import TinyRunConfig

    default = vars(parser.parse_args([]))
    given = sorted(k for k, v in vars(args).items()
                   if k not in LINKED_OPTIONS and k in default and v != default[k])  # fmt: skip
    if given:
        flags = ", ".join(parser.options[k].option_strings[-1] for k in given)
        raise UsageError(f"--world linked: {flags} do not apply (the linked world trains its own "
                         "tiny model with the demo's recipe and runs every method to matched "
                         "forgetting; see docs/compare.md)")  # fmt: skip
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--world linked runs in one process")
    if args.fraction is not None and not 0.0 < args.fraction <= 1.0:
        raise UsageError(f"--fraction {args.fraction}: must be in (0, 1]")
    if args.threads is not None and args.threads < 0:
        raise UsageError(f"--threads {args.threads}: must be ≥ 0")
    check_out(args.out)
    kw = dict(seed=args.seed or 0, device=args.device, gamma=args.gamma, fraction=args.fraction,
              progress=not args.no_progress)  # fmt: skip
    if args.methods is not None:
        kw["methods"] = _methods(args.methods, False)
    if args.threads is not None:
        kw["threads"] = args.threads or None
    if args.state_dtype not in (None, "fp32"):
        kw["unlearn"] = replace(TinyRunConfig().unlearn, state_dtype=args.state_dtype)
    if args.fast:
        kw.update(FAST)
    with RunLock(args.out):
        try:
            run_linked_demo(args.out, TinyRunConfig(**kw), resume=True)
        except ResumeMismatch as e:
            raise UsageError(str(e)) from e
    return 0


__all__ = ["LINKED_ONLY", "LINKED_OPTIONS", "run_linked", "world_options"]
