"""One step of the unlearning loop and the hooks that run after it.

:class:`Stepper` takes one forget or retain step, or a fine-tuning ``train`` step
(:func:`mmunlearn.train.train`): the ``grad_accum`` batches, the non-finite guard, clipping,
the masked or plain optimizer step, the scheduler. :class:`StepResult` is what it reports;
:class:`LogHook`, :class:`EvalHook`, :class:`CheckpointHook` and :class:`CallbackHook` act on
that report. :func:`mmunlearn.loop.unlearn` wires them together.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mmunlearn.checkpoint import Checkpoints
from mmunlearn.config import RunConfig
from mmunlearn.data.batching import to_device
from mmunlearn.distributed import all_reduce_sum_, local, world_size
from mmunlearn.losses import local_batch
from mmunlearn.methods import Method
from mmunlearn.optim_base import GradRelease
from mmunlearn.runlog import RunLog, grad_norm


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the step was not applied and the last checkpoint is intact."""


def global_value(loss: torch.Tensor) -> float:
    """The loss of the whole global batch as a float (under torchrun each rank's loss is its
    share, ``local_sum / global_count · world``: the mean over ranks is the global loss)."""
    w = world_size()
    if w == 1:
        return loss.item()
    t = loss.detach().float().reshape(1).clone()
    return all_reduce_sum_(t).item() / w


# ------------------------------------------------------------------------------------------------
# one step
# ------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What one applied step reports to the hooks. ``loss``: the global loss, read back only
    at log points (``logged``; None between them, so no host sync there)."""

    step: int
    kind: str  # "forget" | "retain" | "train" (fine-tuning)
    index: int  # the batch index of the plan
    loss: float | None
    grad_norm: float | None
    lr: float  # the lr the step used
    masked: bool
    logged: bool
    seconds: float


class Stepper:
    """One forget or retain step: the ``grad_accum`` batches' losses and backward passes, the
    non-finite guard, clipping, the (masked) optimizer step and the scheduler step.

    The guard: at log points (every ``log_every`` steps) the global loss is read back and a
    NaN/inf raises :class:`NonFiniteLossError` before the step is applied. Between log points
    (``log_every > 1``) no host sync happens: each step's non-finite flag stays on the device
    (all-reduced under torchrun), the optimizer skips that step there, and the next log point
    reads every pending flag at once and reports the first bad step."""

    def __init__(self, model, method: Method, opt, sched, cfg: RunConfig, ref_model, plan,
                 epoch_ends: set, checkpoints: Checkpoints | None = None):  # fmt: skip
        self.model, self.method, self.opt, self.sched = model, method, opt, sched
        self.cfg, self.ref_model, self.plan = cfg, ref_model, plan
        self.epoch_ends, self.checkpoints = epoch_ends, checkpoints
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.device = next((local(p).device for p in self.params), torch.device("cpu"))
        self.total = len(plan)
        self.streams: dict = {}  # kind -> iterator of batches, set before the first step
        self.takes_flag = cfg.log_every > 1  # device-side flags instead of a sync per step
        self.pending: list = []  # (step, kind, index, flag) of steps whose loss is unread
        # grad_release: every parameter steps inside backward (optim_base.GradRelease)
        self.release = GradRelease(opt) if cfg.grad_release else None
        self.scaler = loss_scaler(self.params, self.device, method, cfg)
        if self.release is not None and self.scaler is not None:
            raise ValueError(
                "grad_release with fp16 weights is not supported: the loss scaler must see every "
                "gradient before any parameter steps; use bf16, or drop --grad-release"
            )

    def __call__(self, step: int) -> StepResult:
        t0 = time.perf_counter()
        kind, idx = self.plan[step]
        logged = (step + 1) % self.cfg.log_every == 0 or step + 1 == self.total
        masked = kind == "forget" and self.method.uses_mask
        if self.release is not None:
            value, gnorm = self._released_step(step, kind, idx, masked, logged)
        else:
            loss = self._backward(kind)
            flag = self._flag(step, kind, idx, loss)
            if logged:
                self._check_pending(step)
            value = self._read(step, kind, idx, loss) if (logged or not self.takes_flag) else None
            gnorm = grad_norm(self.params) if logged else None
            if gnorm is not None and self.scaler is not None:
                gnorm /= self.scaler.get_scale()  # the gradients are scaled
            self._apply(kind, masked, flag)
        lr = self.opt.param_groups[0]["lr"]
        if self.cfg.schedule_unit == "step" or step in self.epoch_ends:
            self.sched.step()
        dt = time.perf_counter() - t0
        return StepResult(step, kind, idx, value, gnorm, lr, masked, logged, dt)

    def _loss(self, kind: str) -> torch.Tensor:
        """The loss of the next ``kind`` batch (this rank's slice of the global batch)."""
        batch = local_batch(self.model, to_device(next(self.streams[kind]), self.device))
        step_loss = getattr(self.method, "step_loss", None)  # one loss for every kind (SMFA)
        if step_loss is not None:
            return step_loss(kind, self.model, batch, self.ref_model)
        if kind == "forget":
            return self.method.forget_loss(self.model, batch, self.ref_model)
        return self.method.retain_loss(self.model, batch, self.ref_model)

    def _released_step(self, step, kind, idx, masked, logged):
        """``grad_release``: the loss first (checked, read back at log points, before anything
        moves), then one backward in which every parameter steps and frees its gradient.
        Returns (loss value or None, global gradient norm or None)."""
        loss = self._loss(kind)
        flag = self._flag(step, kind, idx, loss.detach())
        if logged:
            self._check_pending(step)
        value = self._read(step, kind, idx, loss) if (logged or not self.takes_flag) else None
        clip = self.cfg.retain_clip if kind == "retain" else self.cfg.max_grad_norm
        with self.release.armed(masked=masked, max_grad_norm=clip, found_inf=flag, norm=logged):
            loss.backward()
        sq = self.release.last_sq_norm
        return value, (float(sq.sqrt()) if logged and sq is not None else None)

    def _backward(self, kind: str) -> torch.Tensor:
        """Forward + backward over ``grad_accum`` batches; the summed (detached) loss."""
        ga, total = self.cfg.grad_accum, None
        for _ in range(ga):
            # under torchrun every rank computes its slice of the same global batch
            loss = self._loss(kind)
            part = loss / ga
            (part if self.scaler is None else self.scaler.scale(part)).backward()
            d = loss.detach() / ga
            total = d if total is None else total + d
        return total

    def _flag(self, step, kind, idx, loss):
        """This step's non-finite flag on the device (every rank agrees), or None."""
        if not self.takes_flag:
            return None
        flag = ~torch.isfinite(loss.reshape(1))
        if world_size() > 1:
            flag = all_reduce_sum_(flag.float()) > 0
        self.pending.append((step, kind, idx, flag))
        return flag

    def _fail(self, message: str):
        self.opt.zero_grad(set_to_none=True)
        last = self.checkpoints.last_good() if self.checkpoints else "none"
        return NonFiniteLossError(f"{message}; last good checkpoint: {last}")

    def _check_pending(self, step: int) -> None:
        """One read for every flag since the last log point."""
        if not self.pending:
            return
        bad = torch.cat([f.reshape(1) for *_, f in self.pending]).cpu()
        if bool(bad.any()):
            s0, k0, i0, _ = self.pending[int(bad.nonzero()[0])]
            raise self._fail(
                f"non-finite {k0} loss at step {s0} of {self.total} (method "
                f"{self.method.name}, {k0} batch {i0}); that step and every non-finite one up "
                f"to step {step} were not applied"
            )
        self.pending.clear()

    def _read(self, step, kind, idx, loss) -> float:
        """The global loss (all ranks agree, so a NaN stops every rank at the same step)."""
        value = global_value(loss)
        if not np.isfinite(value):
            raise self._fail(
                f"non-finite {kind} loss ({value}) at step {step} of {self.total} (method "
                f"{self.method.name}, {kind} batch {idx}); the step was not applied"
            )
        return value

    def _apply(self, kind: str, masked: bool, flag) -> None:
        clip = self.cfg.retain_clip if kind == "retain" else self.cfg.max_grad_norm
        if masked and self.cfg.mask_mode == "zero_grad":
            zero_grad_mask_step(self.opt, self.params, clip, flag)
        elif self.scaler is not None:  # skips on inf/NaN gradients, then adapts the scale
            self.scaler.step(self.opt, masked=masked, max_grad_norm=clip, found_inf=flag)
            self.scaler.update()
        else:
            self.opt.step(masked=masked, max_grad_norm=clip, found_inf=flag)
        self.opt.zero_grad(set_to_none=True)


def loss_scaler(params, device, method: Method, cfg: RunConfig):
    """A ``torch.amp.GradScaler`` (torch's defaults: scale 2¹⁶, halved on an inf/NaN gradient,
    whose step is skipped, doubled after 2000 good steps) when a trained weight is fp16: fp16
    gradients underflow without one. ValueError where it cannot apply: the official
    ``zero_grad`` masked step (it clips and masks the scaled gradient itself) and FSDP2."""
    if not any(local(p).dtype == torch.float16 for p in params):
        return None
    if method.uses_mask and cfg.mask_mode == "zero_grad":
        raise ValueError("fp16 weights need loss scaling, which mask_mode 'zero_grad' (the "
                         "official masked step) does not do; use bf16 or fp32 weights")  # fmt: skip
    if world_size() > 1:
        raise ValueError("fp16 weights under torchrun are not supported; use bf16 (FSDP2's "
                         "--mixed-precision bf16) or fp32")  # fmt: skip
    return torch.amp.GradScaler(device.type)


def zero_grad_mask_step(opt, params, max_grad_norm, found_inf=None) -> None:
    """The official forget step: clip the unmasked gradient, multiply by the masks (parameters
    without a mask keep their whole gradient), then a plain AdamW step over everything
    (skipped on the device where ``found_inf`` is set)."""
    if max_grad_norm is not None:
        grads = [p for p in params if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, max_grad_norm)
    for p in params:
        if p.grad is not None and opt.get_mask(p) is not None:
            local(p.grad).mul_(opt.get_mask(p, dense=True).to(local(p.grad).dtype))
    opt.step(masked=False, max_grad_norm=None, found_inf=found_inf)


# ------------------------------------------------------------------------------------------------
# hooks: what happens after a step
# ------------------------------------------------------------------------------------------------


class LogHook:
    """The history (losses read back), the progress bar and ``log.jsonl`` / TensorBoard rows."""

    def __init__(self, log: RunLog, history: list, bar, epoch_ends: set, fraction):
        self.log, self.history, self.bar = log, history, bar
        self.epoch_ends, self.fraction = epoch_ends, fraction

    def after_step(self, r: StepResult) -> None:
        if r.loss is not None:
            self.history.append({"step": r.step, "kind": r.kind, "loss": r.loss})
            self.bar.set_postfix({r.kind: f"{r.loss:.3f}"}, refresh=False)
        self.bar.update(1)
        if r.logged:
            row = {"step": r.step, "epoch": sum(1 for e in self.epoch_ends if e < r.step)}
            row.update(phase=r.kind, loss=r.loss, lr=r.lr, grad_norm=r.grad_norm)
            row.update(masked_fraction=self.fraction if r.masked else None)
            row["seconds"] = round(r.seconds, 4)
            self.log.write(row)


class EvalHook:
    """``monitor(model, step)`` every ``every`` steps and after the last one; the best score's
    row is kept and ``on_best(model, step, metrics)`` called when it improves."""

    def __init__(self, model, monitor: Callable, every: int, log: RunLog, on_best=None):
        self.model, self.monitor, self.every, self.log = model, monitor, every, log
        self.on_best = on_best
        self.evals: list[dict] = []
        self.best: dict | None = None

    def after_step(self, r: StepResult) -> None:
        if self.every and (r.step + 1) % self.every == 0:
            self.run(r.step)

    def finish(self, total: int) -> None:
        if total and (not self.evals or self.evals[-1]["step"] != total - 1):
            self.run(total - 1)

    def run(self, step: int) -> None:
        self.model.eval()
        with torch.no_grad():
            metrics = dict(self.monitor(self.model, step))
        self.model.train()
        row = {"step": step, "phase": "eval", **metrics}
        self.evals.append(row)
        self.log.write(row)
        if self.best is None or metrics["score"] > self.best["score"]:
            self.best = row
            if self.on_best is not None:
                self.on_best(self.model, step, metrics)


class CheckpointHook:
    """A checkpoint every ``every`` steps (0: only the final one, written by :func:`unlearn`)."""

    def __init__(self, checkpoints: Checkpoints, opt, sched, cfg: RunConfig, history: list,
                 scaler=None):  # fmt: skip
        self.checkpoints, self.opt, self.sched = checkpoints, opt, sched
        self.cfg, self.history, self.scaler = cfg, history, scaler
        self.saved_step: int | None = None  # the step of the last checkpoint written

    def after_step(self, r: StepResult) -> None:
        every = self.cfg.checkpoint_every
        if every and (r.step + 1) % every == 0:
            self.save(r.step + 1)

    def save(self, step: int) -> None:
        if self.saved_step != step:
            extra = {"grad_scaler": self.scaler.state_dict()} if self.scaler else None
            self.checkpoints.save(self.opt, self.sched, step, self.history, self.cfg, extra)
            self.saved_step = step


class PreemptHook:
    """Stops the run after the step in which a signal arrived (:class:`~mmunlearn.runctl.
    Preemption`): writes the checkpoint of that step, then raises
    :class:`~mmunlearn.runctl.PreemptedError`. Checked after every step in one process; under
    torchrun at log points (the ranks agree through an all-reduce, a sync not paid per step)."""

    def __init__(self, preemption, saver: CheckpointHook | None, total: int, device):
        self.preemption, self.saver, self.total, self.device = preemption, saver, total, device

    def after_step(self, r: StepResult) -> None:
        if world_size() > 1 and not r.logged:
            return
        if not self.preemption.requested(self.device):
            return
        from mmunlearn.runctl import PreemptedError

        where = "no checkpoint (no output directory)"
        if self.saver is not None:
            self.saver.save(r.step + 1)
            where = f"checkpoint {self.saver.checkpoints.path}"
        raise PreemptedError(
            f"stopped on {self.preemption.signal or 'a signal on another rank'} after step "
            f"{r.step + 1} of {self.total}; {where}; rerun the same command with --resume "
            "to continue"
        )


class CallbackHook:
    """``callback(step, kind, loss)`` after every step whose loss is read back."""

    def __init__(self, callback: Callable):
        self.callback = callback

    def after_step(self, r: StepResult) -> None:
        if r.logged:
            self.callback(r.step, r.kind, r.loss)


__all__ = [
    "CallbackHook",
    "CheckpointHook",
    "EvalHook",
    "LogHook",
    "PreemptHook",
    "NonFiniteLossError",
    "StepResult",
    "Stepper",
    "global_value",
    "loss_scaler",
    "zero_grad_mask_step",
]
