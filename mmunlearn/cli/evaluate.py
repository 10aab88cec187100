"""``mmunlearn eval``: evaluate saved models (or the demo's tiny model) on a benchmark, under our
protocol or the benchmark's own, with the unlearning metrics and intervals.

Models: ``--model DIR`` (repeatable; a checkpoint directory as written by ``mmunlearn unlearn``
/ ``demo``, or a Hub id already in the local Hugging Face cache, as ``unlearn --model``:
:func:`mmunlearn.models.loading.resolve`; loaded with :func:`mmunlearn.models.load_checkpoint`
in ``--dtype``, its processor from ``--processor DIR`` when it ships none), labelled by the
directory name or ``--label``; or ``--tiny``, the demo's tiny LLaVA freshly built.
``--reference DIR``: the model trained without the forget set, evaluated as the row
``reference`` and used for forget quality, PrivLeak and the average gap. Data:
``--synthetic``, ``--mllmu DIR`` or ``--clear DIR``.

Protocols (:mod:`mmunlearn.eval.suite`): ``mmunlearn`` (ours: zero-shot, MCQ by option
likelihood and by generated letter, 16 new tokens, hand-written metrics;
:mod:`mmunlearn.eval.tasks`), ``mllmu`` (MLLMU-Bench's ``eval.py``;
:mod:`mmunlearn.eval.mllmu_protocol`), ``clear`` (CLEAR's ``mm/eval.py`` +
``calculate_metrics.py``; :mod:`mmunlearn.eval.clear_protocol`). docs/eval_protocols.md maps
every printed number to the benchmark's code.

Options may come from ``--config FILE`` (YAML / JSON, keys = option names), checked like
``unlearn``'s (:func:`mmunlearn.cli.common.load_config`: types, choices, "did you mean" for
an unknown key); flags on the command line win (repeatable ones, ``--model`` / ``--label``, add
to the file's list). Generation and likelihood passes show tqdm bars on a terminal
(``--no-progress``). Intervals: :mod:`mmunlearn.eval.bootstrap` (``--ci-method``).

Writes under ``--out``: ``results.json`` (``{"methods": {label: {set: metrics, with per-item
"_items"}}, "intervals", "unlearning", "gap", "official", "_protocol", "models", "config"}``),
``outputs.json`` (every generation), ``report.md`` and, for several models, ``tradeoff.png``.
With ``--lmms-tasks`` lmms-eval's tasks also run on every model (:mod:`mmunlearn.eval.lmms`),
their results under ``"lmms"``.

Exit codes as in every command (:mod:`mmunlearn.cli`): 2 for a bad option or a path that is not
there; 1 for an input that is there but unusable (a truncated or malformed data file, an empty
split, a checkpoint that cannot be loaded).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mmunlearn.cli import lmms_tasks
from mmunlearn.cli.common import UsageError, add_vision_modules, at_least
from mmunlearn.cli.data import add_own_data, check_own, image_policy, own_files, own_record

DTYPES = ("float32", "bfloat16", "float16")

EPILOG = """examples:
  # ours, several models and the reference trained without the forget set
  mmunlearn eval --model runs/demo/ga --model runs/demo/mmunlearner \\
      --reference runs/demo/reference --synthetic
  # MLLMU-Bench's own eval.py (few-shot, generated letter, 50 tokens, rouge_score, nltk)
  mmunlearn eval --protocol mllmu --model runs/u/model --processor llava-1.5-7b-hf \\
      --mllmu data/MLLMU-Bench --split 5 --reference runs/retain95
  # CLEAR's own evaluation (Prob., ROUGE-L recall, truth ratio, model utility, forget quality)
  mmunlearn eval --protocol clear --model runs/u/model --clear data/CLEAR --split 10 \\
      --reference runs/retain90
  # zero-shot MLLMU prompts (MMUnlearner's own evaluator's setting)
  mmunlearn eval --protocol mllmu --shots 0 --model runs/u/model --mllmu data/MLLMU-Bench
  # options from a file (keys = option names; flags on the command line win), a cached Hub
  # id in bfloat16, BCa intervals
  mmunlearn eval --config eval.yaml --model llava-hf/llava-1.5-7b-hf --dtype bfloat16 \\
      --ci-method BCa

  # also lmms-eval's tasks on the same models (docs/eval_protocols.md §7)
  mmunlearn eval --model runs/u/model --mllmu data/MLLMU-Bench --lmms-tasks mme,pope

--protocol mllmu and clear, and the unlearning metrics, need the extra:
  pip install mmunlearn[eval]      (rouge_score, nltk, scipy)
--lmms-tasks needs the extra:
  pip install 'mmunlearn[lmms]'    (lmms_eval 0.7.x)"""


def register(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on an ``add_subparsers()`` object; returns the sub-parser."""
    e = subparsers.add_parser(
        "eval",
        help="evaluate saved models on the synthetic benchmark, MLLMU-Bench or CLEAR",
        description="Evaluate one or more saved model directories (or --tiny) on one benchmark,\n"
        "under our protocol (default) or the benchmark's own (--protocol mllmu|clear), with\n"
        "the unlearning metrics (truth ratio, forget quality, model utility, loss / zlib /\n"
        "min-k MIA AUC, PrivLeak, average gap to --reference) and a seeded bootstrap 95 %\n"
        "interval and n for every number. Writes results.json, outputs.json, report.md and,\n"
        "with several models, tradeoff.png under --out. Values in --config (YAML or JSON,\n"
        "keys = option names) are defaults; flags on the command line win; an unknown key is\n"
        "an error.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--config", help="YAML/JSON file of option: value defaults")
    _model_options(e)
    _data_options(e)
    _protocol_options(e)
    lmms_tasks.add_options(e)
    e.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    e.set_defaults(fn=run)
    return e


def _model_options(e) -> None:
    """``--model``, ``--tiny``, ``--label``, ``--reference``, ``--processor``, ``--dtype``, ..."""
    m = e.add_argument_group("models")
    m.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="DIR|HUB_ID",
        help="a saved model directory (save_pretrained layout + tokenizer), or a Hub id in the "
        "local Hugging Face cache (nothing is downloaded); repeat to compare",
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
        "--reference",
        metavar="DIR|HUB_ID",
        help="the model trained without the forget set: row 'reference'; forget quality, "
        "PrivLeak and the average gap are measured against it",
    )
    m.add_argument(
        "--processor",
        metavar="DIR|HUB_ID",
        help="take the processor / tokenizer (and chat template) from DIR (or a cached Hub id) "
        "when a checkpoint ships none",
    )
    m.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="load the evaluated models in this dtype (default: as the checkpoint is stored; "
        "--tiny: float32)",
    )
    add_vision_modules(m)
    m.add_argument(
        "--vanilla-steps",
        type=at_least(0),
        metavar="N",
        default=0,
        help="--tiny: fine-tune this many steps on the synthetic benchmark first (default 0)",
    )


def _data_options(e) -> None:
    """One data source (checked in :func:`run`) and its size."""
    d = e.add_argument_group("data (one of)")
    x = d.add_mutually_exclusive_group()  # checked in run(): a --config may name it
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
        "--people", type=at_least(2), metavar="N", default=40, help="synthetic people (default 40)"
    )
    d.add_argument(
        "--limit",
        type=at_least(1),
        metavar="N",
        default=None,
        help="at most N items per task and set (first N; --protocol clear: 300, its ds_size)",
    )
    add_own_data(d, "eval")


def _protocol_options(e) -> None:
    """The protocol, its generation and scoring options, the intervals and the device."""
    p = e.add_argument_group("protocol")
    p.add_argument(
        "--protocol",
        choices=["mmunlearn", "mllmu", "clear"],
        default="mmunlearn",
        help="mmunlearn (ours, default), mllmu (MLLMU-Bench's eval.py, needs --mllmu), clear "
        "(CLEAR's own, needs --clear); docs/eval_protocols.md",
    )
    p.add_argument(
        "--shots",
        default="official",
        metavar="N|official",
        help="--protocol mllmu: few-shot profiles per question (official: 1 for classification, "
        "2 for cloze; 0 = zero-shot); drawn with --seed",
    )
    p.add_argument("--batch-size", type=at_least(1), metavar="N", default=16, help="default 16")
    p.add_argument(
        "--seed",
        type=int,
        metavar="N",
        default=0,
        help="option order, image picks, shots, data, bootstrap (default 0)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=at_least(1),
        metavar="N",
        default=None,
        help="greedy generation length (default: the protocol's, mmunlearn 16, mllmu 50, "
        "clear 300)",
    )
    p.add_argument(
        "--no-generation",
        action="store_true",
        help="skip generation metrics (ROUGE/BLEU, CLEAR captions)",
    )
    p.add_argument(
        "--no-letter-mcq", action="store_true", help="MCQ by option likelihood only (no letter)"
    )
    p.add_argument(
        "--no-unlearning-metrics",
        action="store_true",
        help="skip the likelihood pass of truth ratio / forget quality / utility / MIA",
    )
    p.add_argument(
        "--rouge-stemmer",
        action="store_true",
        help="--protocol mmunlearn: ROUGE with Porter stemming (default off; mllmu and clear "
        "always stem, as their code)",
    )
    p.add_argument(
        "--n-boot",
        type=at_least(1),
        metavar="N",
        default=1000,
        help="bootstrap draws of every interval (default 1000)",
    )
    p.add_argument(
        "--ci-method",
        choices=["percentile", "BCa"],
        default="percentile",
        help="bootstrap interval (scipy.stats.bootstrap): percentile (default) or BCa",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (shown on a terminal for generation and likelihood passes)",
    )


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
    if args.reference and "reference" in out:
        raise UsageError("--label reference: that row is --reference's; choose another label")
    return out


def _load(path: str, flag: str, processor, dev, dtype, vision_modules=None):
    """``(model, tokenizer, adapter)`` of a checkpoint directory or a cached Hub id
    (:func:`mmunlearn.models.loading.resolve`). As in every command (mmunlearn/cli/__init__.py):
    a folder or id that is not there, or a ``--vision-modules`` naming modules it lacks, is a
    UsageError (exit 2); one that is there but cannot be loaded (broken config, weights,
    processor) a ValueError naming it (exit 1)."""
    from mmunlearn.models import load_checkpoint
    from mmunlearn.models.loading import VisionModulesError, resolve

    try:
        resolve(path, flag)
        if processor:
            resolve(processor, "--processor")
        kw = {"vision_modules": vision_modules} if vision_modules else {}
        model, adapter = load_checkpoint(path, processor=processor, dtype=dtype, device=dev, **kw)
    except (FileNotFoundError, VisionModulesError) as e:
        raise UsageError(str(e)) from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{flag} {path}: cannot load it ({type(e).__name__}: {e})") from e
    return model, adapter.tokenizer, adapter


def _shots(value: str) -> dict | None:
    if value == "official":
        return None
    try:
        k = int(value)
    except ValueError:
        raise UsageError(f"--shots {value}: give a number of profiles or 'official'") from None
    if k < 0:
        raise UsageError(f"--shots {value}: must be >= 0")
    return {"classification": k, "cloze": k}


def _plan(args, cfg):
    from mmunlearn.eval.suite import make_plan

    bench = None
    if args.synthetic or args.tiny:
        from mmunlearn.data.synthetic import make_benchmark

        bench = make_benchmark(n_people=args.people, seed=args.seed)
    own = own_files(args)
    benchmark = "synthetic" if args.synthetic else "MLLMU-Bench" if args.mllmu else "CLEAR"
    benchmark = "custom" if own else benchmark
    if args.protocol == "mllmu" and not args.mllmu:
        raise UsageError("--protocol mllmu evaluates MLLMU-Bench files: give --mllmu DIR")
    if args.protocol == "clear" and not args.clear:
        raise UsageError("--protocol clear evaluates CLEAR files: give --clear DIR")
    try:
        with image_policy(args):
            plan = make_plan(
                args.protocol,
                benchmark,
                cfg,
                data=own or args.mllmu or args.clear,
                bench=bench,
                split=args.split,
                limit=args.limit,
                shots=_shots(args.shots),
            )
    except FileNotFoundError as e:  # a folder or file that is not there: usage (exit 2)
        raise UsageError(f"cannot read the data: {e}") from e
    # a file that is there but unreadable (truncated, a bad row) raises DataFormatError naming
    # file, row and column: a runtime failure (exit 1), as in saliency and unlearn
    return plan, bench, benchmark


def _check(args) -> None:
    """The choices argparse cannot check when a --config may supply them."""
    if bool(args.tiny) == bool(args.model):
        raise UsageError("give --model DIR (one or more) or --tiny")
    given = [f for f, v in (("--synthetic", args.synthetic), ("--mllmu", args.mllmu),
                            ("--clear", args.clear)) if v]  # fmt: skip
    given += ["--forget"] if check_own(args, needs_retain=False) else []
    if len(given) != 1:
        which = "not together: " + ", ".join(given) if given else "none given"
        raise UsageError(
            "give one data source, --synthetic, --mllmu DIR, --clear DIR or --forget FILE "
            f"({which})"
        )
    if args.n_boot < 1:
        raise UsageError(f"--n-boot {args.n_boot}: must be >= 1")


def _models(args, labels, plan, bench, dev, lmms_run=None) -> tuple:
    """Evaluate every model in turn → ``(results, stats, templates, last adapter, record)``;
    ``lmms_run(model, adapter)``, when given, runs the lmms-eval tasks on each model after our
    protocol (its results under ``results["lmms_methods"][label]``)."""
    import functools

    import torch

    from mmunlearn.cli import oom
    from mmunlearn.eval.mllmu_protocol import MultiImageUnsupported
    from mmunlearn.eval.suite import evaluate_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    runs = [(lab, "--model", args.model[i] if args.model else None) for i, lab in enumerate(labels)]
    if args.reference:
        runs.append(("reference", "--reference", args.reference))
    results: dict = {"methods": {}, "models": {}}
    stats, templates, adapter, proto = {}, {}, None, {}
    for label, flag, path in runs:
        if path is None:  # --tiny
            from mmunlearn.tinyrun import TinyRunConfig, build_tiny
            from mmunlearn.train import finetune

            torch.manual_seed(args.seed)
            model, tok, adapter = build_tiny(bench, TinyRunConfig(seed=args.seed), dev)
            if args.vanilla_steps:
                finetune(model, adapter, bench.train, args.vanilla_steps, 1e-3, 16, args.seed, dev)
            if dtype is not None:
                model.to(dtype)
        else:
            model, tok, adapter = _load(path, flag, args.processor, dev, dtype, args.vision_modules)
        results["models"][label] = path or "tiny"
        try:
            est = functools.partial(oom.estimate_line, model, "eval", args.batch_size, 1024)
            with oom.guard("eval", est):
                res, st, proto = evaluate_model(
                    model, adapter, tok, plan, unlearning=not args.no_unlearning_metrics
                )
        except MultiImageUnsupported as e:
            raise UsageError(f"--shots {args.shots}: {e}; use --shots 0") from e
        except ImportError as e:
            raise UsageError(f"--protocol {args.protocol}: {e}") from e
        results["methods"][label], stats[label] = res, st
        templates[label] = adapter.template()
        if lmms_run is not None:
            results.setdefault("lmms_methods", {})[label] = lmms_run(model, adapter)
        print(f"eval: {label} done")
        del model
    return results, stats, templates, adapter, proto


def run(args) -> int:
    """Run ``mmunlearn eval`` from parsed arguments; returns the exit status (raises
    :class:`UsageError` naming the bad input for unusable models, data or options)."""
    import torch

    from mmunlearn.eval import EvalConfig
    from mmunlearn.eval.suite import MAX_NEW_TOKENS, assemble, protocol_record

    _check(args)
    labels = _labels(args)
    lmms_tm, lmms_names = lmms_tasks.check(args)
    dev = torch.device(args.device)
    cfg = EvalConfig(
        batch_size=args.batch_size,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens or MAX_NEW_TOKENS[args.protocol],
        letter_mcq=not args.no_letter_mcq,
        generation=not args.no_generation,
        progress=not args.no_progress,
        rouge_stemmer=args.rouge_stemmer,
    )
    plan, bench, benchmark = _plan(args, cfg)
    lmms_run = lmms_tasks.runner(args, lmms_tm, lmms_names) if lmms_names else None
    results, stats, templates, adapter, proto = _models(args, labels, plan, bench, dev, lmms_run)
    lmms_methods = results.pop("lmms_methods", None)
    ref = "reference" if args.reference else None
    try:
        assemble(results, stats, plan, ref, args.n_boot, args.seed, method=args.ci_method)
    except ImportError as e:
        raise UsageError(f"the unlearning metrics: {e} (or --no-unlearning-metrics)") from e
    results["_protocol"] = {
        **protocol_record(plan, adapter),
        **{k: v for k, v in proto.items() if k not in ("benchmark",)},
        "name": args.protocol,
        "benchmark": benchmark,
        "data": own_record(args) or args.mllmu or args.clear,
        "split": None if args.synthetic else args.split,
        "limit": args.limit,
        "dtype": args.dtype,
        "template": templates,
    }
    if lmms_methods is not None:
        results["lmms"] = lmms_tasks.record(args, lmms_names, lmms_methods)
    results["config"] = {k: v for k, v in vars(args).items() if k != "fn"}
    _write(args, results, plan, benchmark)
    return 0


def _write(args, results: dict, plan, benchmark: str) -> None:
    """results.json, outputs.json, report.md (+ tradeoff.png) under --out; the tables printed."""
    from mmunlearn.eval.report import markdown_table, unlearning_table, write_report

    os.makedirs(args.out, exist_ok=True)
    outputs = results.pop("outputs", None)
    if outputs:
        from mmunlearn.io import atomic_write_text

        path = os.path.join(args.out, "outputs.json")
        atomic_write_text(path, json.dumps(outputs, indent=1, ensure_ascii=False, default=str))
    extra = [(t or "Table", c) for t, c in plan.extra_tables]
    paths = write_report(
        results,
        args.out,
        title=f"mmunlearn eval: {benchmark} ({args.protocol} protocol)",
        columns=plan.columns,
        plot=len(results["methods"]) > 1,
        details=True,
        extra_tables=extra,
    )
    print(markdown_table(results, plan.columns))
    unl = unlearning_table(results)
    if unl:
        print("\n" + unl)
    lmms_tasks.print_table(results)
    gap = results.get("gap")
    if gap:
        best = gap["methods"][gap["closest"]]["avg_gap"]
        print(
            f"\nclosest to the reference: {gap['closest']} (avg gap {best['estimate']:.3f}, "
            f"{100 * gap['level']:.0f} % CI [{best['lo']:.3f}, {best['hi']:.3f}])"
        )
    print("wrote " + ", ".join(paths.values()) + (", outputs.json" if outputs else ""))
    _update_cards(args, results, plan, benchmark)


def _update_cards(args, results: dict, plan, benchmark: str) -> None:
    """The eval table in the model card of every evaluated folder that has one."""
    from mmunlearn.eval.report import markdown_table
    from mmunlearn.modelcard import add_eval_to_cards

    data = ", ".join(own_files(args).values()) or args.mllmu or args.clear or "built-in"
    note = f"`mmunlearn eval` on {benchmark} ({args.protocol} protocol, seed {args.seed}, "
    note += f"data {data}):\n"
    add_eval_to_cards(args.model or [], markdown_table(results, plan.columns), note)
