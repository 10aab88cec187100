"""``mmunlearn demo``: the paper's comparison in miniature, offline (mmunlearn.demo)."""

from __future__ import annotations

from mmunlearn.cli.common import (
    UsageError,
    add_device,
    add_fast,
    add_mask_rule,
    add_seed,
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
)


def register(sub):
    d = sub.add_parser(
        "demo",
        help="the paper's comparison in miniature, offline: tiny LLaVA, synthetic people",
        description="Build the synthetic benchmark and a tiny LLaVA, fine-tune it into the "
        "vanilla model, compute the MMUnlearner saliency masks, run GA, GA_Diff, KL_Min, NPO "
        "and MMUnlearner with the same budget, train the reference (the same recipe without "
        "the forget people's pictures), evaluate all seven, and write results.json, report.md, "
        "tradeoff.png, every model and the mask under --out (about 4 minutes on 2 CPU cores). "
        "Under torchrun every model is FSDP2-sharded and rank 0 evaluates and writes.",
    )
    add_device(d, "cpu or cuda (cuda uses the Triton kernels)")
    add_seed(d)
    add_mask_rule(d)
    d.add_argument(
        "--threads",
        type=int,
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
    add_fast(d, " (6 people, few steps)")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.set_defaults(fn=run)
    return d


def run(args) -> int:
    from mmunlearn.demo import DemoConfig, run_demo

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
    if args.fast:
        kw.update(FAST)
    run_demo(args.out, DemoConfig(**kw))
    return 0
