"""``mmunlearn saliency`` (the MMUnlearner masks) and ``mmunlearn unlearn`` (one method), on a
real checkpoint and MLLMU-Bench / CLEAR files or the user's own files (``--forget`` /
``--retain``: :mod:`mmunlearn.cli.data`), or on the built-in tiny model and benchmark.

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
    add_run_options,
    add_torchrun,
    add_vision_modules,
    at_least,
    check_out,
    device,
    mixed_precision,
    run_config,
    say,
    start_distributed,
)
from mmunlearn.cli.data import add_data_options, data_source, own_record, read_sets
from mmunlearn.cli.extras import save_trained
from mmunlearn.methods import METHODS
from mmunlearn.presets import RECIPES

EPILOG = """examples:
  mmunlearn saliency --model llava-hf/llava-1.5-7b-hf --mllmu data/MLLMU-Bench --split 5 \\
      --out runs/sal
  mmunlearn unlearn --config configs/mllmu/llava-1.5-7b.yaml --mask runs/sal/mask_both.safetensors
  mmunlearn unlearn --model ckpt/qwen2-vl --clear data/CLEAR --split 5 --recipe official \\
      --method npo --reference-model ckpt/qwen2-vl-retain
  mmunlearn unlearn --tiny --synthetic --method mmunlearner --lr 1e-3 --out runs/u"""


def register(sub):
    import argparse
    import textwrap

    parsers = []
    for name, fn, helptext in (
        ("saliency", run_saliency, "compute the Fisher saliency masks and write them"),
        ("unlearn", run_unlearn, "run one unlearning method and write the model (+ mask)"),
    ):
        c = sub.add_parser(
            name,
            help=helptext,
            description=textwrap.fill(
                helptext + ". Values in --config (YAML or JSON, keys = option names) are "
                "defaults; flags given on the command line win; an unknown key is an error. "
                "Run settings left unset take the recipe's value (--recipe). Every data file "
                "is read before the model is loaded.",
                width=88,
            ),
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        c.add_argument("--config", help="YAML/JSON file of option: value defaults")
        _model_options(c)
        add_data_options(c, name)
        r = c.add_argument_group("recipe")
        r.add_argument(
            "--recipe",
            default="mmunlearn",
            choices=list(RECIPES),
            help="ours (default) or the official code's semantics (docs/recipes.md)",
        )
        add_mask_rule(r)
        r.add_argument(
            "--fisher-offload",
            action="store_true",
            help="keep finished Fishers on the CPU (one fp32 set on the GPU; one process only)",
        )
        r.add_argument(
            "--save-fisher", action="store_true", help="also write the Fishers to --out/fisher"
        )
        if name == "unlearn":
            _unlearn_options(c)
        _resume_option(c, name)
        add_run_options(c, name)
        add_device(c)
        add_torchrun(c)
        c.add_argument("--out", default=f"runs/{name}", help=f"output dir (default runs/{name})")
        c.set_defaults(fn=fn)
        parsers.append(c)
    return parsers


def _model_options(c) -> None:
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
        help="weights' dtype (auto: bf16 on CUDA, fp32 on the CPU; fp16 weights train with "
        "torch.amp.GradScaler loss scaling: steps with inf/NaN gradients are skipped)",
    )
    m.add_argument(
        "--vanilla-steps",
        type=at_least(0),
        default=300,
        help="--tiny: fine-tune steps before unlearning (default 300)",
    )
    add_vision_modules(m)


def _resume(text: str):
    """``--resume [auto]`` (a config file may say ``resume: true`` / ``auto`` / ``false``)."""
    t = str(text).strip().lower()
    if t in ("auto", "true", "yes", "1", "on"):
        return "auto"
    if t in ("false", "no", "0", "off"):
        return None
    raise ValueError(f"{text!r} is not auto, true or false")


_resume.__name__ = "auto"
_resume.accepts_bool = True


def _resume_option(c, name: str) -> None:
    what = "--out/run/checkpoint" if name == "unlearn" else "the partial Fisher sums in --out"
    c.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        type=_resume,
        default=None,
        metavar="auto",
        help=f"continue from {what} when they are of the same run, else start fresh (so a "
        "requeued job reruns the same command; --resume and --resume auto agree)",
    )


def _unlearn_options(c) -> None:
    u = c.add_argument_group("unlearning")
    u.add_argument(
        "--method", default="mmunlearner", choices=list(METHODS), help="default mmunlearner"
    )
    u.add_argument("--mask", help="a mask file from `mmunlearn saliency` (else computed)")
    u.add_argument("--mask-group", default="both", choices=["vision", "language", "both"])
    u.add_argument(
        "--reference-model",
        help="the frozen reference of KL_Min, NPO, RMU, UNDIAL (default: the start model)",
    )
    u.add_argument(
        "--eval-items",
        type=at_least(1),
        default=16,
        help="with --eval-every: items held out per set to evaluate; the best checkpoint "
        "(largest forget CE − retain CE) is kept in --out/best (default 16)",
    )


# ------------------------------------------------------------------------------------------------
# assembly
# ------------------------------------------------------------------------------------------------


def _run_config(args, benchmark: str):
    """The run's :class:`~mmunlearn.config.RunConfig`: the recipe's for this method and
    benchmark, with every run option given (flag or ``--config`` key)."""
    from mmunlearn import presets
    from mmunlearn.cli.extras import check_extras

    base = presets.resolve(args.recipe, getattr(args, "method", "mmunlearner"), benchmark)
    cfg = run_config(args, args.cmd, base)
    check_extras(args, cfg)
    return cfg


def _dtype(args, dev):
    import torch

    if args.dtype == "auto":
        return torch.bfloat16 if dev.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]


def _prepare(args, distributed: bool = False):
    """(run config, data sets, model, adapter, device, reference model) of a run. Under torchrun
    the model (and the reference) are FSDP2-sharded per block."""
    from mmunlearn import fsdp
    from mmunlearn.distributed import is_rank0
    from mmunlearn.methods import Method
    from mmunlearn.models import load_checkpoint
    from mmunlearn.train import finetune

    source = data_source(args)
    cfg = _run_config(args, "mllmu" if source == "custom" else source)  # own data: MLLMU's
    data, bench = read_sets(args, source, cfg)  # every file read before any model
    dev = device(args, distributed)
    dtype = _dtype(args, dev)
    if args.tiny:
        from mmunlearn.tinyrun import TinyRunConfig, build_tiny

        model, _tok, adapter = build_tiny(bench, TinyRunConfig(seed=cfg.seed), dev)
        if args.vanilla_steps:
            finetune(
                model, adapter, bench.train, args.vanilla_steps, 1e-3, 16, cfg.seed, dev,
                progress=is_rank0(),
            )  # fmt: skip
        if dtype is not None:
            model.to(dtype)
    else:
        model, adapter = load_model_arg(args, dtype, dev)
    if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
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
    return cfg, data, model, adapter, dev, ref


def _masks(args, cfg, model, adapter, data, src=None, stop=None, resume=None):
    """The three masks (``src``: the Fisher batch sources, made here when not given;
    ``stop`` / ``resume``: see :func:`mmunlearn.masks.build_masks`)."""
    from mmunlearn.cli.saliency import sources
    from mmunlearn.distributed import is_rank0, is_sharded
    from mmunlearn.masks import build_masks

    src = src or sources(args, cfg, adapter, data)
    fisher_dir = os.path.join(args.out, "fisher") if getattr(args, "save_fisher", False) else None
    return build_masks(
        model,
        src["forget"],
        src["vision_preserve"],
        src["language_preserve"],
        gamma=args.gamma,
        fraction=args.fraction,
        progress=is_rank0(),
        official_parity=cfg.fisher_parity,
        backend=cfg.backend,
        fisher_dir=fisher_dir,
        offload=args.fisher_offload and not is_sharded(model),
        stop=stop,
        resume=resume,
    )


def run_saliency(args) -> int:
    from mmunlearn.cli import saliency
    from mmunlearn.runctl import Preemption

    distributed = start_distributed(args)
    with _held(args, distributed), Preemption() as p:
        return saliency.run(args, distributed, p, _prepare, _masks)


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


def _mask(args, cfg, model, adapter, data):
    """MMUnlearner's mask: the ``--mask`` file, or computed now (``--mask-group``)."""
    from mmunlearn.saliency import SaliencyMask

    if args.mask:
        try:
            mask = SaliencyMask.load(args.mask, model=model)
        except ValueError as e:
            raise UsageError(f"--mask: {e}") from e
    else:
        mask = _masks(args, cfg, model, adapter, data)[args.mask_group]
    return mask.official_filter() if cfg.mask_filter == "official" else mask


def _held_out(args, cfg, adapter, proc, distributed, forget, retain, kw):
    """``--eval-every``: hold out ``--eval-items`` per set, monitor them, keep the best model in
    ``--out/best``; returns the remaining (forget, retain)."""
    from mmunlearn import fsdp
    from mmunlearn.distributed import is_rank0

    k = args.eval_items
    if len(forget) <= k or len(retain) <= k:
        raise UsageError(f"--eval-items {k}: the forget or retain set is not larger than it")
    best_dir = os.path.join(args.out, "best")

    def on_best(m, step, metrics):
        state = fsdp.full_state_dict(m) if distributed else None
        if is_rank0():  # LoRA: the adapter (merging would unwrap the model in training)
            save_trained(m, proc, best_dir, cfg, state, mode="adapter")

    kw.update(monitor=_monitor(args, adapter, forget[:k], retain[:k]), on_best=on_best)
    return forget[k:], retain[k:]


def _held(args, distributed: bool):
    """The run lock of ``--out`` (rank 0; the other ranks of the same run share it), taken
    once the folder is known to be usable."""
    from contextlib import nullcontext

    from mmunlearn.distributed import is_rank0
    from mmunlearn.runctl import RunLock

    check_out(args.out)
    return RunLock(args.out) if is_rank0() else nullcontext()


def run_unlearn(args) -> int:
    from mmunlearn.runctl import Preemption

    distributed = start_distributed(args)
    with _held(args, distributed), Preemption() as preemption:
        return _unlearn(args, distributed, preemption)


def _unlearn(args, distributed: bool, preemption) -> int:
    from dataclasses import replace

    from mmunlearn.cli import oom
    from mmunlearn.data.batching import BatchSource
    from mmunlearn.distributed import is_rank0
    from mmunlearn.loop import unlearn

    cfg, data, model, adapter, dev, ref = _prepare(args, distributed)
    proc = adapter.processor if adapter.processor is not None else adapter.tokenizer
    if cfg.lora:
        from mmunlearn.cli.extras import wrap_lora

        model = wrap_lora(args, cfg, model)
    kw = {"ref_model": ref} if ref is not None else {}
    est = oom.estimator(args, cfg, model, data.forget, adapter)
    with oom.guard("saliency", lambda: est("saliency", cfg.fisher_batch_size)):
        mask = _mask(args, cfg, model, adapter, data) if args.method == "mmunlearner" else None
    if mask is not None:
        kw["masks"] = mask.for_model(model)
    forget, retain = list(data.forget), list(data.retain)
    if cfg.eval_every:
        forget, retain = _held_out(args, cfg, adapter, proc, distributed, forget, retain, kw)
    cfg = replace(cfg, progress=is_rank0())

    def source(items, k):
        return BatchSource(items, adapter.collate, cfg.batch_size, seed=cfg.seed + k,
                           loss_tokens=cfg.loss_tokens)  # fmt: skip

    run_dir = os.path.join(args.out, "run")
    f_src, r_src = source(forget, 0), (source(retain, 1) if retain else [])  # GA, NPO: none
    fingerprints = {
        "forget fingerprint": f_src.fingerprint(),
        "retain fingerprint": r_src.fingerprint() if retain else None,
        **own_record(args),
    }
    kept = lambda: oom.last_checkpoint(args.out)  # noqa: E731
    with oom.guard("unlearning", lambda: est("unlearning", cfg.batch_size), kept):
        result = unlearn(model, args.method, f_src, r_src, config=cfg,
                         output_dir=run_dir, resume=bool(args.resume), preemption=preemption,
                         **kw)  # fmt: skip
    if result["finished"]:
        say(f"{args.out}/run: this run is already finished (step {result['steps']} of "
            f"{result['steps']}); nothing to resume, {args.out}/model left as it is")  # fmt: skip
        return 0
    _write_outputs(args, cfg, model, proc, mask, data, result, distributed, fingerprints)
    return 0


def _write_outputs(args, cfg, model, proc, mask, data, result, distributed, fingerprints) -> None:
    """The model (a world-size-independent folder: full tensors gathered one at a time to rank
    0), the mask and ``unlearn.json``, written only now that the run worked."""
    from mmunlearn import fsdp
    from mmunlearn.distributed import is_rank0
    from mmunlearn.io import atomic_write_json
    from mmunlearn.modelcard import write_card

    state = fsdp.full_state_dict(model) if distributed else None
    if not is_rank0():
        return
    mask_file = os.path.join(args.out, "mask.safetensors") if mask is not None else None
    if mask is not None:
        mask.save(mask_file)
    path = save_trained(model, proc, os.path.join(args.out, "model"), cfg, state)
    card = dict(
        base_model=args.model or "mmunlearn tiny LLaVA", method=args.method, steps=result["steps"]
    )
    write_card(path, config=cfg.to_dict(), data={**data.sizes(), **fingerprints}, mask=mask,
               mask_file=mask_file, **card)  # fmt: skip
    summary = {
        "config": cfg.to_dict(),
        "method": args.method,
        "data": {**data.sizes(), **fingerprints},
        "steps": result["steps"],
        "best": result["best"],
    }
    for key in ("manu", "mip", "smfa"):  # what MANU pruned, MIP-Editor edited, SMFA sculpted
        if key in result:
            summary[key] = result[key]
    atomic_write_json(os.path.join(args.out, "unlearn.json"), summary)
    say(f"wrote {path}, {args.out}/unlearn.json, {args.out}/run/log.jsonl")


def load_model_arg(args, dtype, dev):
    """``--model`` (with ``--processor``, ``--vision-modules``) as ``(model, adapter)``; a
    missing checkpoint, or a ``--vision-modules`` naming modules it lacks, is a UsageError
    naming it (a checkpoint that is there but cannot be loaded: ValueError, exit 1)."""
    from mmunlearn.models import load_checkpoint
    from mmunlearn.models.loading import VisionModulesError

    try:
        return load_checkpoint(args.model, processor=args.processor, dtype=dtype, device=dev,
                               vision_modules=args.vision_modules)  # fmt: skip
    except (FileNotFoundError, VisionModulesError) as e:
        raise UsageError(str(e)) from e
