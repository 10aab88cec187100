"""Unlearning objectives: GA, GA_Diff, KL_Min, NPO and MMUnlearner.

Every method is a pair of losses over batches of a causal (multimodal) LM whose forward takes
``**batch`` (with ``labels``, -100 where no loss is taken) and returns ``.loss`` and ``.logits``:

=============  ===========================================  ==================================
method         forget step (minimised)                      retain step (minimised)
=============  ===========================================  ==================================
GA             −CE(θ; forget)                               —
GA_Diff        −CE(θ; forget)                               CE(θ; retain)
KL_Min         −CE(θ; forget)                               CE(θ; retain) + KL(p_ref ‖ p_θ)
NPO            −(2/β)·mean log σ(−β·(log π_θ − log π_ref))  — (``npo_retain=True``: CE retain)
MMUnlearner    −α·CE(θ; forget), masked step                CE(θ; retain), unmasked step
=============  ===========================================  ==================================

CE is the mean token cross-entropy over label tokens (answer-only with ``ans_only``); log π is a
sample's summed label-token log-probability; KL is averaged over label tokens. The reference
model (KL_Min, NPO) is a frozen copy of the vanilla model unless given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmunlearn.dist import global_mean, world_size

METHODS = ("ga", "ga_diff", "kl_min", "npo", "mmunlearner")


def _shifted(logits: torch.Tensor, labels: torch.Tensor):
    """Causal-LM alignment: position t predicts token t+1."""
    return logits[:, :-1, :].float(), labels[:, 1:]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor):
    """Log-probabilities of the label tokens, shape [B, T-1], and the valid-token mask."""
    lg, lb = _shifted(logits, labels)
    valid = lb != -100
    safe = lb.clamp_min(0)
    lp = torch.log_softmax(lg, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return lp * valid, valid


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ log p(label tokens) per sample, shape [B]."""
    lp, _ = token_logprobs(logits, labels)
    return lp.sum(-1)


def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each sample's label tokens, shape [B] (0 for no label token)."""
    lp, valid = token_logprobs(logits, labels)
    return -lp.sum(-1) / valid.sum(-1).clamp_min(1)


def mean_ce(out, batch) -> torch.Tensor:
    """Mean token CE of the batch's label tokens; under torchrun the mean is over the *global*
    batch (label tokens counted on every rank), so gradients do not depend on the world size."""
    if world_size() == 1:
        return out.loss
    lp, valid = token_logprobs(out.logits, batch["labels"])
    return global_mean(-lp.sum(), valid.sum())


def kl_ref_to_model(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor):
    """KL(p_ref ‖ p_θ) averaged over label-token positions (scalar)."""
    lg, lb = _shifted(logits, labels)
    rg, _ = _shifted(ref_logits, labels)
    valid = lb != -100
    kl = F.kl_div(
        torch.log_softmax(lg, -1), torch.log_softmax(rg, -1), log_target=True, reduction="none"
    ).sum(-1)
    return global_mean((kl * valid).sum(), valid.sum())


@dataclass
class Method:
    """A named unlearning objective. ``forget_loss`` / ``retain_loss`` return scalars to
    minimise; ``retain_loss`` is None for methods without a retain step."""

    name: str
    alpha: float = 1.0  # ascent weight (MMUnlearner's α)
    beta: float = 0.4  # NPO's β
    npo_retain: bool = False

    def __post_init__(self):
        self.name = self.name.lower()
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")

    @property
    def needs_reference(self) -> bool:
        return self.name in ("kl_min", "npo")

    @property
    def uses_mask(self) -> bool:
        return self.name == "mmunlearner"

    @property
    def has_retain(self) -> bool:
        return self.name in ("ga_diff", "kl_min", "mmunlearner") or (
            self.name == "npo" and self.npo_retain
        )

    def forget_loss(self, model, batch, ref_model=None) -> torch.Tensor:
        if self.name == "npo":
            out = model(**batch)
            with torch.no_grad():
                ref = ref_model(**batch)
            logr = sequence_logprob(out.logits, batch["labels"]) - sequence_logprob(
                ref.logits, batch["labels"]
            )
            per_sample = F.logsigmoid(-self.beta * logr)
            return -(2.0 / self.beta) * global_mean(per_sample.sum(), per_sample.numel())
        return -self.alpha * mean_ce(model(**batch), batch)

    def retain_loss(self, model, batch, ref_model=None) -> torch.Tensor | None:
        if not self.has_retain:
            return None
        out = model(**batch)
        if self.name == "kl_min":
            with torch.no_grad():
                ref = ref_model(**batch)
            return mean_ce(out, batch) + kl_ref_to_model(out.logits, ref.logits, batch["labels"])
        return mean_ce(out, batch)
