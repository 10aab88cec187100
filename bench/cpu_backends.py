"""Which fast CPU path, and what its first use costs: the C kernels vs ``torch.compile``.

    python bench/cpu_backends.py --size 4M --dtype bf16

For a masked AdamW step over model-shaped tensors (437 of them, bench/cases.model_shapes):
first-use cost in a fresh process (cold: empty caches; warm: caches filled by the cold run) and
the steady per-step time (median of ``--reps``); "first call" includes building or loading the
C kernels and torch.compile's compilation; for
  cpu       the C kernels (kernels/_cpu.py): one multi-tensor call per step
  compile   ``torch.compile(dynamic=True)`` of a per-tensor masked AdamW in the torch-twin style
            (packed bits expanded in the graph, ``torch.where`` writes), called once per tensor
  twins     the torch reference twins (the CPU path before issue 16)
  fused     ``grad.mul_(mask)`` + ``torch.optim.AdamW(fused=True)`` (the baseline to beat)
Each measurement runs in its own subprocess; caches live in a temporary directory
(``MMUNLEARN_CACHE_DIR``, ``TORCHINDUCTOR_CACHE_DIR``) so "cold" really is cold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TAG = "RESULT-JSON "


def _child(impl: str, size: int, dtype: str, reps: int, threads: int | None) -> dict:
    t_start = time.perf_counter()
    import torch

    if threads:
        torch.set_num_threads(threads)

    sys.path.insert(0, HERE)
    from cases import Case

    import mmunlearn.kernels as K
    from mmunlearn.kernels import _cpu

    t0 = time.perf_counter()
    if impl == "cpu":
        _cpu.load()  # cold: compile with cc and cache; warm: load the cached object
    build = time.perf_counter() - t0
    case = Case("masked_adamw", size, "cpu", dtype=dtype)
    kw = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    if impl == "cpu":
        fn = lambda: K.masked_adamw_(  # noqa: E731
            case.params, case.grads, case.m, case.v, case.masks, backend="cpu", **kw
        )
    elif impl == "twins":
        fn = lambda: K.masked_adamw_(  # noqa: E731
            case.params, case.grads, case.m, case.v, case.masks, backend="torch", **kw
        )
    elif impl == "fused":
        fn = case._masked_adamw_fused_adamw
    else:

        def one(p, g, m, v, bits, decay, beta2, w1, omb2, eps, nss, bc2s):
            n = p.numel()
            idx = torch.arange(n, device=p.device)
            keep = ((bits[idx >> 3].to(torch.int32) >> (idx & 7)) & 1).bool().view(p.shape)
            g32 = g.float()
            m_new = m.lerp(g32, w1)
            v_new = v * beta2 + omb2 * g32 * g32
            p_new = p.float() * decay + (nss * m_new) / (v_new.sqrt() / bc2s + eps)
            p.copy_(torch.where(keep, p_new.to(p.dtype), p))
            m.copy_(torch.where(keep, m_new, m))
            v.copy_(torch.where(keep, v_new, v))

        compiled = torch.compile(one, dynamic=True, fullgraph=True)
        scal = (1.0, 0.999, 0.1, 0.001, 1e-8, -1e-4, 0.0316)

        def fn():
            for p, g, m, v, b in zip(case.params, case.grads, case.m, case.v, case.masks):
                compiled(p, g, m, v, b, *scal)

    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return dict(
        impl=impl,
        elements=case.numel,
        tensors=len(case.shapes),
        first_call_s=first + build,
        process_to_first_result_s=time.perf_counter() - t_start - sum(times),
        step_ms=statistics.median(times) * 1e3,
        all_ms=[t * 1e3 for t in times],
        threads=torch.get_num_threads(),
    )


def _run(impl, size, dtype, reps, env, threads) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--size", str(size)]
    cmd += ["--dtype", dtype, "--reps", str(reps), "--threads", str(threads or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG) :])
    return {"impl": impl, "error": (proc.stderr or proc.stdout).strip()[-500:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="4M")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--impls", nargs="+", default=["cpu", "compile", "twins", "fused"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch / cpu-backend threads")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    from run import parse_size

    size = parse_size(args.size) if isinstance(args.size, str) else args.size
    if args.child:
        res = _child(args.child, size, args.dtype, args.reps, args.threads)
        print(TAG + json.dumps(res), flush=True)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, MMUNLEARN_CACHE_DIR=os.path.join(cache, "mmu"),
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"))  # fmt: skip
        env.pop("TRITON_INTERPRET", None)
        for impl in args.impls:
            for phase in ("cold", "warm") if impl in ("cpu", "compile") else ("-",):
                r = _run(impl, size, args.dtype, args.reps, env, args.threads)
                r["phase"] = phase
                rows.append(r)
                print(r if "error" in r else {k: v for k, v in r.items() if k != "all_ms"},
                      file=sys.stderr)  # fmt: skip
    lines = [
        f"masked AdamW step, {args.dtype} params/grads, fp32 moments, ~{args.size} model-shaped "
        f"elements, median of {args.reps}, threads {rows[0].get('threads', '?')}",
        "",
        "| impl | caches | first call s | process start → first result s | step ms |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['phase']} | failed: {r['error'][:80]} | | |")
            continue
        lines.append(
            f"| {r['impl']} | {r['phase']} | {r['first_call_s']:.2f} | "
            f"{r['process_to_first_result_s']:.2f} | {r['step_ms']:.2f} |"
        )
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
