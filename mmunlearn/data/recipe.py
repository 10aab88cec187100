"""The four data sets of an MMUnlearner run (method.md §2–3), built in one place for every
benchmark:

- ``forget``: multimodal VQA of the forget entities (ascended; the mask's forget Fisher);
- ``retain``: the retain training set (descended between forget steps);
- ``vision_preserve``: the vision group's preserve set (multimodal retain data);
- ``language_preserve``: the language group's preserve set (text-only QA of the forget
  entities, their knowledge to keep, plus multimodal retain data).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmunlearn.data.schema import Sample


@dataclass
class UnlearningSets:
    """Sample lists of one run (see the module docstring)."""

    forget: list[Sample]
    retain: list[Sample]
    vision_preserve: list[Sample]
    language_preserve: list[Sample]

    def sizes(self) -> dict[str, int]:
        """Items per set, for logs and reports."""
        return {k: len(v) for k, v in vars(self).items()}


def synthetic_sets(bench) -> UnlearningSets:
    """The sets of the built-in synthetic benchmark (:class:`~mmunlearn.data.synthetic.
    SyntheticBenchmark`): forget = the forget people's picture questions; retain = the retain
    people's picture and by-name questions; vision preserve = the retain people's picture
    questions; language preserve = the forget people's by-name questions + the retain people's
    picture questions."""
    return UnlearningSets(
        forget=list(bench.forget_vqa),
        retain=list(bench.retain_vqa) + list(bench.retain_text),
        vision_preserve=list(bench.retain_vqa),
        language_preserve=list(bench.forget_text) + list(bench.retain_vqa),
    )


__all__ = ["UnlearningSets", "synthetic_sets"]
