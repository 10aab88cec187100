"""UNDIAL (Dong et al. 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust
Unlearning in Large Language Models", arXiv 2402.10052, NAACL 2025): distil the model toward
the frozen reference's next-token distribution in which the true token's logit is lowered by a
strength γ:

    target_t = softmax(z_ref,t − γ·onehot(y_t))
    L = mean over label tokens of  −Σ_v target_t,v · log softmax(z_θ,t)_v

(a cross-entropy to a fixed soft target: the same gradient as KL(target ‖ p_θ)). Only the
target token's probability is moved; the reference's ranking of every other token is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmunlearn.distributed import global_mean
from mmunlearn.losses import _shifted


def undial_loss(logits, ref_logits, labels, strength: float) -> torch.Tensor:
    """The UNDIAL loss of ``logits`` ``[B, T, V]`` against ``ref_logits`` with the label
    token's logit lowered by ``strength`` (HF layout: position t predicts label t+1)."""
    lg, lb = _shifted(logits, labels)
    rg, _ = _shifted(ref_logits, labels)
    valid = lb != -100
    onehot = F.one_hot(lb.clamp_min(0), rg.shape[-1]).to(rg.dtype)
    target = torch.softmax(rg - strength * onehot, dim=-1)
    ce = -(target * torch.log_softmax(lg, dim=-1)).sum(-1)
    return global_mean((ce * valid).sum(), valid.sum())


def forget_loss(model, ref_model, batch: dict, strength: float) -> torch.Tensor:
    out = model(**batch)
    with torch.no_grad():
        ref = ref_model(**batch)
    return undial_loss(out.logits, ref.logits.to(out.logits.device), batch["labels"], strength)


__all__ = ["forget_loss", "undial_loss"]
