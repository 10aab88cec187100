"""Ahead-of-time compile report: every Triton kernel, as the wrappers launch it, for sm_80 / sm_90.

    python bench/aot.py                    # markdown table on stdout
    python bench/aot.py --json out.json --targets 90

No GPU or driver is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
yields PTX and a cubin; ``ptxas -v`` (the one Triton bundles and calls itself; for sm_90 Triton
3.9 uses ``ptxas-blackwell``) gives registers and spills, ``cuobjdump -sass`` the global access
widths (``LDG.E.128`` = 128 bits per thread) and the atomics. Columns: compiles, registers per
thread, spill bytes (stores + loads), shared memory (bytes, Triton's allocation), widest global
load / store (bits), global atomic instructions in the SASS (static count per thread; whether
the PTX predicates them), and launches per optimizer step (or per call).
``tests/test_aot.py`` runs the same compiles in CI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import torch

from mmunlearn.kernels import _common, adamw, bits, fisher, saliency, sgd

BLOCK = _common.BLOCK
NUM_WARPS = _common.NUM_WARPS


@dataclass
class Spec:
    """One launch configuration: kernel, runtime argument types, constexpr values."""

    name: str
    label: str
    fn: object
    types: dict  # runtime argument → triton type string ("*i64", "i32", "fp32", ...)
    constexprs: dict
    launches: str
    num_warps: int = NUM_WARPS
    options: dict = field(default_factory=dict)
    streaming: bool = True  # full chunks should use 128-bit accesses

    def signature(self) -> dict:
        return {a: self.types.get(a, "constexpr") for a in self.fn.arg_names}


def specs() -> list[Spec]:
    """Every launch configuration the wrappers use (dtype pairs and flags of a real run)."""
    if not _common.HAS_TRITON:
        return []
    tl = _common.tl
    out: list[Spec] = []
    f32, bf16 = tl.float32, tl.bfloat16
    nofuse = {"enable_fp_fusion": False}

    # masked AdamW: forget step (masked, clipped), retain step (no mask), guarded step
    # (found_inf + device step counts), and the unaligned fallback.
    adam_types = {
        "ptrs_ptr": "*i64",
        "chunks_ptr": "*i64",
        "scale_ptr": "*fp32",
        "found_ptr": "*fp32",
        "n_tensors": "i32",
        "seed": "i32",
        **{
            k: "fp32"
            for k in (
                "decay beta2 omb1 omb2 eps neg_step_size bc2_sqrt "
                "lr_hi lr_lo lnb1_hi lnb1_lo lnb2_hi lnb2_lo"
            ).split()
        },
    }
    for p, g in ((f32, f32), (bf16, bf16)):
        pb = tl.uint32 if p == f32 else tl.uint16
        gb = tl.uint32 if g == f32 else tl.uint16
        # label, mask, scale, found, device steps, aligned, state dtype, SR, sparse, compact
        for label, mask, scale, found, dstep, aligned, sdt, sr, sparse, compact in (
            ("forget (mask, clip)", True, True, False, False, True, f32, False, False, False),
            ("forget, sparse table", True, True, False, False, True, f32, False, True, False),
            ("retain (no mask)", False, True, False, False, True, f32, False, False, False),
            ("guarded (mask, clip, found_inf, device steps)",
             True, True, True, True, True, f32, False, False, False),
            ("unaligned fallback (mask, clip)",
             True, True, False, False, False, f32, False, False, False),
            ("forget, bf16 state + SR, sparse", True, True, False, False, True, bf16, True, True,
             False),
            ("forget, compacted fp32 state", True, True, False, False, True, f32, False, True,
             True),
            ("forget, compacted bf16 state + SR", True, True, False, False, True, bf16, True,
             True, True),
        ):  # fmt: skip
            if not aligned and p == f32:
                continue
            out.append(
                Spec(
                    "masked_adamw",
                    f"p {p} g {g}: {label}",
                    adamw._masked_adamw_kernel,
                    adam_types,
                    dict(
                        P_DTYPE=p,
                        PB_DTYPE=pb,
                        GB_DTYPE=gb,
                        G_DTYPE=g,
                        S_DTYPE=sdt,
                        SB_DTYPE=tl.uint32 if sdt == f32 else tl.uint16,
                        HAS_MASK=mask,
                        HAS_SCALE=scale,
                        HAS_FOUND=found,
                        DEVICE_STEP=dstep,
                        MAXIMIZE=True,
                        LERP_SMALL=True,
                        SR_STATE=sr,
                        SR_PARAM=sr and p == bf16,
                        SPARSE=sparse,
                        COMPACT=compact,
                        ALIGNED=aligned,
                        ROWS=adamw.ADAMW_BLOCK // 8,
                    ),  # fmt: skip
                    "1 per (param, grad, state dtype, device) group"
                    + (" + 1 step-count add" if dstep else ""),
                    num_warps=adamw.ADAMW_WARPS,
                    options={**nofuse, **adamw.launch_options(compact, aligned)},
                    # compacted moments are gathered: only params and grads stream 128-bit
                    streaming=aligned and not compact,
                )
            )
    sgd_types = {
        "ptrs_ptr": "*i64",
        "chunks_ptr": "*i64",
        "scale_ptr": "*fp32",
        "found_ptr": "*fp32",
        "n_tensors": "i32",
        "lr": "fp32",
        "decay": "fp32",
    }
    for p in (f32, bf16):
        b = tl.uint32 if p == f32 else tl.uint16
        out.append(
            Spec(
                "masked_sgd",
                f"p {p} g {p}: mask, clip",
                sgd._masked_sgd_kernel,
                sgd_types,
                dict(
                    P_DTYPE=p,
                    PB_DTYPE=b,
                    GB_DTYPE=b,
                    G_DTYPE=p,
                    HAS_MASK=True,
                    HAS_SCALE=True,
                    HAS_FOUND=False,
                    MAXIMIZE=True,
                    ALIGNED=True,
                    ROWS=BLOCK // 8,
                ),  # fmt: skip
                "1 per (param dtype, grad dtype) group",
                options=nofuse,
            )
        )
    for g in (f32, bf16):
        out.append(
            Spec(
                "fisher_accumulate",
                f"g {g}, sq",
                fisher._fisher_accumulate_kernel,
                {"ptrs_ptr": "*i64", "chunks_ptr": "*i64", "n_tensors": "i32", "scale": "fp32"},
                dict(G_DTYPE=g, ABS=False, ALIGNED=True, BLOCK=BLOCK),
                "1 per gradient bucket (FisherBuckets) and grad dtype",
                options=nofuse,
            )
        )
        out.append(
            Spec(
                "grad_sq_norm",
                f"g {g}",
                fisher._grad_sq_norm_kernel,
                {
                    "ptrs_ptr": "*i64",
                    "chunks_ptr": "*i64",
                    "partial_ptr": "*fp32",
                    "n_tensors": "i32",
                },
                dict(G_DTYPE=g, ALIGNED=True, BLOCK=BLOCK),
                "1 per grad dtype + 1 sum, per clipped step",
            )
        )
    out.append(
        Spec(
            "saliency_mask",
            "fp32 Fishers",
            saliency._saliency_mask_kernel,
            {
                "ptrs_ptr": "*i64",
                "chunks_ptr": "*i64",
                "count_ptr": "*i64",
                "n_tensors": "i32",
                "gamma": "fp32",
                "eps": "fp32",
            },
            dict(ALIGNED=True, ROWS=BLOCK // 8),
            "1 per mask (once per run)",
        )
    )
    for level, (shift, nbits) in enumerate(saliency.RADIX_LEVELS):
        out.append(
            Spec(
                "saliency_histogram",
                f"level {level} ({nbits} bits)",
                saliency._saliency_histogram_kernel,
                {
                    "ptrs_ptr": "*i64",
                    "chunks_ptr": "*i64",
                    "hist_ptr": "*i64",
                    "n_tensors": "i32",
                    "eps": "fp32",
                    "prefix": "i32",
                },
                dict(
                    SHIFT=shift,
                    NBITS=nbits,
                    LEVEL0=level == 0,
                    ALIGNED=True,
                    HIST_MASK=saliency.HIST_MASK,
                    BLOCK=saliency.HIST_BLOCK,
                ),  # fmt: skip
                "3 per exact top-k (once per run)",
                num_warps=saliency.HIST_WARPS,
            )
        )
    out.append(
        Spec(
            "pack_bits",
            "bool → uint8",
            bits._pack_bits_kernel,
            {"src_ptr": "*u8", "out_ptr": "*u8", "n": "i32"},
            dict(ROWS=BLOCK // 8),
            "once per mask",
            streaming=False,
        )
    )
    out.append(
        Spec(
            "unpack_bits",
            "uint8 → bool",
            bits._unpack_bits_kernel,
            {"packed_ptr": "*u8", "out_ptr": "*u8", "n": "i32"},
            dict(ROWS=BLOCK // 8),
            "per mask_then_clip step (dense masked grads)",
            streaming=False,
        )
    )
    return out


# ------------------------------------------------------------------ tools
def api_missing() -> str | None:
    """Why this Triton cannot compile ahead of time here, or None."""
    if not _common.HAS_TRITON:
        return "triton is not installed"
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this triton lacks the AOT API ({e})"
    if "enable_fp_fusion" not in _cuda_option_fields():
        return "this triton's CUDA backend has no enable_fp_fusion option"
    if _tool("ptxas", 90) is None or _tool("cuobjdump", 90) is None:
        return "ptxas / cuobjdump not found (triton's bundled CUDA tools)"
    return None


def _cuda_option_fields() -> set:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        return set(CUDAOptions.__dataclass_fields__)
    except Exception:  # pragma: no cover - other triton layouts
        return set()


def _tool(name: str, arch: int) -> str | None:
    try:
        if name == "ptxas":
            from triton.backends.nvidia.compiler import get_ptxas

            return get_ptxas(arch).path
        from triton import knobs

        return getattr(knobs.nvidia, name).path
    except Exception:
        import shutil

        return shutil.which(name)


def compile_spec(spec: Spec, arch: int):
    """Compile ``spec`` for sm_<arch>; returns the CompiledKernel (raises on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = spec.signature()
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(spec.fn.arg_names)
             if sig[a].startswith("*")}  # fmt: skip
    src = ASTSource(spec.fn, sig, constexprs=spec.constexprs, attrs=attrs)
    opts = {"num_warps": spec.num_warps, **spec.options}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


# global memory ops in SASS: loads, stores, reductions / atomics (sm_90 spells them REDG/ATOMG)
_OP = re.compile(r"\b(LDG|STG|REDG|RED|ATOMG|ATOM)((?:\.[A-Z0-9_]+)*)(?=[\s;])")


def _width(mods: str) -> int:
    parts = mods.split(".")
    for w in ("128", "64"):
        if w in parts:
            return int(w)
    if any(p in ("U16", "S16") for p in parts):
        return 16
    if any(p in ("U8", "S8") for p in parts):
        return 8
    return 32


def analyse(kernel, arch: int, fp_fusion: bool = True) -> dict:
    """Registers, spills, shared memory, access widths and atomics of a compiled kernel.

    Registers and local memory come from the cubin Triton built (``cuobjdump -res-usage``);
    spill bytes from ``ptxas -v`` run on the PTX with the flags Triton 3.9 passes
    (``-lineinfo --regAllocOptLevel=2``, ``--fmad=false`` without FP fusion).
    """
    ptx = kernel.asm["ptx"]
    cubin = kernel.asm["cubin"]
    res: dict = {"shared": int(kernel.metadata.shared)}
    with tempfile.TemporaryDirectory() as d:
        ptx_path, cubin_path = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run(
            [_tool("cuobjdump", arch), "-res-usage", cubin_path], capture_output=True, text=True
        ).stdout
        m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", usage)
        res["registers"] = int(m.group(1)) if m else None
        res["local_bytes"] = int(m.group(2)) if m else None
        gpu = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
        flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}"]
        flags += [] if fp_fusion else ["--fmad=false"]
        ptxas = subprocess.run(
            [_tool("ptxas", arch), *flags, ptx_path, "-o", os.path.join(d, "x")],
            capture_output=True,
            text=True,
        )
        info = ptxas.stderr + ptxas.stdout
        sp = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
        res["spill_bytes"] = int(sp.group(1)) + int(sp.group(2)) if sp else None
        sass = subprocess.run(
            [_tool("cuobjdump", arch), "-sass", cubin_path], capture_output=True, text=True
        ).stdout
    loads, stores, atomics = [], [], 0
    for line in sass.splitlines():
        mm = _OP.search(line)
        if not mm:
            continue
        op, mods = mm.group(1), mm.group(2)
        if op == "LDG":
            loads.append(_width(mods))
        elif op == "STG":
            stores.append(_width(mods))
        else:
            atomics += 1
    res["max_load_bits"] = max(loads, default=0)
    res["max_store_bits"] = max(stores, default=0)
    res["ld128"] = sum(w == 128 for w in loads)
    res["st128"] = sum(w == 128 for w in stores)
    res["global_atomics"] = atomics  # static SASS count (per thread, per program)
    ptx_atomics = re.findall(r"^\s*(@%p\d+\s+)?(?:atom|red)\.global", ptx, re.M)
    res["atomics_predicated"] = bool(ptx_atomics) and all(ptx_atomics)
    res["ptx_v4"] = len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx))
    return res


def ctas_per_sm(registers: int, warps: int, shared: int, arch: int) -> int:
    """Resident programs per SM: the register file (64 K 32-bit registers, allocated per warp
    in units of 256), shared memory (sm_90: 228 KiB, sm_80: 164 KiB, 1 KiB reserved per
    block), 64 warps and 32 blocks per SM."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = 65536 // (per_warp * warps) if registers else 32
    smem = (228 if arch >= 90 else 164) * 1024
    by_smem = smem // (shared + 1024)
    return min(by_regs, by_smem, 64 // warps, 32)


def report(targets=(80, 90), only: str | None = None) -> list[dict]:
    rows = []
    for spec in specs():
        if only and only not in spec.name:
            continue
        for arch in targets:
            row = dict(kernel=spec.name, config=spec.label, target=f"sm_{arch}",
                       launches=spec.launches, streaming=spec.streaming,
                       num_warps=spec.num_warps)  # fmt: skip
            try:
                kernel = compile_spec(spec, arch)
            except Exception as e:  # a kernel that stops compiling is a row, and a failed test
                row.update(compiles=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            else:
                fusion = spec.options.get("enable_fp_fusion", True)
                row.update(compiles=True, **analyse(kernel, arch, fusion))
                row["ctas_per_sm"] = ctas_per_sm(
                    row["registers"] or 0, spec.num_warps, row["shared"], arch
                )
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| kernel | config | target | compiles | warps | regs | CTAs/SM | spill B | smem B "
        "| widest LDG / STG bits | global atomics | launches |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        if not r["compiles"]:
            lines.append(
                f"| {r['kernel']} | {r['config']} | {r['target']} | **no**: {r['error']} "
                "| | | | | | | | |"
            )
            continue
        at = r["global_atomics"]
        at_s = f"{at} (predicated)" if at and r["atomics_predicated"] else str(at)
        lines.append(
            f"| {r['kernel']} | {r['config']} | {r['target']} | yes | {r['num_warps']} | "
            f"{r['registers']} | {r['ctas_per_sm']} | "
            f"{r['spill_bytes']} | {r['shared']} | {r['max_load_bits']} / "
            f"{r['max_store_bits']} | {at_s} | {r['launches']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--targets", nargs="+", type=int, default=[80, 90])
    ap.add_argument("--only", default=None, help="substring of a kernel name")
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = ap.parse_args(argv)
    why = api_missing()
    if why:
        print(f"AOT report skipped: {why}", file=sys.stderr)
        return 0
    import triton

    rows = report(args.targets, args.only)
    print(
        f"triton {triton.__version__}, torch {torch.__version__}, date {dt.date.today()}; "
        f"BLOCK {BLOCK} elements per program\n"
    )
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, date=str(dt.date.today()), rows=rows), f,
                      indent=1)  # fmt: skip
    return 0 if all(r["compiles"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
