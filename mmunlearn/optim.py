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

fp16 training: ``torch.amp.GradScaler`` works as with torch's fused AdamW (``scaler.scale(loss)
.backward(); scaler.step(opt, max_grad_norm=1.0); scaler.update()``): the scale is divided out
inside the kernel, clipping sees the unscaled norm, and a step with an inf/NaN gradient is
skipped on the device (``MaskedOptimizer`` in :mod:`mmunlearn.optim_base`).

Policy for parameters without a mask during a masked step (``unmasked=``): ``"freeze"``
(default: they do not move at all) or ``"update"`` (a full step). The official MMUnlearner code
behaves like ``"update"`` — silently, because its mask is keyed by names that do not cover norms,
embeddings or whole towers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from mmunlearn.distributed import local as local_shard
from mmunlearn.kernels import STATE_DTYPES, masked_adamw_, masked_sgd_, unpack_bits
from mmunlearn.kernels._common import mix32
from mmunlearn.optim_base import GradRelease, _by_device
from mmunlearn.optim_base import MaskedOptimizer as _MaskedOptimizer


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

    def state_tensors(self, p, *, dense: bool = False) -> dict[str, torch.Tensor]:
        """``{"exp_avg", "exp_avg_sq", "step"}`` of ``p`` ({} without state): the live
        tensors — moments of the local shard's shape, or 1-D compacted with ``compact_state``.
        ``dense=True``: moments always of the local shard's shape (for compacted state a
        scattered copy, zero where unselected: what a layout-independent checkpoint holds)."""
        st = self.state.get(p, {})
        if "exp_avg" not in st:
            return {}
        out = {k: st[k] for k in ("exp_avg", "exp_avg_sq", "step")}
        if dense and self.compact_state:
            local = local_shard(p)
            sel = unpack_bits(st["mask"], local.shape, backend="torch")
            for k in ("exp_avg", "exp_avg_sq"):
                d = torch.zeros(local.shape, dtype=st[k].dtype, device=st[k].device)
                d[sel] = st[k]
                out[k] = d
        return out

    def load_state_tensors(self, p, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into the state of ``p`` (created first): moments dense (the local
        shard's shape) or compacted (the mask's count), converted to this optimizer's dtype
        and layout; ``step`` as is. ValueError when a size fits neither."""
        st = self.init_state(p)
        local = local_shard(p)
        for k, v in tensors.items():
            if k not in ("exp_avg", "exp_avg_sq", "step"):
                raise KeyError(f"load_state_tensors: no state tensor {k!r}")
            v = local_shard(v)
            if v.data_ptr() == st[k].data_ptr():
                continue
            if k != "step" and self.compact_state and v.numel() == local.numel() != st[k].numel():
                v = v.reshape(-1)[unpack_bits(st["mask"], (local.numel(),), backend="torch")]
            if v.numel() != st[k].numel():
                raise ValueError(
                    f"load_state_tensors: {k} of {self._param_names()[p]} has {v.numel()} "
                    f"elements, the state holds {st[k].numel()}"
                )
            st[k].copy_(v.reshape(st[k].shape))

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

    def sr_counters(self) -> torch.Tensor:
        """The per-group step counters the stochastic-rounding seeds derive from (int64, one per
        param group; kept in ``param_groups[i]["sr_step"]``, so ``state_dict`` carries them).
        A checkpoint that stores the moments elsewhere (DCP) stores these too, so that a
        resumed run rounds exactly as an uninterrupted one."""
        return torch.tensor([g.get("sr_step", 0) for g in self.param_groups], dtype=torch.int64)

    def load_sr_counters(self, counters) -> None:
        """Restore :meth:`sr_counters`."""
        vals = [int(x) for x in torch.as_tensor(counters).reshape(-1).tolist()]
        if len(vals) != len(self.param_groups):
            raise ValueError(f"{len(vals)} SR counters for {len(self.param_groups)} param groups")
        for g, v in zip(self.param_groups, vals):
            g["sr_step"] = v

    def _call_seed(self, gi: int, counter: int, call: int) -> int | None:
        if self.state_dtype != torch.bfloat16 and not self.param_sr:
            return None
        return mix32(mix32(mix32(self.seed ^ (gi * 0x9E3779B9)) ^ counter) ^ call)

    def _group_kwargs(self, group, scale) -> dict:
        """The keyword arguments shared by every ``masked_adamw_`` launch of ``group``."""
        beta1, beta2 = group["betas"]
        return dict(
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

    def _step_group(self, gi: int, group, masked, scale, flag, keep: dict) -> None:
        """:meth:`step` of one param group: one launch per (device, mask use) list, and per
        distinct step count when the counts live on the host."""
        counter = group["sr_step"] = group.get("sr_step", 0) + 1
        with_mask, without = self._split(group, masked)
        kw = self._group_kwargs(group, scale)
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
                n_call += 1
                self._launch_device_counts(plist, idx, kw, flag, keep, gi, counter, n_call)
                continue
            n_call = self._launch_host_counts(plist, use_mask, kw, gi, counter, n_call)

    def _launch_device_counts(
        self, plist, idx: dict, kw: dict, flag, keep: dict, gi: int, counter: int, n_call: int
    ) -> None:
        """One launch over ``plist`` with the step counts on the device, advanced by
        ``keep[device]`` (0.0 where ``flag`` skips the step); ``n_call``: this launch's number."""
        sts = [self.init_state(p) for p in plist]
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
            step=steps,
            found_inf=flag.to(dev),
            sr_seed=self._call_seed(gi, counter, n_call),
            **idx,
            **kw,
        )

    def _launch_host_counts(
        self, plist, use_mask: bool, kw: dict, gi: int, counter: int, n_call: int
    ) -> int:
        """Launches over ``plist`` with host step counts: one per distinct step count (normally
        one). Returns the number of the last launch made."""
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
        return n_call

    def _launch_one(self, p, gi, pi, use_mask, scale, flag, counter) -> None:
        """:class:`~mmunlearn.optim_base.GradRelease`'s launch over one parameter (its
        stochastic-rounding call number is its index in the group, so the bits do not depend
        on the order in which backward completes the gradients)."""
        kw = self._group_kwargs(self.param_groups[gi], scale)
        idx = dict(
            masks=[self.state[p]["mask"]] if use_mask else None,
            mask_index=[self._mask_index_of(p)] if use_mask else None,
            compact=self.compact_state and use_mask,
        )
        if flag is not None:
            self._launch_device_counts([p], idx, kw, flag, {}, gi, counter, 1 + pi)
        else:
            self._launch_host_counts([p], use_mask, kw, gi, counter, pi)

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
            self._step_group(gi, group, masked, scale, flag, keep)
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

    def _launch_one(self, p, gi, pi, use_mask, scale, flag, counter) -> None:
        group = self.param_groups[gi]
        masked_sgd_(
            [local_shard(p)],
            [local_shard(p.grad)],
            [self.state[p]["mask"]] if use_mask else None,
            lr=float(group["lr"]),
            weight_decay=group["weight_decay"],
            grad_mul=scale,
            found_inf=flag,
            maximize=group["maximize"],
            backend=self.backend,
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


__all__ = ["GradRelease", "MaskedAdamW", "MaskedSGD"]
