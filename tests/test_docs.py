"""The README and docs/ as a user follows them: every relative link resolves, every
``mmunlearn`` command line in a shell block parses with the real parser (flags, choices,
built-in config names), every repository path named in backticks exists, every ``make``
target exists, the README's first screen holds the install, the two commands and the Python
example, and that Python example runs as written on a real-format checkpoint and JSONL files."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from realformat import llava_checkpoint

from mmunlearn.cli import build_parser
from mmunlearn.cli.common import config_path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# top-level folders of this repository: a backticked path starting with one must exist
REPO_DIRS = ("bench/", "docs/", "examples/", "experiments/", "kernels/", "mmunlearn/", "tests/")


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _command_lines(block: str) -> list[str]:
    """Logical lines of a shell block (continuations joined, comments dropped)."""
    out, cur = [], ""
    for raw in block.splitlines():
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(cur.strip())
        cur = ""
    return out


def _mmunlearn_argv(line: str) -> list[str] | None:
    """The argv of the ``mmunlearn`` command on ``line`` (direct, ``python -m mmunlearn.cli``
    or under torchrun), or None when the line runs something else."""
    words = shlex.split(line.replace("$(which mmunlearn)", "mmunlearn"))
    for i, w in enumerate(words):
        if w == "mmunlearn" or w.endswith("/mmunlearn"):
            return words[i + 1 :]
        if w == "-m" and i + 1 < len(words) and words[i + 1] == "mmunlearn.cli":
            return words[i + 2 :]
    return None


def test_every_relative_link_resolves():
    bad = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # external (no network here) or an anchor of the same page
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.exists():
                bad.append(f"{_rel(doc)}: {target}")
    assert not bad, "links that do not resolve:\n" + "\n".join(bad)


def test_docs_do_not_cite_files_outside_the_repository():
    bad = [_rel(d) for d in DOCS if re.search(r"\.\./shared|method\.md|design\.md", d.read_text())]
    assert not bad, f"docs citing files a user does not have: {bad}"


def test_every_command_line_parses():
    """Each ``mmunlearn …`` line of a shell block parses (argparse exits on an unknown flag or
    a bad choice) and its ``--config`` names a file or a built-in config."""
    parser = build_parser()
    seen, bad = 0, []
    for doc in DOCS:
        for block in _blocks(doc.read_text(), "bash"):
            for line in _command_lines(block):
                argv = _mmunlearn_argv(line)
                if argv is None:
                    continue
                seen += 1
                try:
                    args = parser.parse_args(argv)
                    if getattr(args, "config", None):
                        config_path(args.config)
                except SystemExit as e:
                    bad.append(f"{_rel(doc)}: {line} (exit {e.code})")
                except Exception as e:  # noqa: BLE001 - reported below
                    bad.append(f"{_rel(doc)}: {line} ({e})")
    assert seen >= 20, f"only {seen} command lines found: is the block syntax still ```bash?"
    assert not bad, "command lines that do not parse:\n" + "\n".join(bad)


def test_every_repository_path_in_backticks_exists():
    bad = []
    for doc in DOCS:
        for token in re.findall(r"`([^`\s]+)`", doc.read_text()):
            path = token.split(":")[0].rstrip(".,)")
            if any(c in path for c in "*{}<>$|"):
                continue
            if re.match(r"configs/(mllmu|clear|models|finetune)/", path):
                # the built-in configs, found by name (other configs/ paths quote other projects)
                try:
                    config_path(path)
                except Exception:  # noqa: BLE001 - reported below
                    bad.append(f"{_rel(doc)}: {token}")
                continue
            if not path.startswith(REPO_DIRS):
                continue
            if not (ROOT / path).exists():
                bad.append(f"{_rel(doc)}: {token}")
    assert not bad, "paths named in the docs that do not exist:\n" + "\n".join(bad)


def test_every_make_target_named_exists():
    targets = set(re.findall(r"^([a-z][\w.-]*):", (ROOT / "Makefile").read_text(), re.M))
    pat = r"(?:^|`)make ([a-z][\w-]*)\b"  # in code: at a line start or after a backtick
    named = {m for d in DOCS for m in re.findall(pat, d.read_text(), re.M)}
    assert named and named <= targets, f"make targets named but missing: {named - targets}"


def test_the_readme_first_screen_opens_the_door():
    first = "\n".join((ROOT / "README.md").read_text().splitlines()[:60])
    for needle in ("pip install", "make demo", "make test", "```python"):
        assert needle in first, f"the README's first screen lacks {needle!r}"


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's ``python`` block, as written, in a folder holding what it names: a
    real-format LLaVA checkpoint (with its processor and chat template) at models/my-llava and
    JSONL forget / retain files with PNG pictures under data/."""
    from test_custom_data import pictures, rows_of, write_jsonl

    torch.set_num_threads(1)
    (block,) = _blocks((ROOT / "README.md").read_text(), "python")
    assert len(block.strip().splitlines()) <= 12
    llava_checkpoint(tmp_path / "ck")
    shutil.copytree(tmp_path / "ck", tmp_path / "models" / "my-llava")
    pictures(tmp_path / "data")
    write_jsonl(tmp_path / "data" / "forget.jsonl", rows_of(2))
    write_jsonl(tmp_path / "data" / "retain.jsonl", rows_of(4, start=2))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    masks = scope["masks"]
    assert set(masks) == {"vision", "language", "both"}
    out = tmp_path / "runs" / "forgotten"
    assert (out / "config.json").exists() and any(out.glob("*.safetensors"))
    before = scope["load_checkpoint"]("models/my-llava")[0].state_dict()
    after = scope["model"].state_dict()
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert moved, "the example's unlearning moved no weight"


@pytest.mark.parametrize("doc", ["real_models.md", "failures.md", "kernels.md", "optimizer.md"])
def test_moved_pages_stand_alone(doc):
    """The pages the README's sections moved to start with their own title."""
    text = (ROOT / "docs" / doc).read_text()
    assert text.startswith("# ")
