"""What ``pip install .`` (not editable) ships: every package folder of the source tree.

An editable install maps ``mmunlearn`` onto the source folder, so a subpackage missing from
pyproject's ``packages`` list still imports there and only a real install loses it (issue #23:
``mmunlearn.methods`` and ``mmunlearn.attack`` were missing).
"""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        st = tomllib.load(f)["tool"]["setuptools"]
    listed = set(st["packages"])
    dirs = {name: ROOT / path for name, path in st["package-dir"].items()}
    found = set()
    for top, base in dirs.items():
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((top, *rel)))
    assert found == listed
