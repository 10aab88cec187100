"""``mmunlearn attack``: does the forgetting hold? Four probes on an unlearned model folder
(docs/attack.md; :mod:`mmunlearn.attack`): a relearning attack, rephrased pictures, text-only
questions and per-layer CKA against ``--vanilla``. Data flags as ``mmunlearn eval``'s
(``--synthetic`` or ``--mllmu DIR``, ``--split``, ``--people``, ``--limit``).

Order of work: the plan is drawn from the data first (bad data fails before a model loads);
the vanilla model (when given) is scored and its hidden states kept, then freed; the unlearned
model is scored, then fine-tuned in memory by the relearning attack (the folder is not
touched) and scored again. Writes ``attack.json``, ``attack.md`` and ``attack.png`` under
``--out``.
"""

from __future__ import annotations

import argparse
import time

from mmunlearn.cli.common import UsageError, add_vision_modules, check_out
from mmunlearn.cli.evaluate import DTYPES, _data_options, _load

EPILOG = """examples:
  # every probe on the demo's models (synthetic world, seed 0)
  mmunlearn attack --model runs/demo/ga_diff --vanilla runs/demo/vanilla --synthetic \\
      --relearn-lr 1e-3 --out runs/attack
  # LLaVA-1.5-7B on MLLMU-Bench 5 %, relearning on 16 retain items
  mmunlearn attack --model runs/mllmu5-llava/model --vanilla models/MLLMU-LLaVA-Vanilla \\
      --processor llava-hf/llava-1.5-7b-hf --mllmu data/MLLMU-Bench --split 5 \\
      --relearn-on retain --relearn-k 16 --device cuda --dtype bfloat16"""


def _csv(kind: str, allowed: tuple):
    def conv(text: str) -> tuple:
        vals = tuple(v.strip() for v in str(text).split(",") if v.strip())
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(
                f"{kind} {','.join(bad) or repr(text)}: choose from {', '.join(allowed)}"
            )
        return vals

    conv.__name__ = f"{kind} list"
    return conv


def register(subparsers) -> argparse.ArgumentParser:
    """Register ``attack`` on an ``add_subparsers()`` object; returns the sub-parser."""
    from mmunlearn.attack.probes import PROBES
    from mmunlearn.attack.transforms import TRANSFORMS

    a = subparsers.add_parser(
        "attack",
        help="does the forgetting hold? relearning, rephrased pictures, text-only, CKA",
        description="Probe an unlearned model: fine-tune it a few steps on k forget (or retain) "
        "items and score the held-out forget items (relearning attack); score the forget "
        "pictures cropped, jittered, blurred, posterised and grey; ask the forget people's "
        "questions by name without a picture; per-layer linear CKA against --vanilla on forget "
        "and retain inputs. Every number with a bootstrap interval; attack.json, attack.md, "
        "attack.png under --out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a.add_argument("--config", help="YAML/JSON file of option: value defaults")
    m = a.add_argument_group("models")
    m.add_argument("--model", metavar="DIR|HUB_ID", help="the unlearned model (required)")
    m.add_argument("--vanilla", metavar="DIR|HUB_ID", help="the model before unlearning")
    m.add_argument("--processor", metavar="DIR|HUB_ID", help="processor when a folder has none")
    m.add_argument("--dtype", choices=list(DTYPES), default=None, help="load the models so")
    add_vision_modules(m)
    _data_options(a)
    p = a.add_argument_group("probes")
    p.add_argument("--probes", type=_csv("probe", PROBES), default=None, metavar="A,B",
                   help=f"which probes ({','.join(PROBES)}; default all, cka only with "
                   "--vanilla)")  # fmt: skip
    p.add_argument("--relearn-on", choices=["forget", "retain"], default="forget",
                   help="relearn on forget training items (default) or retain ones")  # fmt: skip
    p.add_argument("--relearn-k", type=int, default=8, metavar="K", help="items (default 8)")
    p.add_argument("--relearn-steps", type=int, default=20, metavar="N", help="default 20")
    p.add_argument(
        "--relearn-lr",
        type=float,
        default=1e-5,
        metavar="LR",
        help="AdamW lr (default 1e-5, a 7B model's; the tiny models need ~1e-3)",
    )
    p.add_argument("--relearn-batch-size", type=int, default=4, metavar="N", help="default 4")
    p.add_argument(
        "--transforms",
        type=_csv("transform", TRANSFORMS),
        default=TRANSFORMS,
        metavar="A,B",
        help=f"picture transforms (default {','.join(TRANSFORMS)})",
    )
    p.add_argument("--cka-items", type=int, default=64, metavar="N",
                   help="forget and retain inputs of the CKA (default 64 each)")  # fmt: skip
    r = a.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=16, metavar="N", help="default 16")
    r.add_argument("--seed", type=int, default=0, help="every draw (default 0)")
    r.add_argument("--n-boot", type=int, default=1000, metavar="N", help="default 1000")
    r.add_argument("--ci-method", choices=["percentile", "BCa"], default="percentile")
    r.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--out", default="runs/attack", help="output folder (default runs/attack)")
    a.set_defaults(fn=run)
    return a


def _check(args) -> tuple:
    """The checks argparse cannot make (a --config may give the values); the probes run."""
    from mmunlearn.attack.probes import PROBES

    if not args.model:
        raise UsageError("give --model DIR: the unlearned model")
    if args.clear:
        raise UsageError("--clear: attack reads --synthetic or --mllmu DIR (CLEAR not yet)")
    if not (args.synthetic or args.mllmu):
        raise UsageError("give one data source, --synthetic or --mllmu DIR")
    bounds = (
        ("--relearn-k", args.relearn_k, 1),
        ("--relearn-steps", args.relearn_steps, 0),
        ("--relearn-batch-size", args.relearn_batch_size, 1),
        ("--cka-items", args.cka_items, 3),
        ("--n-boot", args.n_boot, 1),
        ("--batch-size", args.batch_size, 1),
    )
    for flag, v, low in bounds:
        if v < low:
            raise UsageError(f"{flag} {v}: must be >= {low}")
    if not args.relearn_lr > 0:
        raise UsageError(f"--relearn-lr {args.relearn_lr}: must be > 0")
    probes = tuple(args.probes or PROBES)
    if "cka" in probes and not args.vanilla:
        if args.probes:
            raise UsageError("--probes cka compares with the vanilla model: give --vanilla DIR")
        probes = tuple(p for p in probes if p != "cka")
    if args.out:
        check_out(args.out)
    return probes


def _data(args):
    """The probes' data. A folder or file that is not there is a UsageError (exit 2); one that
    is there but unreadable raises DataFormatError naming it (exit 1), as in every command."""
    from mmunlearn.attack import probes as P

    try:
        if args.synthetic:
            from mmunlearn.data.synthetic import make_benchmark

            return P.synthetic_data(make_benchmark(n_people=args.people, seed=args.seed),
                                    args.limit)  # fmt: skip
        return P.mllmu_data(args.mllmu, args.split, args.seed, args.limit)
    except FileNotFoundError as e:
        raise UsageError(f"cannot read the data: {e}") from e


def _model(args, which: str, dev):
    import torch

    dtype = getattr(torch, args.dtype) if args.dtype else None
    path = args.model if which == "--model" else args.vanilla
    return _load(path, which, args.processor, dev, dtype, args.vision_modules)


def run(args) -> int:
    """Run ``mmunlearn attack`` from parsed arguments; returns the exit status."""
    import torch

    from mmunlearn.attack import probes as P
    from mmunlearn.attack import report
    from mmunlearn.cli.common import device

    t0 = time.time()
    probes = _check(args)
    dev = device(args, False)
    data = _data(args)
    try:
        opts = P.options(
            probes=probes, relearn_on=args.relearn_on, relearn_k=args.relearn_k,
            relearn_steps=args.relearn_steps, relearn_lr=args.relearn_lr,
            relearn_batch_size=args.relearn_batch_size, transforms=tuple(args.transforms),
            cka_items=args.cka_items, batch_size=args.batch_size, seed=args.seed,
            n_boot=args.n_boot, ci_method=args.ci_method, progress=not args.no_progress,
        )  # fmt: skip
        plan = P.AttackPlan.build(data, opts)
    except ValueError as e:
        flag = {"relearn": "--relearn-k", "images": "--probes", "text": "--probes",
                "cka": "--cka-items"}.get(str(e).split(":")[0], "--probes")  # fmt: skip
        raise UsageError(f"{flag}: {e}") from e
    vanilla = None
    if args.vanilla:
        model, _tok, adapter = _model(args, "--vanilla", dev)
        torch.manual_seed(args.seed)
        vanilla = P.run_model(model, adapter, plan, opts)
        print("attack: vanilla scored")
        del model
    model, _tok, adapter = _model(args, "--model", dev)
    torch.manual_seed(args.seed)
    unlearned = P.run_model(model, adapter, plan, opts)
    print("attack: unlearned scored")
    relearned = None
    if "relearn" in probes:
        relearned = P.relearn(model, adapter, plan, opts, dev)
        print("attack: relearned scored")
    results = P.assemble(plan, opts, unlearned, vanilla, relearned)
    results["models"] = {"unlearned": args.model, **({"vanilla": args.vanilla} if args.vanilla
                                                      else {})}  # fmt: skip
    results["probes"] = list(probes)
    results["seconds"] = round(time.time() - t0, 1)
    results["config"] = {k: v for k, v in vars(args).items() if k != "fn"}
    if not args.vanilla:
        results["notes"] = ["No --vanilla: no CKA and no vanilla column."]
    paths = report.write(results, args.out)
    print(report.markdown({k: v for k, v in results.items() if k != "config"}))
    print("wrote " + ", ".join(paths.values()))
    return 0
