"""``mmunlearn demo``: the paper's comparison in miniature, offline (mmunlearn.demo)."""

from __future__ import annotations

from mmunlearn.cli.common import (
    UsageError,
    add_device,
    add_fast,
    add_mask_rule,
    add_seed,
    at_least,
    device,
    mixed_precision,
    start_distributed,
)

# the --fast smoke configuration: seconds, not a result
FAST = dict(
    n_people=6,
    forget_ratio=0.34,
    vanilla_steps=20,
    unlearn_steps=3,
    batch_size=8,
    hidden=32,
    vision_hidden=32,
    # the linked world's smoke run: gates reported, not enforced
    stage_steps={"text": 10, "identity": 10, "grounding": 10},
    max_unlearn_steps=3,
    enforce_gates=False,
)


def register(sub):
    d = sub.add_parser(
        "demo",
        help="the paper's comparison in miniature, offline: tiny LLaVA, synthetic people",
        description="The linked world (default): build fictitious people whose pictures name "
        "them and some of whose facts are taught by name only, train a tiny LLaVA in stages "
        "into the vanilla model and the reference (the same recipe without the forget "
        "people's pictures), check the gates (failing them: 'not testable', stop), compute the "
        "MMUnlearner masks, run GA, GA_Diff, KL_Min, NPO and MMUnlearner each until it has "
        "forgotten as much as the reference (matched forgetting), and compare them there: gap "
        "to the reference with a bootstrap interval, the forget people's facts by name, the "
        "retain people. --world basic: the earlier comparison at a fixed budget (which also "
        "runs under torchrun, every model FSDP2-sharded). Writes results.json, report.md, "
        "tradeoff.png, every model and the mask under --out (a few minutes on 2 CPU cores).",
    )
    add_device(d, "cpu or cuda (cuda uses the Triton kernels)")
    add_seed(d)
    add_mask_rule(d)
    d.add_argument(
        "--threads",
        type=at_least(0),
        default=None,
        help="torch CPU threads (default 2 in one process: the table depends on the thread "
        "count; under torchrun OMP_NUM_THREADS, so its table can differ from the "
        "1-process one beyond rounding; 0 = torch's default)",
    )
    d.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the reference model (the recipe trained without the forget pictures)",
    )
    d.add_argument(
        "--mixed-precision",
        choices=["auto", "bf16", "none"],
        default="auto",
        help="under torchrun: FSDP2 bf16 parameters / fp32 reduce (auto: bf16 on CUDA)",
    )
    d.add_argument(
        "--fsdp",
        action="store_true",
        help="require torchrun (FSDP2 is used whenever WORLD_SIZE > 1)",
    )
    d.add_argument(
        "--world",
        choices=["linked", "basic"],
        default=None,
        help="linked (the default) or basic (the default under torchrun, where the linked "
        "world cannot run, and with --fast, where its gates cannot pass)",
    )
    d.add_argument(
        "--methods",
        default=None,
        metavar="A,B|all",
        help="the methods compared, comma-separated, or all (every method mmunlearn has: the "
        "paper's five, then RMU, UNDIAL, MANU, SMFA, MIP-Editor); default: the paper's five, "
        "ga,ga_diff,kl_min,npo,mmunlearner. The newer methods run in one process only",
    )
    d.add_argument(
        "--state-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="the unlearning optimizer's moments: fp32, or bf16 with stochastic rounding",
    )
    add_fast(
        d,
        " (6 people, few steps; the basic world unless --world linked, whose gates are then "
        "reported, not enforced)",
    )
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.set_defaults(fn=run)
    return d


def _methods(text: str, distributed: bool) -> list[str]:
    """``--methods`` checked: known names (or ``all``), at least one, none twice; the edits
    that need whole weights (MANU, SMFA, MIP-Editor) not under torchrun."""
    from mmunlearn.methods import METHODS

    names = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    if names == ["all"]:
        names = list(METHODS)
    if not names:
        raise UsageError(f"--methods {text!r}: give at least one method, or all")
    for m in names:
        if m not in METHODS:
            raise UsageError(f"--methods {text}: unknown method {m!r} (known: "
                             f"{', '.join(METHODS)}, or all)")  # fmt: skip
    if len(set(names)) != len(names):
        raise UsageError(f"--methods {text}: a method is named twice")
    whole = [m for m in names if m in ("manu", "smfa", "mip_editor")]
    if distributed and whole:
        raise UsageError(f"--methods: {', '.join(whole)} edit whole weights and run in one "
                         "process, not under torchrun")  # fmt: skip
    return names


def run(args) -> int:
    from mmunlearn.demo import run_demo
    from mmunlearn.demo_linked import run_linked_demo
    from mmunlearn.tinyrun import TinyRunConfig

    if args.fraction is not None and not 0.0 < args.fraction <= 1.0:
        raise UsageError(f"--fraction {args.fraction}: must be in (0, 1]")
    distributed = start_distributed(args)
    dev = device(args, distributed)
    kw = dict(
        seed=args.seed,
        device=str(dev),
        gamma=args.gamma,
        fraction=args.fraction,
        reference=not args.no_reference,
        mixed_precision=mixed_precision(args, dev, distributed),
    )
    if args.threads is not None:
        kw["threads"] = args.threads or None
    elif distributed:
        kw["threads"] = None  # torchrun's OMP_NUM_THREADS (1 per rank unless set)
    if args.state_dtype != "fp32":
        from dataclasses import replace

        kw["unlearn"] = replace(TinyRunConfig().unlearn, state_dtype=args.state_dtype)
    if args.methods is not None:
        kw["methods"] = _methods(args.methods, distributed)
    if args.fast:
        kw.update(FAST)
    # --fast is a plumbing smoke run: the linked world cannot pass its gates in seconds, so
    # it defaults to the basic world (as under torchrun); --world linked --fast still runs
    world = args.world or ("basic" if distributed or args.fast else "linked")
    if world == "linked" and distributed:
        raise UsageError("--world linked runs in one process; use --world basic under torchrun")
    if world == "linked" and args.no_reference:
        raise UsageError("--no-reference: the linked world's matched forgetting needs it")
    (run_linked_demo if world == "linked" else run_demo)(args.out, TinyRunConfig(**kw))
    return 0
