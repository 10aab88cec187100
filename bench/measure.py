"""Shared helpers of the end-to-end benchmark scripts (e2e_saliency.py, topk_scale.py).

Timing: CUDA events around each call (median over repeats); on the CPU ``time.perf_counter``.
Host peak memory: each measured variant runs in its own subprocess; its high-water mark of
resident memory is reset (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0) once the shared inputs
are built and read back (``VmHWM``) afterwards, so the figure is what the variant itself added.
Where the reset is not allowed, ``ru_maxrss`` minus the resident size at that point is used
(an over-estimate if building the inputs peaked higher). CUDA device peak:
``torch.cuda.max_memory_allocated`` minus what was allocated when the variant started.
Only APIs present in torch ≥ 2.4 are used (the lent GPU image has torch 2.11 / triton 3.6).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

RESULT_TAG = "RESULT-JSON "


def parse_size(s: str) -> int:
    """``1M`` / ``4K`` / ``1G`` (binary), ``1e9`` / ``7000000000`` (decimal), ``2^25``."""
    s = s.strip()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1 << 30}
    if "^" in s:
        base, exp = s.split("^")
        return int(base) ** int(exp)
    if s[-1].upper() in mult:
        return int(float(s[:-1]) * mult[s[-1].upper()])
    return int(float(s))


def fmt_size(n: int) -> str:
    for unit, v in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= v and n % v == 0:
            return f"{n // v}{unit}"
    return f"{n:.2e}" if n >= 10**7 else f"{n:,}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# bytes written between timed CUDA calls so that no operand is still in L2 (H100/H200: 50 /
# 60 MB of L2; 256 MB covers both with room): a timed call then reads from HBM, as a step of a
# real run whose working set is GBs does
L2_FLUSH_BYTES = 256 << 20
_flush_buf: dict = {}


def flush_l2(device: torch.device) -> None:
    """Evict the L2 cache of ``device`` (a CUDA device) by writing a buffer larger than it."""
    buf = _flush_buf.get(device)
    if buf is None:
        buf = _flush_buf[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    buf.zero_()


def time_fn(fn, device: torch.device, reps: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median seconds per call of ``fn`` over ``reps`` calls (after ``warmup`` calls). On CUDA
    each call is timed with CUDA events after an L2 flush (:func:`flush_l2`), outside the
    timed interval."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            flush_l2(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryProbe:
    """Peak extra host (and CUDA device) memory since :meth:`start`, in MiB."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        sync(self.device)
        self.reset_ok = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = True
        except OSError:
            pass
        self.rss0 = _status_kib("VmRSS")
        self.hwm0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.dev0 = torch.cuda.memory_allocated(self.device)

    def read(self) -> dict:
        sync(self.device)
        out: dict = {"host_method": None, "host_peak_mib": None, "device_peak_mib": None}
        hwm = _status_kib("VmHWM")
        if self.rss0 is not None and hwm is not None:
            if self.reset_ok:
                out["host_method"] = "VmHWM after clear_refs reset"
                out["host_peak_mib"] = max(0, hwm - self.rss0) / 1024
            else:
                maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                out["host_method"] = "ru_maxrss - VmRSS at start (upper bound)"
                out["host_peak_mib"] = max(0, maxrss - self.rss0) / 1024
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            out["device_peak_mib"] = (peak - self.dev0) / (1 << 20)
        return out


def emit(result: dict) -> None:
    """Child side: print the result as one tagged JSON line on stdout."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(script: str, args: list[str], timeout: float | None = None) -> dict:
    """Parent side: run ``script`` in a fresh interpreter, return its tagged JSON result.

    A child that dies (out of host memory, a crash) yields ``{"error": ...}`` instead.
    """
    cmd = [sys.executable, script, *args]
    env = dict(os.environ)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"child exited {proc.returncode}: " + " | ".join(tail)}


def fmt(x, spec: str = ".2f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)
