"""End-to-end saliency pipeline: ours vs the official MMUnlearner way, on model-shaped tensors.

    python bench/e2e_saliency.py                      # CUDA: 16M 256M 1G; CPU: 1M 4M
    python -m bench.e2e_saliency --sizes 1M --dtypes fp32 --out bench/out

ours      per batch, the gradients of every parameter (bf16 or fp32) are added into fp32 Fisher
          accumulators on the device by one multi-tensor ``fisher_accumulate_`` call; at the end
          ``saliency_mask`` makes 1-bit masks on the device; every forget step is one
          ``masked_adamw_`` call with those packed masks (fp32 moments). Backend "auto": the
          Triton kernels on CUDA, the C kernels (``cpu`` backend) on the CPU.
twins     ours with ``backend="torch"`` (the reference twins; ``--impls ours official twins``).
official  what the reference code does (docs method.md §2): every gradient is copied to the host
          (``.cpu()``), squared there in the parameter dtype and summed in that dtype; the bool
          mask ``(F_f+ε)/(F_p+ε) ≥ γ`` is computed on the host, copied to the device every forget
          step, then ``grad.mul_(mask)`` and a stock ``torch.optim.AdamW`` step (moments in the
          parameter dtype, torch's default foreach/for-loop choice).

Phases per (elements, gradient dtype, implementation):
  fisher    one batch of a Fisher pass (median over ``--reps``)
  mask      forget + preserve Fisher → mask, once per run
  step      one forget step
  pipeline  2·batches·fisher + mask + steps·step (a forget and a preserve Fisher pass over
            ``--batches`` batches each, then ``--steps`` forget steps); forward/backward and the
            retain steps are *not* included: this isolates what the saliency machinery costs.
Gradients are random (the values do not change the cost); each implementation runs in its own
subprocess so that its peak memory is its own (bench/measure.py). On the CPU "device" is the
host, so the official device↔host copies cost nothing there: CPU ratios are not the target.
Writes ``e2e_saliency.json`` and ``e2e_saliency.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import model_shapes  # noqa: E402
from measure import MemoryProbe, emit, fmt, fmt_size, parse_size, run_child, time_fn  # noqa: E402

import mmunlearn.kernels as K  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPS = 1e-15  # the official ε
GAMMA = 1.0  # the official default γ
ADAM = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)  # official: wd 0
# "twins": ours with backend="torch" (the reference twins, the CPU path before the C kernels)
IMPLS = ("ours", "official", "twins")


class Inputs:
    """What a training step hands the saliency machinery: parameters and two gradient lists."""

    def __init__(self, total: int, dtype: torch.dtype, device, seed: int = 0):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.dtype = dtype
        self.shapes = model_shapes(total)
        self.numel = sum(math.prod(s) for s in self.shapes)
        dev = self.device
        self.params = [(torch.randn(s, device=dev) * 0.02).to(dtype) for s in self.shapes]
        self.g_forget = [torch.randn(s, device=dev).to(dtype) for s in self.shapes]
        self.g_preserve = [torch.randn(s, device=dev).to(dtype) for s in self.shapes]

    def resample(self) -> None:
        """New random gradients in place (a new batch)."""
        for g in self.g_forget + self.g_preserve:
            g.copy_(torch.randn(g.shape, device=g.device))


class Ours:
    """Device-resident fp32 Fisher, 1-bit masks, masked AdamW with fp32 moments."""

    def __init__(self, inp: Inputs, backend: str = "auto"):
        self.inp, self.backend = inp, backend
        z = lambda: [torch.zeros(s, device=inp.device) for s in inp.shapes]
        self.f_forget, self.f_preserve = z(), z()
        self.params = [p.detach() for p in inp.params]  # updated in place
        self.m, self.v = z(), z()
        self.masks = self.counts = None
        self.t = 0

    def fisher_forget(self) -> None:
        K.fisher_accumulate_(self.f_forget, self.inp.g_forget, 1.0, backend=self.backend)

    def fisher_preserve(self) -> None:
        K.fisher_accumulate_(self.f_preserve, self.inp.g_preserve, 1.0, backend=self.backend)

    def mask(self) -> None:
        self.masks, self.counts = K.saliency_mask(
            self.f_forget, self.f_preserve, GAMMA, EPS, backend=self.backend
        )

    def step(self) -> None:
        self.t += 1
        K.masked_adamw_(
            self.params,
            self.inp.g_forget,
            self.m,
            self.v,
            self.masks,
            step=self.t,
            backend=self.backend,
            **ADAM,
        )

    def fishers_fp32(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [f.cpu() for f in self.f_forget], [f.cpu() for f in self.f_preserve]

    def packed_masks_cpu(self) -> list[torch.Tensor]:
        return [b.cpu() for b in self.masks]


class Official:
    """The reference code's way: host Fisher in the parameter dtype, host bool masks.

    ``own_copies=True`` clones parameters and gradients so that it can run next to
    :class:`Ours` on the same :class:`Inputs` (the step multiplies gradients in place).
    """

    def __init__(self, inp: Inputs, own_copies: bool = False):
        self.inp = inp
        self.f_forget = [torch.zeros(s, dtype=inp.dtype) for s in inp.shapes]  # host
        self.f_preserve = [torch.zeros(s, dtype=inp.dtype) for s in inp.shapes]
        src = [p.detach().clone() if own_copies else p.detach() for p in inp.params]
        self.leaf = [p.requires_grad_(True) for p in src]
        self.own_copies = own_copies
        self.opt = torch.optim.AdamW(
            self.leaf,
            lr=ADAM["lr"],
            betas=(ADAM["beta1"], ADAM["beta2"]),
            eps=ADAM["eps"],
            weight_decay=ADAM["weight_decay"],
        )
        self.host_masks = None

    @staticmethod
    def _accumulate(accs, grads) -> None:
        for a, g in zip(accs, grads):
            gc = g.detach().cpu()  # device → host, every parameter, every batch
            a.add_(gc * gc)  # squared and summed in the parameter dtype

    def fisher_forget(self) -> None:
        self._accumulate(self.f_forget, self.inp.g_forget)

    def fisher_preserve(self) -> None:
        self._accumulate(self.f_preserve, self.inp.g_preserve)

    def mask(self) -> None:
        self.host_masks = [
            (ff + EPS) / (fp + EPS) >= GAMMA for ff, fp in zip(self.f_forget, self.f_preserve)
        ]

    def step(self) -> None:
        for p, g, hm in zip(self.leaf, self.inp.g_forget, self.host_masks):
            if p.grad is None:  # the gradient the backward left (a copy when sharing inputs)
                p.grad = g.clone() if self.own_copies else g
            elif self.own_copies:
                p.grad.copy_(g)
            p.grad.mul_(hm.to(p.device))  # host bool mask → device, every forget step
        self.opt.step()

    def fishers_fp32(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [f.float() for f in self.f_forget], [f.float() for f in self.f_preserve]

    def packed_masks_cpu(self) -> list[torch.Tensor]:
        return [K.pack_bits(m) for m in self.host_masks]


def agreement(total: int, dtype: torch.dtype, device, batches: int = 3, seed: int = 0) -> dict:
    """Both ways over the same ``batches`` random batches: Fisher and mask differences."""
    inp = Inputs(total, dtype, device, seed)
    ours, off = Ours(inp), Official(inp, own_copies=True)
    for b in range(batches):
        if b:
            inp.resample()
        for impl in (ours, off):
            impl.fisher_forget()
            impl.fisher_preserve()
    ours.mask()
    off.mask()
    of, op = ours.fishers_fp32()
    xf, xp = off.fishers_fp32()
    rel = 0.0
    for a, b in zip(of + op, xf + xp):
        rel = max(rel, ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item())
    mo, mx = ours.packed_masks_cpu(), off.packed_masks_cpu()
    n = inp.numel
    sel_o = sum(int(K.unpack_bits(m, (s,)).sum()) for m, s in zip(mo, map(math.prod, inp.shapes)))
    sel_x = sum(int(m.sum()) for m in off.host_masks)
    diff = sum(
        int((K.unpack_bits(a, (s,)) != K.unpack_bits(b, (s,))).sum())
        for a, b, s in zip(mo, mx, map(math.prod, inp.shapes))
    )
    return dict(
        numel=n,
        dtype=str(dtype).replace("torch.", ""),
        batches=batches,
        fisher_max_rel_diff=rel,
        masks_equal=all(torch.equal(a, b) for a, b in zip(mo, mx)),
        mask_mismatch_fraction=diff / n,
        ours_selected_fraction=sel_o / n,
        official_selected_fraction=sel_x / n,
    )


def measure(impl: str, total: int, dtype_name: str, device, reps: int, seed: int = 0) -> dict:
    """Time the three phases of one implementation and its peak memory (call in a fresh
    process for host memory to mean anything)."""
    device = torch.device(device)
    # first calls import and cache things (torch.optim's step machinery, kernel tables): make
    # them at a tiny size for both ways so that neither pays them inside the measurement
    tiny = Inputs(1 << 12, DTYPES[dtype_name], device, seed)
    for warm in (Ours(tiny), Official(tiny, own_copies=True)):
        warm.fisher_forget(), warm.fisher_preserve(), warm.mask(), warm.step()
    del tiny, warm
    inp = Inputs(total, DTYPES[dtype_name], device, seed)
    probe = MemoryProbe(device)
    probe.start()
    if impl == "official":
        obj = Official(inp)
    else:
        obj = Ours(inp, backend="torch" if impl == "twins" else "auto")
    res = dict(impl=impl, numel=inp.numel, n_tensors=len(inp.shapes), dtype=dtype_name)
    big = device.type == "cuda" and impl == "official" and inp.numel >= (1 << 28)
    r = min(reps, 3) if big else reps  # the official way takes seconds per batch there
    res["fisher_s"], res["fisher_all_s"] = time_fn(obj.fisher_forget, device, r)
    for _ in range(r + 1):  # the preserve Fisher over as many batches
        obj.fisher_preserve()
    res["mem_after_fisher"] = probe.read()
    res["mask_s"], _ = time_fn(obj.mask, device, r)
    res["mem_after_mask"] = probe.read()
    res["step_s"], res["step_all_s"] = time_fn(obj.step, device, r)
    res["mem"] = probe.read()
    res["reps"] = r
    return res


def _child_main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = measure(args.child, args.child_size, args.child_dtype, args.device, args.reps)
    except Exception as e:  # out of memory and the like: report, do not crash the table
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    res["threads"] = torch.get_num_threads()
    emit(res)
    return 0


def build_tables(rows, batches: int, steps: int, device_name: str, cpu: bool) -> str:
    lines = [
        "| elements | grads | impl | Fisher ms/batch | mask ms | step ms | pipeline s | "
        "device peak MiB | host peak MiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {fmt_size(r['size'])} | {r['dtype']} | {r['impl']} | "
                f"failed: {r['error']} | | | | | |"
            )
            continue
        m = r["mem"]
        lines.append(
            f"| {r['numel']:,} | {r['dtype']} | {r['impl']} | {r['fisher_s'] * 1e3:.2f} | "
            f"{r['mask_s'] * 1e3:.2f} | {r['step_s'] * 1e3:.2f} | {r['pipeline_s']:.2f} | "
            f"{fmt(m['device_peak_mib'], '.0f')} | {fmt(m['host_peak_mib'], '.0f')} |"
        )
    lines += [
        "",
        "| elements | grads | official/ours Fisher | mask | step | pipeline |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    by = {(r["size"], r["dtype"], r["impl"]): r for r in rows if "error" not in r}
    for size, dtype, impl in by:
        if impl != "ours" or (size, dtype, "official") not in by:
            continue
        o, x = by[(size, dtype, "ours")], by[(size, dtype, "official")]
        ratio = [x[k] / o[k] for k in ("fisher_s", "mask_s", "step_s", "pipeline_s")]
        lines.append(
            f"| {o['numel']:,} | {dtype} | " + " | ".join(f"{v:.2f}×" for v in ratio) + " |"
        )
    note = (
        f"Device: {device_name}. Pipeline = 2 × {batches} Fisher batches + mask + {steps} "
        "forget steps (no forward/backward, no retain steps). Ratio > 1: ours is faster."
    )
    if cpu:
        note += (
            " On the CPU the device *is* the host: the official `.cpu()` and `mask.to(device)` "
            "are no-ops, so its device↔host copies (its main cost on a GPU) are absent here, "
            "and ours runs the C kernels of the `cpu` backend (`twins`: the torch reference "
            "twins), not the Triton kernels. CPU ratios are not the GPU target."
        )
    return "\n".join(lines) + "\n\n" + note


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", nargs="+", default=None, help="elements: 1M 16M 256M 1G 1e9")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--impls", nargs="+", default=["ours", "official"], choices=list(IMPLS))
    ap.add_argument("--reps", type=int, default=None, help="timed calls per phase (median)")
    ap.add_argument("--batches", type=int, default=50, help="Fisher batches per set (pipeline)")
    ap.add_argument("--steps", type=int, default=50, help="forget steps (pipeline)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU runs)"
    )
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="no subprocess per implementation (faster; host peak memory is then n/a)",
    )
    ap.add_argument("--check-size", default="1M", help="elements of the agreement check")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-dtype", choices=list(DTYPES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads is None and not cuda:
        args.threads = 1
    if args.child:
        return _child_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [
        parse_size(s) for s in (args.sizes or (["16M", "256M", "1G"] if cuda else ["1M", "4M"]))
    ]
    reps = args.reps or (10 if cuda else 5)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"

    checks = [
        agreement(parse_size(args.check_size), DTYPES[d], device, batches=3) for d in args.dtypes
    ]
    for c in checks:
        print(f"agreement {c}", file=sys.stderr)
        if c["dtype"] == "float32" and not cuda:
            assert c["masks_equal"] and c["fisher_max_rel_diff"] <= 1e-6, c

    rows = []
    for size in sizes:
        for dname in args.dtypes:
            for impl in args.impls:
                if args.in_process:
                    try:
                        r = measure(impl, size, dname, device, reps)
                    except Exception as e:
                        r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                    if cuda:
                        torch.cuda.empty_cache()
                else:
                    child_args = [
                        "--child", impl, "--child-size", str(size), "--child-dtype", dname,
                        "--device", str(device), "--reps", str(reps),
                        "--threads", str(args.threads or 0),
                    ]  # fmt: skip
                    r = run_child(os.path.abspath(__file__), child_args)
                r.update(size=size, dtype=dname, impl=impl)
                if "error" not in r:
                    r["pipeline_s"] = 2 * args.batches * r["fisher_s"] + r["mask_s"]
                    r["pipeline_s"] += args.steps * r["step_s"]
                print(
                    f"{fmt_size(size)} {dname} {impl}: "
                    + (
                        r["error"]
                        if "error" in r
                        else f"fisher {r['fisher_s'] * 1e3:.2f} ms, mask {r['mask_s'] * 1e3:.2f} "
                        f"ms, step {r['step_s'] * 1e3:.2f} ms"
                    ),
                    file=sys.stderr,
                )
                rows.append(r)

    table = build_tables(rows, args.batches, args.steps, name, cpu=not cuda)
    header = (
        f"device: {name}; torch {torch.__version__}; date {dt.date.today()}; "
        f"threads {args.threads or torch.get_num_threads()}; reps {reps}; "
        f"command: {' '.join(['python bench/e2e_saliency.py', *(argv or sys.argv[1:])])}"
    )
    check_lines = [
        "",
        "Agreement (same random batches through both ways):",
        "",
        "| elements | grads | batches | max rel. Fisher diff | masks equal | "
        "mask mismatch | selected ours | selected official |",
        "|---:|---|---:|---:|---|---:|---:|---:|",
    ] + [
        f"| {c['numel']:,} | {c['dtype']} | {c['batches']} | {c['fisher_max_rel_diff']:.2e} | "
        f"{c['masks_equal']} | {c['mask_mismatch_fraction']:.2e} | "
        f"{c['ours_selected_fraction']:.4f} | {c['official_selected_fraction']:.4f} |"
        for c in checks
    ]
    text = header + "\n\n" + table + "\n" + "\n".join(check_lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "e2e_saliency.json"), "w") as f:
        json.dump(
            dict(
                device=name,
                torch=torch.__version__,
                date=str(dt.date.today()),
                threads=args.threads or torch.get_num_threads(),
                batches=args.batches,
                steps=args.steps,
                rows=rows,
                agreement=checks,
            ),
            f,
            indent=1,
        )
    with open(os.path.join(args.out, "e2e_saliency.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
