"""Thin ``torch.optim.Optimizer`` subclasses over the masked-step kernels.

``MaskedAdamW`` / ``MaskedSGD`` behave like ``torch.optim.AdamW`` / ``SGD`` (param groups,
``zero_grad``, ``add_param_group``, ``state_dict`` round-trip, LR schedulers) and add per-parameter
1-bit masks: ``step(masked=True)`` moves only the selected elements of masked parameters and
leaves every other element of the parameter *and its moments* byte-identical. The hot path is
one multi-tensor kernel launch per (param group, dtype pair, step count), with no host sync:
the clip coefficient stays on the device. ``step(found_inf=flag)`` takes a device flag
(nonzero: skip) as torch's fused AdamW does, so a step guarded against a non-finite loss or
gradient needs no ``loss.item()`` either: the update, the moments and the step counts stay as
they were, on the device.

Three-line use in any training loop::

    opt = MaskedAdamW(model.parameters(), lr=1e-4)
    opt.set_masks({p: p.abs() > 0.1 for p in model.parameters()})   # bool or packed masks
    loss.backward(); opt.step(max_grad_norm=1.0); opt.zero_grad()
    # or, never reading the loss back: skip the step on the device if it is not finite
    opt.step(max_grad_norm=1.0, found_inf=~torch.isfinite(loss.detach()))

Policy for parameters without a mask during a masked step (``unmasked=``): ``"freeze"``
(default: they do not move at all) or ``"update"`` (a full step). The official MMUnlearner code
behaves like ``"update"`` — silently, because its mask is keyed by names that do not cover norms,
embeddings or whole towers.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch

from mmunlearn.distributed import local as local_shard
from mmunlearn.kernels import (
    grad_sq_norm,
    masked_adamw_,
    masked_sgd_,
    pack_bits,
    packed_size,
    unpack_bits,
)

_UNMASKED = ("freeze", "update")
_CLIP_ORDERS = ("clip_then_mask", "mask_then_clip")


def _shard_like(mask: torch.Tensor, p) -> torch.Tensor:
    """A full-shape mask → the local shard matching DTensor parameter ``p`` (FSDP2 layout)."""
    try:
        from torch.distributed.tensor import distribute_tensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import distribute_tensor
    dev = local_shard(p).device
    return distribute_tensor(mask.to(dev), p.device_mesh, p.placements).to_local()


class _MaskedOptimizer(torch.optim.Optimizer):
    """Shared machinery: masks kept in per-parameter state, clipping, masked/unmasked split."""

    def __init__(self, params, defaults, *, unmasked, clip_order, backend):
        if unmasked not in _UNMASKED:
            raise ValueError(f"unmasked must be one of {_UNMASKED}, got {unmasked!r}")
        if clip_order not in _CLIP_ORDERS:
            raise ValueError(f"clip_order must be one of {_CLIP_ORDERS}, got {clip_order!r}")
        super().__init__(params, defaults)
        self.unmasked = unmasked
        self.clip_order = clip_order
        self.backend = backend

    # ------------------------------------------------------------------ masks
    def _param_names(self) -> dict[torch.Tensor, str]:
        return {
            p: f"group {gi} param {pi}"
            for gi, g in enumerate(self.param_groups)
            for pi, p in enumerate(g["params"])
        }

    def set_masks(self, masks: Mapping[torch.Tensor, torch.Tensor], *, clear: bool = True):
        """Attach masks: ``{param: mask}``; a mask is a bool tensor of the parameter's shape, or
        a packed uint8 tensor of ``ceil(numel/8)`` bytes (:func:`pack_bits`). For a sharded
        (DTensor, FSDP2) parameter a full-shape bool mask is sharded like the parameter (all
        ranks must call this together); a packed mask must already be the local shard's.

        With ``clear=True`` (default) parameters absent from ``masks`` lose any previous mask.
        Raises ValueError naming the parameter for a mask that does not fit.
        """
        names = self._param_names()
        if clear:
            self.clear_masks()
        for p, m in masks.items():
            if p not in names:
                raise ValueError("set_masks: a tensor that is not a parameter of this optimizer")
            local = local_shard(p)
            if hasattr(p, "to_local") and m.dtype == torch.bool and m.shape == p.shape:
                m = _shard_like(m, p)  # a full-shape mask for a sharded parameter
            m = local_shard(m).to(local.device)
            if m.dtype == torch.bool:
                if m.shape != local.shape:
                    raise ValueError(
                        f"set_masks: mask for {names[p]} has shape {tuple(m.shape)}, "
                        f"parameter has {tuple(local.shape)}"
                    )
                m = pack_bits(m, backend=self.backend)
            elif m.dtype == torch.uint8:
                need = packed_size(local.numel())
                if m.numel() != need:
                    raise ValueError(
                        f"set_masks: packed mask for {names[p]} has {m.numel()} bytes, "
                        f"parameter of {local.numel()} elements needs {need}"
                    )
                m = m.reshape(-1).contiguous()
            else:
                raise ValueError(
                    f"set_masks: mask for {names[p]} must be bool or uint8, got {m.dtype}"
                )
            self.state[p]["mask"] = m

    def clear_masks(self) -> None:
        """Remove every mask."""
        for st in self.state.values():
            st.pop("mask", None)

    def get_mask(self, p: torch.Tensor, dense: bool = False):
        """The packed mask of ``p`` (or the bool tensor with ``dense=True``), or None."""
        m = self.state.get(p, {}).get("mask")
        if m is None or not dense:
            return m
        return unpack_bits(m, local_shard(p).shape, backend=self.backend)

    @property
    def has_masks(self) -> bool:
        return any("mask" in st for st in self.state.values())

    # ------------------------------------------------------------------ state_dict
    def load_state_dict(self, state_dict):
        """Like ``Optimizer.load_state_dict`` but keeps fp32 moments and uint8 masks as saved
        (torch casts every state tensor to the parameter's dtype, which would round fp32
        moments of bf16 parameters to bf16 and turn masks into floats)."""
        saved = {pid: dict(st) for pid, st in state_dict["state"].items()}
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        super().load_state_dict(state_dict)
        current = [p for g in self.param_groups for p in g["params"]]
        id_map = dict(zip(saved_ids, current))
        for pid, st in saved.items():
            p = id_map[pid]
            dev = local_shard(p).device
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    self.state[p][k] = v.to(device=dev)

    # ------------------------------------------------------------------ step helpers
    def _clip_scale(self, max_grad_norm, masked):
        """Device 0-dim clip coefficient min(1, max_norm / (norm + 1e-6)) (torch's formula)."""
        coef, _ = self._clip_scale_and_norm(max_grad_norm, masked)
        return coef

    def _clip_scale_and_norm(self, max_grad_norm, masked):
        """(clip coefficient, squared norm) as device 0-dim tensors, or (None, None)."""
        grads, dense_masked = [], []
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                grad = local_shard(p.grad)
                m = self.state.get(p, {}).get("mask") if masked else None
                if masked and self.clip_order == "mask_then_clip":
                    if m is not None:
                        dense_masked.append(grad * unpack_bits(m, grad.shape, backend=self.backend))
                        continue
                    if self.unmasked == "freeze":
                        continue
                grads.append(grad)
        parts = grads + dense_masked
        if not parts:
            return None, None
        sq = grad_sq_norm(parts, backend=self.backend)
        sq = self._all_reduce_sq_norm(sq)
        return torch.clamp(max_grad_norm / (sq.sqrt() + 1e-6), max=1.0), sq

    def _prepare(self, max_grad_norm, masked, found_inf):
        """Clip coefficient and skip flag for a step, both on the device (no host sync).

        With ``found_inf`` given and clipping on, a non-finite gradient norm also skips the step
        (the norm is computed anyway)."""
        if max_grad_norm is None:
            scale, sq = None, None
        else:
            scale, sq = self._clip_scale_and_norm(max_grad_norm, masked)
        if found_inf is None:
            return scale, None
        if not isinstance(found_inf, torch.Tensor) or found_inf.numel() != 1:
            raise ValueError("found_inf must be a 1-element tensor (nonzero: skip the step)")
        flag = found_inf.detach().reshape(()).to(torch.float32)
        if sq is not None:
            flag = torch.maximum(flag.to(sq.device), (~torch.isfinite(sq)).to(torch.float32))
        return scale, flag

    def _all_reduce_sq_norm(self, sq):
        """Hook for sharded parameters: sum the squared norm over ranks when any is a DTensor."""
        if any(hasattr(p, "to_local") for g in self.param_groups for p in g["params"]):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(sq)
        return sq

    def _split(self, group, masked):
        """Parameters of a group to step: (with mask, without mask) as lists of params."""
        with_mask, without = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if masked and "mask" in self.state.get(p, {}):
                with_mask.append(p)
            elif not masked or self.unmasked == "update":
                without.append(p)
        return with_mask, without

    def _resolve_masked(self, masked):
        if masked is None:
            return self.has_masks
        if masked and not self.has_masks and self.unmasked == "freeze":
            warnings.warn(
                "step(masked=True) with no masks set and unmasked='freeze': nothing moves",
                stacklevel=3,
            )
        return bool(masked)


class MaskedAdamW(_MaskedOptimizer):
    """AdamW (decoupled weight decay, bias correction) whose steps can be restricted to masks.

    Args mirror ``torch.optim.AdamW``: ``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``maximize``. State is fp32 whatever the parameter dtype (bf16 parameters are written with
    round-to-nearest-even). ``unmasked``: policy for parameters without a mask in masked steps
    ("freeze" | "update"). ``clip_order``: "clip_then_mask" (the official code: the norm of the
    full gradient) or "mask_then_clip" (the norm of the masked gradient). ``backend``: kernel
    backend ("auto" = Triton on CUDA).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        unmasked: str = "freeze",
        clip_order: str = "clip_then_mask",
        backend: str = "auto",
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr}, eps={eps} or weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize
        )
        super().__init__(
            params, defaults, unmasked=unmasked, clip_order=clip_order, backend=backend
        )

    def _init_state(self, p):
        st = self.state[p]
        if "exp_avg" not in st:
            local = local_shard(p)
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
            st["exp_avg_sq"] = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
        return st

    @staticmethod
    def _device_step(st, local: torch.Tensor) -> torch.Tensor:
        """The state's step count as a 0-dim fp32 tensor on the parameter's device (moved there
        once, as torch's fused and capturable AdamW keep it)."""
        t = st["step"]
        if t.device != local.device or t.dtype != torch.float32:
            t = st["step"] = t.to(device=local.device, dtype=torch.float32)
        return t

    @torch.no_grad()
    def step(
        self,
        closure=None,
        *,
        masked: bool | None = None,
        max_grad_norm: float | None = None,
        found_inf: torch.Tensor | None = None,
    ):
        """One optimizer step.

        ``masked=True``: masked parameters move only where their bit is 1; unmasked parameters
        follow the ``unmasked`` policy. ``masked=False``: a plain AdamW step over every parameter
        with a gradient. ``masked=None`` (default): masked iff any mask is set.
        ``max_grad_norm``: clip the global gradient norm on the device first (no host sync).
        ``found_inf``: a 1-element tensor, e.g. ``~torch.isfinite(loss.detach())``; where it is
        nonzero the step is a no-op on the device — parameters, moments and step counts keep
        their values — without a host sync (torch's fused-AdamW ``found_inf`` contract). With
        ``max_grad_norm`` a non-finite gradient norm skips the step too. Step counts then live
        on the parameters' devices and bias corrections are computed there (in fp64, rounded
        to fp32: within an fp32 rounding of the host values used without ``found_inf``).
        Returns the closure's loss, if a closure was given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masked = self._resolve_masked(masked)
        scale, flag = self._prepare(max_grad_norm, masked, found_inf)
        keep: dict = {}  # device → 1.0 where the step is taken, 0.0 where it is skipped
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            with_mask, without = self._split(group, masked)
            kw = dict(
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                grad_scale=scale,
                maximize=group["maximize"],
                backend=self.backend,
            )
            for plist, use_mask in ((with_mask, True), (without, False)):
                if not plist:
                    continue
                if flag is not None:  # device step counts, one launch per dtype pair
                    sts = [self._init_state(p) for p in plist]
                    locs = [local_shard(p) for p in plist]
                    steps = [self._device_step(st, x) for st, x in zip(sts, locs)]
                    dev = locs[0].device
                    if dev not in keep:
                        keep[dev] = (flag.to(dev) == 0).to(torch.float32)
                    torch._foreach_add_(steps, [keep[dev]] * len(steps))
                    masked_adamw_(
                        locs,
                        [local_shard(p.grad) for p in plist],
                        [s["exp_avg"] for s in sts],
                        [s["exp_avg_sq"] for s in sts],
                        [s["mask"] for s in sts] if use_mask else None,
                        step=steps,
                        found_inf=flag.to(dev),
                        **kw,
                    )
                    continue
                # one launch per distinct step count (normally one)
                by_step: dict[float, list] = {}
                for p in plist:
                    st = self._init_state(p)
                    st["step"] += 1
                    by_step.setdefault(float(st["step"]), []).append(p)
                for step, ps in by_step.items():
                    sts = [self.state[p] for p in ps]
                    masked_adamw_(
                        [local_shard(p) for p in ps],
                        [local_shard(p.grad) for p in ps],
                        [s["exp_avg"] for s in sts],
                        [s["exp_avg_sq"] for s in sts],
                        [s["mask"] for s in sts] if use_mask else None,
                        step=int(step),
                        **kw,
                    )
        return loss


class MaskedSGD(_MaskedOptimizer):
    """Plain SGD (``p -= lr·g``, optional decoupled weight decay) restricted to masks.

    Same mask, policy and clipping behaviour as :class:`MaskedAdamW`; no momentum state.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        unmasked: str = "freeze",
        clip_order: str = "clip_then_mask",
        backend: str = "auto",
    ):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr} or weight_decay={weight_decay}")
        super().__init__(
            params,
            dict(lr=lr, weight_decay=weight_decay, maximize=maximize),
            unmasked=unmasked,
            clip_order=clip_order,
            backend=backend,
        )

    @torch.no_grad()
    def step(
        self,
        closure=None,
        *,
        masked: bool | None = None,
        max_grad_norm: float | None = None,
        found_inf: torch.Tensor | None = None,
    ):
        """One SGD step; arguments as :meth:`MaskedAdamW.step`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masked = self._resolve_masked(masked)
        scale, flag = self._prepare(max_grad_norm, masked, found_inf)
        for group in self.param_groups:
            with_mask, without = self._split(group, masked)
            for plist, use_mask in ((with_mask, True), (without, False)):
                if not plist:
                    continue
                locs = [local_shard(p) for p in plist]
                masked_sgd_(
                    locs,
                    [local_shard(p.grad) for p in plist],
                    [self.state[p]["mask"] for p in plist] if use_mask else None,
                    lr=float(group["lr"]),
                    weight_decay=group["weight_decay"],
                    grad_scale=scale,
                    found_inf=None if flag is None else flag.to(locs[0].device),
                    maximize=group["maximize"],
                    backend=self.backend,
                )
        return loss
