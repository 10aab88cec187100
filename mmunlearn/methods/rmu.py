"""RMU (Representation Misdirection for Unlearning; Li et al. 2024, "The WMDP Benchmark",
arXiv 2403.03218): at one decoder layer ℓ of the language model, push the forget inputs'
hidden states toward a fixed random direction of norm c, keep the retain inputs' hidden states
where the frozen model puts them.

    forget:  mean over label tokens of (1/d)·‖h_ℓ(θ) − c·u‖²       u = r/‖r‖, r ~ U[0, 1)^d
    retain:  α · mean over label tokens of (1/d)·‖h_ℓ(θ) − h_ℓ(ref)‖²

``h_ℓ`` is the output of decoder layer ℓ (0-based; negative counts from the end), ``d`` the
hidden size; ``u`` is drawn once per run from the run's seed (so a resumed run uses the same
one). The forward stops at layer ℓ (nothing after it is computed) except on FSDP2-sharded
models, which run the whole forward.
"""

from __future__ import annotations

import torch

from mmunlearn.distributed import global_mean, is_sharded
from mmunlearn.models.adapters import _language_model
from mmunlearn.params import unwrap


class _Stop(Exception):
    """Raised by the capture hook to end a forward at the chosen layer."""


def decoder_layer(model, index: int) -> torch.nn.Module:
    """Decoder layer ``index`` of the model's language model (negative: from the end).
    Raises ValueError naming the valid range."""
    layers = _language_model(unwrap(model)).layers
    n = len(layers)
    if not -n <= index < n:
        raise ValueError(
            f"rmu_layer {index}: the language model has {n} decoder layers "
            f"(give 0..{n - 1}, or -{n}..-1 from the end)"
        )
    return layers[index]


def layer_output(model, batch: dict, index: int) -> torch.Tensor:
    """The hidden states ``[B, T, d]`` leaving decoder layer ``index`` for ``batch`` (with the
    graph when gradients are enabled). The forward stops there unless the model is sharded."""
    layer = decoder_layer(model, index)
    stop = not is_sharded(model)
    seen: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        if seen:  # a gradient-checkpointing recompute runs the layer again: leave it alone
            return None
        seen.append(output[0] if isinstance(output, (tuple, list)) else output)
        if stop:
            raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        model(**batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"decoder layer {index} did not run in the model's forward")
    return seen[0]


def control_vector(dim: int, coeff: float, seed: int) -> torch.Tensor:
    """RMU's target ``c·u``: ``u = r/‖r‖`` with ``r`` uniform in ``[0, 1)^dim`` from a
    generator seeded with ``seed`` (the same vector on every device and every resume)."""
    g = torch.Generator().manual_seed(int(seed))
    r = torch.rand(dim, generator=g, dtype=torch.float64)
    return (r / r.norm() * coeff).float()


def activation_mse(act: torch.Tensor, target: torch.Tensor, labels: torch.Tensor):
    """Mean over label-token positions (``labels != -100``, the global batch under torchrun)
    of ``mean_k (act − target)²``; ``target`` broadcasts against ``act`` ``[B, T, d]``."""
    valid = labels != -100
    per_token = (act.float() - target.float()).pow(2).mean(-1)
    return global_mean((per_token * valid).sum(), valid.sum())


def forget_loss(model, batch: dict, layer: int, coeff: float, seed: int) -> torch.Tensor:
    act = layer_output(model, batch, layer)
    target = control_vector(act.shape[-1], coeff, seed).to(act.device)
    return activation_mse(act, target, batch["labels"])


def retain_loss(model, ref_model, batch: dict, layer: int, alpha: float) -> torch.Tensor:
    act = layer_output(model, batch, layer)
    with torch.no_grad():
        ref = layer_output(ref_model, batch, layer)
    return alpha * activation_mse(act, ref.to(act.device), batch["labels"])


__all__ = [
    "activation_mse",
    "control_vector",
    "decoder_layer",
    "forget_loss",
    "layer_output",
    "retain_loss",
]
