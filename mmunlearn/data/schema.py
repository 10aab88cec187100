"""The one sample type every reader produces and every model adapter consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One training / evaluation item.

    question: the user turn (without any image placeholder; the adapter inserts it).
    answer:   the target text (the only tokens that carry loss with ``ans_only``).
    image:    a ``PIL.Image.Image`` for multimodal items, ``None`` for text-only items.
    entity:   the person / profile this item is about (used for forget/retain splits).
    kind:     "vqa" (image-grounded) or "text" (no image), or a reader-specific tag.
    meta:     anything else (options for MCQ, ground truth for cloze, source row, ...).
    """

    question: str
    answer: str
    image: Any = None
    entity: str = ""
    kind: str = "vqa"
    meta: dict = field(default_factory=dict)
