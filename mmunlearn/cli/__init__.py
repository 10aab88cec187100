"""The ``mmunlearn`` command line: one parser, every subcommand registered the same way
(``register(subparsers)`` in its module), errors as one line.

Exit codes: 0 success; 2 a usage error (a bad flag, config key or value, input path: the
message names it); 1 a runtime failure (corrupt data, a non-finite loss, a failed write, an
output folder held by another live run); 75 preempted (SIGTERM / SIGUSR1 / SIGINT: the current
step finished and a checkpoint was written; rerun the same command with ``--resume``).
``--debug`` shows the traceback instead of the one line.
"""

from __future__ import annotations

import os
import sys

from mmunlearn.cli import attack, common, compare, demo, evaluate, finetune, tools, unlearn
from mmunlearn.cli.common import Parser, UsageError


def _build() -> tuple[Parser, dict[str, Parser]]:
    p = Parser(
        prog="mmunlearn",
        description="Multimodal machine unlearning (MMUnlearner and baselines) with fused "
        "Triton kernels: saliency masks from Fisher importance, masked optimizer steps.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    commands: dict[str, Parser] = {}
    for module in (demo, finetune, unlearn, compare, evaluate, attack, tools):
        made = module.register(sub)
        for c in made if isinstance(made, list) else [made]:
            commands[c.prog.split()[-1]] = c
    return p, commands


def build_parser() -> Parser:
    """The ``mmunlearn`` argument parser."""
    return _build()[0]


def _run(argv) -> int:
    parser, commands = _build()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        # file values become defaults of that subcommand; explicit flags still win
        sub = commands[args.cmd]
        siblings = tuple(p for name, p in commands.items() if name != args.cmd)
        sub.set_defaults(**common.load_config(args.config, sub, siblings))
        args = parser.parse_args(argv)
    return args.fn(args)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def main(argv=None) -> int:
    """Run ``mmunlearn`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    from mmunlearn.data.parquet import DataFormatError
    from mmunlearn.distributed import finish
    from mmunlearn.loop import NonFiniteLossError
    from mmunlearn.runctl import PreemptedError

    raw = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in raw
    cmd = next((a for a in raw if not a.startswith("-")), "")
    prefix = f"mmunlearn {cmd}".rstrip()
    try:
        rc = _run(raw)
    except SystemExit as e:  # argparse: --help (0) or a one-line usage error (2), already printed
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except PreemptedError as e:
        print(f"{prefix}: {_one_line(e)}", file=sys.stderr)
        rc = e.exit_code
    except UsageError as e:
        if debug:
            raise
        print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
        rc = 2
    except (DataFormatError, NonFiniteLossError, ValueError, OSError, RuntimeError) as e:
        if debug:
            raise
        print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        rc = 130
    if finish() and argv is None:
        # under torchrun, as a program: leave without interpreter teardown, where gloo's
        # threads can abort the process ("terminate called without an active exception")
        # after all work is done and written
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc or 0)
    return rc


__all__ = ["UsageError", "build_parser", "main"]
