"""What every ``mmunlearn`` subcommand shares: the usage error, options defined once, config
files, the torchrun / device set-up and rank-0 printing."""

from __future__ import annotations

import argparse
import json
import os


class UsageError(Exception):
    """A bad command line or config value: one line naming it, exit code 2."""


def add_fast(p: argparse.ArgumentParser, what: str = "") -> None:
    """``--fast``: a seconds-long smoke configuration of the command (not a result)."""
    p.add_argument(
        "--fast",
        action="store_true",
        help=f"a seconds-long smoke configuration{what}: not a result",
    )


def at_least(minimum: int):
    """An argparse type: an integer ≥ ``minimum`` (argparse's message names the flag)."""

    def conv(text: str) -> int:
        try:
            v = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {minimum}, got {v}")
        return v

    conv.__name__ = "int"
    return conv


def positive(text: str) -> float:
    """An argparse type: a positive finite number."""
    try:
        v = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {v}")
    return v


def add_device(p, help_: str = "cpu or cuda (under torchrun: cuda:LOCAL_RANK)") -> None:
    p.add_argument("--device", default="cpu", help=help_)


def add_seed(p, help_: str = "seed of every random draw (default 0)") -> None:
    p.add_argument("--seed", type=int, default=0, help=help_)


def add_torchrun(p) -> None:
    """``--fsdp`` and ``--mixed-precision`` (FSDP2 under torchrun)."""
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="require a torchrun launch (FSDP2 is used whenever WORLD_SIZE > 1)",
    )
    p.add_argument(
        "--mixed-precision",
        default="auto",
        choices=["auto", "bf16", "none"],
        help="FSDP2 policy: bf16 parameters, fp32 gradient reduction (auto: bf16 on CUDA)",
    )


def add_vision_modules(p) -> None:
    """``--vision-modules A,B``: the vision side by module name (for a model whose vision
    side is not found from its structure, or to choose another); kept in its config.json."""
    p.add_argument(
        "--vision-modules",
        metavar="A,B",
        help="the vision side's modules by name, comma-separated (e.g. vision_tower,"
        "multi_modal_projector), when it is not found from the model; saved with the model",
    )


def add_mask_rule(p) -> None:
    """``--gamma`` / ``--fraction``: the saliency mask's rule."""
    p.add_argument("--gamma", type=float, default=1.0, help="mask threshold γ (default 1.0)")
    p.add_argument(
        "--fraction",
        type=float,
        default=None,
        help="exact top-k mask: this fraction of each group's weights instead of γ (e.g. 0.05)",
    )


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that keeps the ``Action`` of each option it (or one of its groups)
    adds, by ``dest``, so a config file can be checked against the options with argparse's
    own types and choices (argparse itself keeps them only in private attributes)."""

    def __init__(self, *args, **kwargs):
        self.options: dict[str, argparse.Action] = {}  # before __init__ adds --help
        super().__init__(*args, **kwargs)

    def _remember(self, add):
        def add_argument(*args, **kwargs):
            action = add(*args, **kwargs)
            self.options[action.dest] = action
            return action

        return add_argument

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.options[action.dest] = action
        return action

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        group.add_argument = self._remember(group.add_argument)
        make = group.add_mutually_exclusive_group

        def mutex(*a, **kw):
            m = make(*a, **kw)
            m.add_argument = self._remember(m.add_argument)
            return m

        group.add_mutually_exclusive_group = mutex
        return group

    def add_mutually_exclusive_group(self, *args, **kwargs):
        group = super().add_mutually_exclusive_group(*args, **kwargs)
        group.add_argument = self._remember(group.add_argument)
        return group

    def error(self, message):
        """One line on stderr naming the bad input (argparse prints the usage block too)."""

        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def check_out(path: str, flag: str = "--out") -> None:
    """``path`` can hold the command's outputs: not an existing file, and writable (its
    first existing ancestor is checked, nothing is created). UsageError otherwise."""
    from pathlib import Path

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path}: an existing file, not a directory")
    q = p
    while not q.exists():
        if q.parent == q:
            break
        q = q.parent
    if q.exists() and not q.is_dir():
        raise UsageError(f"{flag} {path}: {q} is a file, so the directory cannot be created")
    if not os.access(q, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {q} is not writable")


def _config_value(path: str, key: str, action: argparse.Action, value):
    """``value`` of config key ``key`` converted and checked like the command-line option."""
    flag = action.option_strings[-1] if action.option_strings else key

    def bad(why: str):
        return UsageError(f"--config {path}: {key}: {value!r} {why} (as {flag})")

    if value is None:  # `key: null` (or an empty value) leaves the option at its default
        return action.default
    if action.nargs == 0:  # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise bad("is not true or false")
        return action.const if value else action.default
    joins = isinstance(action, JoinAction)  # a comma-separated list option: a list is fine
    many = joins or action.nargs in ("*", "+") or isinstance(action.default, list)
    values = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise bad("is a list; one value expected")
    out = []
    for v in values:
        if isinstance(v, (dict, list)) or v is None:
            raise bad("is not a single value")
        takes_bool = action.type is boolean or getattr(action.type, "accepts_bool", False)
        if isinstance(v, bool) and action.type not in (None, str) and not takes_bool:
            raise bad("is a boolean")
        try:
            v = action.type(str(v)) if action.type is not None else str(v)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise bad(f"is not valid ({e})") from e
        if action.choices is not None and v not in action.choices:
            raise bad(f"is not one of {', '.join(map(str, action.choices))}")
        out.append(v)
    if joins:
        return _config_value(path, key, action, ",".join(out)) if len(out) > 1 else out[0]
    return out if many else out[0]


def _config_keys(parser: Parser) -> dict:
    """``{key: action}``: an option's dest and its long flag (``steps`` for ``--steps``, whose
    dest is ``max_steps``), dashes as underscores."""
    out = {}
    for d, a in parser.options.items():
        if d in ("help", "config"):
            continue
        out[d] = a
        for flag in a.option_strings:
            if flag.startswith("--"):
                out.setdefault(flag[2:].replace("-", "_"), a)
    return out


def builtin_configs(suffixes=(".yaml", ".yml", ".json")) -> list[str]:
    """Names of the configs shipped with the package (``mllmu/llava-1.5-7b``, …)."""
    from importlib import resources

    root = resources.files("mmunlearn") / "configs"
    out: list[str] = []

    def walk(node, prefix):
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(suffixes):
                out.append(prefix + child.name.rsplit(".", 1)[0])

    if root.is_dir():
        walk(root, "")
    return out


def config_path(name: str, flag: str = "--config", suffixes=(".yaml", ".yml", ".json")) -> str:
    """A config file's path: ``name`` itself when it exists, else the package's built-in config
    of that name (``mllmu/llava-1.5-7b``, with or without its suffix). A name that is neither
    is a :class:`UsageError` listing the built-in names."""
    from importlib import resources

    if os.path.exists(name):
        return name
    root = resources.files("mmunlearn") / "configs"
    stem = name.removeprefix("configs/")
    for cand in [stem] + [stem + s for s in suffixes]:
        node = root.joinpath(*cand.split("/"))
        if cand.endswith(suffixes) and node.is_file():
            return str(node)
    known = ", ".join(builtin_configs(suffixes))
    raise UsageError(f"{flag} {name}: no such file, and no built-in config of that name "
                     f"(built-in: {known})")  # fmt: skip


def load_config(path: str, parser: Parser, siblings: tuple = ()) -> dict:
    """Option values from a YAML or JSON mapping (``key: value``, dashes or underscores), each
    converted and checked as the command-line option would be. An unknown key (a typo) or a
    bad value is a :class:`UsageError` naming the file, the key and what is accepted. Keys of
    ``siblings`` (commands sharing config files, e.g. ``unlearn``'s ``method`` read by
    ``saliency``) that this command lacks are skipped."""
    import difflib

    import yaml

    path = config_path(path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f) if path.endswith((".yaml", ".yml")) else json.load(f)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UsageError(f"--config {path}: cannot read it ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option: value")
    known = _config_keys(parser)
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key not in known and any(key in _config_keys(p) for p in siblings):
            continue
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {near[0].replace('_', '-')!r}?" if near else ""
            raise UsageError(f"--config {path}: unknown option {k!r}{hint}")
        out[known[key].dest] = _config_value(path, str(k), known[key], v)
    return out


# ------------------------------------------------------------------------------------------------
# the run configuration's options: one per RunConfig field, generated from its metadata
# ------------------------------------------------------------------------------------------------


def boolean(text: str) -> bool:
    """``true`` / ``false`` (also yes/no, 1/0, on/off)."""
    t = str(text).strip().lower()
    if t in ("true", "yes", "1", "on"):
        return True
    if t in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def _number(kind, *, none: bool, same: bool):
    """A converter for a numeric option that may also accept ``none`` / ``same``."""

    def conv(text: str):
        t = str(text).strip().lower()
        if none and t == "none":
            return None
        if same and t == "same":
            return "same"
        return kind(text)

    words = [w for w, on in (("none", none), ("same", same)) if on]
    conv.__name__ = " or ".join([kind.__name__, *words])
    return conv


def _checked(conv, name: str):
    """``conv`` followed by RunConfig's own check of field ``name`` (an out-of-range value is
    refused where it is parsed, so the message names the flag or the config file's key)."""

    def check(text: str):
        from mmunlearn.config import RunConfig

        v = conv(text)
        try:
            RunConfig(**{name: v})
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
        return v

    check.__name__ = conv.__name__
    return check


class JoinAction(argparse.Action):
    """A comma-separated list option that may also be repeated: ``--report-to a,b`` and
    ``--report-to a --report-to b`` give ``"a,b"`` (a repeat on the command line extends the
    command line's value, never a ``--config`` default)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = f"_{self.dest}_given"
        prev = getattr(namespace, self.dest, None) if getattr(namespace, seen, False) else None
        value = values if prev is None else self.type(f"{prev},{values}")
        setattr(namespace, self.dest, value)
        setattr(namespace, seen, True)


def _option_kwargs(f) -> dict:
    """argparse keywords of the option of RunConfig field ``f`` (default None: the recipe's)."""
    meta, t = f.metadata, str(f.type)
    default = "same" if f.default == "same" else f.default
    kw = {"default": None, "help": f"{meta['help']} (default: {default})"}
    if t.startswith("bool"):
        kw.update(nargs="?", const=True, type=boolean, metavar="BOOL")
    elif "float" in t or "int" in t:
        kind = float if "float" in t else int
        kw["type"] = _checked(_number(kind, none="None" in t, same="str" in t), f.name)
    if meta.get("choices"):
        kw["choices"] = list(meta["choices"])
    if meta.get("many"):
        kw.update(action=JoinAction, type=_joined(f.name), metavar="A,B")
    return kw


def _joined(name: str):
    """A converter normalising a comma-separated list field (``RunConfig`` does the check)."""

    def conv(text: str) -> str:
        from mmunlearn.config import RunConfig

        try:
            return getattr(RunConfig(**{name: text}), name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    conv.__name__ = "list"
    return conv


def add_run_options(p, command: str) -> None:
    """An option for every :class:`~mmunlearn.config.RunConfig` field of ``command``, in its
    group (``--lr``, ``--steps`` for ``max_steps``, ...). Their defaults are None: a given
    value overrides the recipe's (:func:`run_config`)."""
    from mmunlearn.config import GROUPS, cli_fields

    groups: dict = {}
    for f in cli_fields(command):
        g = f.metadata["group"]
        if g not in groups:
            groups[g] = p.add_argument_group(GROUPS[g][0])
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        kw = _option_kwargs(f)
        if "metavar" not in kw and "choices" not in kw:
            kw["metavar"] = flag[2:].upper().replace("-", "_")
        groups[g].add_argument(flag, dest=f.name, **kw)


def run_config(args, command: str, base):
    """``base`` (a recipe's :class:`~mmunlearn.config.RunConfig`) with every run option given
    on the command line or in ``--config`` (UsageError naming the option for a bad value)."""
    from dataclasses import replace

    from mmunlearn.config import cli_fields

    given = {}
    for f in cli_fields(command):
        v = getattr(args, f.name, None)
        if v is not None:
            given[f.name] = v
    try:
        return replace(base, **given)
    except ValueError as e:
        name = str(e).split()[0]
        f = next((f for f in cli_fields(command) if f.name == name), None)
        flag = f.metadata.get("flag", "--" + name.replace("_", "-")) if f else name
        raise UsageError(f"{flag} {given.get(name, '')}: {e}") from e


def say(*a) -> None:
    """Print on rank 0 only (under torchrun every rank runs the command)."""
    from mmunlearn.distributed import is_rank0

    if is_rank0():
        print(*a, flush=True)


def start_distributed(args) -> bool:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1): FSDP2 then."""
    from mmunlearn import distributed

    # NCCL only for CUDA tensors: a CPU run on a GPU host still needs gloo
    cuda = str(getattr(args, "device", "cpu")).startswith("cuda")
    on = distributed.init_from_env(None if cuda else "gloo")
    if getattr(args, "fsdp", False) and not on:
        raise UsageError("--fsdp: launch with torchrun --nproc-per-node N (WORLD_SIZE is 1)")
    return on


def device(args, distributed: bool):
    """The torch device of this rank."""
    import torch

    if distributed and str(args.device).startswith("cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device!r}: {e}") from e
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise UsageError(f"--device {args.device}: this machine has {n} CUDA device(s)")
    return dev


def mixed_precision(args, dev, distributed: bool) -> str:
    """``--mixed-precision`` resolved: bf16 only for FSDP2 on CUDA under ``auto``."""
    mp = args.mixed_precision
    if mp == "auto":
        return "bf16" if (distributed and dev.type == "cuda") else "none"
    if mp == "bf16" and not distributed:
        say("--mixed-precision bf16 applies to FSDP2 (torchrun) only; this run is fp32")
        return "none"
    return mp
