"""The ``mmunlearn`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_demo(args) -> int:
    if args.kernels:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.fsdp:
            raise SystemExit(
                "demo --kernels runs in one process; drop torchrun/--fsdp or --kernels"
            )
        from mmunlearn import quickdemo

        res = quickdemo.run(device=args.device, seed=args.seed, gamma=args.gamma)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")
        return 0
    from mmunlearn.demo import DemoConfig, run_demo

    distributed = _distributed(args)
    dev = _device(args, distributed)
    mp = args.mixed_precision
    if mp == "auto":
        mp = "bf16" if (distributed and dev.type == "cuda") else "none"
    elif mp == "bf16" and not distributed:
        _say("--mixed-precision bf16 applies to FSDP2 (torchrun) only; this run is fp32")
        mp = "none"
    kw = dict(
        seed=args.seed,
        device=str(dev),
        gamma=args.gamma,
        fraction=args.fraction,
        reference=not args.no_reference,
        mixed_precision=mp,
    )
    if args.threads is not None:
        kw["threads"] = args.threads or None
    elif distributed:
        kw["threads"] = None  # torchrun's OMP_NUM_THREADS (1 per rank unless set)
    if args.fast:
        kw.update(
            n_people=6,
            forget_ratio=0.34,
            vanilla_steps=20,
            unlearn_steps=3,
            batch_size=8,
            hidden=32,
            vision_hidden=32,
        )
    run_demo(args.out, DemoConfig(**kw))
    return 0


def _say(*a) -> None:
    """Print on rank 0 only (under torchrun every rank runs the command)."""
    from mmunlearn.dist import is_rank0

    if is_rank0():
        print(*a, flush=True)


def _distributed(args) -> bool:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1): FSDP2 then."""
    from mmunlearn import dist as mdist

    # NCCL only for CUDA tensors: a CPU run on a GPU host still needs gloo
    cuda = str(getattr(args, "device", "cpu")).startswith("cuda")
    on = mdist.init_from_env(None if cuda else "gloo")
    if args.fsdp and not on:
        raise SystemExit("--fsdp: launch with torchrun --nproc-per-node N (WORLD_SIZE is 1)")
    return on


def _device(args, distributed: bool):
    import torch

    if distributed and str(args.device).startswith("cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(args.device)


def _prepare(args, distributed: bool = False):
    """Model, tokenizer, adapter, synthetic benchmark and device for saliency / unlearn, plus
    an unsharded copy of the starting model when the method needs a reference (KL_Min, NPO).
    Under torchrun the model (and the reference) are FSDP2-sharded per block."""
    import copy

    from mmunlearn import fsdp
    from mmunlearn.data.synthetic import make_benchmark
    from mmunlearn.demo import DemoConfig, build_tiny, finetune
    from mmunlearn.methods import Method
    from mmunlearn.models import adapter_for, load_model

    if not args.synthetic:
        raise SystemExit("only --synthetic data is wired to the CLI so far; see mmunlearn.data")
    bench = make_benchmark(n_people=args.people, seed=args.seed)
    dev = _device(args, distributed)
    if args.tiny:
        model, tok, adapter = build_tiny(bench, DemoConfig(seed=args.seed), dev)
        if args.vanilla_steps:
            progress = not distributed or int(os.environ.get("RANK", "0")) == 0
            finetune(
                model,
                adapter,
                bench.train,
                args.vanilla_steps,
                1e-3,
                16,
                args.seed,
                dev,
                progress=progress,
            )
    elif args.model:
        try:
            model, tok = load_model(args.model, device=dev)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--model {args.model}: cannot load it ({e})") from e
        adapter = adapter_for(model, tok)
    else:
        raise SystemExit("give --model DIR (a saved model) or --tiny")
    method = getattr(args, "method", None)
    ref = None
    if method and Method(method).needs_reference:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    if distributed:
        fsdp.broadcast_from_rank0(model)  # every rank starts from rank 0's weights
        mp = args.mixed_precision
        if mp == "auto":
            mp = "bf16" if dev.type == "cuda" else "none"
        blocks = adapter.block_classes()
        fsdp.shard_model(model, blocks, mixed_precision=mp)
        if ref is not None:
            fsdp.broadcast_from_rank0(ref)
            fsdp.shard_model(ref, blocks, mixed_precision=mp)
    return model, tok, adapter, bench, dev, ref


def _masks(args, model, adapter, bench, dev):
    import random

    from mmunlearn.demo import make_batches, to_device
    from mmunlearn.dist import is_rank0
    from mmunlearn.saliency import build_masks

    rng = random.Random(args.seed)
    b = lambda xs: to_device(make_batches(adapter, xs, 16, rng), dev)  # noqa: E731
    return build_masks(
        model,
        b(bench.forget_vqa),
        b(bench.retain_vqa),
        b(bench.forget_text + bench.retain_vqa),
        gamma=args.gamma,
        fraction=args.fraction,
        progress=is_rank0(),
    )


def _cmd_saliency(args) -> int:
    from mmunlearn.dist import is_rank0

    distributed = _distributed(args)
    model, tok, adapter, bench, dev, _ = _prepare(args, distributed)
    masks = _masks(args, model, adapter, bench, dev)
    if is_rank0():
        os.makedirs(args.out, exist_ok=True)
        for k, m in masks.items():
            m.save(os.path.join(args.out, f"mask_{k}.safetensors"))
            cov = m.coverage()["total"]
            print(
                f"{k}: {cov['selected']:,}/{cov['total']:,} selected "
                f"({100 * cov['fraction']:.1f} %)"
            )
        print(f"wrote {args.out}/mask_{{vision,language,both}}.safetensors")
    return 0


def _cmd_unlearn(args) -> int:
    import random

    from mmunlearn import fsdp
    from mmunlearn.demo import make_batches, to_device
    from mmunlearn.dist import is_rank0
    from mmunlearn.loop import UnlearnConfig, unlearn
    from mmunlearn.models import save_model
    from mmunlearn.saliency import SaliencyMask

    distributed = _distributed(args)
    model, tok, adapter, bench, dev, ref = _prepare(args, distributed)
    kw = {}
    if ref is not None:
        kw["ref_model"] = ref
    if args.method == "mmunlearner":
        if args.mask:
            try:
                mask = SaliencyMask.load(args.mask, model=model)
            except ValueError as e:
                raise SystemExit(f"--mask: {e}") from e
        else:
            mask = _masks(args, model, adapter, bench, dev)[args.mask_group]
        if is_rank0():
            os.makedirs(args.out, exist_ok=True)
            mask.save(os.path.join(args.out, "mask.safetensors"))
        kw["masks"] = mask.for_model(model)
    rng = random.Random(args.seed)
    forget = to_device(make_batches(adapter, bench.forget_vqa, 16, rng, args.steps), dev)
    retain = to_device(
        make_batches(adapter, bench.retain_vqa + bench.retain_text, 16, rng, args.steps), dev
    )
    cfg = UnlearnConfig(
        lr=args.lr,
        weight_decay=0.0,
        max_grad_norm=1.0,
        forget_freq=1,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        progress=is_rank0(),
    )
    unlearn(
        model,
        args.method,
        forget,
        retain,
        config=cfg,
        output_dir=os.path.join(args.out, "run"),
        resume=args.resume,
        **kw,
    )
    # a world-size-independent model directory: full tensors gathered one at a time to rank 0
    state = fsdp.full_state_dict(model) if distributed else None
    if is_rank0():
        path = save_model(model, tok, os.path.join(args.out, "model"), state_dict=state)
        print(f"wrote {path}")
    return 0


def _load_config_file(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) if path.endswith((".yaml", ".yml")) else json.load(f)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise SystemExit(f"--config {path}: cannot read it ({e})") from e
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


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
        cfg,
        args.world_size,
        args.dtype,
        args.batch,
        args.seq,
        args.method,
        args.grad_checkpointing,
        attn=args.attn,
        images_per_sample=args.images,
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
        "and MMUnlearner with the same budget, train the reference (the same recipe without "
        "the forget people's pictures), evaluate all seven, and write results.json, report.md, "
        "tradeoff.png, every model and the mask under --out (about 2 minutes on 2 CPU cores). "
        "Under torchrun every model is FSDP2-sharded and rank 0 evaluates and writes.",
    )
    d.add_argument("--device", default="cpu", help="cpu or cuda (cuda uses the Triton kernels)")
    d.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    d.add_argument("--gamma", type=float, default=1.0, help="mask threshold γ (default 1.0)")
    d.add_argument(
        "--fraction",
        type=float,
        default=None,
        help="exact top-k mask: this fraction of each group's weights instead of γ",
    )
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

    for name, fn, helptext in (
        ("saliency", _cmd_saliency, "compute the Fisher saliency masks and write them"),
        ("unlearn", _cmd_unlearn, "run one unlearning method and write the model (+ mask)"),
    ):
        c = sub.add_parser(
            name,
            help=helptext,
            description=helptext + ". Values in --config "
            "(YAML or JSON) are defaults; flags given on the command line win.",
        )
        c.add_argument("--config", help="YAML/JSON file of option: value defaults")
        c.add_argument("--tiny", action="store_true", help="a tiny LLaVA built from a config")
        c.add_argument("--model", help="a saved model directory (save_pretrained layout)")
        c.add_argument("--synthetic", action="store_true", help="the built-in benchmark")
        c.add_argument("--people", type=int, default=40, help="synthetic people (default 40)")
        c.add_argument(
            "--vanilla-steps",
            type=int,
            default=300,
            help="--tiny: fine-tune steps before unlearning (default 300)",
        )
        c.add_argument("--gamma", type=float, default=1.0, help="mask threshold γ")
        c.add_argument(
            "--fraction",
            type=float,
            default=None,
            help="exact top-k fraction instead of γ (e.g. 0.05)",
        )
        c.add_argument("--seed", type=int, default=0)
        c.add_argument(
            "--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)"
        )
        c.add_argument(
            "--fsdp",
            action="store_true",
            help="require a torchrun launch (FSDP2 is used whenever WORLD_SIZE > 1)",
        )
        c.add_argument(
            "--mixed-precision",
            default="auto",
            choices=["auto", "bf16", "none"],
            help="FSDP2 policy: bf16 parameters, fp32 gradient reduction (auto: bf16 on CUDA)",
        )
        c.add_argument("--out", default=f"runs/{name}", help=f"output dir (default runs/{name})")
        if name == "unlearn":
            c.add_argument(
                "--method",
                default="mmunlearner",
                choices=["ga", "ga_diff", "kl_min", "npo", "mmunlearner"],
            )
            c.add_argument("--mask", help="a mask file from `mmunlearn saliency` (else computed)")
            c.add_argument("--mask-group", default="both", choices=["vision", "language", "both"])
            c.add_argument("--steps", type=int, default=50, help="forget steps (default 50)")
            c.add_argument("--lr", type=float, default=1e-3)
            c.add_argument("--checkpoint-every", type=int, default=0)
            c.add_argument("--resume", action="store_true", help="continue from --out/run")
        c.set_defaults(fn=fn)

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
    e.add_argument(
        "--attn",
        default=None,
        choices=["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"],
        help="attention implementation (default: the config's, else sdpa); eager stores the "
        "s² softmax",
    )
    e.add_argument("--images", type=int, default=1, help="images per sequence (multimodal configs)")
    e.set_defaults(fn=_cmd_estimate)

    from mmunlearn.evalcli import add_eval_parser
    from mmunlearn.sweep import add_sweep_parser

    add_eval_parser(sub)
    add_sweep_parser(sub)

    b = sub.add_parser(
        "bench", help="kernel benchmark table (source checkout only; see bench/)", add_help=False
    )
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_cmd_bench)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        # file values become defaults of that subcommand; explicit flags still win
        sub = parser._subparsers._group_actions[0].choices[args.cmd]
        sub.set_defaults(**_load_config_file(args.config))
        args = parser.parse_args(argv)
    rc = args.fn(args)
    from mmunlearn.dist import finish

    if finish() and argv is None:
        # under torchrun, as a program: leave without interpreter teardown, where gloo's
        # threads can abort the process ("terminate called without an active exception")
        # after all work is done and written
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc or 0)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
