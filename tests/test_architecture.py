"""The package's import graph: data flows one way (docs/architecture.md).

Every module of ``mmunlearn`` (``kernels/`` is ``mmunlearn.kernels``) is assigned a layer below;
a module may import modules of its own layer or lower ones, never a higher one, and the graph
has no cycle. Imports inside functions count (they are found with ``ast``). A new module must be
added to a layer here, which is the point: its place in the design is decided, not drifted into.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import from its own layer and every layer before it
LAYERS: list[tuple[str, list[str]]] = [
    ("kernels", ["mmunlearn.kernels", "mmunlearn.kernels.*"]),
    (
        "foundations",
        [
            "mmunlearn._version",
            "mmunlearn.io",
            "mmunlearn.rng",
            "mmunlearn.distributed",
            "mmunlearn.data",
            "mmunlearn.data.schema",
            "mmunlearn.data.batching",
            "mmunlearn.data.parquet",
            "mmunlearn.data.portraits",
        ],
    ),
    (
        "names and data",
        [
            "mmunlearn.params",
            "mmunlearn.data.mllmu",
            "mmunlearn.data.clear",
            "mmunlearn.data.synthetic",
            "mmunlearn.data.recipe",
            "mmunlearn.data.linked",
            "mmunlearn.data.linked_probes",
            "mmunlearn.data.eval_sets",
            "mmunlearn.data.custom",
        ],
    ),
    ("losses and models", ["mmunlearn.losses", "mmunlearn.models", "mmunlearn.models.*"]),
    ("fisher", ["mmunlearn.fisher"]),
    ("saliency", ["mmunlearn.saliency"]),
    ("masks", ["mmunlearn.masks"]),
    ("optimizer", ["mmunlearn.optim_base", "mmunlearn.optim"]),
    ("methods", ["mmunlearn.methods", "mmunlearn.methods.*"]),
    ("run config", ["mmunlearn.config"]),
    ("fsdp", ["mmunlearn.fsdp"]),
    ("checkpoint", ["mmunlearn.checkpoint"]),
    (
        "loop",
        [
            "mmunlearn.reporters",
            "mmunlearn.runlog",
            "mmunlearn.runctl",
            "mmunlearn.stepper",
            "mmunlearn.loop",
            "mmunlearn.train",
            "mmunlearn.presets",
        ],
    ),
    ("eval", ["mmunlearn.eval", "mmunlearn.eval.*"]),
    ("attack", ["mmunlearn.attack", "mmunlearn.attack.*"]),
    (
        "applications",
        [
            "mmunlearn.tinyrun",
            "mmunlearn.modelcard",
            "mmunlearn.demo",
            "mmunlearn.demo_linked",
            "mmunlearn.estimate",
        ],
    ),
    ("cli", ["mmunlearn.cli", "mmunlearn.cli.*"]),
    ("api", ["mmunlearn"]),
]


def modules() -> dict[str, Path]:
    """``{module name: file}`` of every module of the package."""
    out = {}
    for base, prefix in (
        (ROOT / "mmunlearn", "mmunlearn"),
        (ROOT / "kernels", "mmunlearn.kernels"),
    ):
        for f in sorted(base.rglob("*.py")):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = f
    return out


def layer_of(name: str) -> int | None:
    for i, (_, pats) in enumerate(LAYERS):
        for p in pats:
            if name == p or (p.endswith(".*") and name.startswith(p[:-1])):
                return i
    return None


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (anywhere in the file)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("mmunlearn"):
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {n: imports(n, f, known) for n, f in mods.items()}


def test_every_module_has_a_layer():
    missing = [n for n in modules() if layer_of(n) is None]
    assert not missing, f"add these modules to a layer in {__file__}: {missing}"


def test_no_import_goes_up_a_layer():
    bad = []
    for mod, deps in graph().items():
        for d in deps:
            if (
                layer_of(d) is not None
                and layer_of(mod) is not None
                and layer_of(d) > layer_of(mod)
            ):
                bad.append(
                    f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
                )
    assert not bad, "imports going up a layer:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    g = graph()
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not sccs, f"import cycles: {sccs}"


def test_every_module_says_its_job_and_stays_small():
    """A docstring on every module and no module of ``mmunlearn/`` over ≈500 lines (one job per
    file; the kernel files are each one op with its launchers and twin, and may be longer)."""
    for name, path in modules().items():
        text = path.read_text()
        assert ast.get_docstring(ast.parse(text)), f"{path} has no module docstring"
        if not name.startswith("mmunlearn.kernels"):
            assert len(text.splitlines()) <= 520, f"{path}: {len(text.splitlines())} lines"


def test_the_checker_catches_an_upward_import(tmp_path):
    """The checker itself can fail: a lower-layer module importing a higher one is found."""
    f = tmp_path / "io.py"
    f.write_text("def f():\n    from mmunlearn.loop import unlearn\n")
    deps = imports("mmunlearn.io", f, set(modules()))
    assert deps == {"mmunlearn.loop"}
    assert layer_of("mmunlearn.loop") > layer_of("mmunlearn.io")


MAX_FUNCTION_LINES = 80


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``"path:line name (n lines)"`` of every function (methods and nested ones included) of
    ``path`` longer than ``limit`` lines, decorators excluded."""
    out = []
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = n.end_lineno - n.lineno + 1
            if length > limit:
                out.append(f"{path}:{n.lineno} {n.name} ({length} lines)")
    return out


def test_every_function_reads_in_one_screen():
    """No function of ``mmunlearn/`` over 80 lines (the kernel files, one op each with its
    Triton kernel written out in full, are exempt as from the module-size rule)."""
    long = [
        x
        for name, path in modules().items()
        if not name.startswith("mmunlearn.kernels")
        for x in long_functions(path)
    ]
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_the_length_check_can_fail(tmp_path):
    f = tmp_path / "m.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(80))
    f.write_text(f"def short():\n    pass\n\n\ndef long():\n{body}")
    assert long_functions(f) == [f"{f}:5 long (81 lines)"]
    assert long_functions(f, limit=81) == []


def test_the_package_never_imports_bench():
    """``bench/`` (and ``tests/``, ``experiments/``, ``examples/``) sit beside the package and
    are never imported by it, nor put on ``sys.path``."""
    bad = []
    for name, path in modules().items():
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [node.module or ""]
            for m in mods:
                if m.split(".")[0] in ("bench", "run", "tests", "experiments", "examples"):
                    bad.append(f"{name} imports {m}")
        if "sys.path" in text:
            bad.append(f"{name} touches sys.path")
    assert not bad, bad


def documented_layers() -> list[str]:
    """The layer names of docs/architecture.md's layer table, top (highest) first."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("```")[1]
    names = []
    for line in block.splitlines():
        if line.startswith(" ") and not line.startswith("  ") and "─" not in line:
            cell = line[1:20].rstrip()
            if cell and cell != "layer":
                names.append(cell)
    return names


def test_the_documented_layer_order_is_the_checked_one():
    """docs/architecture.md's table lists exactly :data:`LAYERS`, highest first: the order is
    written once (here) and the docs are checked against it."""
    assert documented_layers() == [name for name, _ in reversed(LAYERS)]
