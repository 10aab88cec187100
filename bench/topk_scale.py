"""Exact top-k saliency threshold at scale: ours vs torch.kthvalue / torch.topk / torch.quantile.

    python bench/topk_scale.py                   # CUDA: 1e9 and 7e9 (or the largest that fits)
    python bench/topk_scale.py --sizes 2^22 2^25 --fraction 0.05      # the CPU default

The scores are ``(F_f + ε)/(F_p + ε)`` over a list of fp32 Fisher pairs shaped like a model
(bench/cases.py model_shapes; exponential values, the first rows of the largest tensor zero in
both, i.e. unused embedding rows whose score is exactly 1). The threshold is the k-th largest
score, k = ceil(fraction · N).

ours      ``saliency_threshold_topk``: three radix-select histogram passes over the list, nothing
          concatenated (Triton on CUDA, the torch twin on the CPU)
kthvalue  scores written tensor by tensor into one flat N-element buffer, ``kthvalue(N-k+1)``
topk      the same buffer, ``topk(k).values.min()``
quantile  the same buffer, ``quantile(q, interpolation="lower")`` with q = (N-k)/(N-1); torch
          refuses inputs over 2^24 elements (its RuntimeError is recorded)
Each (method, N) runs in its own subprocess: time (median over ``--reps``), peak extra memory,
and any refusal or out-of-memory error, caught and recorded. The script asserts that every
method that ran returned the same threshold as kthvalue bit for bit (quantile excepted: its
index arithmetic is reported, not asserted), after writing ``topk_scale.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import struct
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import model_shapes  # noqa: E402
from measure import MemoryProbe, emit, fmt, fmt_size, parse_size, run_child, time_fn  # noqa: E402

import mmunlearn.kernels as K  # noqa: E402

METHODS = ("ours", "kthvalue", "topk", "quantile")
EPS = 1e-15


def make_fishers(total: int, device, seed: int = 0):
    """Forget / preserve fp32 Fisher lists shaped like a model (about ``total`` elements)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = model_shapes(total)
    ff = [torch.empty(s, device=device).exponential_(generator=gen) for s in shapes]
    fp = [torch.empty(s, device=device).exponential_(generator=gen) for s in shapes]
    big = max(range(len(shapes)), key=lambda i: ff[i].numel())
    rows = max(1, ff[big].shape[0] // 100)  # unused embedding rows: score (0+ε)/(0+ε) = 1
    ff[big][:rows].zero_()
    fp[big][:rows].zero_()
    return ff, fp


def flat_scores(ff, fp) -> torch.Tensor:
    """All scores in one flat buffer, written tensor by tensor (the least memory a
    concatenating baseline can use: N × 4 bytes plus one tensor's temporary)."""
    n = sum(t.numel() for t in ff)
    out = torch.empty(n, dtype=torch.float32, device=ff[0].device)
    i = 0
    for a, b in zip(ff, fp):
        out[i : i + a.numel()] = K.saliency_ratio(a, b, EPS).reshape(-1)
        i += a.numel()
    return out


def threshold(method: str, ff, fp, fraction: float) -> float:
    n = sum(t.numel() for t in ff)
    k = K.topk_count(fraction, n)
    if method == "ours":
        return K.saliency_threshold_topk(ff, fp, fraction, EPS)
    s = flat_scores(ff, fp)
    if method == "kthvalue":
        return s.kthvalue(n - k + 1).values.item()
    if method == "topk":
        return s.topk(k, sorted=False).values.min().item()
    if method == "quantile":
        q = (n - k) / (n - 1) if n > 1 else 0.0
        return torch.quantile(s, q, interpolation="lower").item()
    raise ValueError(method)


def f32_bits(x: float) -> str:
    return struct.pack(">f", x).hex()


def measure(method: str, total: int, device, fraction: float, reps: int, seed: int = 0) -> dict:
    device = torch.device(device)
    tiny = make_fishers(1 << 12, device, seed)  # imports and first-call caches, off the books
    threshold(method if method != "quantile" else "kthvalue", *tiny, fraction)
    del tiny
    ff, fp = make_fishers(total, device, seed)
    n = sum(t.numel() for t in ff)
    res = dict(method=method, numel=n, n_tensors=len(ff), k=K.topk_count(fraction, n))
    probe = MemoryProbe(device)
    probe.start()
    out = {}

    def call():
        out["t"] = threshold(method, ff, fp, fraction)

    t0 = time.perf_counter()
    try:
        res["time_s"], res["times_s"] = time_fn(call, device, reps, warmup=0)
        res["threshold"] = out["t"]
        res["bits"] = f32_bits(out["t"])
        res["status"] = "ok"
    except Exception as e:  # refusals (quantile > 2^24) and out-of-memory are results here
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        res["status"] = "OOM" if oom else "refused"
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        res["seconds_to_error"] = time.perf_counter() - t0
    res["mem"] = probe.read()
    return res


def _child_main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = measure(args.child, args.child_size, args.device, args.fraction, args.reps)
    except Exception as e:  # e.g. the inputs themselves do not fit
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        res = dict(method=args.child, status="OOM" if oom else "error")
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    res["threads"] = torch.get_num_threads()
    emit(res)
    return 0


def fit_sizes(sizes: list[int], device: torch.device) -> list[tuple[int, int]]:
    """(requested, run) pairs: on CUDA a size whose inputs (8 bytes/element) would not fit in
    90 % of the free memory is cut to the largest multiple of 1e8 that does."""
    if device.type != "cuda":
        return [(s, s) for s in sizes]
    free, _ = torch.cuda.mem_get_info(device)
    cap = int(0.9 * free / 8) // 10**8 * 10**8
    return [(s, min(s, cap)) for s in sizes]


def check(rows) -> list[str]:
    """Bit-exact agreement with kthvalue (and topk) wherever both ran; quantile reported only."""
    failures = []
    by_n: dict = {}
    for r in rows:
        by_n.setdefault(r["size"], {})[r["method"]] = r
    for size, ms in by_n.items():
        ref = ms.get("kthvalue")
        ref = ref if ref and ref.get("status") == "ok" else ms.get("topk")
        ref = ref if ref and ref.get("status") == "ok" else None
        for m, r in ms.items():
            if r.get("status") != "ok":
                r["agrees"] = None
                continue
            r["agrees"] = None if ref is None else r["bits"] == ref["bits"]
            if m != "quantile" and r["agrees"] is False:
                failures.append(
                    f"{fmt_size(size)}: {m} threshold {r['threshold']!r} ({r['bits']}) != "
                    f"{ref['method']} {ref['threshold']!r} ({ref['bits']})"
                )
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", nargs="+", default=None, help="elements: 2^25 1e9 7e9 64M")
    ap.add_argument("--fraction", type=float, default=0.05, help="k = ceil(fraction · N)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU: 1)")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads is None and not cuda:
        args.threads = 1
    args.reps = args.reps or (5 if cuda else 3)
    if args.child:
        return _child_main(args)
    sizes = [parse_size(s) for s in (args.sizes or (["1e9", "7e9"] if cuda else ["2^22", "2^25"]))]
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    rows = []
    for requested, size in fit_sizes(sizes, device):
        for method in args.methods:
            child_args = [
                "--child", method, "--child-size", str(size), "--device", str(device),
                "--fraction", str(args.fraction), "--reps", str(args.reps),
                "--threads", str(args.threads or 0),
            ]  # fmt: skip
            r = run_child(os.path.abspath(__file__), child_args)
            r.update(size=size, requested=requested, method=method)
            r.setdefault("status", "error")
            print(f"{fmt_size(size)} {method}: {r['status']} {r.get('error', '')}", file=sys.stderr)
            rows.append(r)
    failures = check(rows)

    lines = [
        f"device: {name}; torch {torch.__version__}; date {dt.date.today()}; "
        f"threads {args.threads or torch.get_num_threads()}; fraction {args.fraction}; "
        f"reps {args.reps}; "
        f"command: {' '.join(['python bench/topk_scale.py', *(argv or sys.argv[1:])])}",
        "",
        "| N (requested) | method | status | median s | device peak MiB | host peak MiB | "
        "threshold | = kthvalue |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        mem = r.get("mem") or {}
        n = f"{r.get('numel', r['size']):,}"
        if r["requested"] != r.get("numel"):
            n += f" ({fmt_size(r['requested'])})"
        agrees = {True: "bit-exact", False: "differs", None: "—"}[r.get("agrees")]
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"
        if "seconds_to_error" in r:
            status += f" (after {r['seconds_to_error']:.2f} s)"
        lines.append(
            f"| {n} | {r['method']} | {status} | {fmt(r.get('time_s'), '.3f')} | "
            f"{fmt(mem.get('device_peak_mib'), '.0f')} | {fmt(mem.get('host_peak_mib'), '.0f')} "
            f"| {fmt(r.get('threshold'), '.9g', '—')} | {agrees} |"
        )
    lines += [
        "",
        "Peak memory: what the method added on top of the two Fisher lists (8 bytes/element). "
        "'= kthvalue' compares the fp32 bits (topk is the reference where kthvalue did not run)."
        + ("" if cuda else " CPU: ours is the torch twin (chunked, 4 M scores at a time)."),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "topk_scale.json"), "w") as f:
        json.dump(
            dict(
                device=name,
                torch=torch.__version__,
                date=str(dt.date.today()),
                fraction=args.fraction,
                rows=rows,
                failures=failures,
            ),
            f,
            indent=1,
        )
    with open(os.path.join(args.out, "topk_scale.md"), "w") as f:
        f.write(text)
    assert not failures, "thresholds disagree: " + "; ".join(failures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
