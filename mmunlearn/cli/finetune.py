"""``mmunlearn finetune``: the models unlearning starts from and is compared with. The vanilla
model (``--train-set vanilla``: the base model fine-tuned on every person of the benchmark) and
the reference (``--train-set reference``: the same recipe without the forget set), from a real
checkpoint and MLLMU-Bench / CLEAR files, or the built-in tiny model and benchmark.

The run is the unlearning loop's (:func:`mmunlearn.train.train`): ``--config`` files, the run
lock of ``--out``, preemption (exit 75) and ``--resume [auto]``, checkpoints, ``log.jsonl``,
FSDP2 under torchrun. Writes ``--out/model`` (safetensors + processor + chat template + model
card, loadable by ``saliency`` / ``unlearn`` / ``eval``) and ``--out/finetune.json``.
"""

from __future__ import annotations

import os

from mmunlearn.cli.common import (
    UsageError,
    add_device,
    add_run_options,
    add_torchrun,
    add_vision_modules,
    device,
    mixed_precision,
    run_config,
    say,
    start_distributed,
)
from mmunlearn.cli.data import add_own_data, choose_source, image_policy, own_files, own_record
from mmunlearn.data.recipe import TRAIN_SETS
from mmunlearn.presets import RECIPES

EPILOG = """examples:
  mmunlearn finetune --config finetune/mllmu/llava-1.5-7b --train-set vanilla \\
      --out runs/mllmu-llava-vanilla
  mmunlearn finetune --config finetune/mllmu/llava-1.5-7b --train-set reference \\
      --split 5 --out runs/mllmu-llava-retain95
  mmunlearn finetune --tiny --synthetic --lr 1e-3 --epochs 3 --out runs/ft"""


def register(sub):
    import argparse

    c = sub.add_parser(
        "finetune",
        help="fine-tune the vanilla model (every person) or the reference (without the forget "
        "set) and write it",
        description="Fine-tune a model on a benchmark's training set: --train-set vanilla (the "
        "model unlearning starts from) or reference (without the forget set of --split: what "
        "eval --reference compares with). Values in --config (YAML or JSON, keys = option "
        "names) are defaults; flags win; an unknown key is an error. Settings left unset take "
        "the recipe's value (--recipe). Every data file is read before the model is loaded.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--config", help="YAML/JSON file of option: value defaults")
    m = c.add_argument_group("model (one of)")
    m.add_argument("--model", help="the base checkpoint folder, or a Hub id in the local HF cache")
    m.add_argument("--tiny", action="store_true", help="the built-in tiny LLaVA, untrained")
    m.add_argument("--processor", help="folder / cached Hub id with the processor, tokenizer "
                   "and chat template, for checkpoints that ship without them")  # fmt: skip
    m.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weights' dtype (auto: bf16 on CUDA, fp32 on the CPU)")  # fmt: skip
    add_vision_modules(m)
    d = c.add_argument_group("data (one of)")
    d.add_argument("--mllmu", metavar="DIR", help="MLLMU-Bench root (ft_Data/, forget_5/, ...)")
    d.add_argument("--clear", metavar="DIR", help="CLEAR root (full+tofu/, forget05/, ...)")
    d.add_argument("--synthetic", action="store_true", help="the built-in benchmark")
    d.add_argument("--split", type=int, default=5, help="forget %% that --train-set reference "
                   "leaves out: MLLMU 5|10|15, CLEAR 1|5|10")  # fmt: skip
    d.add_argument("--people", type=int, default=40, help="synthetic people (default 40)")
    add_own_data(d, "finetune")
    d.add_argument("--train-set", default="vanilla", choices=list(TRAIN_SETS),
                   help="vanilla: every person; reference: without the forget set of --split "
                   "(docs/finetune.md says which files each is)")  # fmt: skip
    r = c.add_argument_group("recipe")
    r.add_argument(
        "--recipe",
        default="mmunlearn",
        choices=list(RECIPES),
        help="ours (default) or the official fine-tune's settings (docs/finetune.md)",
    )
    _resume_option(c)
    add_run_options(c, "finetune")
    add_device(c)
    add_torchrun(c)
    c.add_argument("--out", default="runs/finetune", help="output dir (default runs/finetune)")
    c.set_defaults(fn=run_finetune)
    return c


def _resume_option(c) -> None:
    from mmunlearn.cli.unlearn import _resume

    c.add_argument(
        "--resume", nargs="?", const="auto", type=_resume, default=None, metavar="auto",
        help="continue from --out/run/checkpoint when one of the same run is there, else start "
        "fresh (so a requeued job reruns the same command)",
    )  # fmt: skip


def _benchmark(args) -> str:
    """The checked data source (own files: vanilla = forget + retain, reference = retain)."""
    return choose_source(args, "--train-set reference" if args.train_set == "reference" else None)


def training_data(args, benchmark: str, seed: int):
    """(samples, where they came from, the synthetic benchmark or None) of ``--train-set``:
    every data file is read (and every image decoded) here, before any model is loaded."""
    from mmunlearn.data.recipe import training_set
    from mmunlearn.data.synthetic import make_benchmark

    if benchmark == "custom":
        return _own_training_data(args) + (None,)
    bench = make_benchmark(n_people=args.people, seed=seed) if benchmark == "synthetic" else None
    try:
        samples, source = training_set(args.train_set, mllmu=args.mllmu, clear=args.clear,
                                       bench=bench, split=args.split)  # fmt: skip
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    return samples, source, bench


def _own_training_data(args) -> tuple[list, str]:
    """(samples, source) from own files: the vanilla model learns the forget and the retain
    rows (and the text-only ``--preserve-text`` rows); the reference learns all but the forget
    rows. Read under ``--max-image-pixels`` / ``--data-root``; a bad row is one line."""
    from mmunlearn.data.custom import read_custom
    from mmunlearn.data.parquet import DataFormatError

    files = own_files(args)
    parts = [("forget", False)] if args.train_set == "vanilla" else []
    parts += [("retain", False), ("preserve_text", True)]
    samples, used = [], []
    with image_policy(args):
        for name, text_only in parts:
            if name not in files:
                continue
            try:
                samples += read_custom(files[name], text_only=text_only)
            except DataFormatError as e:
                raise UsageError(str(e)) from e
            used.append(f"{name.replace('_', '-')} {files[name]}")
    return samples, "own files: " + " + ".join(used)


def _model(args, bench, cfg, dev, distributed: bool):
    """The base model and its adapter (FSDP2-sharded per block under torchrun)."""
    from mmunlearn import fsdp
    from mmunlearn.cli.unlearn import _dtype

    dtype = _dtype(args, dev)
    if args.tiny:
        from mmunlearn.tinyrun import TinyRunConfig, build_tiny

        model, _tok, adapter = build_tiny(bench, TinyRunConfig(seed=cfg.seed), dev)
        if dtype is not None:
            model.to(dtype)
    else:
        from mmunlearn.cli.unlearn import load_model_arg

        model, adapter = load_model_arg(args, dtype, dev)
    if distributed:
        fsdp.broadcast_from_rank0(model)  # every rank starts from rank 0's weights
        mp = mixed_precision(args, dev, distributed)
        fsdp.shard_model(model, adapter.block_classes(), mixed_precision=mp)
    return model, adapter


def run_finetune(args) -> int:
    from mmunlearn.cli.unlearn import _held
    from mmunlearn.runctl import Preemption

    distributed = start_distributed(args)
    with _held(args, distributed), Preemption() as preemption:
        return _finetune(args, distributed, preemption)


def _finetune(args, distributed: bool, preemption) -> int:
    from dataclasses import replace

    from mmunlearn import presets
    from mmunlearn.data.batching import BatchSource
    from mmunlearn.distributed import is_rank0
    from mmunlearn.train import train

    benchmark = _benchmark(args)
    base = presets.finetune(args.recipe, "mllmu" if benchmark == "custom" else benchmark)
    cfg = run_config(args, "finetune", base)
    samples, source, bench = training_data(args, benchmark, cfg.seed)
    dev = device(args, distributed)
    model, adapter = _model(args, bench, cfg, dev, distributed)
    proc = adapter.processor if adapter.processor is not None else adapter.tokenizer
    try:
        src = BatchSource(samples, adapter.collate, cfg.batch_size, seed=cfg.seed,
                          loss_tokens=cfg.loss_tokens)  # fmt: skip
    except ValueError as e:
        raise UsageError(f"--train-set {args.train_set}: {source}: {e}") from e
    if len(src) < cfg.grad_accum:
        raise UsageError(f"--grad-accum {cfg.grad_accum}: {source} makes only {len(src)} "
                         f"batches of {cfg.batch_size}")  # fmt: skip
    cfg = replace(cfg, progress=is_rank0())
    say(f"finetune ({args.train_set}): {len(samples)} items from {source}")
    ident = {"train_set": args.train_set}
    result = train(model, src, config=cfg, output_dir=os.path.join(args.out, "run"),
                   resume=bool(args.resume), identity=ident, preemption=preemption)  # fmt: skip
    if result["finished"]:
        say(f"{args.out}/run: this run is already finished (step {result['steps']} of "
            f"{result['steps']}); nothing to resume, {args.out}/model left as it is")  # fmt: skip
        return 0
    data = {"items": len(samples), "batches": len(src), "fingerprint": src.fingerprint()}
    _write_outputs(args, cfg, model, proc, source, data, result, distributed)
    return 0


def _settings(cfg) -> dict:
    """The settings a fine-tune reads (the recipe and every ``finetune`` option's field)."""
    from mmunlearn.config import cli_fields

    d = cfg.to_dict()
    return {k: d[k] for k in ["recipe", "betas", *(f.name for f in cli_fields("finetune"))]}


def _write_outputs(args, cfg, model, proc, source, data, result, distributed) -> None:
    """The model folder (full tensors gathered to rank 0 under torchrun), its card and
    ``finetune.json``, written only now that the run worked."""
    from mmunlearn import fsdp
    from mmunlearn.distributed import is_rank0
    from mmunlearn.io import atomic_write_json
    from mmunlearn.modelcard import write_finetune_card
    from mmunlearn.models import save_model

    state = fsdp.full_state_dict(model) if distributed else None
    if not is_rank0():
        return
    path = save_model(model, proc, os.path.join(args.out, "model"), state_dict=state)
    base = args.model or "mmunlearn tiny LLaVA"
    settings = _settings(cfg)
    write_finetune_card(path, base_model=base, train_set=args.train_set, source=source,
                        config=settings, data=data, steps=result["steps"])  # fmt: skip
    losses = [h["loss"] for h in result["history"]]
    record = {
        "train_set": args.train_set,
        "source": source,
        "split": args.split if args.train_set == "reference" else None,
        "base_model": base,
        "config": settings,
        "data": data,
        "steps": result["steps"],
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        **own_record(args),
    }
    atomic_write_json(os.path.join(args.out, "finetune.json"), record)
    say(f"wrote {path}, {args.out}/finetune.json, {args.out}/run/log.jsonl")
