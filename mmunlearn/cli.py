"""The ``mmunlearn`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_demo(args) -> int:
    from mmunlearn import quickdemo

    res = quickdemo.run(
        device=args.device, seed=args.seed, gamma=args.gamma, steps=args.steps, lr=args.lr
    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")
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
        help="run the built-in demo offline (CPU or GPU) and write runs/demo/results.json",
        description="Kernel demo on a small real network: Fisher of a forget class and of the "
        "retained classes, the MMUnlearner saliency mask, masked gradient ascent interleaved "
        "with retain descent, accuracy before/after and the untouched-weights check.",
    )
    d.add_argument("--device", default="cpu", help="cpu or cuda (cuda uses the Triton kernels)")
    d.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    d.add_argument("--gamma", type=float, default=1.0, help="mask threshold γ (default 1.0)")
    d.add_argument("--steps", type=int, default=30, help="forget/retain step pairs (default 30)")
    d.add_argument("--lr", type=float, default=3e-3, help="unlearning learning rate")
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
