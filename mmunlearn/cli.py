"""The ``mmunlearn`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_demo(args) -> int:
    if args.kernels:
        from mmunlearn import quickdemo

        res = quickdemo.run(device=args.device, seed=args.seed, gamma=args.gamma, steps=30)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")
        return 0
    from mmunlearn.demo import DemoConfig, run_demo

    cfg = DemoConfig(seed=args.seed, device=args.device, gamma=args.gamma)
    if args.fast:
        cfg = DemoConfig(
            seed=args.seed,
            device=args.device,
            gamma=args.gamma,
            n_people=6,
            forget_ratio=0.34,
            vanilla_steps=20,
            unlearn_steps=3,
            batch_size=8,
            hidden=32,
            vision_hidden=32,
        )
    run_demo(args.out, cfg)
    return 0


def _cmd_bench(args) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(here, "bench", "run.py")
    if not os.path.exists(script):
        print(
            "bench/run.py is not installed with the package; run it from a source checkout",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, os.path.dirname(script))
    import run as bench_run  # type: ignore

    return bench_run.main(args.rest)


def _cmd_estimate(args) -> int:
    from mmunlearn import estimate as est

    cfg = est._load_config(args.model)
    ests = est.estimate(
        cfg, args.world_size, args.dtype, args.batch, args.seq, args.method, args.grad_checkpointing
    )
    params, _ = est.count_parameters(cfg)
    print(est.format_report(ests, params, args.world_size))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmunlearn",
        description="Multimodal machine unlearning (MMUnlearner and baselines) with fused "
        "Triton kernels: saliency masks from Fisher importance, masked optimizer steps.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="the paper's comparison in miniature, offline: tiny LLaVA, synthetic people",
        description="Build the synthetic benchmark and a tiny LLaVA, fine-tune it into the "
        "vanilla model, compute the MMUnlearner saliency masks, run GA, GA_Diff, KL_Min, NPO "
        "and MMUnlearner with the same budget, evaluate all six, and write results.json, "
        "report.md, tradeoff.png, every model and the mask under --out (~75 s on 2 CPU cores).",
    )
    d.add_argument("--device", default="cpu", help="cpu or cuda (cuda uses the Triton kernels)")
    d.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    d.add_argument("--gamma", type=float, default=1.0, help="mask threshold γ (default 1.0)")
    d.add_argument(
        "--fast",
        action="store_true",
        help="a seconds-long smoke configuration (6 people, few steps): not a result",
    )
    d.add_argument(
        "--kernels",
        action="store_true",
        help="the 1-second kernel demo on an MLP instead (mask, masked ascent)",
    )
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.set_defaults(fn=_cmd_demo)

    e = sub.add_parser(
        "estimate",
        help="peak memory per rank for saliency and unlearning (no weights needed)",
        description="Estimate the peak bytes per rank of each phase from a model config, "
        "broken down into weights, grads, moments, Fisher, mask, reference model, activations.",
    )
    e.add_argument("--model", required=True, help="model directory or config.json")
    e.add_argument("--world-size", type=int, default=1, help="FSDP2 ranks (default 1)")
    e.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    e.add_argument("--batch", type=int, default=4, help="per-rank batch size (default 4)")
    e.add_argument("--seq", type=int, default=1024, help="sequence length (default 1024)")
    e.add_argument(
        "--method", default="mmunlearner", choices=["ga", "ga_diff", "kl_min", "npo", "mmunlearner"]
    )
    e.add_argument("--grad-checkpointing", action="store_true")
    e.set_defaults(fn=_cmd_estimate)

    b = sub.add_parser(
        "bench", help="kernel benchmark table (source checkout only; see bench/)", add_help=False
    )
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
