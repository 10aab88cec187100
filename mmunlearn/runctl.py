"""Running on a shared cluster: one run per output folder (:class:`RunLock`) and preemption
(:class:`Preemption`): a scheduler's SIGTERM / SIGUSR1 (or Ctrl-C) lets the current step finish,
a checkpoint is written and the run exits with :data:`EXIT_PREEMPTED`, so a requeue that reruns
the same command with ``--resume`` continues where it stopped.

The lock is an advisory ``flock`` on ``<out>/.mmunlearn.lock`` whose content names the holder
(pid, host, start time); the file is removed when the run ends, and a folder the run created
but left empty is removed too. The kernel releases the lock when the holding process dies,
however it dies, so a stale lock from a killed run is simply taken by the next one; a live
run's lock makes a second run fail at once with one line naming the holder. Under torchrun
rank 0 holds it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import torch

from mmunlearn.distributed import all_reduce_sum_, world_size

LOCK_NAME = ".mmunlearn.lock"
# the exit status of a preempted run: EX_TEMPFAIL ("try again"), which requeue scripts can test
EXIT_PREEMPTED = 75
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class RunLockedError(RuntimeError):
    """Another live run holds the output folder."""


class RunLock:
    """``with RunLock(out):`` holds ``out`` for this process (see the module docstring)."""

    def __init__(self, out: str):
        self.out = str(out)
        self.path = os.path.join(self.out, LOCK_NAME)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self._made = not os.path.isdir(self.out)
        os.makedirs(self.out, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # no flock (Windows): the folder is not locked
            self._fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"--out {self.out}: another run is using it ({holder}); wait for it to end or "
                "choose another --out"
            ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        """Release the lock and remove its file (and ``out`` when this run created it and left
        nothing in it), so a failed run leaves the folder as it found it."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None
        if self._made:
            try:
                os.rmdir(self.out)  # only if empty
            except OSError:
                pass


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "a process that has not written its name yet"


class Preemption:
    """``with Preemption() as p:`` turns SIGTERM / SIGUSR1 / SIGINT into a request that
    :meth:`requested` reports (the previous handlers are restored on exit; a second signal
    while one is pending raises ``KeyboardInterrupt``, for a user who means it). Installs
    nothing outside the main thread."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> Preemption:
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def requested(self, device=None) -> bool:
        """Whether any rank got a signal (under torchrun an all-reduce, so every rank agrees
        on the step it stops after)."""
        flag = self.signal is not None
        if world_size() == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        return bool(all_reduce_sum_(t).item() > 0)


class PreemptedError(RuntimeError):
    """The run stopped on a signal after writing a checkpoint; rerun with ``--resume``."""

    exit_code = EXIT_PREEMPTED


__all__ = [
    "EXIT_PREEMPTED",
    "LOCK_NAME",
    "Preemption",
    "PreemptedError",
    "RunLock",
    "RunLockedError",
]
