"""Every unlearning method end to end on one workload, as a ratio to GA_Diff (issue 27).

    python bench/e2e_methods.py                       # the demo's workload, 3 rounds
    python bench/e2e_methods.py --people 6 --steps 2 --hidden 32 --rounds 1   # seconds

The workload is the demo's basic world (mmunlearn.demo): the tiny LLaVA (``--hidden``),
``--people`` synthetic people (20 % to forget), a short vanilla fine-tune (not timed), then for
every method that ``mmunlearn.methods.METHODS`` lists *at run time* (new methods appear by
themselves): a fresh copy of the vanilla model unlearned for ``--steps`` forget batches of
``--batch-size`` (a retain step after each forget step when the method has one; SMFA runs three
such updates and merges them, MIP-Editor first scores and edits its paths, both inside its
time; lr 1e-3, constant, the demo's :class:`~mmunlearn.tinyrun.TinyRunConfig`). A method that
uses a mask (MMUnlearner) first makes it, as the demo does: one Fisher pass over the forget set
and one over each preserve set (``masks.build_masks``, γ = 1); that "mask pass" is included in
its total and also shown on its own. Methods needing a reference model get the loop's frozen
copy (its creation is timed with the run).

Each (method, round) is timed in wall-clock and in process CPU time; rounds go round-robin
over the methods so that a change in the machine's load spreads over all of them, and the
median round is reported. On a shared machine the CPU time is the steadier figure (another
process's load stretches the wall clock, much less this process's CPU time); the load average
before and after is recorded. Writes ``e2e_methods.json`` and ``e2e_methods.md`` to
``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import replace

import torch

from mmunlearn.data.batching import make_batches, to_device
from mmunlearn.data.recipe import synthetic_sets
from mmunlearn.data.synthetic import make_benchmark
from mmunlearn.loop import unlearn
from mmunlearn.masks import build_masks
from mmunlearn.tinyrun import TinyRunConfig, build_tiny, cpu_name
from mmunlearn.train import finetune


def methods() -> list[str]:
    """The methods ``mmunlearn.methods`` lists now."""
    from mmunlearn import methods as M

    return list(M.METHODS)


class Workload:
    """The model, batches and settings every method runs on (built once)."""

    def __init__(self, people=40, steps=50, batch_size=16, hidden=128, vanilla_steps=100,
                 seed=0, device="cpu"):  # fmt: skip
        self.dev = torch.device(device)
        self.cfg = TinyRunConfig(seed=seed, device=device, n_people=people, hidden=hidden,
                                 vision_hidden=max(16, hidden // 2), batch_size=batch_size,
                                 unlearn_steps=steps, progress=False)  # fmt: skip
        torch.manual_seed(seed)
        bench = make_benchmark(n_people=people, forget_ratio=self.cfg.forget_ratio, seed=seed)
        self.model, _tok, self.adapter = build_tiny(bench, self.cfg, self.dev)
        if vanilla_steps:
            finetune(self.model, self.adapter, bench.train, vanilla_steps, 1e-3, batch_size,
                     seed, self.dev, progress=False)  # fmt: skip
        self.data = synthetic_sets(bench)
        rng = random.Random(seed)

        def batches(items, n=None):
            return to_device(make_batches(self.adapter, items, batch_size, rng, n), self.dev)

        self.forget = batches(self.data.forget, steps)
        self.retain = batches(self.data.retain, steps)
        self.fisher_sets = (batches(self.data.forget), batches(self.data.vision_preserve),
                            batches(self.data.language_preserve))  # fmt: skip
        self.sizes = {**self.data.sizes(), "mask_batches": sum(map(len, self.fisher_sets))}

    def mask(self, model):
        return build_masks(model, *self.fisher_sets, gamma=self.cfg.gamma, progress=False)

    def run(self, name: str) -> dict:
        """One timed run of method ``name`` from a fresh copy of the vanilla model."""
        m = copy.deepcopy(self.model)
        layers = self.model.config.text_config.num_hidden_layers
        # layer-indexed methods at the tiny model's depth (their 7B defaults name deeper layers)
        run = replace(self.cfg.run_config(progress=False), rmu_layer=layers // 2,
                      manu_layers=min(layers, 3))  # fmt: skip
        method = run.method_for(name)
        sync = torch.cuda.synchronize if self.dev.type == "cuda" else (lambda: None)
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        kw, mask_w, mask_c = {}, 0.0, 0.0
        if method.uses_mask:
            masks = self.mask(m)
            sync()
            mask_w, mask_c = time.perf_counter() - w0, time.process_time() - c0
            kw["masks"] = masks["both"].for_model(m)
        res = unlearn(m, method, self.forget, self.retain, config=run, **kw)
        sync()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        return {"wall_s": wall, "cpu_s": cpu, "mask_wall_s": mask_w, "mask_cpu_s": mask_c,
                "steps": res["steps"]}  # fmt: skip


def measure(work: Workload, names: list[str], rounds: int, warmup: bool = True) -> dict:
    """``{method: {"runs": [...], median figures}}``, rounds round-robin over the methods;
    with ``warmup``, a first untimed run of each warms caches, kernels and allocators."""
    runs: dict = {n: [] for n in names}
    for n in names if warmup else ():
        work.run(n)
    for _ in range(rounds):
        for n in names:
            runs[n].append(work.run(n))
    out = {}
    for n, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k.endswith("_s")}
        out[n] = {"runs": rs, **med, "steps": rs[0]["steps"]}
    return out


def ratios(res: dict, base: str = "ga_diff") -> dict:
    """Each method's median CPU and wall time over ``base``'s (and its mask pass's, alone)."""
    b = res[base]
    out = {}
    for n, r in res.items():
        out[n] = {"cpu": r["cpu_s"] / b["cpu_s"], "wall": r["wall_s"] / b["wall_s"]}
        if r["mask_cpu_s"]:
            out[n]["mask_cpu"] = r["mask_cpu_s"] / b["cpu_s"]
            out[n]["loop_cpu"] = (r["cpu_s"] - r["mask_cpu_s"]) / b["cpu_s"]
    return out


def table(res: dict, rat: dict) -> str:
    lines = [
        "| method | steps | CPU s | wall s | mask pass CPU s | CPU × GA_Diff | wall × GA_Diff | "
        "mask pass × GA_Diff | rest × GA_Diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, r in res.items():
        q = rat[n]
        mask = f"{r['mask_cpu_s']:.2f}" if r["mask_cpu_s"] else "—"
        lines.append(
            f"| {n} | {r['steps']} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | {mask} | "
            f"{q['cpu']:.2f}× | {q['wall']:.2f}× | "
            + (f"{q['mask_cpu']:.2f}× | {q['loop_cpu']:.2f}× |" if "mask_cpu" in q else "— | — |")
        )
    return "\n".join(lines)


def environment(threads: int) -> dict:
    return {
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--people", type=int, default=40)
    ap.add_argument("--steps", type=int, default=50, help="forget steps per method")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128, help="tiny LLaVA width (demo: 128)")
    ap.add_argument("--vanilla-steps", type=int, default=100, help="untimed fine-tune first")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    ap.add_argument("--no-warmup", action="store_true", help="no untimed first run")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = methods()
    if "ga_diff" not in names:
        sys.exit("e2e_methods: GA_Diff, the baseline of the ratios, is not in mmunlearn.methods")
    load0 = os.getloadavg()
    t0 = time.time()
    work = Workload(args.people, args.steps, args.batch_size, args.hidden, args.vanilla_steps,
                    args.seed, args.device)  # fmt: skip
    res = measure(work, names, args.rounds, not args.no_warmup)
    rat = ratios(res)
    out = {
        "methods": res,
        "ratio_to_ga_diff": rat,
        "workload": {**vars(args), "sizes": work.sizes},
        "environment": {**environment(args.threads), "loadavg_before": load0,
                        "loadavg_after": os.getloadavg(), "seconds": round(time.time() - t0)},
    }  # fmt: skip
    text = table(res, rat)
    print(text)
    env = out["environment"]
    print(f"\n{env['cpu']}, {args.threads} thread(s), torch {env['torch']}, {env['date']}; "
          f"load average {load0[0]:.2f} before, {env['loadavg_after'][0]:.2f} after")  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "e2e_methods.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(args.out, "e2e_methods.md"), "w") as f:
        f.write(text + "\n")
    return out


if __name__ == "__main__":
    main()
