"""Recipes: every setting that defines an unlearning run, as two presets.

``mmunlearn`` is ours (the default); ``official`` reproduces the public MMUnlearner code's
semantics for each method and benchmark (docs/reference/official_recipe.md, with sources;
docs/recipes.md lists every difference and why ours differs). A recipe is a function
of (method, benchmark) returning a :class:`~mmunlearn.config.RunConfig`, the one object every
run reads (the loop, the Fisher pass's settings, the mask's treatment); a command-line flag,
config key or ``dataclasses.replace`` overrides any single value.

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

from dataclasses import replace

from mmunlearn.config import RECIPES, RunConfig

BENCHMARKS = ("synthetic", "mllmu", "clear")


def mmunlearn(method: str, benchmark: str = "mllmu") -> RunConfig:
    """Ours: the :class:`RunConfig` defaults, for every method and benchmark."""
    return RunConfig(recipe="mmunlearn")


def official(method: str, benchmark: str = "mllmu") -> RunConfig:
    """The public MMUnlearner code's semantics for ``method`` on ``benchmark`` (table above)."""
    clear = benchmark == "clear"
    r = RunConfig(
        recipe="official",
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
        return replace(
            r,
            loss_tokens="answer" if clear else "all_with_image",
            max_grad_norm=1.0,
            retain_max_grad_norm=None if clear else 1.0,
            schedule_unit="epoch",
            mask_filter="official",
            mask_mode="zero_grad",
        )
    if method == "ga_diff":
        return replace(r, lr_schedule="constant")
    if method == "kl_min":
        return replace(r, schedule_unit="epoch", kl="all_batchmean")
    if method == "npo":
        return replace(r, npo="batch_mean")
    return r


_RECIPE_FNS = {"mmunlearn": mmunlearn, "official": official}


def finetune(name: str = "mmunlearn", benchmark: str = "mllmu") -> RunConfig:
    """The fine-tuning settings (``mmunlearn finetune``: vanilla and reference models) of recipe
    ``name``. ``mmunlearn``: the :class:`RunConfig` defaults (lr 1e-5, batch 4, one epoch, lr
    decaying linearly per step, clip 1.0, loss on the answer tokens). ``official``: the public
    MLLMU / CLEAR vanilla fine-tunes (docs/reference/official_recipe.md §8): the same lr,
    batch, epoch and schedule, no clipping, loss on every token but the pads (image
    placeholders included), ε 1e-6 (the unlearning drivers' ``transformers.AdamW``; §8 does not
    name the fine-tune's AdamW) — but all weights are trained, not the LoRA adapters (r 8 / 16)
    those scripts train."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if name == "mmunlearn":
        return RunConfig(recipe="mmunlearn")
    return RunConfig(recipe="official", eps=1e-6, max_grad_norm=None,
                     loss_tokens="all_with_image")  # fmt: skip


def resolve(name: str, method: str, benchmark: str = "mllmu", **overrides) -> RunConfig:
    """The :class:`RunConfig` of recipe ``name`` (:data:`RECIPES`) for ``method`` on
    ``benchmark`` (:data:`BENCHMARKS`; the synthetic one follows MLLMU-Bench), with
    ``overrides`` (settings given as None are ignored). Raises ValueError naming an unknown
    recipe, method, benchmark or setting, or a bad value."""
    from dataclasses import fields

    from mmunlearn.methods import METHODS

    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in fields(RunConfig)})
    if unknown:
        raise ValueError(f"unknown recipe setting {unknown[0]!r}")
    return replace(_RECIPE_FNS[name](method, benchmark), **given)


def differences(method: str, benchmark: str = "mllmu") -> dict[str, tuple]:
    """``{setting: (ours, official)}`` where the two recipes differ for a method."""
    a = resolve("mmunlearn", method, benchmark).to_dict()
    b = resolve("official", method, benchmark).to_dict()
    return {k: (a[k], b[k]) for k in a if k != "recipe" and a[k] != b[k]}


__all__ = ["BENCHMARKS", "RECIPES", "differences", "finetune", "mmunlearn", "official", "resolve"]
