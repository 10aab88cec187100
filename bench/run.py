"""Side-by-side kernel table: every op × size × implementation in one run.

    python bench/run.py                      # CUDA: 1M,16M,256M,1B elements; CPU: 1M, 4M
    python bench/run.py --sizes 1M 16M --out bench/out

Prints one markdown table and writes ``results.json`` and ``results.md`` to ``--out``. Columns:
median time, bytes moved (design.md's per-element budget), GB/s, % of the device copy bandwidth
measured in the same run, and the speed-up of our kernel (triton on CUDA, torch twin on CPU)
over each alternative.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from cases import OPS, Case, copy_bandwidth, sync  # noqa: E402


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1 << 30}
    return int(float(s[:-1]) * mult[s[-1].upper()]) if s[-1].upper() in mult else int(s)


def time_fn(fn, device, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", nargs="+", default=None, help="element counts, e.g. 1M 16M 256M 1G")
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sizes = [
        parse_size(s)
        for s in (args.sizes or (["1M", "16M", "256M", "1G"] if cuda else ["1M", "4M"]))
    ]
    reps = args.reps or (20 if cuda else 3)
    bw = copy_bandwidth(device, numel=(1 << 26) if cuda else (1 << 22))
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    rows = []
    for op in args.ops:
        for size in sizes:
            try:
                case = Case(op, size, str(device))
            except torch.OutOfMemoryError:
                print(f"skip {op} @ {size}: out of memory", file=sys.stderr)
                continue
            impls = case.impls()
            times = {}
            for impl, fn in impls.items():
                try:
                    times[impl] = time_fn(fn, device, reps)
                except Exception as e:  # a baseline that cannot run is reported, not fatal
                    print(f"{op} {impl} @ {size}: {type(e).__name__}: {e}", file=sys.stderr)
            ours = "triton" if "triton" in times else "torch"
            for impl, t in times.items():
                gbs = case.bytes_moved / t / 1e9
                rows.append(
                    dict(
                        op=op,
                        numel=case.numel,
                        impl=impl,
                        median_ms=t * 1e3,
                        bytes=case.bytes_moved,
                        gbps=gbs,
                        pct_copy_bw=100 * gbs * 1e9 / bw,
                        speedup_of_ours=t / times[ours],
                    )
                )
            del case, impls
            if cuda:
                torch.cuda.empty_cache()
    header = (
        f"device: {name}; torch {torch.__version__}; date {dt.date.today()}; "
        f"copy bandwidth {bw / 1e9:.1f} GB/s"
    )
    lines = [
        header,
        "",
        "| op | elements | impl | median ms | GB/s | % copy BW | ours × faster |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['numel']:,} | {r['impl']} | {r['median_ms']:.3f} | "
            f"{r['gbps']:.1f} | {r['pct_copy_bw']:.0f} | {r['speedup_of_ours']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            dict(
                device=name,
                torch=torch.__version__,
                date=str(dt.date.today()),
                copy_bandwidth=bw,
                rows=rows,
            ),
            f,
            indent=1,
        )
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
