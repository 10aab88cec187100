"""``mmunlearn saliency`` (the MMUnlearner masks) and ``mmunlearn unlearn`` (one method), on a
real checkpoint and MLLMU-Bench / CLEAR files, or on the built-in tiny model and benchmark.

Order of work: options are checked, then every data file is read (a bad file, row or column
fails here, before any model is loaded), then the model and its processor, then the run.
"""

from __future__ import annotations

import copy
import os

from mmunlearn.cli.common import (
    UsageError,
    add_device,
    add_mask_rule,
    add_seed,
    add_torchrun,
    check_out,
    device,
    mixed_precision,
    say,
    start_distributed,
)
from mmunlearn.methods import METHODS
from mmunlearn.presets import RECIPES

EPILOG = """examples:
  mmunlearn saliency --model llava-hf/llava-1.5-7b-hf --mllmu data/MLLMU-Bench --split 5 \\
      --out runs/sal
  mmunlearn unlearn --config configs/mllmu/llava-1.5-7b.yaml --mask runs/sal/mask_both.safetensors
  mmunlearn unlearn --model ckpt/qwen2-vl --clear data/CLEAR --split 5 --recipe official \\
      --method npo --reference-model ckpt/qwen2-vl-retain
  mmunlearn unlearn --tiny --synthetic --method mmunlearner --lr 1e-3 --out runs/u"""


def _positive(kind):
    def conv(text: str):
        v = kind(text)
        if not v > 0 or v != v or v == float("inf"):
            raise ValueError(f"{text} is not a positive finite number")
        return v

    conv.__name__ = f"positive {kind.__name__}"
    return conv


def register(sub):
    parsers = []
    for name, fn, helptext in (
        ("saliency", run_saliency, "compute the Fisher saliency masks and write them"),
        ("unlearn", run_unlearn, "run one unlearning method and write the model (+ mask)"),
    ):
        c = sub.add_parser(
            name,
            help=helptext,
            description=__import__("textwrap").fill(
                helptext + ". Values in --config (YAML or JSON, keys = option names) are "
                "defaults; flags given on the command line win; an unknown key is an error. "
                "Every data file is read before the model is loaded.",
                width=88,
            ),
            epilog=EPILOG,
            formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
        )
        c.add_argument("--config", help="YAML/JSON file of option: value defaults")
        m = c.add_argument_group("model (one of)")
        m.add_argument("--model", help="checkpoint folder, or a Hub id in the local HF cache")
        m.add_argument("--tiny", action="store_true", help="the built-in tiny LLaVA")
        m.add_argument(
            "--processor",
            help="folder / cached Hub id with the processor, tokenizer and chat template, for "
            "checkpoints that ship without them",
        )
        m.add_argument(
            "--dtype",
            default="auto",
            choices=["auto", "bf16", "fp16", "fp32"],
            help="weights' dtype (auto: bf16 on CUDA, fp32 on the CPU)",
        )
        m.add_argument(
            "--gradient-checkpointing",
            action="store_true",
            help="recompute activations in backward (less memory, ≈30 %% more time)",
        )
        m.add_argument(
            "--vanilla-steps",
            type=int,
            default=300,
            help="--tiny: fine-tune steps before unlearning (default 300)",
        )
        d = c.add_argument_group("data (one of)")
        d.add_argument("--mllmu", metavar="DIR", help="MLLMU-Bench root (forget_5/, ...)")
        d.add_argument("--clear", metavar="DIR", help="CLEAR root (forget05/, full+tofu/, ...)")
        d.add_argument("--synthetic", action="store_true", help="the built-in benchmark")
        d.add_argument(
            "--split", type=int, default=5, help="forget %%: MLLMU 5|10|15, CLEAR 1|5|10"
        )
        d.add_argument("--people", type=int, default=40, help="synthetic people (default 40)")
        r = c.add_argument_group("recipe")
        r.add_argument(
            "--recipe",
            default="mmunlearn",
            choices=list(RECIPES),
            help="ours (default) or the official code's semantics (docs/recipes.md)",
        )
        add_mask_rule(r)
        r.add_argument("--fisher-batch-size", type=int, default=None, help="recipe's if unset")
        r.add_argument(
            "--fisher-offload",
            action="store_true",
            help="keep finished Fishers on the CPU (one fp32 set on the GPU; one process only)",
        )
        r.add_argument(
            "--save-fisher", action="store_true", help="also write the Fishers to --out/fisher"
        )
        r.add_argument(
            "--loss-tokens",
            choices=["answer", "all", "all_with_image"],
            default=None,
            help="tokens that carry loss (recipe's if unset)",
        )
        add_seed(c)
        add_device(c)
        add_torchrun(c)
        c.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
        c.add_argument(
            "--backend",
            default="auto",
            choices=["auto", "torch", "triton", "cpu"],
            help="kernel backend (auto: Triton on CUDA, the C kernels on the CPU; torch: the "
            "PyTorch twins, e.g. to reproduce a table made before the CPU kernels)",
        )
        c.add_argument("--out", default=f"runs/{name}", help=f"output dir (default runs/{name})")
        if name == "unlearn":
            _unlearn_options(c)
        c.set_defaults(fn=fn)
        parsers.append(c)
    return parsers


def _unlearn_options(c) -> None:
    u = c.add_argument_group("unlearning")
    u.add_argument(
        "--method", default="mmunlearner", choices=list(METHODS), help="default mmunlearner"
    )
    u.add_argument("--mask", help="a mask file from `mmunlearn saliency` (else computed)")
    u.add_argument("--mask-group", default="both", choices=["vision", "language", "both"])
    u.add_argument("--reference-model", help="KL_Min / NPO reference (default: the start model)")
    u.add_argument("--lr", type=_positive(float), default=None, help="recipe's if unset (1e-5)")
    u.add_argument("--batch-size", type=_positive(int), default=None, help="recipe's (4)")
    u.add_argument("--grad-accum", type=_positive(int), default=1, help="batches per step")
    u.add_argument("--epochs", type=_positive(int), default=None, help="recipe's (1)")
    u.add_argument("--forget-freq", type=_positive(int), default=None, help="default retain/forget")
    u.add_argument("--alpha", type=_positive(float), default=None, help="ascent weight (1.0)")
    u.add_argument("--weight-decay", type=float, default=None, help="recipe's (0)")
    u.add_argument(
        "--max-grad-norm", type=_positive(float), default=None, help="clip (recipe's: 1.0)"
    )
    u.add_argument("--steps", type=_positive(int), default=None, help="stop after N steps")
    u.add_argument("--checkpoint-every", type=int, default=0, help="steps (0: at the end)")
    u.add_argument("--resume", action="store_true", help="continue from --out/run")
    w = c.add_argument_group("watching the run")
    w.add_argument("--log-every", type=_positive(int), default=1, help="steps (log.jsonl)")
    w.add_argument("--report-to", choices=["none", "tensorboard"], default="none")
    w.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="steps between evaluations of a held-out forget/retain sample; the best "
        "checkpoint (largest forget CE − retain CE) is kept in --out/best",
    )
    w.add_argument("--eval-items", type=_positive(int), default=16, help="held out per set")


# ------------------------------------------------------------------------------------------------
# assembly
# ------------------------------------------------------------------------------------------------


def _benchmark(args) -> str:
    given = [k for k in ("mllmu", "clear") if getattr(args, k)] + (
        ["synthetic"] if args.synthetic else []
    )
    if len(given) != 1:
        raise UsageError("give exactly one of --mllmu DIR, --clear DIR or --synthetic")
    if bool(args.tiny) == bool(args.model):
        raise UsageError("give --model DIR (a checkpoint) or --tiny (the built-in tiny model)")
    if args.tiny and not args.synthetic:
        raise UsageError("--tiny knows only the --synthetic benchmark's words; use --model")
    if args.fraction is not None and not 0.0 < args.fraction <= 1.0:
        raise UsageError(f"--fraction {args.fraction}: must be in (0, 1]")
    if not args.gamma > 0 or args.gamma != args.gamma or args.gamma == float("inf"):
        raise UsageError(f"--gamma {args.gamma}: must be a positive finite number")
    from mmunlearn.data.recipe import SPLITS

    splits = SPLITS.get(given[0])
    if splits and args.split not in splits:
        ok = "|".join(map(str, splits))
        raise UsageError(f"--split {args.split}: --{given[0]} has forget splits {ok} (percent)")
    if args.synthetic and args.people < 2:
        raise UsageError(f"--people {args.people}: the synthetic benchmark needs at least 2")
    for flag, v in (("--workers", args.workers), ("--fisher-batch-size", args.fisher_batch_size)):
        if v is not None and v < (1 if flag != "--workers" else 0):
            raise UsageError(f"{flag} {v}: must be {'≥ 0' if flag == '--workers' else '≥ 1'}")
    for flag in ("checkpoint_every", "eval_every"):
        if getattr(args, flag, 0) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be ≥ 0")
    check_out(args.out)
    return given[0]


def _recipe(args, benchmark: str):
    from mmunlearn import presets

    method = getattr(args, "method", "mmunlearner")
    return presets.resolve(
        args.recipe,
        method,
        benchmark,
        lr=getattr(args, "lr", None),
        batch_size=getattr(args, "batch_size", None),
        epochs=getattr(args, "epochs", None),
        alpha=getattr(args, "alpha", None),
        weight_decay=getattr(args, "weight_decay", None),
        max_grad_norm=getattr(args, "max_grad_norm", None),
        loss_tokens=args.loss_tokens,
        fisher_batch_size=args.fisher_batch_size,
    )


def _data(args, benchmark: str, recipe):
    from mmunlearn.data.recipe import benchmark_sets, synthetic_sets
    from mmunlearn.data.synthetic import make_benchmark

    if benchmark == "synthetic":
        bench = make_benchmark(n_people=args.people, seed=args.seed)
        return synthetic_sets(bench), bench
    try:
        return benchmark_sets(
            mllmu=args.mllmu,
            clear=args.clear,
            split=args.split,
            language_preserve=recipe.language_preserve,
        ), None
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e


def _dtype(args, dev):
    import torch

    if args.dtype == "auto":
        return torch.bfloat16 if dev.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]


def _prepare(args, distributed: bool = False):
    """(recipe, data sets, model, adapter, device, reference model) of a run. Under torchrun
    the model (and the reference) are FSDP2-sharded per block."""
    from mmunlearn import fsdp
    from mmunlearn.distributed import is_rank0
    from mmunlearn.methods import Method
    from mmunlearn.models import load_checkpoint
    from mmunlearn.train import finetune

    benchmark = _benchmark(args)
    recipe = _recipe(args, benchmark)
    data, bench = _data(args, benchmark, recipe)  # every file read before any model
    dev = device(args, distributed)
    dtype = _dtype(args, dev)
    if args.tiny:
        from mmunlearn.demo import DemoConfig, build_tiny

        model, _tok, adapter = build_tiny(bench, DemoConfig(seed=args.seed), dev)
        if args.vanilla_steps:
            finetune(
                model, adapter, bench.train, args.vanilla_steps, 1e-3, 16, args.seed, dev,
                progress=is_rank0(),
            )  # fmt: skip
        if dtype is not None:
            model.to(dtype)
    else:
        try:
            model, adapter = load_checkpoint(
                args.model, processor=args.processor, dtype=dtype, device=dev
            )
        except FileNotFoundError as e:
            raise UsageError(str(e)) from e
    if args.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    method = getattr(args, "method", None)
    ref = None
    if method and Method(method).needs_reference:
        if getattr(args, "reference_model", None):
            ref, _ = load_checkpoint(args.reference_model, processor=args.processor, dtype=dtype)
            ref.to(dev)
        else:
            if args.recipe == "official" and method == "npo":
                say("note: the official NPO reference is a retain-only fine-tune of the base "
                    "model; without --reference-model the start model is used")  # fmt: skip
            ref = copy.deepcopy(model)
        ref.eval().requires_grad_(False)
    if distributed:
        fsdp.broadcast_from_rank0(model)  # every rank starts from rank 0's weights
        mp = mixed_precision(args, dev, distributed)
        blocks = adapter.block_classes()
        fsdp.shard_model(model, blocks, mixed_precision=mp)
        if ref is not None:
            fsdp.broadcast_from_rank0(ref)
            fsdp.shard_model(ref, blocks, mixed_precision=mp)
    return recipe, data, model, adapter, dev, ref


def _masks(args, recipe, model, adapter, data):
    from mmunlearn.data.batching import BatchSource
    from mmunlearn.distributed import is_rank0, is_sharded
    from mmunlearn.masks import build_masks

    kw = {"loss_tokens": recipe.fisher_loss_tokens}
    bs = recipe.fisher_batch_size

    def src(items, k):
        return BatchSource(items, adapter.collate, bs, seed=args.seed + k, **kw)

    fisher_dir = os.path.join(args.out, "fisher") if getattr(args, "save_fisher", False) else None
    return build_masks(
        model,
        src(data.forget, 0),
        src(data.vision_preserve, 1),
        src(data.language_preserve, 2),
        gamma=args.gamma,
        fraction=args.fraction,
        progress=is_rank0(),
        official_parity=recipe.fisher_parity,
        backend=args.backend,
        fisher_dir=fisher_dir,
        offload=args.fisher_offload and not is_sharded(model),
    )


def run_saliency(args) -> int:
    from mmunlearn.distributed import is_rank0
    from mmunlearn.io import atomic_write_json

    distributed = start_distributed(args)
    recipe, data, model, adapter, dev, _ = _prepare(args, distributed)
    masks = _masks(args, recipe, model, adapter, data)
    if is_rank0():
        os.makedirs(args.out, exist_ok=True)
        for k, m in masks.items():
            m.save(os.path.join(args.out, f"mask_{k}.safetensors"))
            cov = m.coverage()["total"]
            pct = 100 * cov["fraction"]
            print(f"{k}: {cov['selected']:,}/{cov['total']:,} selected ({pct:.1f} %)")
        info = {"recipe": recipe.to_dict(), "data": data.sizes(), "model": args.model or "tiny"}
        atomic_write_json(os.path.join(args.out, "saliency.json"), info)
        print(f"wrote {args.out}/mask_{{vision,language,both}}.safetensors, saliency.json")
    return 0


def _monitor(args, adapter, forget_items, retain_items):
    """The --eval-every evaluation: mean answer CE on held-out forget / retain items; score =
    forget CE − retain CE (forgotten and kept)."""
    from mmunlearn.data.batching import BatchSource, to_device
    from mmunlearn.losses import local_batch, mean_ce

    def ce(model, items) -> float:
        dev = next(model.parameters()).device
        src = BatchSource(items, adapter.collate, 8, seed=0)
        tot = 0.0
        for i in range(len(src)):
            b = local_batch(model, to_device(src[i], dev))
            tot += float(mean_ce(model(**b), b))
        return tot / len(src)

    def monitor(model, step):
        f, r = ce(model, forget_items), ce(model, retain_items)
        return {"forget_ce": f, "retain_ce": r, "score": f - r}

    return monitor


def run_unlearn(args) -> int:
    from mmunlearn import fsdp
    from mmunlearn.data.batching import BatchSource
    from mmunlearn.distributed import is_rank0
    from mmunlearn.io import atomic_write_json
    from mmunlearn.loop import UnlearnConfig, unlearn
    from mmunlearn.methods import Method
    from mmunlearn.models import save_model
    from mmunlearn.saliency import SaliencyMask

    distributed = start_distributed(args)
    recipe, data, model, adapter, dev, ref = _prepare(args, distributed)
    proc = adapter.processor if adapter.processor is not None else adapter.tokenizer
    kw = {"ref_model": ref} if ref is not None else {}
    mask = None
    if args.method == "mmunlearner":
        if args.mask:
            try:
                mask = SaliencyMask.load(args.mask, model=model)
            except ValueError as e:
                raise UsageError(f"--mask: {e}") from e
        else:
            mask = _masks(args, recipe, model, adapter, data)[args.mask_group]
        if recipe.mask_filter == "official":
            mask = mask.official_filter()
        kw["masks"] = mask.for_model(model)
    forget, retain = list(data.forget), list(data.retain)
    if args.eval_every:
        k = args.eval_items
        if len(forget) <= k or len(retain) <= k:
            raise UsageError(f"--eval-items {k}: the forget or retain set is not larger than it")
        held_f, forget = forget[:k], forget[k:]
        held_r, retain = retain[:k], retain[k:]
        best_dir = os.path.join(args.out, "best")

        def on_best(m, step, metrics):
            state = fsdp.full_state_dict(m) if distributed else None
            if is_rank0():
                save_model(m, proc, best_dir, state_dict=state)

        kw.update(monitor=_monitor(args, adapter, held_f, held_r), on_best=on_best)
    ck = {"loss_tokens": recipe.loss_tokens}
    bs = recipe.batch_size
    cfg = UnlearnConfig(
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        eps=recipe.eps,
        max_grad_norm=recipe.max_grad_norm,
        retain_max_grad_norm=recipe.retain_max_grad_norm,
        epochs=recipe.epochs,
        forget_freq=args.forget_freq,
        forget_cap=recipe.forget_cap,
        lr_schedule=recipe.lr_schedule,
        schedule_unit=recipe.schedule_unit,
        mask_mode=recipe.mask_mode,
        seed=args.seed,
        grad_accum=args.grad_accum,
        max_steps=args.steps,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        eval_every=args.eval_every,
        workers=args.workers,
        report_to=None if args.report_to == "none" else args.report_to,
        progress=is_rank0(),
        backend=args.backend,
    )
    method = Method(args.method, alpha=recipe.alpha, beta=recipe.beta, kl=recipe.kl, npo=recipe.npo)
    result = unlearn(
        model,
        method,
        BatchSource(forget, adapter.collate, bs, seed=args.seed, **ck),
        BatchSource(retain, adapter.collate, bs, seed=args.seed + 1, **ck),
        config=cfg,
        output_dir=os.path.join(args.out, "run"),
        resume=args.resume,
        **kw,
    )
    if result["finished"]:
        say(f"{args.out}/run: this run is already finished (step {result['steps']} of "
            f"{result['steps']}); nothing to resume, {args.out}/model left as it is")  # fmt: skip
        return 0
    # a world-size-independent model directory: full tensors gathered one at a time to rank 0
    state = fsdp.full_state_dict(model) if distributed else None
    if is_rank0():
        if args.method == "mmunlearner":  # written with the model: never before the run works
            mask.save(os.path.join(args.out, "mask.safetensors"))
        path = save_model(model, proc, os.path.join(args.out, "model"), state_dict=state)
        summary = {
            "recipe": recipe.to_dict(),
            "method": args.method,
            "data": data.sizes(),
            "steps": result["steps"],
            "best": result["best"],
        }
        atomic_write_json(os.path.join(args.out, "unlearn.json"), summary)
        say(f"wrote {path}, {args.out}/unlearn.json, {args.out}/run/log.jsonl")
    return 0
