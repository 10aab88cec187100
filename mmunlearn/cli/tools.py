"""``mmunlearn estimate``: peak memory per rank, no weights needed. (The kernel benchmarks are
``bench/`` of a source checkout, run as ``python bench/run.py`` or ``make bench``; the package
never imports them.)"""

from __future__ import annotations

import os

from mmunlearn.cli.common import at_least, positive
from mmunlearn.methods import METHODS


def register(sub):
    e = sub.add_parser(
        "estimate",
        help="peak memory per rank for saliency and unlearning (no weights needed)",
        description="Estimate the peak bytes per rank of each phase from a model config, "
        "broken down into weights, grads, moments, Fisher, mask, reference model, activations.",
    )
    e.add_argument(
        "--config",
        help="the run's YAML/JSON config (a file or a built-in name, e.g. mllmu/llava-1.5-7b): "
        "model, batch size, dtype, method, "
        "gradient checkpointing are read from it",
    )
    e.add_argument(
        "--model",
        help="checkpoint folder, config.json, a cached Hub id, or a built-in 7B config "
        "(models/llava-1.5-7b-hf, models/qwen2-vl-7b-instruct)",
    )
    e.add_argument("--world-size", type=at_least(1), default=1, help="FSDP2 ranks (default 1)")
    e.add_argument("--dtype", default="bf16", choices=["auto", "bf16", "fp16", "fp32"])
    e.add_argument(
        "--batch-size",
        "--batch",
        type=at_least(1),
        default=4,
        help="per-rank batch size (default 4)",
    )
    e.add_argument("--seq", type=at_least(1), default=1024, help="sequence length (default 1024)")
    e.add_argument("--method", default="mmunlearner", choices=list(METHODS))
    e.add_argument("--gradient-checkpointing", "--grad-checkpointing", action="store_true")
    e.add_argument(
        "--fisher-offload",
        action="store_true",
        help="the saliency pass keeps finished Fishers on the CPU (saliency --fisher-offload)",
    )
    e.add_argument(
        "--state-dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="AdamW moments' dtype (unlearn --state-dtype; bf16: half the optimizer memory)",
    )
    e.add_argument(
        "--compact-state",
        type=float,
        default=None,
        metavar="FRACTION",
        help="moments only for this selected fraction (MaskedAdamW(compact_state=True))",
    )
    e.add_argument(
        "--grad-release",
        action="store_true",
        help="unlearning steps inside backward, one gradient alive at a time (unlearn "
        "--grad-release; one rank)",
    )
    e.add_argument(
        "--gpu-memory",
        type=positive,
        default=None,
        metavar="GIB",
        help="say whether each phase fits in this much memory per GPU (e.g. 80 for an H100)",
    )
    e.add_argument(
        "--attn",
        default=None,
        choices=["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"],
        help="attention implementation (default: the config's, else sdpa); eager stores the "
        "s² softmax",
    )
    e.add_argument(
        "--images", type=at_least(0), default=1, help="images per sequence (multimodal configs)"
    )
    e.set_defaults(fn=run_estimate)
    return e


def run_estimate(args) -> int:
    from mmunlearn import estimate as est
    from mmunlearn.cli.common import UsageError, config_path

    if not args.model:
        raise UsageError("give --model (a checkpoint folder, config.json or cached Hub id)")
    if args.compact_state is not None and not 0.0 < args.compact_state <= 1.0:
        raise UsageError(f"--compact-state {args.compact_state}: a fraction in (0, 1]")
    if args.grad_release and args.world_size > 1:
        raise UsageError("--grad-release runs on one rank: drop it or use --world-size 1")
    model = args.model
    if not os.path.exists(model) and model.removeprefix("configs/").startswith("models/"):
        model = config_path(model, "--model", (".json",))  # a built-in 7B config by name
    cfg = est.load_config(model)
    dtype = "bf16" if args.dtype == "auto" else args.dtype
    ests = est.estimate(
        cfg,
        args.world_size,
        dtype,
        args.batch_size,
        args.seq,
        args.method,
        args.gradient_checkpointing,
        attn=args.attn,
        images_per_sample=args.images,
        fisher_offload=args.fisher_offload,
        state_dtype=args.state_dtype,
        compact_fraction=args.compact_state,
        grad_release=args.grad_release,
    )
    params, _ = est.count_parameters(cfg)
    print(est.format_report(ests, params, args.world_size))
    if args.gpu_memory is not None:
        gib = 1024**3
        hints = [] if args.gradient_checkpointing else ["--gradient-checkpointing"]
        if not args.fisher_offload and args.world_size == 1:
            hints.append("--fisher-offload (saliency)")
        if args.state_dtype == "fp32":
            hints.append("--state-dtype bf16 (unlearning)")
        if not args.grad_release and args.world_size == 1:
            hints.append("--grad-release (unlearning)")
        hints += ["a smaller --batch-size", "more ranks under torchrun (--world-size)"]
        for e in ests:
            ok = e.total <= args.gpu_memory * gib
            line = f"{e.phase}: {e.total / gib:.1f} GiB per rank "
            line += f"fits in {args.gpu_memory:g} GiB" if ok else (
                f"does NOT fit in {args.gpu_memory:g} GiB; try " + ", ".join(hints)
            )  # fmt: skip
            print(line)
    return 0
