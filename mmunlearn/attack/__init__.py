"""Does the forgetting hold? The probes of ``mmunlearn attack`` on an unlearned model
(docs/attack.md): a relearning attack, rephrased pictures, text-only questions and per-layer
CKA against the vanilla model (:mod:`~mmunlearn.attack.probes`), the picture transforms
(:mod:`~mmunlearn.attack.transforms`), linear CKA (:mod:`~mmunlearn.attack.cka`) and the
result files (:mod:`~mmunlearn.attack.report`)."""

from mmunlearn.attack.cka import cka_interval, linear_cka
from mmunlearn.attack.probes import PROBES, AttackOptions, AttackPlan, assemble
from mmunlearn.attack.transforms import TRANSFORMS, rephrase

__all__ = [
    "PROBES",
    "TRANSFORMS",
    "AttackOptions",
    "AttackPlan",
    "assemble",
    "cka_interval",
    "linear_cka",
    "rephrase",
]
