"""The shared machinery of the masked optimizers (:mod:`mmunlearn.optim`): per-parameter
packed masks and their :class:`~mmunlearn.kernels.MaskIndex`, the masked/unmasked split, global
gradient-norm clipping on the device (reduced over each DTensor's shard groups), device
grouping, and the public state methods the checkpoint and logging code use.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from mmunlearn.distributed import all_reduce_sum_, shard_groups
from mmunlearn.distributed import local as local_shard
from mmunlearn.kernels import MaskIndex, grad_sq_norm, pack_bits, packed_size, unpack_bits

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


class MaskedOptimizer(torch.optim.Optimizer):
    """Shared machinery: masks kept in per-parameter state, clipping, masked/unmasked split.

    ``torch.amp.GradScaler`` support (the contract of torch's fused optimizers): with
    ``_step_supports_amp_scaling``, ``scaler.step(opt, ...)`` sets ``opt.grad_scale`` (None
    when ``scaler.unscale_(opt)`` already ran) and ``opt.found_inf`` and calls :meth:`step`
    directly; the step divides the gradients by the scale inside the kernel (``grad_mul``:
    no unscaled copy, and fp16 gradients are never unscaled in fp16), clips on the unscaled
    norm, and where ``found_inf`` is set (an inf/NaN gradient) is a no-op on the device:
    weights, moments and step counts untouched. ``scaler.update()`` then adapts the scale."""

    _step_supports_amp_scaling = True

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

    def _clip_scale_and_norm(self, max_grad_norm, masked, inv_scale=None):
        """(clip coefficient, squared norm) as device 0-dim tensors, or (None, None);
        ``inv_scale``: the gradients are scaled by its inverse (a loss scale), the coefficient
        is that of the unscaled norm (the squared norm returned is the scaled one)."""
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
        norm = sq.sqrt() if inv_scale is None else sq.sqrt() * inv_scale.to(sq.device)
        return torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0), sq

    def _prepare(self, max_grad_norm, masked, found_inf):
        """Clip coefficient and skip flag for a step, both on the device (no host sync).

        With ``found_inf`` given and clipping on, a non-finite gradient norm also skips the step
        (the norm is computed anyway). Under ``torch.amp.GradScaler.step`` (the class
        docstring) the scaler's ``grad_scale`` and ``found_inf`` join in: the returned
        multiplier includes ``1 / grad_scale`` and the flag the scaler's."""
        inv = getattr(self, "grad_scale", None)
        inv = None if inv is None else torch.reciprocal(inv.detach().reshape(()).float())
        amp_inf = getattr(self, "found_inf", None)
        if amp_inf is not None:
            amp_inf = amp_inf.detach().reshape(()).float()
            if found_inf is not None:
                given = found_inf.detach().reshape(()).float().to(amp_inf.device)
                amp_inf = torch.maximum(amp_inf, given)
            found_inf = amp_inf
        if max_grad_norm is None:
            scale, sq = inv, None
        else:
            scale, sq = self._clip_scale_and_norm(max_grad_norm, masked, inv)
            if inv is not None:
                scale = inv if scale is None else scale * inv.to(scale.device)
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

    # ------------------------------------------------------------------ step in backward
    def _release_step(self, p, gi: int, pi: int, armed: dict) -> torch.Tensor | None:
        """:class:`GradRelease`'s step of one parameter whose gradient is complete: its own
        clip coefficient (``armed["max_grad_norm"]`` against this gradient's norm alone), the
        masked/unmasked policy of :meth:`step`, then one launch; returns the gradient's squared
        norm on the device when it was computed (clipping, or ``armed["norm"]``), else None."""
        masked = armed["masked"]
        use_mask = masked and "mask" in self.state.get(p, {})
        moves = use_mask or not masked or self.unmasked == "update"
        grad = local_shard(p.grad)
        sq = None
        if armed["max_grad_norm"] is not None or armed["norm"]:
            g = grad
            if use_mask and self.clip_order == "mask_then_clip":
                g = grad * unpack_bits(self.state[p]["mask"], grad.shape, backend=self.backend)
            sq = grad_sq_norm([g], backend=self.backend)
        if not moves:
            return sq
        scale = None
        if armed["max_grad_norm"] is not None:
            scale = torch.clamp(armed["max_grad_norm"] / (sq.sqrt() + 1e-6), max=1.0)
        flag = armed["found_inf"]
        if flag is not None:
            flag = flag.to(grad.device)
            if sq is not None:
                flag = torch.maximum(flag, (~torch.isfinite(sq)).to(torch.float32))
        self._launch_one(p, gi, pi, use_mask, scale, flag, armed["counters"][gi])
        return sq

    def _launch_one(self, p, gi, pi, use_mask, scale, flag, counter) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no step in backward")


class GradRelease:
    """Optimizer step in backward: every parameter is updated as soon as its gradient is
    complete and the gradient is freed at once, so at most one parameter's gradient (plus
    autograd's in-flight buffers) is alive instead of all of them.

    ``rel = GradRelease(opt)`` hooks every parameter of ``opt`` (torch's
    ``register_post_accumulate_grad_hook``); then, per step::

        with rel.armed(masked=True, max_grad_norm=1.0, found_inf=~torch.isfinite(loss)):
            loss.backward()          # the step happens here; no opt.step(), no zero_grad()

    What it changes against ``backward(); opt.step(...)``: clipping is per parameter (each
    gradient against its own norm; the global norm is not known until backward ends), so with
    ``max_grad_norm`` the result differs from global clipping; without clipping an fp32-state
    step is bit-identical to :meth:`step` (bf16 state draws its stochastic-rounding bits per
    parameter instead of per launch: equally reproducible, not the same bits). A gradient
    that is non-finite skips only its own parameter (``found_inf`` from the loss skips all).
    It needs one backward per step (no gradient accumulation) and plain parameters: FSDP2's
    DTensor parameters are refused (FSDP2 reduce-scatters gradients outside these hooks).
    Outside ``armed()`` the hooks do nothing and gradients accumulate as usual.
    ``last_sq_norm``: Σ‖g‖² of the last armed backward (a device tensor) when clipping or
    ``norm=True`` asked for it. ``close()`` removes the hooks.
    """

    def __init__(self, opt: MaskedOptimizer):
        if not isinstance(opt, MaskedOptimizer):
            raise TypeError("GradRelease needs a MaskedAdamW / MaskedSGD optimizer")
        self.opt = opt
        self._where: dict = {}
        for gi, g in enumerate(opt.param_groups):
            for pi, p in enumerate(g["params"]):
                if hasattr(p, "to_local"):
                    raise ValueError(
                        f"GradRelease: group {gi} param {pi} is a DTensor (FSDP2): the step in "
                        "backward needs plain parameters"
                    )
                self._where[p] = (gi, pi)
        self._armed: dict | None = None
        self.last_sq_norm: torch.Tensor | None = None
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook) for p in self._where if p.requires_grad
        ]

    def armed(self, *, masked: bool | None = None, max_grad_norm: float | None = None,
              found_inf: torch.Tensor | None = None, norm: bool = False):  # fmt: skip
        """A context in which each completed gradient is stepped and freed (arguments as
        :meth:`MaskedAdamW.step`, clipping per parameter; ``norm=True``: also sum the squared
        gradient norms into :attr:`last_sq_norm`)."""
        from contextlib import contextmanager

        opt = self.opt
        resolved = opt._resolve_masked(masked)
        if found_inf is not None:
            if not isinstance(found_inf, torch.Tensor) or found_inf.numel() != 1:
                raise ValueError("found_inf must be a 1-element tensor (nonzero: skip the step)")
            found_inf = found_inf.detach().reshape(()).to(torch.float32)
        if getattr(opt, "compact_state", False):  # (step() checks the params with a grad)
            for p, (gi, pi) in self._where.items():
                has = "mask" in opt.state.get(p, {})
                if p.requires_grad and not (resolved and (has or opt.unmasked == "freeze")):
                    raise ValueError(
                        f"compact_state: group {gi} param {pi} would take an unmasked step "
                        f"(masked={resolved}, unmasked={opt.unmasked!r}, has a mask: {has})"
                    )
        counters = []
        for group in opt.param_groups:  # one stochastic-rounding counter per step, as step()
            group["sr_step"] = group.get("sr_step", 0) + 1
            counters.append(group["sr_step"])

        @contextmanager
        def ctx():
            self._armed = dict(masked=resolved, max_grad_norm=max_grad_norm,
                               found_inf=found_inf, norm=norm, counters=counters)  # fmt: skip
            self.last_sq_norm = None
            try:
                yield self
            finally:
                self._armed = None
                opt._opt_called = True  # a step was taken (torch's LR schedulers check this)

        return ctx()

    @torch.no_grad()
    def _hook(self, p) -> None:
        armed = self._armed
        if armed is None or p.grad is None:
            return
        gi, pi = self._where[p]
        sq = self.opt._release_step(p, gi, pi, armed)
        if sq is not None:
            sq = sq.float()
            self.last_sq_norm = sq if self.last_sq_norm is None else self.last_sq_norm + sq
        p.grad = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
