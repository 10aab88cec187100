"""The ``cpu`` backend: multi-tensor C kernels for CPU tensors, built once with the system cc.

Why C and not ``torch.compile``: the ops run over lists of hundreds of tensors (437 for a
LLaVA-7B-shaped model), most of them small. A compiled per-tensor function pays its dispatch
(guards + wrappers, tens of µs) once per tensor, which alone exceeds the whole step at 4 M
elements; one compiled function over the whole list recompiles per model and takes minutes on
2 cores. These kernels read the same pointer/chunk tables the Triton kernels read, so one call
covers every tensor in one pass, its chunks taken by ``torch.get_num_threads()`` POSIX threads
from a shared counter. The source is kernels/mmu_cpu.c (installed as package data: plain C11
+ POSIX, no ``_Float16``, so gcc < 12 builds it). Build: ``cc -O3 -march=native``, a few
seconds once per machine, then a cached shared object (``$MMUNLEARN_CACHE_DIR``, default
``~/.cache/mmunlearn``) that loads in milliseconds.
Numbers and the alternatives measured: bench/NOTES.md.

Arithmetic follows ATen's CPU kernels operation for operation, so the results equal the torch
twins bit for bit on the machines measured (fmaf where ATen uses a fused multiply-add: ``lerp``,
``addcmul``, ``add(alpha=)``; ``-ffp-contract=off`` everywhere else); the tests bound them
by the same ulp tolerances as the Triton kernels. Elements whose mask bit is 0 are written
back with the integer bit pattern that was read (whole-vector read-modify-write, so the loops
vectorise): their bytes never change. bf16 moments take one division instead of ATen's two in
every backend (kernels/adamw.py, ``bf16_state_scalars``) and, where the build has AVX2 + FMA +
F16C, hand-written 16-element blocks (same bits as the scalar body; why: bench/NOTES.md,
issue 21, third pass). Imports nothing beyond the standard library and torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import torch

# Elements per chunk (a multiple of 8: chunks start on mask bytes). 32 K fp32 = 128 KiB per
# operand: per-chunk overhead is negligible and 4 M model-shaped elements give ~500 chunks to
# balance over the threads.
CPU_BLOCK = 1 << 15
# Below this many elements one thread does the work (a thread start costs ~20 µs; 2 threads
# only pay off past ~64 K elements on the 2-core CI machine, 2026-11-30).
PARALLEL_MIN = 1 << 16
ABI = 4

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# The C source ships next to this module as package data (pyproject.toml).
_SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mmu_cpu.c")


def source() -> str:
    """The C source of the kernels (kernels/mmu_cpu.c, installed as package data)."""
    src = _STATE.get("source")
    if src is None:
        with open(_SOURCE_PATH) as f:
            src = _STATE["source"] = f.read()
    return src


# ------------------------------------------------------------------ build and load
_LOCK = threading.Lock()
_STATE: dict = {}


def cache_dir() -> str:
    """Where the built library is kept: ``$MMUNLEARN_CACHE_DIR``, else ``~/.cache/mmunlearn``
    (``$XDG_CACHE_HOME`` respected), else — if that cannot be written — a private
    ``mmunlearn-<uid>`` directory (mode 0700) in the temporary directory."""
    d = os.environ.get("MMUNLEARN_CACHE_DIR")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = os.path.join(base, "mmunlearn")
    try:
        os.makedirs(d, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    getuid = getattr(os, "getuid", None)  # absent on Windows
    if getuid is None:
        import getpass

        who = getpass.getuser()
    else:
        who = str(getuid())
    d = os.path.join(tempfile.gettempdir(), f"mmunlearn-{who}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    if getuid is not None and os.stat(d).st_uid != getuid():
        raise RuntimeError(f"{d} belongs to another user; set MMUNLEARN_CACHE_DIR")
    return d


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    text += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return text


_FLAGS = [
    "-O3",
    "-std=gnu11",
    "-ffp-contract=off",  # no fused multiply-adds but the explicit fmaf() where ATen has them
    "-fno-math-errno",  # lets sqrtf vectorise; IEEE results unchanged
    "-mprefer-vector-width=512",  # AVX-512 machines: full-width vectors (no-op elsewhere)
    "-fPIC",
    "-shared",
    "-pthread",
]


# how to get the fast path, said with every build failure
_FAST_PATH = (
    "The PyTorch twins are used instead (correct, slower); for the C kernels install gcc or "
    "clang (any C11 compiler) or point CC at one, then run again"
)


def _build(path: str) -> str:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError(f"no C compiler found (looked for $CC or cc, gcc). {_FAST_PATH}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        src = os.path.join(tmp, "mmu_cpu.c")
        with open(src, "w") as f:
            f.write(source())
        out = os.path.join(tmp, "mmu_cpu.so")
        errors = []
        for arch in (["-march=native"], []):  # -march=native is unknown to some compilers
            cmd = [cc, *_FLAGS, *arch, src, "-o", out, "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(out, path)  # atomic: concurrent builders write the same bytes
                return " ".join(cmd)
            errors.append(proc.stderr.strip() or f"exit status {proc.returncode}")
    first = next((ln for ln in errors[-1].splitlines() if "error" in ln.lower()), None)
    first = first or errors[-1].splitlines()[0]
    raise RuntimeError(
        f"building the CPU kernels failed: {cc} {' '.join(_FLAGS)} (with and without "
        f"-march=native): {first.strip()}. {_FAST_PATH}"
    )


def _declare(lib) -> None:
    i64p = ctypes.c_void_p
    i64, i32, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_float
    table = [i64p, i64, i64p, i64, i64, i32]
    lib.mmu_abi.restype = i64
    u32 = ctypes.c_uint32
    lib.mmu_adamw.argtypes = [i32, i32, i32, *table, i32, i32, u32, i32, i32] + [f32] * 8
    lib.mmu_adamw.restype = i32
    lib.mmu_sgd.argtypes = [i32, i32, *table, i32, f32, f32, f32]
    lib.mmu_sgd.restype = i32
    lib.mmu_fisher.argtypes = [i32, *table, f32, i32]
    lib.mmu_fisher.restype = i32
    lib.mmu_sqnorm.argtypes = [i32, *table]
    lib.mmu_sqnorm.restype = ctypes.c_double
    lib.mmu_mask.argtypes = [*table, f32, f32, i64p]
    lib.mmu_mask.restype = i32
    lib.mmu_hist.argtypes = [*table, f32, i32, i32, i32, ctypes.c_uint32, i64p]
    lib.mmu_hist.restype = i32
    for name in ("mmu_f16_to_f32", "mmu_f32_to_f16", "mmu_mix32"):
        getattr(lib, name).argtypes = [i64p, i64p, i64]
        getattr(lib, name).restype = None


def load():
    """The loaded library (built on first use); RuntimeError when it cannot be built."""
    lib = _STATE.get("lib")
    if lib is not None:
        return lib
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]
        if "error" in _STATE:
            raise RuntimeError(_STATE["error"])
        key = hashlib.sha256(
            "\0".join([source(), " ".join(_FLAGS), _cpu_id(), str(ABI)]).encode()
        ).hexdigest()[:24]
        try:
            path = os.path.join(cache_dir(), f"mmu_cpu_{key}.so")
            if not os.path.exists(path):
                _STATE["build"] = _build(path)
            lib = ctypes.CDLL(path)
            _declare(lib)
            if lib.mmu_abi() != ABI:
                raise RuntimeError(f"{path}: ABI {lib.mmu_abi()} != {ABI}")
        except (OSError, RuntimeError) as e:
            _STATE["error"] = f"mmunlearn CPU kernels unavailable: {e}"
            raise RuntimeError(_STATE["error"]) from e
        _STATE["path"], _STATE["lib"] = path, lib
        return lib


def available() -> bool:
    """Whether the ``cpu`` backend works here (builds it on the first call, warns once if not)."""
    if "lib" in _STATE:
        return True
    try:
        load()
        return True
    except RuntimeError as e:
        if not _STATE.get("warned"):
            _STATE["warned"] = True
            warnings.warn(f"{e}; the torch twins are used instead", RuntimeWarning, stacklevel=3)
        return False


def threads_for(total: int) -> int:
    """Threads for a call over ``total`` elements: torch's intra-op count, 1 for small work."""
    return 1 if total < PARALLEL_MIN else max(1, torch.get_num_threads())
