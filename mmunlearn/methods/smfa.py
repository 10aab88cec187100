"""SMFA (Sculpted Memory Forgetting Adapter; Zeng et al. 2025, "Towards Benign Memory
Forgetting for Selective Multimodal Large Language Model Unlearning", arXiv 2511.20196), as
Open-MMunlearning ports it (``src/trainer/unlearn/smfa.py``; the sculpting in
``src/model/__init__.py``), at full parameter.

Three updates start from the same model θ₀, each by descent on a mean token cross-entropy:

- ``multi`` (the multimodal memory forgetting adapter): forget items relabelled with a
  refusal (:data:`REFUSALS`), with their images, and the retain items;
- ``text`` (the textual one): the same forget refusals and retain items as text only (the
  same question and answer, no image);
- ``anchor`` (the retaining anchor): the retain items with and without their images.

Each forget update ``δ`` (``θ_multi − θ₀``, ``θ_text − θ₀``) is *sculpted* against the anchor's
``a = θ_anchor − θ₀``, one weight tensor at a time: with ``ρ = ‖δ‖ / (‖a‖ + 1e-12)``, an element
is set to 0 where ``δ·a < 0`` (the two disagree) and ``|δ| > k·ρ·|a|``; the model is
``θ₀ + (sculpt(δ_multi, k_multi) + sculpt(δ_text, k_text)) / 2`` (the anchor itself is not
added). :func:`mmunlearn.loop.unlearn` runs the three updates and the merge.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import torch

from mmunlearn.data.schema import Sample
from mmunlearn.losses import mean_ce

# the refusal answers forget items are relabelled with (one per item, fixed by the seed)
REFUSALS = (
    "I don't know.",
    "I'm not sure about that.",
    "I can't answer that question.",
    "I have no information about that.",
    "Sorry, I don't know the answer.",
    "I'm unable to tell you that.",
    "That is something I don't know.",
    "I don't have that information.",
)
PHASES = ("anchor", "multi", "text")  # run in this order; the anchor is needed by the others


def refusal(sample: Sample, seed: int = 0) -> Sample:
    """``sample`` with its answer replaced by a refusal from :data:`REFUSALS`, the same one for
    the same question, entity and seed."""
    key = f"{seed}\x00{sample.entity}\x00{sample.question}".encode()
    return replace(sample, answer=REFUSALS[zlib.crc32(key) % len(REFUSALS)], meta=dict(sample.meta))


def text_only(sample: Sample) -> Sample:
    """``sample`` without its image (the same question and answer)."""
    if sample.image is None:
        return sample
    return replace(sample, image=None, kind="text", meta=dict(sample.meta))


def views(forget, retain, seed: int = 0) -> dict[str, dict[str, object]]:
    """The batch sources of each update, ``{phase: {step kind: source}}`` (see the module
    docstring), made from ``forget`` and ``retain`` with their ``view`` method (a
    :class:`~mmunlearn.data.batching.BatchSource` or the
    :class:`~mmunlearn.data.batching.Batches` of ``make_batches``: same batches, changed
    samples)."""
    if not len(retain):
        raise ValueError("smfa needs retain batches (its retain terms and its anchor)")
    for name, src in (("forget", forget), ("retain", retain)):
        if not hasattr(src, "view"):
            raise ValueError(
                f"smfa relabels forget items and drops images, so its {name} batches must "
                "remember their samples: give a BatchSource or make_batches' batches, not "
                f"a {type(src).__name__} of collated batches"
            )

    def ref(s):
        return refusal(s, seed)

    def ref_text(s):
        return text_only(refusal(s, seed))

    return {
        "anchor": {"anchor:retain": retain, "anchor:retain_text": retain.view(text_only)},
        "multi": {"multi:refusal": forget.view(ref), "multi:retain": retain},
        "text": {"text:refusal": forget.view(ref_text), "text:retain": retain.view(text_only)},
    }


@dataclass(frozen=True)
class PhaseLoss:
    """An SMFA update as the loop's :class:`~mmunlearn.stepper.Stepper` sees a method: every
    step, whatever its kind, is descent on the batch's mean label-token cross-entropy."""

    name: str = "smfa"
    phase: str = "multi"
    uses_mask: bool = False
    has_retain: bool = True  # unmasked steps
    needs_reference: bool = False

    def step_loss(self, kind, model, batch, ref_model=None) -> torch.Tensor:
        return mean_ce(model(**batch), batch)


def sculpt(delta: torch.Tensor, anchor: torch.Tensor, k: float) -> torch.Tensor:
    """``delta`` with 0 where it disagrees in sign with ``anchor`` and
    ``|delta| > k·(‖delta‖ / (‖anchor‖ + 1e-12))·|anchor|`` (both fp32 tensors of one shape)."""
    ratio = delta.norm() / (anchor.norm() + 1e-12)
    drop = (delta * anchor < 0) & (k * ratio * anchor.abs() < delta.abs())
    return delta.masked_fill(drop, 0.0)


class Sculptor:
    """The start weights θ₀ of ``params`` (``{name: parameter}``; kept in host memory in their
    dtype), the anchor's update and the running sum of the sculpted forget updates (fp32, host
    memory): what the merge needs, filled as the updates finish."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.start = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
        self.anchor: dict | None = None
        self.total = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}

    def reset(self) -> None:
        """Every parameter back to θ₀."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.start[n].to(p.device))

    def _delta(self, n: str) -> torch.Tensor:
        return self.params[n].detach().float().cpu() - self.start[n].float()

    def take_anchor(self) -> None:
        """The parameters hold θ_anchor: keep ``θ_anchor − θ₀``."""
        self.anchor = {n: self._delta(n) for n in self.params}

    def add(self, k: float) -> dict:
        """The parameters hold a forget update's weights: add half its sculpted update to the
        sum. Returns ``{"elements", "zeroed", "changed"}`` (elements set to 0 by the sculpting,
        elements the update moved)."""
        if self.anchor is None:
            raise RuntimeError("smfa: the anchor's update must be taken first")
        zeroed = changed = 0
        for n in self.params:
            d = self._delta(n)
            s = sculpt(d, self.anchor[n], k)
            zeroed += int(((s == 0) & (d != 0)).sum())
            changed += int((d != 0).sum())
            self.total[n] += 0.5 * s
        elements = sum(p.numel() for p in self.params.values())
        return {"elements": elements, "zeroed": zeroed, "changed": changed}

    def apply(self) -> None:
        """Every parameter set to ``θ₀ + sum``."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_((self.start[n].float() + self.total[n]).to(p.device, p.dtype))


__all__ = ["PHASES", "REFUSALS", "PhaseLoss", "Sculptor", "refusal", "sculpt", "text_only", "views"]
