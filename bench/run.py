"""Side-by-side kernel table: every op × size × dtype × implementation in one run.

    python bench/run.py                          # CUDA: 1M,16M,256M,1G; CPU: 4M, 16M; bf16, fp32
    python bench/run.py --sizes 4M 16M --dtypes bf16 --json bench/out/run.json
    python bench/run.py --adamw-sweep --sizes 4M 16M   # masked AdamW state sweep (issue 21)

Prints one markdown table and writes ``results.json`` / ``results.md`` to ``--out`` and, with
``--json PATH``, every row as ``{op, impl, device, dtype, elements, ms, GB/s, ...}``. Columns:
median time over ``--reps`` calls (after warm-up calls; the implementations' calls are
interleaved so that other jobs on a shared machine slow them alike), bytes moved (design.md's
per-element budget for the dtype), GB/s, % of the device copy bandwidth measured in the same
run, and the speed-up of ours (the Triton kernels on CUDA, the C kernels of the ``cpu`` backend
on CPU) over each row. A summary lists the ratios issue 16 asks for.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from cases import (  # noqa: E402
    DTYPES,
    LAYOUTS,
    OPS,
    SELECTIONS,
    AdamWStateCase,
    Case,
    adamw_bytes,
    copy_bandwidth,
    sync,
)

# (op, baseline) pairs whose speed ratio the CPU path must keep ≥ 1 (issue 16)
GOALS = [
    ("masked_adamw", "fused_adamw"),
    ("fisher_accumulate", "eager"),
    ("saliency_mask", "eager"),
]


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1 << 30}
    return int(float(s[:-1]) * mult[s[-1].upper()]) if s[-1].upper() in mult else int(s)


def time_fns(fns: dict, device, reps: int, warmup: int = 2) -> dict:
    """Median seconds per call of each function, the individual times, and the median process
    CPU time per call (all threads; on a CPU shared with other jobs it counts the work done,
    not the waiting: a contention-robust companion to the wall time).

    The calls are interleaved (rep 1 of every implementation, then rep 2, ...), so a machine
    shared with other jobs loads every implementation alike and the ratios stay fair. A
    function that raises is dropped (reported on stderr)."""
    live = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            sync(device)
            live[name] = fn
        except Exception as e:  # a baseline that cannot run is reported, not fatal
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
    times: dict = {name: [] for name in live}
    cpu: dict = {name: [] for name in live}
    for _ in range(reps):
        for name, fn in live.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {n: (statistics.median(t), t, statistics.median(cpu[n])) for n, t in times.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def adamw_sweep(sizes, device, reps: int, name: str, bw: float) -> tuple[str, list]:
    """Masked AdamW: selection × layout × state (fp32 / bf16 SR / compacted) against
    ``grad.mul_(mask)`` + ``torch.optim.AdamW(fused=True)`` (issue 21). Returns the markdown
    table (with the two targets' ratios) and the rows."""
    rows = []
    for size in sizes:
        for layout in LAYOUTS:
            for sel in SELECTIONS:
                if sel >= 1.0 and layout == "clustered":
                    continue  # 100 % is one layout
                case = AdamWStateCase(size, str(device), sel, layout)
                times = time_fns(case.impls(), device, reps)
                base = times["ours fp32 state"][0]
                for impl, (t, all_t, cpu_t) in times.items():
                    b = adamw_bytes(impl, case.selected / case.numel)
                    rows.append(dict(
                        op="masked_adamw_state", impl=impl, device=name, elements=case.numel,
                        selection=sel, layout=layout, ms=t * 1e3, cpu_ms=cpu_t * 1e3,
                        bytes_per_element=b, gbps=b * case.numel / t / 1e9,
                        pct_copy_bw=100 * b * case.numel / t / bw, vs_fp32_state=base / t,
                        reps=reps, all_ms=[x * 1e3 for x in all_t],
                    ))  # fmt: skip
                done = ", ".join(f"{k} {v[0] * 1e3:.1f}" for k, v in times.items())
                print(f"adamw {size} {layout} {sel:.0%}: {done} ms", file=sys.stderr)
                del case
    lines = [
        "| elements | mask | selected | impl | B/elem | median ms | CPU ms | GB/s "
        "| % copy BW | × vs ours fp32 state |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['elements']:,} | {r['layout']} | {r['selection']:.0%} | {r['impl']} | "
            f"{r['bytes_per_element']:.2f} | {r['ms']:.2f} | {r['cpu_ms']:.2f} | "
            f"{r['gbps']:.1f} | {r['pct_copy_bw']:.0f} | {r['vs_fp32_state']:.2f} |"
        )
    by = {(r["elements"], r["layout"], r["selection"], r["impl"]): r for r in rows}
    lines += [
        "",
        "| target | elements | mask | selected | wall-time ratio | CPU-time ratio |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for (n, lay, sel, impl), r in by.items():
        if impl == "ours bf16 state":
            f = by[(n, lay, sel, "ours fp32 state")]
            lines.append(
                f"| bf16 state vs fp32 state (≥ 1.3×) | {n:,} | {lay} | {sel:.0%} | "
                f"{f['ms'] / r['ms']:.2f}× | {f['cpu_ms'] / r['cpu_ms']:.2f}× |"
            )
    for (n, lay, sel, impl), r in by.items():
        if impl.startswith("ours compact") and sel == 0.05:
            for base in ("fused fp32 params", "fused bf16 params"):
                f = by[(n, lay, sel, base)]
                lines.append(
                    f"| {impl} vs {base} + mask (≥ 3×) | {n:,} | {lay} | {sel:.0%} | "
                    f"{f['ms'] / r['ms']:.2f}× | {f['cpu_ms'] / r['cpu_ms']:.2f}× |"
                )
    return "\n".join(lines), rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", nargs="+", default=None, help="element counts, e.g. 4M 16M 1G")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument("--impls", nargs="+", default=None, help="only these implementations")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per row (median)")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--json", default=None, help="also write every row to this JSON file")
    ap.add_argument("--threads", type=int, default=None, help="torch (and cpu backend) threads")
    ap.add_argument(
        "--adamw-sweep", action="store_true", help="only the masked-AdamW state sweep (#21)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sizes = [
        parse_size(s)
        for s in (args.sizes or (["1M", "16M", "256M", "1G"] if cuda else ["4M", "16M"]))
    ]
    reps = args.reps or (20 if cuda else 7)
    bw = copy_bandwidth(device, numel=(1 << 26) if cuda else (1 << 24))
    name = torch.cuda.get_device_name(device) if cuda else f"{cpu_name()} ({os.cpu_count()} cores)"
    if args.adamw_sweep:
        table, rows = adamw_sweep(sizes, device, reps, name, bw)
        header = (
            f"device: {name}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
            f"date {dt.date.today()}; copy bandwidth {bw / 1e9:.1f} GB/s; median of {reps} calls"
        )
        print(header + "\n\n" + table)
        os.makedirs(args.out, exist_ok=True)
        meta = dict(device=name, torch=torch.__version__, threads=torch.get_num_threads(),
                    date=str(dt.date.today()), copy_bandwidth=bw, reps=reps)  # fmt: skip
        with open(os.path.join(args.out, "adamw_sweep.json"), "w") as f:
            json.dump(dict(meta, rows=rows), f, indent=1)
        with open(os.path.join(args.out, "adamw_sweep.md"), "w") as f:
            f.write(header + "\n\n" + table + "\n")
        return 0
    rows = []
    for op in args.ops:
        for size in sizes:
            for dtype in args.dtypes:
                try:
                    case = Case(op, size, str(device), dtype=dtype)
                except torch.OutOfMemoryError:
                    print(f"skip {op} @ {size} {dtype}: out of memory", file=sys.stderr)
                    continue
                impls = case.impls()
                if args.impls:
                    impls = {k: v for k, v in impls.items() if k in args.impls or k == case.ours}
                times = time_fns(impls, device, reps)
                for impl, (t, all_t, cpu_t) in times.items():
                    gbs = case.bytes_moved / t / 1e9
                    rows.append(
                        dict(
                            op=op,
                            impl=impl,
                            device=name,
                            dtype=dtype,
                            elements=case.numel,
                            ms=t * 1e3,
                            cpu_ms=cpu_t * 1e3,
                            gbps=gbs,
                            bytes=case.bytes_moved,
                            pct_copy_bw=100 * gbs * 1e9 / bw,
                            speedup_of_ours=t / times[case.ours][0],
                            ours=impl == case.ours,
                            reps=reps,
                            all_ms=[x * 1e3 for x in all_t],
                        )
                    )
                done = ", ".join(f"{k} {v[0] * 1e3:.2f} ms" for k, v in times.items())
                print(f"{op} {size} {dtype}: {done}", file=sys.stderr)
                del case, impls
                if cuda:
                    torch.cuda.empty_cache()
    header = (
        f"device: {name}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
        f"date {dt.date.today()}; copy bandwidth {bw / 1e9:.1f} GB/s; median of {reps} calls"
    )
    lines = [
        header,
        "",
        "| op | dtype | elements | impl | median ms | CPU ms | GB/s | % copy BW | ours × faster |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['dtype']} | {r['elements']:,} | {r['impl']} | {r['ms']:.3f} | "
            f"{r['cpu_ms']:.3f} | {r['gbps']:.1f} | {r['pct_copy_bw']:.0f} | "
            f"{r['speedup_of_ours']:.2f} |"
        )
    by = {(r["op"], r["dtype"], r["elements"], r["impl"]): r for r in rows}
    summary = [
        "",
        "| goal: ours / baseline speed | dtype | elements | wall-time ratio | CPU-time ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for op, base in GOALS:
        for (o, d, n, impl), r in by.items():
            if o == op and impl == base:
                ours = [x for x in rows if (x["op"], x["dtype"], x["elements"]) == (o, d, n)
                        and x["ours"]]  # fmt: skip
                if ours:
                    o = ours[0]
                    summary.append(
                        f"| {op} vs {base} | {d} | {n:,} | {r['ms'] / o['ms']:.2f}× | "
                        f"{r['cpu_ms'] / max(o['cpu_ms'], 1e-9):.2f}× |"
                    )
    table = "\n".join(lines + summary)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=name, torch=torch.__version__, threads=torch.get_num_threads(),
                date=str(dt.date.today()), copy_bandwidth=bw, reps=reps)  # fmt: skip
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
