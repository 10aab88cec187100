"""MANU (Modality Aware Neuron Unlearning; Liu et al. 2025, "Modality-Aware Neuron Pruning for
Unlearning in Multimodal Large Language Models", ACL 2025, arXiv 2502.15910): a one-shot edit,
no gradient step. The MLP
neurons of the last ``layers`` blocks of the vision encoder and of the language model are
scored by how much more they fire on forget inputs than on retain inputs, and the top
``percent`` % of each modality are pruned (their output rows and biases set to zero).

Per neuron j of an MLP linear layer and per batch: mean |a_j|, standard deviation and RMS of
its outputs over the batch's positions (language layers: positions with ``attention_mask`` 1;
vision layers: every patch), averaged over batches. Importance
``s_j = Σ_m w_m·(F_m,j / (R_m,j + ε) − 1)`` over those three statistics (w = 2 each, ε = 1e-5),
F on forget batches, R on retain batches; the top ``percent`` % of s over all of a modality's
neurons (ties at the threshold included) are pruned.
"""

from __future__ import annotations

import math

import torch

from mmunlearn.data.batching import to_device
from mmunlearn.distributed import is_sharded
from mmunlearn.models.adapters import _language_model
from mmunlearn.params import unwrap, vision_module_names

WEIGHTS = {"abs": 2.0, "std": 2.0, "rms": 2.0}
EPS = 1e-5


def _blocks(module) -> torch.nn.ModuleList:
    """The repeated blocks of an encoder / decoder (``layers`` / ``blocks``, or an
    ``encoder`` / ``vision_model`` inside)."""
    for name in ("layers", "blocks"):
        seq = getattr(module, name, None)
        if isinstance(seq, torch.nn.ModuleList) and len(seq):
            return seq
    for name in ("vision_model", "encoder"):
        inner = getattr(module, name, None)
        if inner is not None:
            return _blocks(inner)
    raise ValueError(f"{type(module).__name__}: cannot find its transformer blocks for MANU")


def mlp_modules(model, layers: int) -> dict[str, dict[str, torch.nn.Linear]]:
    """``{"vision": {name: linear}, "language": {...}}``: every linear layer inside ``.mlp`` of
    the last ``layers`` blocks of the vision encoder and of the language model."""
    m = unwrap(model)
    names = {id(mod): n for n, mod in m.named_modules()}
    sides = {
        "vision": _blocks(m.get_submodule(vision_module_names(m)[0])),
        "language": _language_model(m).layers,
    }
    out: dict = {}
    for side, blocks in sides.items():
        if layers > len(blocks):
            raise ValueError(
                f"manu_layers {layers}: the {side} side has {len(blocks)} blocks (give 1.."
                f"{len(blocks)})"
            )
        out[side] = {}
        for block in list(blocks)[-layers:]:
            mlp = getattr(block, "mlp", None)
            if mlp is None:
                raise ValueError(f"{type(block).__name__}: no .mlp for MANU to prune")
            for mod in mlp.modules():
                if isinstance(mod, torch.nn.Linear):
                    out[side][names[id(mod)]] = mod
    return out


def neuron_stats(act: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean |a|, population standard deviation and RMS per neuron (last dim) of ``act``
    ``[..., n]`` over every other dimension, activations clamped to ±1000 (the MANU code's
    guard against outliers)."""
    a = act.detach().float().reshape(-1, act.shape[-1]).clamp(-1e3, 1e3)
    return {
        "abs": a.abs().mean(0),
        "std": a.std(0, unbiased=False),
        "rms": a.square().mean(0).sqrt(),
    }


def collect_stats(model, source, n: int, modules: dict, device) -> dict[str, dict]:
    """``{module name: {stat: per-neuron mean over batches}}`` of ``modules``
    (``{side: {name: linear}}``) over batches ``source[0..n-1]`` (one in memory at a time);
    language positions with ``attention_mask`` 0 are left out."""
    sums: dict = {}
    seen = {"mask": None}

    def hook(name, side):
        def run(_mod, _inp, out):
            mask = seen["mask"]
            if side == "language" and mask is not None and out.shape[:-1] == mask.shape:
                out = out[mask.bool()]
            st = neuron_stats(out)
            prev = sums.get(name)
            sums[name] = st if prev is None else {k: prev[k] + st[k] for k in st}

        return run

    handles = [
        mod.register_forward_hook(hook(name, side))
        for side, mods in modules.items()
        for name, mod in mods.items()
    ]
    try:
        with torch.no_grad():
            for i in range(n):
                batch = to_device(source[i], device)
                seen["mask"] = batch.get("attention_mask")
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {name: {k: v / n for k, v in st.items()} for name, st in sums.items()}


def importance(forget: dict, retain: dict, weights=WEIGHTS, eps: float = EPS) -> dict:
    """``{name: Σ_m w_m·(F_m / (R_m + ε) − 1)}`` per neuron."""
    return {
        name: sum(w * (forget[name][m] / (retain[name][m] + eps) - 1.0) for m, w in weights.items())
        for name in forget
    }


def select(scores: dict[str, torch.Tensor], percent: float) -> dict[str, torch.Tensor]:
    """Boolean masks of the top ``percent`` % of all neurons of ``scores`` (at least one;
    every neuron tied with the k-th largest score included)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = min(flat.numel(), max(1, int(percent / 100.0 * flat.numel())))
    threshold = torch.topk(flat, k).values[-1]
    return {name: s >= threshold for name, s in scores.items()}


def zero_rows(modules: dict[str, torch.nn.Linear], masks: dict[str, torch.Tensor]) -> int:
    """Set the masked output rows (and bias entries) of each linear layer to zero; returns the
    number of rows pruned."""
    n = 0
    with torch.no_grad():
        for name, mask in masks.items():
            mod = modules[name]
            rows = mask.to(mod.weight.device)
            mod.weight[rows] = 0
            if mod.bias is not None:
                mod.bias[rows] = 0
            n += int(rows.sum())
    return n


def prune(model, forget, retain, percent: float, layers: int) -> dict:
    """MANU on ``model`` in place, from the first ``min(len(forget), len(retain))`` batches of
    each; returns ``{side: {"neurons": n, "pruned": k}, "batches": n}``."""
    if is_sharded(model):
        raise ValueError("MANU edits whole weight rows: run it in one process (no FSDP2)")
    if not (0 < percent <= 100 and math.isfinite(percent)):
        raise ValueError(f"manu_percent must be in (0, 100], got {percent!r}")
    modules = mlp_modules(model, layers)
    n = min(len(forget), len(retain))
    if n < 1:
        raise ValueError("MANU needs at least one forget and one retain batch")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    f = collect_stats(model, forget, n, modules, device)
    r = collect_stats(model, retain, n, modules, device)
    report: dict = {"batches": n}
    for side, mods in modules.items():
        masks = select(importance({k: f[k] for k in mods}, {k: r[k] for k in mods}), percent)
        report[side] = {
            "neurons": sum(int(mask.numel()) for mask in masks.values()),
            "pruned": zero_rows(mods, masks),
        }
    model.train(was_training)
    return report


__all__ = [
    "collect_stats",
    "importance",
    "mlp_modules",
    "neuron_stats",
    "prune",
    "select",
    "zero_rows",
]
