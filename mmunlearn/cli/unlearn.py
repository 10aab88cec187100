"""``mmunlearn saliency`` (the MMUnlearner masks) and ``mmunlearn unlearn`` (one method)."""

from __future__ import annotations

import copy
import os

from mmunlearn.cli.common import (
    UsageError,
    add_device,
    add_mask_rule,
    add_seed,
    add_torchrun,
    device,
    mixed_precision,
    say,
    start_distributed,
)
from mmunlearn.methods import METHODS


def register(sub):
    parsers = []
    for name, fn, helptext in (
        ("saliency", run_saliency, "compute the Fisher saliency masks and write them"),
        ("unlearn", run_unlearn, "run one unlearning method and write the model (+ mask)"),
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
        add_mask_rule(c)
        add_seed(c)
        add_device(c)
        add_torchrun(c)
        c.add_argument("--out", default=f"runs/{name}", help=f"output dir (default runs/{name})")
        if name == "unlearn":
            c.add_argument("--method", default="mmunlearner", choices=list(METHODS))
            c.add_argument("--mask", help="a mask file from `mmunlearn saliency` (else computed)")
            c.add_argument("--mask-group", default="both", choices=["vision", "language", "both"])
            c.add_argument("--steps", type=int, default=50, help="forget steps (default 50)")
            c.add_argument("--lr", type=float, default=1e-3)
            c.add_argument("--checkpoint-every", type=int, default=0)
            c.add_argument("--resume", action="store_true", help="continue from --out/run")
        c.set_defaults(fn=fn)
        parsers.append(c)
    return parsers


def _prepare(args, distributed: bool = False):
    """Model, tokenizer, adapter, synthetic benchmark and device for saliency / unlearn, plus
    an unsharded copy of the starting model when the method needs a reference (KL_Min, NPO).
    Under torchrun the model (and the reference) are FSDP2-sharded per block."""
    from mmunlearn import fsdp
    from mmunlearn.data.synthetic import make_benchmark
    from mmunlearn.demo import DemoConfig, build_tiny
    from mmunlearn.distributed import is_rank0
    from mmunlearn.methods import Method
    from mmunlearn.models import adapter_for, load_model
    from mmunlearn.train import finetune

    if not args.synthetic:
        raise UsageError("only --synthetic data is wired to the CLI so far; see mmunlearn.data")
    bench = make_benchmark(n_people=args.people, seed=args.seed)
    dev = device(args, distributed)
    if args.tiny:
        model, tok, adapter = build_tiny(bench, DemoConfig(seed=args.seed), dev)
        if args.vanilla_steps:
            finetune(
                model,
                adapter,
                bench.train,
                args.vanilla_steps,
                1e-3,
                16,
                args.seed,
                dev,
                progress=is_rank0(),
            )
    elif args.model:
        try:
            model, tok = load_model(args.model, device=dev)
        except (OSError, ValueError) as e:
            raise UsageError(f"--model {args.model}: cannot load it ({e})") from e
        adapter = adapter_for(model, tok)
    else:
        raise UsageError("give --model DIR (a saved model) or --tiny")
    method = getattr(args, "method", None)
    ref = None
    if method and Method(method).needs_reference:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    if distributed:
        fsdp.broadcast_from_rank0(model)  # every rank starts from rank 0's weights
        mp = mixed_precision(args, dev, distributed)
        blocks = adapter.block_classes()
        fsdp.shard_model(model, blocks, mixed_precision=mp)
        if ref is not None:
            fsdp.broadcast_from_rank0(ref)
            fsdp.shard_model(ref, blocks, mixed_precision=mp)
    return model, tok, adapter, bench, dev, ref


def _masks(args, model, adapter, bench, dev):
    import random

    from mmunlearn.data.batching import make_batches, to_device
    from mmunlearn.data.recipe import synthetic_sets
    from mmunlearn.distributed import is_rank0
    from mmunlearn.masks import build_masks

    rng = random.Random(args.seed)
    data = synthetic_sets(bench)
    b = lambda xs: to_device(make_batches(adapter, xs, 16, rng), dev)  # noqa: E731
    return build_masks(
        model,
        b(data.forget),
        b(data.vision_preserve),
        b(data.language_preserve),
        gamma=args.gamma,
        fraction=args.fraction,
        progress=is_rank0(),
    )


def run_saliency(args) -> int:
    from mmunlearn.distributed import is_rank0

    distributed = start_distributed(args)
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


def run_unlearn(args) -> int:
    import random

    from mmunlearn import fsdp
    from mmunlearn.data.batching import make_batches, to_device
    from mmunlearn.data.recipe import synthetic_sets
    from mmunlearn.distributed import is_rank0
    from mmunlearn.loop import UnlearnConfig, unlearn
    from mmunlearn.models import save_model
    from mmunlearn.saliency import SaliencyMask

    distributed = start_distributed(args)
    model, tok, adapter, bench, dev, ref = _prepare(args, distributed)
    kw = {}
    if ref is not None:
        kw["ref_model"] = ref
    if args.method == "mmunlearner":
        if args.mask:
            try:
                mask = SaliencyMask.load(args.mask, model=model)
            except ValueError as e:
                raise UsageError(f"--mask: {e}") from e
        else:
            mask = _masks(args, model, adapter, bench, dev)[args.mask_group]
        if is_rank0():
            os.makedirs(args.out, exist_ok=True)
            mask.save(os.path.join(args.out, "mask.safetensors"))
        kw["masks"] = mask.for_model(model)
    rng = random.Random(args.seed)
    data = synthetic_sets(bench)
    forget = to_device(make_batches(adapter, data.forget, 16, rng, args.steps), dev)
    retain = to_device(make_batches(adapter, data.retain, 16, rng, args.steps), dev)
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
        say(f"wrote {path}")
    return 0
