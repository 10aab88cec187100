"""``python -m mmunlearn.cli`` (e.g. under ``torchrun ... -m mmunlearn.cli demo``)."""

from mmunlearn.cli import main

raise SystemExit(main())
