"""``mmunlearn compare``: a list of methods on one model and one data set, then one evaluation
of the vanilla model, every method and the reference (the paper's table layout, with
intervals, the gap to the reference and the trade-off plot).

Nothing is re-implemented: every phase is the real command's run function on a namespace that
the command's own parser made (its defaults), with compare's values laid over it —
``saliency`` (once, for MMUnlearner, unless ``--mask FILE``), ``unlearn`` (one folder per
method, ``--resume auto``: the run lock of that folder, preemption exit 75, an interrupted
method resumes from its checkpoint) and ``eval`` (``results.json``, ``report.md``,
``tradeoff.png`` under ``--out``).

Layout of ``--out``: ``compare.json`` (the options that make the runs, checked on a rerun),
``vanilla/model`` (``--tiny`` only: the tiny model after ``--vanilla-steps``, built once, the
start of every method and the ``vanilla`` row), ``saliency/`` (the masks), ``<method>/``
(``model/``, ``unlearn.json``, ``run/``: ``mmunlearn unlearn``'s folder) and the eval files.
A method whose folder holds ``unlearn.json`` and ``model/`` is skipped on a rerun.

``--world linked`` is the demo's comparison instead (:func:`run_linked`,
:func:`mmunlearn.demo_linked.run_linked_demo` with ``resume``): its own world, model and recipe,
every method to matched forgetting, the demo's table, kept one folder per method.
"""

from __future__ import annotations

import argparse
import os

from mmunlearn.cli.common import Parser, UsageError, add_run_options, check_out, say
from mmunlearn.cli.compare_linked import LINKED_ONLY, run_linked, world_options

EPILOG = """examples:
  mmunlearn compare --model models/llava-1.5-7b-hf --mllmu data/MLLMU-Bench --split 5 \\
      --methods ga,ga_diff,npo,mmunlearner --reference runs/retain95/model --out runs/cmp
  mmunlearn compare --tiny --synthetic --methods ga,ga_diff,mmunlearner --steps 8 --lr 1e-3 \\
      --reference runs/ref/model --out runs/cmp-tiny
  mmunlearn compare --world linked --out runs/cmp-linked
      (the demo's comparison — the linked world, every method to matched forgetting — with
      one folder per method, resumable; the same table as `mmunlearn demo`)
  (rerun the same command after a crash or preemption: finished methods are skipped)"""

DEFAULT_METHODS = "ga,ga_diff,npo,mmunlearner"
# options of `unlearn` that do not change what a method's run computes: a rerun may change them
NOT_IDENTITY = {"config", "device", "fsdp", "mixed_precision", "report_to", "log_every",
                "workers", "fisher_offload", "save_fisher"}  # fmt: skip
EVAL_DTYPE = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def register(sub):
    from mmunlearn.cli.data import add_data_options
    from mmunlearn.cli.unlearn import _model_options
    from mmunlearn.presets import RECIPES

    c = sub.add_parser(
        "compare",
        help="run several methods on one model and data set, then evaluate them together",
        description="Run each of --methods with `mmunlearn unlearn` (one folder per method "
        "under --out; the run options apply to every method; MMUnlearner's mask is computed "
        "once), then evaluate vanilla, every method and --reference with `mmunlearn eval` "
        "(results.json, report.md with intervals and the gap to the reference, tradeoff.png). "
        "Rerunning the same command skips finished methods and resumes an interrupted one. "
        "Values in --config are defaults; flags win; an unknown key is an error.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--config", help="YAML/JSON file of option: value defaults")
    c.add_argument(
        "--methods",
        default=None,
        metavar="A,B",
        help=f"methods to run, comma-separated (default {DEFAULT_METHODS}; with --world linked "
        "the demo's five, ga,ga_diff,kl_min,npo,mmunlearner, or all)",
    )
    _model_options(c)
    c.add_argument(
        "--reference",
        metavar="DIR|HUB_ID",
        help="the model trained without the forget set: the eval's row 'reference' and what "
        "the gap, forget quality and PrivLeak are measured against",
    )
    add_data_options(c, "compare")
    _recipe_options(c, RECIPES)
    add_run_options(c, "unlearn")
    _eval_options(c)
    c.add_argument("--device", default="cpu", help="cpu or cuda (one process)")
    c.add_argument("--out", default="runs/compare", help="output dir (default runs/compare)")
    world_options(c)
    c.set_defaults(fn=run_compare)
    return c


def _recipe_options(c, recipes) -> None:
    from mmunlearn.cli.common import add_mask_rule

    r = c.add_argument_group("recipe and mask")
    r.add_argument(
        "--recipe",
        default="mmunlearn",
        choices=list(recipes),
        help="ours (default) or the official code's semantics (docs/recipes.md)",
    )
    add_mask_rule(r)
    r.add_argument(
        "--fisher-offload",
        action="store_true",
        help="keep finished Fishers on the CPU (one fp32 set on the GPU)",
    )
    r.add_argument(
        "--save-fisher", action="store_true", help="also write the Fishers to --out/saliency/fisher"
    )
    r.add_argument("--mask", help="MMUnlearner's mask file (else computed once, in --out/saliency)")
    r.add_argument("--mask-group", default="both", choices=["vision", "language", "both"])
    r.add_argument(
        "--reference-model",
        help="the frozen reference of KL_Min, NPO, RMU, "
        "UNDIAL during unlearning (default: the start model)",
    )
    r.add_argument("--eval-items", type=int, default=16,
                   help="with --eval-every: items held out per set (as unlearn's)")  # fmt: skip


def _eval_options(c) -> None:
    e = c.add_argument_group("evaluation (as mmunlearn eval's)")
    e.add_argument(
        "--protocol",
        choices=["mmunlearn", "mllmu", "clear"],
        default="mmunlearn",
        help="mmunlearn (ours, default), mllmu or clear (docs/eval_protocols.md)",
    )
    e.add_argument(
        "--shots",
        default="official",
        metavar="N|official",
        help="--protocol mllmu: few-shot profiles per question",
    )
    e.add_argument(
        "--eval-batch-size",
        type=int,
        default=16,
        metavar="N",
        help="the evaluation's batch size (default 16)",
    )
    e.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="greedy generation length (default: the protocol's)",
    )
    e.add_argument(
        "--limit", type=int, default=None, metavar="N", help="at most N items per task and set"
    )
    e.add_argument(
        "--n-boot",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap draws of every interval (default 1000)",
    )
    e.add_argument("--ci-method", choices=["percentile", "BCa"], default="percentile")
    e.add_argument("--no-generation", action="store_true", help="skip generation metrics")
    e.add_argument("--no-letter-mcq", action="store_true", help="MCQ by option likelihood only")
    e.add_argument(
        "--no-unlearning-metrics",
        action="store_true",
        help="skip truth ratio / forget quality / utility / MIA",
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bars")  # fmt: skip


# ------------------------------------------------------------------------------------------------
# the namespaces of the real commands
# ------------------------------------------------------------------------------------------------


def _parsers() -> dict[str, Parser]:
    """Fresh ``saliency``, ``unlearn`` and ``eval`` parsers (the real ones)."""
    from mmunlearn.cli import evaluate, unlearn

    root = Parser(prog="mmunlearn")
    sub = root.add_subparsers(dest="cmd")
    made = [*unlearn.register(sub), evaluate.register(sub)]
    return {p.prog.split()[-1]: p for p in made}


def _namespace(parser: Parser, cmd: str, values: dict) -> argparse.Namespace:
    """``parser``'s defaults (as ``mmunlearn CMD`` with no flags) with ``values`` laid over
    those of its options."""
    ns = parser.parse_args([])
    for k, v in values.items():
        if k in parser.options and k != "help":
            setattr(ns, k, v)
    ns.cmd = cmd
    return ns


def _given(args) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "fn"}


def methods_list(text) -> list[str]:
    """``--methods`` checked: known names, at least one, no repeats (UsageError otherwise)."""
    from mmunlearn.methods import METHODS

    names = [m.strip().lower() for m in str(text or "").split(",") if m.strip()]
    if not names:
        raise UsageError(f"--methods {text!r}: give at least one method ({', '.join(METHODS)})")
    for m in names:
        if m not in METHODS:
            raise UsageError(f"--methods {text}: unknown method {m!r} (known: "
                             f"{', '.join(METHODS)})")  # fmt: skip
    if len(set(names)) != len(names):
        raise UsageError(f"--methods {text}: a method is named twice")
    return names


class Plan:
    """The folders and namespaces of one compare run."""

    def __init__(self, args, methods: list[str]):
        self.args, self.methods, self.out = args, methods, args.out
        self.parsers = _parsers()
        self.vanilla = os.path.join(self.out, "vanilla", "model") if args.tiny else args.model

    def unlearn_args(self, method: str) -> argparse.Namespace:
        a = self.args
        vals = {**_given(a), "method": method, "resume": "auto",
                "out": os.path.join(self.out, method), "mask": self.mask_file(method)}  # fmt: skip
        if a.tiny:  # every method starts from the one saved vanilla model
            vals.update(tiny=False, model=self.vanilla, vanilla_steps=0)
        return _namespace(self.parsers["unlearn"], "unlearn", vals)

    def saliency_args(self) -> argparse.Namespace:
        vals = {**_given(self.args), "out": os.path.join(self.out, "saliency")}
        if self.args.tiny:
            vals.update(tiny=False, model=self.vanilla, vanilla_steps=0)
        return _namespace(self.parsers["saliency"], "saliency", vals)

    def mask_file(self, method: str) -> str | None:
        if method != "mmunlearner":
            return None
        if self.args.mask:
            return self.args.mask
        return os.path.join(self.out, "saliency", f"mask_{self.args.mask_group}.safetensors")

    def eval_args(self) -> argparse.Namespace:
        a = self.args
        vals = {**_given(a), "model": [self.vanilla] + [self.model_dir(m) for m in self.methods],
                "label": ["vanilla", *self.methods], "tiny": False, "vanilla_steps": 0,
                "dtype": EVAL_DTYPE[a.dtype], "batch_size": a.eval_batch_size,
                "seed": a.seed if a.seed is not None else 0, "out": self.out}  # fmt: skip
        return _namespace(self.parsers["eval"], "eval", vals)

    def model_dir(self, method: str) -> str:
        return os.path.join(self.out, method, "model")

    def finished(self, method: str) -> bool:
        folder = os.path.join(self.out, method)
        return os.path.isfile(os.path.join(folder, "unlearn.json")) and os.path.isdir(
            self.model_dir(method)
        )


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def _check(args, plan: Plan) -> None:
    """Every input checked before anything runs (UsageError naming it)."""
    from mmunlearn.cli.data import data_source

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("compare runs in one process; under torchrun run `mmunlearn unlearn` "
                         "per method, then `mmunlearn eval`")  # fmt: skip
    check_out(args.out)
    if args.reference is None:
        say("compare: no --reference: the report has no gap to the reference")
    if args.mask and not os.path.isfile(args.mask):
        raise UsageError(f"--mask {args.mask}: no such file")
    _check_eval(args, plan)
    for m in plan.methods:  # data, model and mask-rule options, as unlearn checks them
        ns = plan.unlearn_args(m)
        ns.tiny, ns.model, ns.mask = args.tiny, args.model, None  # as given
        data_source(ns)


def _check_eval(args, plan: Plan) -> None:
    """The evaluation's inputs, checked now rather than after the training."""
    from mmunlearn.cli import evaluate
    from mmunlearn.models.loading import resolve

    evaluate._check(plan.eval_args())
    if args.protocol != "mmunlearn" and not getattr(args, args.protocol):
        raise UsageError(f"--protocol {args.protocol} evaluates {args.protocol} files: give "
                         f"--{args.protocol} DIR")  # fmt: skip
    if args.reference:
        try:
            resolve(args.reference, "--reference")
        except FileNotFoundError as e:
            raise UsageError(str(e)) from e


def _identity(args) -> dict:
    """The options that make the methods' runs (a finished method is reused only for these)."""
    skip = NOT_IDENTITY | {"methods", "out", "cmd", "debug", "reference"} | LINKED_ONLY
    evals = {a.dest for a in _eval_actions()}
    return {k: v for k, v in sorted(_given(args).items()) if k not in skip | evals}


def _eval_actions():
    p = Parser(prog="x")
    _eval_options(p)
    return [a for a in p.options.values() if a.dest != "help"]


def _record(args, plan: Plan) -> None:
    """``--out/compare.json``: the runs' options; a rerun with other ones is refused."""
    import json

    from mmunlearn.io import atomic_write_json

    path = os.path.join(args.out, "compare.json")
    ident = json.loads(json.dumps(_identity(args), default=str))
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f).get("options", {})
        diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
        if diff:
            opts = plan.parsers["unlearn"].options
            flags = ", ".join(opts[k].option_strings[-1] if k in opts else k for k in diff)
            raise UsageError(f"--out {args.out}: holds a compare run with other options "
                             f"({flags}); use another --out or the same options")  # fmt: skip
    atomic_write_json(path, {"options": ident, "methods": plan.methods})


def _vanilla(plan: Plan) -> None:
    """``--tiny``: the tiny model after ``--vanilla-steps``, built and saved once (as ``unlearn
    --tiny`` builds it), so every method starts from the same weights and eval sees them."""
    from mmunlearn.cli.unlearn import _prepare
    from mmunlearn.models import save_model

    if os.path.isdir(plan.vanilla):
        say(f"compare: vanilla: {plan.vanilla} is there; reused")
        return
    ns = _namespace(plan.parsers["unlearn"], "unlearn", {**_given(plan.args), "method": "ga",
                    "out": os.path.dirname(plan.vanilla)})  # fmt: skip
    _cfg, _data, model, adapter, _dev, _ref = _prepare(ns)
    proc = adapter.processor if adapter.processor is not None else adapter.tokenizer
    save_model(model, proc, plan.vanilla)
    say(f"compare: vanilla: wrote {plan.vanilla}")


def _saliency(plan: Plan) -> None:
    from mmunlearn.cli.unlearn import run_saliency

    ns = plan.saliency_args()
    if os.path.isfile(os.path.join(ns.out, "saliency.json")):
        say(f"compare: saliency: {ns.out} is finished; reused")
        return
    say(f"compare: saliency → {ns.out}")
    run_saliency(ns)


def _method(plan: Plan, method: str) -> bool:
    """Run ``method`` (resuming its folder) unless it is finished; True when it ran."""
    from mmunlearn.cli.unlearn import run_unlearn

    folder = os.path.join(plan.out, method)
    if plan.finished(method):
        say(f"compare: {method}: {folder} is finished (unlearn.json, model); skipped")
        return False
    say(f"compare: {method} → {folder}")
    rc = run_unlearn(plan.unlearn_args(method))
    if rc != 0:
        raise RuntimeError(f"compare: {method}: mmunlearn unlearn exited {rc}")
    if not plan.finished(method):  # its run finished earlier, but the model was never written
        raise RuntimeError(f"{folder}/run is finished but {folder}/model or unlearn.json is "
                           f"missing; delete {folder} and rerun")  # fmt: skip
    return True


def run_compare(args) -> int:
    from mmunlearn.runctl import PreemptedError, Preemption, RunLock

    if getattr(args, "world", None) == "linked":
        root = Parser(prog="mmunlearn")  # a fresh parser: its defaults and flag names
        return run_linked(args, register(root.add_subparsers(dest="cmd")))
    for k in ("threads", "fast"):
        if getattr(args, k, None):
            raise UsageError(f"--{k} applies to --world linked only")
    methods = methods_list(DEFAULT_METHODS if args.methods is None else args.methods)
    plan = Plan(args, methods)
    _check(args, plan)
    with RunLock(args.out), Preemption() as outer:

        def between(what: str) -> None:  # a signal that came between two phases
            if outer.signal is not None:
                raise PreemptedError(f"{outer.signal} before {what}; rerun the same command "
                                     "to continue (finished methods are kept)")  # fmt: skip

        _record(args, plan)
        if args.tiny:
            _vanilla(plan)
        if "mmunlearner" in methods and not args.mask:
            between("the saliency mask")
            _saliency(plan)
        ran = []
        for m in methods:
            between(m)
            if _method(plan, m):
                ran.append(m)
        between("the evaluation")
        say(f"compare: trained {', '.join(ran) or 'none'}; evaluating vanilla, "
            f"{', '.join(methods)}" + (", reference" if args.reference else ""))  # fmt: skip
        return _evaluate(plan)


def _evaluate(plan: Plan) -> int:
    from mmunlearn.cli import evaluate

    return evaluate.run(plan.eval_args())


__all__ = ["methods_list", "register", "run_compare"]
