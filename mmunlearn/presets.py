"""Recipes: every setting that defines an unlearning run, as two presets.

``mmunlearn`` is ours (the default); ``official`` reproduces the public MMUnlearner code's
semantics for each method and benchmark (docs/reference/official_recipe.md, with sources;
docs/recipes.md lists every difference and why ours differs). A :class:`Recipe` is resolved
for one (recipe, method, benchmark) and then turned into the loop's
:class:`~mmunlearn.loop.UnlearnConfig`, the :class:`~mmunlearn.methods.Method`, the Fisher
pass's settings and the mask's treatment; a command-line flag or config key overrides any
single value.

What ``official`` means, per method (MLLMU-Bench; CLEAR differs where noted):

=============  ===============  ==========  ===================  ============================
method         loss tokens      clipping    lr schedule          other
=============  ===============  ==========  ===================  ============================
MMUnlearner    all, image       1.0 both    stepped per epoch    mask: keyword names only,
               tokens too       (CLEAR:     (lr constant in      grad *= mask (momentum still
               (CLEAR: answer)  forget)     epoch 1)             moves masked-out weights)
GA             answer           none        linear, per step
GA_Diff        answer           none        never stepped
KL_Min         answer           none        per epoch            KL over all positions,
                                                                 batchmean
NPO            answer           none        linear, per step     batch-mean CE log-ratio
=============  ===============  ==========  ===================  ============================

Common: AdamW ε 1e-6, weight decay 0, lr 1e-5, batch 4, one epoch, a forget step every
``len(retain) // len(forget)`` retain steps with each forget batch at most once; Fisher with
batch 4 (CLEAR 2) on full sequences, squared in the parameter's dtype on the CPU; the language
preserve set holds every profile's text QA. The official baselines are LoRA fine-tunes; both
recipes here train all weights (docs/recipes.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

RECIPES = ("mmunlearn", "official")
BENCHMARKS = ("synthetic", "mllmu", "clear")


@dataclass(frozen=True)
class Recipe:
    """The resolved settings of one run (see the module docstring)."""

    name: str = "mmunlearn"
    lr: float = 1e-5
    batch_size: int = 4
    epochs: int = 1
    eps: float = 1e-8
    weight_decay: float = 0.0
    loss_tokens: str = "answer"  # "answer" | "all" | "all_with_image"
    max_grad_norm: float | None = 1.0  # forget steps
    retain_max_grad_norm: float | None = 1.0
    lr_schedule: str = "linear"  # "linear" | "constant"
    schedule_unit: str = "step"  # "step" | "epoch"
    forget_cap: bool = False
    mask_filter: str = "all"  # "all" | "official" (keyword names only)
    mask_mode: str = "masked_step"  # "masked_step" | "zero_grad"
    fisher_batch_size: int = 16
    fisher_loss_tokens: str = "answer"
    fisher_parity: bool = False  # square gradients on the CPU in the parameter dtype
    language_preserve: str = "forget_text"  # "forget_text" | "all_text"
    kl: str = "answer_mean"
    npo: str = "sequence"
    alpha: float = 1.0
    beta: float = 0.4

    def to_dict(self) -> dict:
        return asdict(self)


def resolve(name: str, method: str, benchmark: str = "mllmu", **overrides) -> Recipe:
    """The :class:`Recipe` of ``name`` (:data:`RECIPES`) for ``method`` on ``benchmark``
    (:data:`BENCHMARKS`; the synthetic one follows MLLMU-Bench), with ``overrides`` (fields
    given as None are ignored). Raises ValueError naming an unknown value."""
    from mmunlearn.methods import METHODS

    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    r = Recipe(name=name)
    if name == "official":
        clear = benchmark == "clear"
        r = replace(
            r,
            eps=1e-6,
            forget_cap=True,
            fisher_batch_size=2 if clear else 4,
            fisher_loss_tokens="all_with_image",
            fisher_parity=True,
            language_preserve="all_text",
            max_grad_norm=None,
            retain_max_grad_norm=None,
        )
        if method == "mmunlearner":
            r = replace(
                r,
                loss_tokens="answer" if clear else "all_with_image",
                max_grad_norm=1.0,
                retain_max_grad_norm=None if clear else 1.0,
                schedule_unit="epoch",
                mask_filter="official",
                mask_mode="zero_grad",
            )
        elif method == "ga_diff":
            r = replace(r, lr_schedule="constant")
        elif method == "kl_min":
            r = replace(r, schedule_unit="epoch", kl="all_batchmean")
        elif method == "npo":
            r = replace(r, npo="batch_mean")
    fields = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(fields) - set(asdict(r)))
    if unknown:
        raise ValueError(f"unknown recipe setting {unknown[0]!r}")
    return replace(r, **fields)


def differences(method: str, benchmark: str = "mllmu") -> dict[str, tuple]:
    """``{setting: (ours, official)}`` where the two presets differ for a method."""
    a = resolve("mmunlearn", method, benchmark).to_dict()
    b = resolve("official", method, benchmark).to_dict()
    return {k: (a[k], b[k]) for k in a if k != "name" and a[k] != b[k]}


__all__ = ["BENCHMARKS", "RECIPES", "Recipe", "differences", "resolve"]
