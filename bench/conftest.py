"""bench/: pytest-benchmark suites. Run ``pytest bench`` (CPU: torch rows at small sizes, GPU
rows skipped) or ``python bench/run.py`` for the side-by-side table."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
