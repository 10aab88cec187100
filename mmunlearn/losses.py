"""Token losses of a causal (multimodal) LM, and the one "batch → this rank's loss" step.

Every function takes ``logits`` ``[B, T, V]`` and ``labels`` ``[B, T]`` (``-100`` where no loss
is taken) in the Hugging Face layout (position t predicts token t+1). Under torchrun the means
are over the *global* batch (:func:`mmunlearn.distributed.global_mean`), so gradients do not
depend on the world size. :func:`batch_loss` is what the Fisher pass and the vanilla fine-tune
call on a global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmunlearn.data.batching import to_device
from mmunlearn.distributed import (
    global_mean,
    image_token_id,
    reduces_grads,
    shard_batch,
    world_size,
)


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


def local_batch(model, batch: dict) -> dict:
    """This rank's rows of a global batch when ``model`` reduces its gradients across ranks
    under torchrun (FSDP2 or DDP; :func:`mmunlearn.distributed.shard_batch`, images kept with
    their rows); the whole batch otherwise (one process, or an unsharded model trained
    identically on every rank)."""
    if world_size() > 1 and reduces_grads(model):
        return shard_batch(batch, image_token_id=image_token_id(model))
    return batch


def batch_loss(model, batch: dict, device=None) -> torch.Tensor:
    """The mean label-token CE of a global ``batch`` (moved to ``device`` when given), computed
    on this rank's rows; its gradient, reduced by FSDP, is the 1-process gradient of the whole
    batch. Raises ValueError when the model returns no loss (no ``labels`` in the batch)."""
    if device is not None:
        batch = to_device(batch, device)
    local = local_batch(model, batch)
    out = model(**local)
    if world_size() > 1 and reduces_grads(model):
        return mean_ce(out, local)
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", out)
    if not isinstance(loss, torch.Tensor):
        raise ValueError("the model returned no loss (do the batches have labels?)")
    return loss


__all__ = [
    "batch_loss",
    "kl_ref_to_model",
    "local_batch",
    "mean_ce",
    "per_sample_ce",
    "sequence_logprob",
    "token_logprobs",
]
