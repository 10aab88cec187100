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

from mmunlearn.distributed import all_reduce_sum_, shard_groups
from mmunlearn.distributed import local as local_shard
from mmunlearn.kernels import (
    STATE_DTYPES,
    MaskIndex,
    grad_sq_norm,
    masked_adamw_,
    masked_sgd_,
    pack_bits,
    packed_size,
    unpack_bits,
)
from mmunlearn.kernels._common import mix32

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


def _by_device(plist) -> list[list]:
    """Parameters grouped by the device of their local shard (one kernel call per device: a
    launch table never holds another device's pointer), in first-seen order."""
    out: dict = {}
    for p in plist:
        out.setdefault(local_shard(p).device, []).append(p)
    return list(out.values())


def _sq_norm(parts, backend) -> torch.Tensor:
    """Σ‖g‖² over tensors that may span devices: one kernel call per device, summed on the
    first tensor's device."""
    by_dev: dict = {}
    for g in parts:
        by_dev.setdefault(g.device, []).append(g)
    dev0 = parts[0].device
    total = None
    for gs in by_dev.values():
        sq = grad_sq_norm(gs, backend=backend).to(dev0)
        total = sq if total is None else total + sq
    return total


class _MaskedOptimizer(torch.optim.Optimizer):
    """Shared machinery: masks kept in per-parameter state, clipping, masked/unmasked split."""

    def __init__(self, params, defaults, *, unmasked, clip_order, backend):
        if unmasked not in _UNMASKED:
            raise ValueError(f"unmasked must be one of {_UNMASKED}, got {unmasked!r}")
        if clip_order not in _CLIP_ORDERS:
            raise ValueError(f"clip_order must be one of {_CLIP_ORDERS}, got {clip_order!r}")
        self._mask_index: dict = {}
        self._old_masks: dict = {}
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
            old = self.state[p].get("mask") if not clear else self._old_masks.get(p)
            self.state[p]["mask"] = m
            self._mask_index.pop(p, None)
            self._mask_index_of(p)  # built once here: per-chunk popcounts, one host copy
            self._masks_changed(p, old)
        self._old_masks = {}

    def _masks_changed(self, p, old_mask) -> None:
        """Hook: the mask of ``p`` was replaced (compacted state re-lays its moments out)."""

    def _mask_index_of(self, p) -> MaskIndex | None:
        """The :class:`MaskIndex` of ``p``'s current mask (rebuilt when the mask tensor was
        replaced, e.g. by ``load_state_dict``), or None without a mask."""
        m = self.state.get(p, {}).get("mask")
        if m is None:
            return None
        hit = self._mask_index.get(p)
        if hit is None or hit[0] is not m:
            hit = self._mask_index[p] = (m, MaskIndex(m, local_shard(p).numel()))
        return hit[1]

    def clear_masks(self) -> None:
        """Remove every mask."""
        self._old_masks = {p: st["mask"] for p, st in self.state.items() if "mask" in st}
        for st in self.state.values():
            st.pop("mask", None)
        self._mask_index = {}

    def mask_counts(self) -> tuple[int, int]:
        """(selected elements, all elements) of the masked parameters' local shards (this
        rank's counts; sum them over ranks for a sharded model)."""
        sel = tot = 0
        for g in self.param_groups:
            for p in g["params"]:
                ix = self._mask_index_of(p)
                if ix is not None:
                    sel += ix.count
                    tot += ix.numel
        return sel, tot

    def init_state(self, p) -> dict:
        """The state of ``p``, created (zero moments, step 0) when it has none; returns the
        state dict (the masks live there too)."""
        return self.state[p]

    def state_tensors(self, p) -> dict[str, torch.Tensor]:
        """The optimizer state tensors of ``p`` that a checkpoint must hold (the live tensors,
        shared: loading into them fills the state), keyed by name; {} without state."""
        return {}

    def load_state_tensors(self, p, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (as :meth:`state_tensors` returns them) into the state of ``p``,
        creating it first; dtypes are converted to the optimizer's, shapes must match."""
        self.init_state(p)
        st = self.state_tensors(p)
        for k, v in tensors.items():
            if k not in st:
                raise KeyError(f"load_state_tensors: no state tensor {k!r}")
            v = local_shard(v)
            if v.numel() != st[k].numel():
                raise ValueError(
                    f"load_state_tensors: {k} has {v.numel()} elements, the state holds "
                    f"{st[k].numel()}"
                )
            if v.data_ptr() != st[k].data_ptr():
                st[k].copy_(v.reshape(st[k].shape))

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
        # parts keyed by the process groups their shard sums are reduced over (a plain tensor:
        # none; an FSDP2 DTensor: its mesh's shard dimension(s), never the default group)
        parts: dict[tuple, list] = {}
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                grad = local_shard(p.grad)
                m = self.state.get(p, {}).get("mask") if masked else None
                if masked and self.clip_order == "mask_then_clip":
                    if m is not None:
                        grad = grad * unpack_bits(m, grad.shape, backend=self.backend)
                    elif self.unmasked == "freeze":
                        continue
                parts.setdefault(shard_groups(p.grad), []).append(grad)
        if not parts:
            return None, None
        sq = None
        for groups, gs in parts.items():
            part = _sq_norm(gs, self.backend)
            for pg in groups:
                part = all_reduce_sum_(part, group=pg)
            sq = part if sq is None else sq + part.to(sq.device)
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
    ``maximize``. ``unmasked``: policy for parameters without a mask in masked steps
    ("freeze" | "update"). ``clip_order``: "clip_then_mask" (the official code: the norm of the
    full gradient) or "mask_then_clip" (the norm of the masked gradient). ``backend``: kernel
    backend ("auto" = Triton on CUDA, the C kernels on CPU).

    State: ``state_dtype=torch.float32`` (default: bit-exact torch.optim.AdamW arithmetic,
    bf16 parameters written with round-to-nearest-even) or ``torch.bfloat16``: both moments in
    bf16 (8 bytes less per element), written with stochastic rounding from counter-based bits
    seeded per step by (``seed``, the group's step counter, the call): reproducible run to run,
    identical bits on every backend. ``param_sr`` (default: on with bf16 state): bf16
    parameters stochastically rounded too, so updates below half a bf16 ulp still move them in
    expectation. ``compact_state=True``: moments only for the selected elements of masked
    parameters (laid out in element order, offsets from per-chunk popcounts built at
    :meth:`set_masks`); bit-identical to the dense masked step at the same state dtype. Every
    step must then be masked and every parameter with a gradient must have a mask (else
    ValueError naming the parameter); a new mask re-lays the moments out (kept where both masks
    select, zero where only the new one does).
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
        state_dtype: torch.dtype = torch.float32,
        param_sr: bool | None = None,
        compact_state: bool = False,
        seed: int = 0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr}, eps={eps} or weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize
        )
        self.state_dtype = state_dtype
        self.param_sr = (state_dtype == torch.bfloat16) if param_sr is None else bool(param_sr)
        self.compact_state = bool(compact_state)
        self.seed = int(seed)
        super().__init__(
            params, defaults, unmasked=unmasked, clip_order=clip_order, backend=backend
        )

    # ------------------------------------------------------------------ state
    def _moment_numel(self, p) -> int:
        if not self.compact_state:
            return local_shard(p).numel()
        ix = self._mask_index_of(p)
        if ix is None:
            raise ValueError(
                f"compact_state: {self._param_names().get(p, 'a parameter')} has no mask "
                "(compacted state holds moments of selected elements only: set_masks first)"
            )
        return ix.count

    def init_state(self, p) -> dict:
        """The state of ``p`` (``step``, ``exp_avg``, ``exp_avg_sq`` in ``state_dtype``, of
        the local shard's shape, or 1-D of the mask's count with ``compact_state``), created
        with zero moments when absent; returns the state dict."""
        st = self.state[p]
        if "exp_avg" not in st:
            local = local_shard(p)
            shape = (self._moment_numel(p),) if self.compact_state else local.shape
            kw = dict(dtype=self.state_dtype, device=local.device)
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros(shape, **kw)
            st["exp_avg_sq"] = torch.zeros(shape, **kw)
        return st

    _init_state = init_state  # the former private name

    def state_tensors(self, p) -> dict[str, torch.Tensor]:
        """``{"exp_avg", "exp_avg_sq", "step"}`` of ``p`` (live tensors; {} without state).
        Moments have the local shard's shape, or are 1-D compacted with ``compact_state``."""
        st = self.state.get(p, {})
        if "exp_avg" not in st:
            return {}
        return {k: st[k] for k in ("exp_avg", "exp_avg_sq", "step")}

    def _relayout(self, p, old_mask=None) -> None:
        """Bring the moments of ``p`` to this optimizer's dtype and layout (dense, or compacted
        to the current mask; ``old_mask``: the mask a compacted state was laid out for)."""
        st = self.state.get(p, {})
        if "exp_avg" not in st:
            return
        local = local_shard(p)
        mask = st.get("mask")
        for k in ("exp_avg", "exp_avg_sq"):
            t = st[k]
            if t.numel() != local.numel() or (old_mask is not None and t.dim() == 1):
                src = old_mask if old_mask is not None else mask
                if src is None:
                    raise ValueError(f"compacted {k} of {self._param_names()[p]} without a mask")
                sel = unpack_bits(src, (local.numel(),), backend="torch")
                if int(sel.sum()) != t.numel():
                    raise ValueError(
                        f"{k} of {self._param_names()[p]} has {t.numel()} elements: neither the "
                        f"parameter's {local.numel()} nor its mask's {int(sel.sum())}"
                    )
                dense = torch.zeros(local.numel(), dtype=t.dtype, device=t.device)
                dense[sel] = t.reshape(-1)
                t = dense.reshape(local.shape)
            if self.compact_state:
                if mask is None:
                    raise ValueError(
                        f"compact_state: {self._param_names()[p]} has state but no mask"
                    )
                t = t.reshape(-1)[unpack_bits(mask, (local.numel(),), backend="torch")]
            st[k] = t.to(self.state_dtype).contiguous()

    def _masks_changed(self, p, old_mask) -> None:
        if self.compact_state:
            self._relayout(p, old_mask)

    def load_state_dict(self, state_dict):
        """Like ``Optimizer.load_state_dict`` (masks kept uint8, moments not cast to the
        parameter's dtype); moments are converted to this optimizer's ``state_dtype`` and
        layout (a dense checkpoint loads into compacted state and back)."""
        super().load_state_dict(state_dict)
        for g in self.param_groups:
            for p in g["params"]:
                self._relayout(p)

    @staticmethod
    def _device_step(st, local: torch.Tensor) -> torch.Tensor:
        """The state's step count as a 0-dim fp32 tensor on the parameter's device (moved there
        once, as torch's fused and capturable AdamW keep it)."""
        t = st["step"]
        if t.device != local.device or t.dtype != torch.float32:
            t = st["step"] = t.to(device=local.device, dtype=torch.float32)
        return t

    def _check_compact(self, group, masked) -> None:
        """With compacted state every parameter that would step must have a mask."""
        if not self.compact_state:
            return
        for p in group["params"]:
            if p.grad is None or (masked and "mask" in self.state.get(p, {})):
                continue
            if masked and self.unmasked == "freeze":
                continue  # frozen: never stepped, needs no state
            raise ValueError(
                f"compact_state: {self._param_names()[p]} would take an unmasked step "
                f"(masked={masked}, unmasked={self.unmasked!r}, has a mask: "
                f"{'mask' in self.state.get(p, {})}); compacted state only holds the moments "
                "of masked elements"
            )

    def _call_seed(self, gi: int, counter: int, call: int) -> int | None:
        if self.state_dtype != torch.bfloat16 and not self.param_sr:
            return None
        return mix32(mix32(mix32(self.seed ^ (gi * 0x9E3779B9)) ^ counter) ^ call)

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
        for group in self.param_groups:
            self._check_compact(group, masked)
        scale, flag = self._prepare(max_grad_norm, masked, found_inf)
        keep: dict = {}  # device → 1.0 where the step is taken, 0.0 where it is skipped
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            counter = group["sr_step"] = group.get("sr_step", 0) + 1
            with_mask, without = self._split(group, masked)
            kw = dict(
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                grad_mul=scale,
                maximize=group["maximize"],
                param_sr=self.param_sr,
                backend=self.backend,
            )
            calls = [(pl, True) for pl in _by_device(with_mask)]
            calls += [(pl, False) for pl in _by_device(without)]
            n_call = 0
            for plist, use_mask in calls:
                idx = dict(
                    masks=[self.state[p]["mask"] for p in plist] if use_mask else None,
                    mask_index=[self._mask_index_of(p) for p in plist] if use_mask else None,
                    compact=self.compact_state and use_mask,
                )
                if flag is not None:  # device step counts, one launch per dtype pair
                    sts = [self.init_state(p) for p in plist]
                    locs = [local_shard(p) for p in plist]
                    steps = [self._device_step(st, x) for st, x in zip(sts, locs)]
                    dev = locs[0].device
                    if dev not in keep:
                        keep[dev] = (flag.to(dev) == 0).to(torch.float32)
                    torch._foreach_add_(steps, [keep[dev]] * len(steps))
                    n_call += 1
                    masked_adamw_(
                        locs,
                        [local_shard(p.grad) for p in plist],
                        [s["exp_avg"] for s in sts],
                        [s["exp_avg_sq"] for s in sts],
                        step=steps,
                        found_inf=flag.to(dev),
                        sr_seed=self._call_seed(gi, counter, n_call),
                        **idx,
                        **kw,
                    )
                    continue
                # one launch per distinct step count (normally one)
                by_step: dict[float, list] = {}
                for p in plist:
                    st = self.init_state(p)
                    st["step"] += 1
                    by_step.setdefault(float(st["step"]), []).append(p)
                for step, ps in by_step.items():
                    sts = [self.state[p] for p in ps]
                    n_call += 1
                    masked_adamw_(
                        [local_shard(p) for p in ps],
                        [local_shard(p.grad) for p in ps],
                        [s["exp_avg"] for s in sts],
                        [s["exp_avg_sq"] for s in sts],
                        masks=[s["mask"] for s in sts] if use_mask else None,
                        mask_index=[self._mask_index_of(p) for p in ps] if use_mask else None,
                        compact=self.compact_state and use_mask,
                        step=int(step),
                        sr_seed=self._call_seed(gi, counter, n_call),
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
            calls = [(pl, True) for pl in _by_device(with_mask)]
            calls += [(pl, False) for pl in _by_device(without)]
            for plist, use_mask in calls:
                locs = [local_shard(p) for p in plist]
                masked_sgd_(
                    locs,
                    [local_shard(p.grad) for p in plist],
                    [self.state[p]["mask"] for p in plist] if use_mask else None,
                    lr=float(group["lr"]),
                    weight_decay=group["weight_decay"],
                    grad_mul=scale,
                    found_inf=None if flag is None else flag.to(locs[0].device),
                    maximize=group["maximize"],
                    backend=self.backend,
                )
        return loss
