"""``mmunlearn eval``: evaluate saved models (or the demo's tiny model) on a benchmark.

Models: ``--model DIR`` (repeatable; a ``save_pretrained`` directory with its tokenizer, as
written by ``mmunlearn unlearn`` / ``demo``), labelled by the directory name or ``--label``; or
``--tiny``, the demo's tiny LLaVA freshly built (optionally fine-tuned ``--vanilla-steps`` on the
synthetic benchmark first). Data: ``--synthetic``, ``--mllmu DIR`` or ``--clear DIR``; the sets
evaluated are those of :mod:`mmunlearn.data.eval_sets`.

Writes ``results.json`` (``{"methods": {label: {set: metrics}}, "_protocol": {seed, shots,
template, ...}, "models", "config"}``), ``report.md`` and, for several models,
``tradeoff.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mmunlearn.cli.common import UsageError


def register(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on an ``add_subparsers()`` object; returns the sub-parser."""
    e = subparsers.add_parser(
        "eval",
        help="evaluate saved models on the synthetic benchmark, MLLMU-Bench or CLEAR",
        description="Evaluate one or more saved model directories (or --tiny) on one benchmark: "
        "MCQ accuracy by option likelihood and by generated letter, fill-in-the-blank, "
        "ROUGE/BLEU of generations (MLLMU-style keys), or CLEAR face recognition and caption "
        "ROUGE. Writes results.json (with the protocol: template, shots, seed), report.md and, "
        "with several models, tradeoff.png under --out.",
        epilog="examples:\n"
        "  mmunlearn eval --model runs/demo/vanilla --model runs/demo/mmunlearner --synthetic\n"
        "  mmunlearn eval --model runs/u/model --mllmu data/MLLMU-Bench --split 5 --limit 200\n"
        "  mmunlearn eval --model runs/u/model --clear data/CLEAR --split 5 --no-letter-mcq",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = e.add_argument_group("model (one of)")
    m.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="DIR",
        help="a saved model directory (save_pretrained layout + tokenizer); repeat to compare",
    )
    m.add_argument(
        "--tiny",
        action="store_true",
        help="the demo's tiny LLaVA, freshly built (tokenizer from the synthetic benchmark)",
    )
    m.add_argument(
        "--label",
        action="append",
        default=[],
        help="row label per --model, in order (default: the directory name)",
    )
    m.add_argument(
        "--vanilla-steps",
        type=int,
        metavar="N",
        default=0,
        help="--tiny: fine-tune this many steps on the synthetic benchmark first (default 0)",
    )
    d = e.add_argument_group("data (one of)")
    x = d.add_mutually_exclusive_group(required=True)
    x.add_argument("--synthetic", action="store_true", help="the built-in synthetic benchmark")
    x.add_argument("--mllmu", metavar="DIR", help="MLLMU-Bench root (forget_5/, Test_Set/, ...)")
    x.add_argument("--clear", metavar="DIR", help="CLEAR root (forget05/, retain95/, ...)")
    d.add_argument(
        "--split",
        type=int,
        metavar="PCT",
        default=5,
        help="forget percentage: MLLMU forget_R/retain_{100-R}, CLEAR forgetRR (default 5)",
    )
    d.add_argument(
        "--people", type=int, metavar="N", default=40, help="synthetic people (default 40)"
    )
    d.add_argument(
        "--limit",
        type=int,
        metavar="N",
        default=None,
        help="at most N items per task and set (first N)",
    )
    p = e.add_argument_group("protocol")
    p.add_argument("--batch-size", type=int, metavar="N", default=16, help="default 16")
    p.add_argument(
        "--seed",
        type=int,
        metavar="N",
        default=0,
        help="option order, image picks, data (default 0)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        default=16,
        help="greedy generation length (default 16)",
    )
    p.add_argument(
        "--no-generation",
        action="store_true",
        help="skip generation metrics (ROUGE/BLEU, CLEAR captions)",
    )
    p.add_argument(
        "--no-letter-mcq", action="store_true", help="MCQ by option likelihood only (no letter)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    e.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    e.set_defaults(fn=run)
    return e


def _labels(args) -> list[str]:
    if args.tiny:
        return args.label[:1] or ["tiny"]
    if args.label and len(args.label) != len(args.model):
        raise UsageError(f"{len(args.label)} --label for {len(args.model)} --model; give one each")
    labels = args.label or [Path(m).resolve().name or m for m in args.model]
    seen: dict[str, int] = {}
    out = []
    for lab in labels:  # distinct labels for equal directory names
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}#{seen[lab]}")
    return out


def _load(path: str, dev):
    from mmunlearn.models import adapter_for, load_model

    if not Path(path).is_dir():
        raise UsageError(f"--model {path}: no such directory")
    try:
        model, tok = load_model(path, device=dev)
        adapter = adapter_for(model, tok)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--model {path}: cannot load it ({type(e).__name__}: {e})") from e
    return model, tok, adapter


def run(args) -> int:
    """Run ``mmunlearn eval`` from parsed arguments; returns the exit status (raises
    :class:`UsageError` naming the bad path for unusable models or data)."""
    import torch

    from mmunlearn.data.eval_sets import clear_sets, mllmu_sets, synthetic_eval_sets
    from mmunlearn.data.parquet import DataFormatError
    from mmunlearn.eval import EvalConfig, evaluate, evaluate_clear
    from mmunlearn.eval.report import CLEAR_COLUMNS, EVAL_COLUMNS, markdown_table, write_report

    if bool(args.tiny) == bool(args.model):
        raise UsageError("give --model DIR (one or more) or --tiny")
    labels = _labels(args)
    dev = torch.device(args.device)
    cfg = EvalConfig(
        batch_size=args.batch_size,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        letter_mcq=not args.no_letter_mcq,
        generation=not args.no_generation,
        progress=False,
    )
    bench = None
    try:
        if args.synthetic or args.tiny:
            from mmunlearn.data.synthetic import make_benchmark

            bench = make_benchmark(n_people=args.people, seed=args.seed)
        if args.synthetic:
            benchmark, data = "synthetic", None
            sets = synthetic_eval_sets(bench, args.limit)
        elif args.mllmu:
            benchmark, data = "MLLMU-Bench", args.mllmu
            sets = mllmu_sets(args.mllmu, args.split, args.seed, args.limit)
        else:
            benchmark, data = "CLEAR", args.clear
            sets = clear_sets(args.clear, args.split, args.seed, args.limit)
    except (DataFormatError, FileNotFoundError) as e:
        raise UsageError(f"cannot read the data: {e}") from e
    run = evaluate_clear if benchmark == "CLEAR" else evaluate

    results: dict = {"methods": {}, "models": {}}
    templates = {}
    for i, label in enumerate(labels):
        if args.tiny:
            from mmunlearn.demo import DemoConfig, build_tiny
            from mmunlearn.train import finetune

            torch.manual_seed(args.seed)
            model, tok, adapter = build_tiny(bench, DemoConfig(seed=args.seed), dev)
            if args.vanilla_steps:
                finetune(model, adapter, bench.train, args.vanilla_steps, 1e-3, 16, args.seed, dev)
            results["models"][label] = "tiny"
        else:
            model, tok, adapter = _load(args.model[i], dev)
            results["models"][label] = str(args.model[i])
        res = run(model, adapter.collate, tok, sets, cfg)
        protocol = res.pop("_protocol")
        results["methods"][label] = res
        templates[label] = adapter.template()
        print(f"eval: {label} done")
        del model
    results["_protocol"] = {
        **protocol,
        "benchmark": benchmark,
        "data": data,
        "split": None if args.synthetic else args.split,
        "limit": args.limit,
        "template": templates,
    }
    results["config"] = {k: v for k, v in vars(args).items() if k != "fn"}
    os.makedirs(args.out, exist_ok=True)
    columns = CLEAR_COLUMNS if benchmark == "CLEAR" else EVAL_COLUMNS
    paths = write_report(
        results,
        args.out,
        title=f"mmunlearn eval: {benchmark}",
        columns=columns,
        plot=len(labels) > 1,
        details=True,
    )
    print(markdown_table(results, columns))
    print("wrote " + ", ".join(paths.values()))
    return 0
