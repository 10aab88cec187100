"""MIP-Editor (Li et al. 2025, "Cross-Modal Unlearning via Influential Neuron Path Editing in
Multimodal Large Language Models", arXiv 2511.06793, AAAI 2026), as Open-MMunlearning ports it
(``src/trainer/unlearn/mip_editor.py``): an edit of influential FFN paths, then
representation misdirection with a retain loss.

1. **Path scores** (once, before any step, on the first ``batches`` forget batches): for the
   input ``a`` of every FFN output projection (``mlp.down_proj`` / ``mlp.fc2``) of the
   language model and the vision encoder, with ``g = ∂CE(forget)/∂a``, the score of input
   channel j is the mean of ``|a_j·g_j|`` over positions (language: the label positions,
   ``labels != -100``; vision: every patch), averaged over the batches.
2. **Edit**: the ``topk`` channels of each projection with the largest scores have their
   input column of the weight set to 0 and held there (their gradient is zeroed in every
   step that follows). A projection that receives no gradient (LLaVA's last CLIP layer, which
   it does not read) is not scored and not edited.
3. **Steps**: forget ``w_f · mean_samples mean_{label tokens} (1/d)‖h(θ) − c·u‖²`` with ``h``
   the output of the last language FFN output projection and ``u = r/‖r‖``, ``r ~ N(0, I)``
   drawn once from the run's seed; retain ``w_r · CE(θ; retain)``.
"""

from __future__ import annotations

import hashlib

import torch

from mmunlearn.data.batching import to_device
from mmunlearn.losses import mean_ce
from mmunlearn.models.adapters import _language_model
from mmunlearn.params import unwrap, vision_module_names

OUT_PROJ = ("down_proj", "fc2")  # the FFN output projection, by family


def _out_proj(block) -> torch.nn.Linear | None:
    mlp = getattr(block, "mlp", None)
    for name in OUT_PROJ:
        lin = getattr(mlp, name, None)
        if isinstance(lin, torch.nn.Linear):
            return lin
    return None


def ffn_modules(model) -> dict[str, dict[str, torch.nn.Linear]]:
    """``{"language": {name: linear}, "vision": {...}}``: the FFN output projection of every
    block of the language model and (when the model has one) of the vision encoder, in block
    order. ValueError when the language model has none."""
    from mmunlearn.methods.manu import _blocks

    m = unwrap(model)
    names = {id(mod): n for n, mod in m.named_modules()}
    sides = {"language": list(_language_model(m).layers)}
    try:
        sides["vision"] = list(_blocks(m.get_submodule(vision_module_names(m)[0])))
    except ValueError:
        pass  # a text-only model: its language side only
    out: dict = {}
    for side, blocks in sides.items():
        out[side] = {}
        for block in blocks:
            lin = _out_proj(block)
            if lin is not None:
                out[side][names[id(lin)]] = lin
    if not out["language"]:
        raise ValueError(
            f"mip_editor: {type(m).__name__}'s language layers have no mlp.down_proj / mlp.fc2"
        )
    return out


def target_module(model) -> torch.nn.Linear:
    """The module whose output the forget step steers: the last language layer's FFN output
    projection."""
    return list(ffn_modules(model)["language"].values())[-1]


def path_scores(model, source, n: int, modules: dict) -> tuple[dict, int]:
    """``({name: per-input-channel score}, batches used)`` over ``source[0..n-1]`` (or fewer
    when it is shorter): the mean over batches of the mean ``|a·∂CE/∂a|`` over positions
    (language: label positions; vision: all). Parameters' ``.grad`` are left untouched."""
    side_of = {name: side for side, mods in modules.items() for name in mods}
    lins = {name: lin for mods in modules.values() for name, lin in mods.items()}
    device = next(model.parameters()).device
    sums: dict = {}
    n = min(int(n), len(source))
    if n < 1:
        raise ValueError("mip_editor needs at least one forget batch to score its paths")
    seen: dict = {}

    def hook(name):
        def run(_mod, inputs):
            if name not in seen:  # a gradient-checkpointing recompute: leave it alone
                seen[name] = inputs[0]

        return run

    was_training = model.training
    model.eval()
    handles = [lin.register_forward_pre_hook(hook(k)) for k, lin in lins.items()]
    try:
        for i in range(n):
            batch = to_device(source[i], device)
            seen.clear()
            with torch.enable_grad():
                loss = mean_ce(model(**batch), batch)
                keys = [k for k in seen if seen[k].requires_grad]
                grads = torch.autograd.grad(loss, [seen[k] for k in keys], allow_unused=True)
            labels = batch["labels"]
            for k, g in zip(keys, grads):
                if g is None:
                    continue
                s = (seen[k].detach().float() * g.float()).abs()
                if side_of[k] == "language":
                    if s.shape[:2] != labels.shape:
                        raise ValueError(
                            f"mip_editor: {k}'s input {tuple(s.shape)} does not line up with "
                            f"the labels {tuple(labels.shape)}"
                        )
                    valid = labels != -100
                    if not bool(valid.any()):
                        raise ValueError("mip_editor: a forget batch has no label tokens")
                    s = s[valid].mean(0)
                else:
                    s = s.reshape(-1, s.shape[-1]).mean(0)
                sums[k] = s if k not in sums else sums[k] + s
            seen.clear()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: v / n for k, v in sums.items()}, n


def select(scores: dict[str, torch.Tensor], topk: int) -> dict[str, torch.Tensor]:
    """Boolean masks of the ``topk`` largest scores of each module (all when fewer)."""
    out = {}
    for name, s in scores.items():
        mask = torch.zeros(s.numel(), dtype=torch.bool)
        mask[torch.topk(s.cpu(), min(int(topk), s.numel())).indices] = True
        out[name] = mask
    return out


def zero_columns(lins: dict[str, torch.nn.Linear], masks: dict[str, torch.Tensor]) -> int:
    """Set the masked input columns of each linear layer's weight to 0; returns how many."""
    n = 0
    with torch.no_grad():
        for name, mask in masks.items():
            w = lins[name].weight
            w[:, mask.to(w.device)] = 0
            n += int(mask.sum())
    return n


class PathEdit:
    """The edited paths of a run: scored, selected and zeroed by :meth:`apply`; their columns
    held at zero by gradient hooks until :meth:`remove`. ``report``: what was edited;
    ``digest``: a hash of the selected channels (a resume must select the same)."""

    def __init__(self, model, forget, topk: int, batches: int):
        self.modules = ffn_modules(model)
        scores, used = path_scores(model, forget, batches, self.modules)
        self.masks = select(scores, topk)
        self.lins = {k: v for mods in self.modules.values() for k, v in mods.items()}
        self.handles: list = []
        self.report = {"batches": used, "topk": int(topk)}
        for side, mods in self.modules.items():
            edited = [k for k in mods if k in self.masks]
            self.report[side] = {
                "modules": len(mods),
                "edited_modules": len(edited),
                "channels": sum(int(self.masks[k].sum()) for k in edited),
            }
        h = hashlib.sha256()
        for k in sorted(self.masks):
            h.update(k.encode() + self.masks[k].nonzero().flatten().numpy().tobytes())
        self.digest = h.hexdigest()[:16]

    def apply(self) -> PathEdit:
        zero_columns(self.lins, self.masks)
        for name, mask in self.masks.items():
            w = self.lins[name].weight
            if w.requires_grad:
                cols = mask.to(w.device)
                self.handles.append(w.register_hook(lambda g, c=cols: g.masked_fill(c, 0)))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class _Stop(Exception):
    """Raised by the capture hook to end a forward at the target module."""


def target_output(model, batch: dict) -> torch.Tensor:
    """The output ``[B, T, d]`` of :func:`target_module` for ``batch`` (with the graph); the
    forward stops there."""
    mod = target_module(model)
    seen: list = []

    def hook(_module, _inputs, output):
        if seen:  # a gradient-checkpointing recompute runs the module again: leave it alone
            return None
        seen.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise _Stop

    handle = mod.register_forward_hook(hook)
    try:
        model(**batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("mip_editor: the target FFN projection did not run in the forward")
    return seen[0]


def control_vector(dim: int, coeff: float, seed: int) -> torch.Tensor:
    """``c·u``, ``u = r/‖r‖`` with ``r ~ N(0, I_dim)`` from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    r = torch.randn(dim, generator=g, dtype=torch.float64)
    return (r / r.norm() * coeff).float()


def steering_mse(act: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per token ``mean_k (act − target)²``, averaged over each sample's label tokens, then over
    the samples that have any."""
    if act.shape[:2] != labels.shape:
        raise ValueError(
            f"mip_editor: target activations {tuple(act.shape)} do not line up with the labels "
            f"{tuple(labels.shape)}"
        )
    valid = (labels != -100).to(act.device)
    per_token = (act.float() - target.float()).pow(2).mean(-1)
    count = valid.sum(-1)
    per_sample = (per_token * valid).sum(-1) / count.clamp_min(1)
    has = count > 0
    if not bool(has.any()):
        raise ValueError("mip_editor: a forget batch has no label tokens")
    return per_sample[has].mean()


def forget_loss(model, batch: dict, coeff: float, weight: float, seed: int) -> torch.Tensor:
    act = target_output(model, batch)
    target = control_vector(act.shape[-1], coeff, seed).to(act.device)
    return weight * steering_mse(act, target, batch["labels"])


def retain_loss(model, batch: dict, weight: float) -> torch.Tensor:
    return weight * mean_ce(model(**batch), batch)


__all__ = [
    "PathEdit",
    "control_vector",
    "ffn_modules",
    "forget_loss",
    "path_scores",
    "retain_loss",
    "select",
    "steering_mse",
    "target_module",
    "target_output",
    "zero_columns",
]
