"""Out of memory as one line: a CUDA ``torch.OutOfMemoryError``, a ``MemoryError`` or a CPU
allocator's ``RuntimeError`` in a phase of a run becomes :class:`OutOfMemory` (exit 1), whose
message names the phase, this run's estimate (:func:`mmunlearn.estimate.estimate` for the loaded
model and the run's settings), the flags that lower it and what was kept (the last checkpoint).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from contextlib import contextmanager

import torch

# what allocators say when they fail (CUDA's caching allocator, c10's CPU allocator, glibc)
ALLOC_WORDS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "not enough memory",
    "bad_alloc",
    "defaultcpuallocator",
)

# per phase: the flags that lower its peak
LOWER = {
    "saliency": "--fisher-batch-size (smaller), --fisher-offload, --gradient-checkpointing, "
    "--dtype bf16, or FSDP2 (torchrun --nproc-per-node N ... --fsdp)",
    "unlearning": "--state-dtype bf16, --grad-release (one process), a smaller --batch-size "
    "with a larger --grad-accum, "
    "--gradient-checkpointing, --dtype bf16, or FSDP2 (torchrun --nproc-per-node N ... --fsdp)",
    "eval": "a smaller --batch-size or --dtype bfloat16",
}


class OutOfMemory(RuntimeError):
    """A phase of the run ran out of memory (one line: phase, estimate, flags, what is kept)."""


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (CUDA or CPU)."""
    if isinstance(e, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in ALLOC_WORDS)


# oneDNN (the CPU's matmul / conv library) reports a failed allocation as a failed primitive;
# the same words can mean an unsupported shape, so a test allocation decides (below)
ONEDNN_WORDS = ("could not create a primitive",)
PROBE_BYTES = 256 * 2**20


def starved(e: BaseException) -> bool:
    """Whether ``e`` is a oneDNN primitive failure *and* memory is short now: a
    :data:`PROBE_BYTES` test allocation fails too (found under a real address-space limit in
    the eval phase, where no other error names the cause)."""
    if not (isinstance(e, RuntimeError) and any(w in str(e).lower() for w in ONEDNN_WORDS)):
        return False
    try:
        probe = torch.empty(PROBE_BYTES, dtype=torch.uint8)
    except (MemoryError, RuntimeError):
        return True
    del probe
    return False


def estimate_line(model, phase: str, batch: int, seq: int, **kw) -> str:
    """``"X GiB per rank (mmunlearn estimate: …, batch B, seq S)"``: :mod:`mmunlearn.estimate`
    for ``model``'s config and dtype; ``phase`` "saliency", "unlearning" or "eval" (the
    weights and activations of a forward pass). Never raises (a short note instead)."""
    from mmunlearn import estimate as est
    from mmunlearn.distributed import world_size

    try:
        p = next(model.parameters())
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(p.dtype, "fp32")
        ests = est.estimate(model.config, world_size(), dtype, batch, seq, **kw)
        if phase == "eval":
            terms = ests[0].terms
            total = terms["weights (sharded)"] + est.activation_held(
                {k: v for k, v in terms.items() if k.startswith(("activations", "logits"))}
            )
        else:
            total = next(e.total for e in ests if e.phase == phase)
    except Exception as e:  # the estimate is a courtesy: never mask the real error with it
        return f"unavailable ({type(e).__name__})"
    gib = total / 1024**3
    return f"{gib:.2f} GiB per rank (mmunlearn estimate; {dtype}, batch {batch}, seq {seq})"


def estimator(args, cfg, model, samples, adapter) -> Callable[[str, int], str]:
    """``est(phase, batch)``: :func:`estimate_line` for this run's model and settings (a
    ``mmunlearn saliency`` / ``unlearn`` run), at the padded length of the first sample."""
    from mmunlearn.data.batching import BatchSource

    def est(phase: str, batch: int) -> str:
        seq = first_seq(BatchSource(samples, adapter.collate, 1))
        kw = dict(method=getattr(args, "method", "mmunlearner"))
        kw.update(grad_checkpointing=cfg.grad_checkpointing, state_dtype=cfg.state_dtype)
        kw.update(fisher_offload=bool(getattr(args, "fisher_offload", False)))
        return estimate_line(model, phase, batch, seq, **kw)

    return est


def first_seq(source) -> int:
    """The padded length of ``source``'s first batch (a guess at the run's sequence length)."""
    try:
        return int(source[0]["input_ids"].shape[-1])
    except Exception:
        return 1024


def last_checkpoint(out: str) -> str:
    """What an unlearning run that failed keeps: its last checkpoint (and step), or none."""
    import json

    path = os.path.join(out, "run", "checkpoint")
    try:
        with open(os.path.join(path, "state.json")) as f:
            step = json.load(f)["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no checkpoint was written yet"
    return f"the last checkpoint, {path} (step {step}), is kept: rerun with --resume"


@contextmanager
def guard(phase: str, estimate: Callable[[], str], kept: Callable[[], str] | None = None):
    """Turn an allocation failure inside the block into :class:`OutOfMemory`. The message is
    built after the failed frames are released (``estimate()`` and ``kept()`` are called
    then)."""
    why = None
    try:
        yield
    except BaseException as e:
        if is_oom(e):
            why = " ".join(str(e).split())[:160] or type(e).__name__
        elif starved(e):
            why = f"oneDNN: {e}; a {PROBE_BYTES >> 20} MiB test allocation failed too"
        else:
            raise
    if why is None:
        return
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    kept_text = kept() if kept is not None else "no outputs were written"
    raise OutOfMemory(
        f"out of memory in the {phase} phase ({why}); this run's estimate: {estimate()}; lower "
        f"it with {LOWER[phase]}; {kept_text}"
    )


__all__ = [
    "LOWER",
    "OutOfMemory",
    "estimate_line",
    "estimator",
    "first_seq",
    "guard",
    "is_oom",
    "starved",
]
