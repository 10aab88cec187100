"""Unlearning objectives: GA, GA_Diff, KL_Min, NPO, MMUnlearner, RMU, UNDIAL, MIP-Editor;
MANU's edit; SMFA's three updates and their merge.

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
RMU            MSE(h_ℓ(θ), c·u) on label tokens             α_rmu·MSE(h_ℓ(θ), h_ℓ(ref))
UNDIAL         CE(softmax(z_ref − γ·onehot(y)), p_θ)        —
MANU           no steps: one edit (:mod:`mmunlearn.methods.manu`) prunes MLP neurons
MIP_Editor     w_f·MSE(h_L(θ), c·u) on label tokens, after   w_r·CE(θ; retain)
               an edit zeroing the top FFN input paths
SMFA           three descent runs from θ₀ (refusal-relabelled forget + retain, with images and
               as text; retain only), merged: θ₀ + mean of the two sculpted forget updates
=============  ===========================================  ==================================

CE is the mean token cross-entropy over label tokens (answer-only with ``ans_only``); log π is a
sample's summed label-token log-probability; KL is averaged over label tokens. The reference
model (KL_Min, NPO, RMU, UNDIAL) is a frozen copy of the vanilla model unless given. RMU
(:mod:`mmunlearn.methods.rmu`), UNDIAL (:mod:`mmunlearn.methods.undial`), MIP-Editor
(:mod:`mmunlearn.methods.mip`) and SMFA (:mod:`mmunlearn.methods.smfa`) have their own
modules; docs/methods.md gives their sources and options.

The official code's forms (``--recipe official``, docs/reference/official_recipe.md §7):
``kl="all_batchmean"`` is ``kl_div(log_softmax(θ), softmax(ref), reduction="batchmean")`` over
every position and the vocabulary (prompt, image and pad positions included; ≈ T× the
per-token KL); ``npo="batch_mean"`` is ``−(2/β)·log σ(β·(CE_θ − CE_ref))`` with the batch-mean
CEs of the two models (one sigmoid per batch, not per sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmunlearn.distributed import global_mean
from mmunlearn.losses import kl_ref_to_model, mean_ce, sequence_logprob
from mmunlearn.methods import mip, rmu, undial  # manu, smfa: imported by the loop

METHODS = ("ga", "ga_diff", "kl_min", "npo", "mmunlearner", "rmu", "undial", "manu",
           "smfa", "mip_editor")  # fmt: skip
# the methods the MMUnlearner paper compares: what the built-in demo and the sweep run
PAPER_METHODS = ("ga", "ga_diff", "kl_min", "npo", "mmunlearner")
KL_FORMS = ("answer_mean", "all_batchmean")
NPO_FORMS = ("sequence", "batch_mean")


def kl_all_batchmean(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """The official KL_Min term: ``Σ_{b,t,v} p_ref (log p_ref − log p_θ) / B`` over every
    position of the global batch (under torchrun: this rank's sum over the global row count)."""
    kl = F.kl_div(
        torch.log_softmax(logits.float(), -1),
        torch.softmax(ref_logits.float(), -1),
        reduction="sum",
    )
    return global_mean(kl, logits.shape[0])


@dataclass
class Method:
    """A named unlearning objective. ``forget_loss`` / ``retain_loss`` return scalars to
    minimise; ``retain_loss`` is None for methods without a retain step."""

    name: str
    alpha: float = 1.0  # ascent weight (MMUnlearner's α)
    beta: float = 0.4  # NPO's β
    npo_retain: bool = False
    kl: str = "answer_mean"  # KL_Min's KL term, KL_FORMS
    npo: str = "sequence"  # NPO's log-ratio, NPO_FORMS
    rmu_layer: int = 7  # RMU's decoder layer ℓ (negative: from the end)
    rmu_coeff: float = 20.0  # RMU's steering coefficient c
    rmu_alpha: float = 100.0  # RMU's retain weight α
    undial_strength: float = 10.0  # UNDIAL's γ
    manu_percent: float = 10.0  # MANU: % of each modality's MLP neurons pruned
    manu_layers: int = 3  # MANU: the last N blocks of each side
    smfa_multi_k: float = 5.0  # SMFA: sculpting threshold k of the multimodal update
    smfa_text_k: float = 10.0  # SMFA: sculpting threshold k of the text update
    mip_topk: int = 5  # MIP-Editor: input channels edited per FFN output projection
    mip_batches: int = 4  # MIP-Editor: forget batches that score the paths
    mip_coeff: float = 1.0  # MIP-Editor: norm c of the steering target
    mip_forget_weight: float = 5.0  # MIP-Editor: weight of the steering loss
    mip_retain_weight: float = 0.5  # MIP-Editor: weight of the retain CE
    seed: int = 0  # draws RMU's and MIP-Editor's random directions, SMFA's refusals

    def __post_init__(self):
        self.name = self.name.lower()
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        if self.kl not in KL_FORMS:
            raise ValueError(f"kl must be one of {KL_FORMS}, got {self.kl!r}")
        if self.npo not in NPO_FORMS:
            raise ValueError(f"npo must be one of {NPO_FORMS}, got {self.npo!r}")
        check_method_options(**{k: getattr(self, k) for k in OPTION_RANGES})

    @property
    def one_shot(self) -> bool:
        """An edit without gradient steps (MANU: :func:`mmunlearn.methods.manu.prune`)."""
        return self.name == "manu"

    @property
    def phased(self) -> bool:
        """Several runs from the start model, then a merge (SMFA: :mod:`mmunlearn.methods.smfa`,
        run by :func:`mmunlearn.loop.unlearn`)."""
        return self.name == "smfa"

    @property
    def edits_paths(self) -> bool:
        """An edit before the first step whose weights stay fixed (MIP-Editor's paths)."""
        return self.name == "mip_editor"

    def check_model(self, model) -> None:
        """ValueError when this method's options do not fit ``model`` (RMU's layer)."""
        if self.name == "rmu":
            rmu.decoder_layer(model, self.rmu_layer)
        if self.name == "mip_editor":
            mip.ffn_modules(model)

    @property
    def needs_reference(self) -> bool:
        return self.name in ("kl_min", "npo", "rmu", "undial")

    @property
    def uses_mask(self) -> bool:
        return self.name == "mmunlearner"

    @property
    def has_retain(self) -> bool:
        return self.name in ("ga_diff", "kl_min", "mmunlearner", "rmu", "smfa", "mip_editor") or (
            self.name == "npo" and self.npo_retain
        )

    def forget_loss(self, model, batch, ref_model=None) -> torch.Tensor:
        if self.one_shot or self.phased:
            raise ValueError(f"{self.name} is not one loss; run it by unlearn()")
        if self.name == "mip_editor":
            return mip.forget_loss(model, batch, self.mip_coeff, self.mip_forget_weight, self.seed)
        if self.name == "rmu":
            return rmu.forget_loss(model, batch, self.rmu_layer, self.rmu_coeff, self.seed)
        if self.name == "undial":
            return undial.forget_loss(model, ref_model, batch, self.undial_strength)
        if self.name == "npo":
            out = model(**batch)
            with torch.no_grad():
                ref = ref_model(**batch)
            if self.npo == "batch_mean":
                diff = mean_ce(out, batch) - mean_ce(ref, batch)
                return -(2.0 / self.beta) * F.logsigmoid(self.beta * diff)
            logr = sequence_logprob(out.logits, batch["labels"]) - sequence_logprob(
                ref.logits, batch["labels"]
            )
            per_sample = F.logsigmoid(-self.beta * logr)
            return -(2.0 / self.beta) * global_mean(per_sample.sum(), per_sample.numel())
        return -self.alpha * mean_ce(model(**batch), batch)

    def retain_loss(self, model, batch, ref_model=None) -> torch.Tensor | None:
        if not self.has_retain:
            return None
        if self.phased:
            raise ValueError(f"{self.name} is not one loss; run it by unlearn()")
        if self.name == "rmu":
            return rmu.retain_loss(model, ref_model, batch, self.rmu_layer, self.rmu_alpha)
        if self.name == "mip_editor":
            return mip.retain_loss(model, batch, self.mip_retain_weight)
        out = model(**batch)
        if self.name == "kl_min":
            with torch.no_grad():
                ref = ref_model(**batch)
            if self.kl == "all_batchmean":
                return mean_ce(out, batch) + kl_all_batchmean(out.logits, ref.logits)
            return mean_ce(out, batch) + kl_ref_to_model(out.logits, ref.logits, batch["labels"])
        return mean_ce(out, batch)


# the options of RMU, UNDIAL, MANU, SMFA and MIP-Editor: name → the values accepted
OPTION_RANGES = {
    "rmu_layer": "an integer (a decoder layer)",
    "rmu_coeff": "> 0",
    "rmu_alpha": "≥ 0",
    "undial_strength": "> 0",
    "manu_percent": "in (0, 100]",
    "manu_layers": "an integer ≥ 1",
    "smfa_multi_k": "≥ 0",
    "smfa_text_k": "≥ 0",
    "mip_topk": "an integer ≥ 1",
    "mip_batches": "an integer ≥ 1",
    "mip_coeff": "> 0",
    "mip_forget_weight": "> 0",
    "mip_retain_weight": "≥ 0",
}
_INTS = ("manu_layers", "mip_topk", "mip_batches")
_NONNEGATIVE = ("rmu_alpha", "smfa_multi_k", "smfa_text_k", "mip_retain_weight")


def _ok(name: str, v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if name == "rmu_layer" or name in _INTS:
        return isinstance(v, int) and (name == "rmu_layer" or v >= 1)
    if not math.isfinite(v):
        return False
    if name == "manu_percent":
        return 0 < v <= 100
    return v >= 0 if name in _NONNEGATIVE else v > 0


def check_method_options(**options) -> None:
    """ValueError naming the first bad method option (:data:`OPTION_RANGES`;
    RMU's layer and MANU's layer count are checked against the model when the run starts)."""
    for name, v in options.items():
        if not _ok(name, v):
            what = OPTION_RANGES[name]
            kind = what if what.startswith("an ") else f"a finite number {what}"
            raise ValueError(f"{name} must be {kind}, got {v!r}")
