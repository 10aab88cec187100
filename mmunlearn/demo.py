"""``mmunlearn demo``: the paper's comparison in miniature, offline, on CPU in minutes.

:func:`mmunlearn.demo_linked.run_linked_demo` (the default of ``mmunlearn demo``): the linked world
(:mod:`mmunlearn.data.linked`; a picture names the person, some facts are taught by name only),
staged training, the gates (:mod:`mmunlearn.data.linked_probes`; failing them, the run says
"not testable" and stops), the reference (the recipe without the forget pictures), the masks,
then every method run to *matched forgetting* (name and facts from the forget people's held-out
pictures within 0.05 of the reference) and compared there: the gap to the reference with a
bootstrap interval, the forget people's facts by name, the retain people.
:func:`run_demo`: the basic world's comparison at a fixed budget:

1. the built-in synthetic benchmark of fictitious people (portraits + biographies);
2. a tiny LLaVA (real ``LlavaForConditionalGeneration`` from a small config, local tokenizer)
   fine-tuned on all people until it knows them — the *vanilla* model;
3. Fisher importance on the forget VQA data vs the preserve sets, and the MMUnlearner masks
   (vision vs multimodal retain; language vs forget text QA + multimodal retain; their union);
4. GA, GA_Diff, KL_Min, NPO and MMUnlearner from the same vanilla model with the same budget;
5. the reference: the same recipe trained without the forget people's pictures;
6. evaluation of all seven (MCQ by option likelihood), the table, ``results.json``,
   ``report.md`` and ``tradeoff.png`` under ``--out``, plus every model and the masks.

The torch thread count is pinned (``TinyRunConfig.threads``, 2): the table depends on it.
"""

from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import asdict

import torch

from mmunlearn import fsdp
from mmunlearn.data.batching import make_batches, to_device
from mmunlearn.data.recipe import synthetic_sets
from mmunlearn.data.synthetic import make_benchmark
from mmunlearn.distributed import is_rank0, world_size
from mmunlearn.eval import EvalConfig, evaluate
from mmunlearn.eval.report import (
    TEXT_COLUMNS,
    TEXT_TITLE,
    markdown_table,
    write_report,
)
from mmunlearn.loop import unlearn
from mmunlearn.masks import build_masks
from mmunlearn.methods import Method
from mmunlearn.models import save_model
from mmunlearn.tinyrun import (
    TinyRunConfig,
    build_tiny,
    demo_eval_sets,
    depth_settings,
    environment,
    pinned_threads,
    public,
    tiny_model,
)
from mmunlearn.train import finetune


def run_demo(out: str = "runs/demo", cfg: TinyRunConfig | None = None) -> dict:
    """Run the whole comparison; returns the results dict also written to ``out``.

    Under torchrun (a process group of ``WORLD_SIZE > 1`` already started, as the CLI does)
    every model is FSDP2-sharded per block and trained on its ranks' rows of the same global
    batches; models are gathered one tensor at a time to rank 0, which evaluates them and
    writes every file (other ranks return ``{}``). ``cfg.threads`` is set for the run and
    restored afterwards."""
    cfg = cfg or TinyRunConfig()
    return pinned_threads(_run_demo, out, cfg, threads=cfg.threads)


class _BasicDemo:
    """The basic world's run, in the order its random draws are made (module docstring)."""

    def __init__(self, out: str, cfg: TinyRunConfig):
        self.out, self.cfg = out, cfg
        self.dev = torch.device(cfg.device)
        self.world = world_size()
        self.sharded, self.rank0 = self.world > 1, is_rank0()
        self.progress = cfg.progress and self.rank0
        torch.manual_seed(cfg.seed)
        self.bench = make_benchmark(
            n_people=cfg.n_people, forget_ratio=cfg.forget_ratio, seed=cfg.seed
        )
        self.sets = demo_eval_sets(self.bench, cloze_gen=True)
        self.model, self.tok, self.adapter = build_tiny(self.bench, cfg, self.dev)
        # MCQ by option likelihood (the main table), cloze and greedy generation (ROUGE /
        # BLEU: the second table); the letter MCQ is left out: this tiny model is never
        # taught letters
        self.ecfg = EvalConfig(
            batch_size=32, seed=cfg.seed, letter_mcq=False, generation=True, progress=False
        )
        self.vanilla_state = None

    def shard(self, m):
        fsdp.broadcast_from_rank0(m)  # every rank starts from rank 0's weights
        fsdp.shard_model(m, self.adapter.block_classes(), mixed_precision=self.cfg.mixed_precision)
        return m

    def finetune(self, m, samples) -> None:
        c = self.cfg
        finetune(m, self.adapter, samples, c.vanilla_steps, c.vanilla_lr, c.batch_size, c.seed,
                 self.dev, self.progress)  # fmt: skip

    def evaluate_and_save(self, m, name, state=None):
        """Evaluate (rank 0; a sharded model is gathered into an unsharded copy first, unless
        its full ``state`` is given) and save the model under out/name."""
        if self.sharded:
            if state is None:
                state = fsdp.full_state_dict(m)  # every rank: collective
            if not self.rank0:
                return None
            m = tiny_model(self.tok, self.cfg, self.dev)
            m.load_state_dict(state)
            m.eval()
        res = public(evaluate(m, self.adapter.collate, self.tok, self.sets, self.ecfg))
        if self.cfg.save_models:
            save_model(m, self.tok, os.path.join(self.out, name))
        return res

    def vanilla(self, results: dict) -> None:
        if self.sharded:
            self.shard(self.model)
        self.finetune(self.model, self.bench.train)
        # gathered once, to every rank: evaluated here, and the start of every method's copy
        if self.sharded:
            self.vanilla_state = fsdp.full_state_dict(self.model, to_all=True)
        res = self.evaluate_and_save(self.model, "vanilla", self.vanilla_state)
        results["methods"]["vanilla"] = res

    def fresh(self, requires_grad=True):
        """A working copy of the vanilla model (sharded like it under torchrun)."""
        if not self.sharded:
            return copy.deepcopy(self.model)
        m = tiny_model(self.tok, self.cfg, self.dev)
        m.load_state_dict(self.vanilla_state)
        return self.shard(m).requires_grad_(requires_grad)

    def unlearn_all(self, results: dict) -> None:
        """The masks (vision group vs multimodal retain; language group vs the forget people's
        text QA + multimodal retain; both = union), then every method from the vanilla model."""
        cfg, dev, adapter = self.cfg, self.dev, self.adapter
        rng, bs, data = random.Random(cfg.seed), cfg.batch_size, synthetic_sets(self.bench)

        def batches(items, n=None):
            return to_device(make_batches(adapter, items, bs, rng, n), dev)

        forget = batches(data.forget, cfg.unlearn_steps)
        retain_mm = batches(data.retain, cfg.unlearn_steps)
        f_b, v_pres = batches(data.forget), batches(data.vision_preserve)
        l_pres = batches(data.language_preserve)
        masks = build_masks(self.model, f_b, v_pres, l_pres, gamma=cfg.gamma,
                            fraction=cfg.fraction, progress=self.progress)  # fmt: skip
        results["mask_coverage"] = {k: m.coverage()["total"] for k, m in masks.items()}
        if cfg.save_models and self.rank0:
            masks["both"].save(os.path.join(self.out, "mask_both.safetensors"))
        ucfg = cfg.run_config(progress=self.progress, **depth_settings(self.model))
        for name in cfg.methods:
            m = self.fresh()
            kw = {}
            if name == "mmunlearner":
                kw["masks"] = masks["both"].for_model(m)
            if self.sharded and Method(name).needs_reference:
                kw["ref_model"] = self.fresh(requires_grad=False).eval()
            unlearn(m, name, forget, retain_mm, config=ucfg, **kw)
            results["methods"][name] = self.evaluate_and_save(m, name)
            del m, kw

    def reference(self, results: dict) -> None:
        """Same init (the model is rebuilt from the seed), recipe and batch order; the forget
        people's pictures left out."""
        ref = tiny_model(self.tok, self.cfg, self.dev)
        if self.sharded:
            self.shard(ref)
        pictures = {id(s) for s in self.bench.forget_vqa}
        self.finetune(ref, [s for s in self.bench.train if id(s) not in pictures])
        results["methods"]["reference"] = self.evaluate_and_save(ref, "reference")


def _run_demo(out: str, cfg: TinyRunConfig) -> dict:
    t0 = time.time()
    demo = _BasicDemo(out, cfg)
    results = {"methods": {}, "config": asdict(cfg)}
    results["environment"] = environment(demo.dev, demo.world)
    demo.vanilla(results)
    demo.unlearn_all(results)
    if cfg.reference:
        demo.reference(results)
    results["seconds"] = round(time.time() - t0, 1)
    results["protocol"] = demo.ecfg.__dict__
    cov = ", ".join(f"{k} {100 * v['fraction']:.1f} %" for k, v in results["mask_coverage"].items())
    rule = f"γ = {cfg.gamma:g}" if cfg.fraction is None else f"top-k {cfg.fraction:g}"
    results["notes"] = [f"Mask coverage ({rule}): {cov} of the weights."]
    if cfg.reference:
        results["notes"].append(
            "reference: the vanilla recipe (same init, steps, lr, batch order) trained without "
            "the forget people's pictures; what an ideal visual unlearning would reach "
            "(forget VQA near it, not below it: below chance the answer is avoided, "
            "not forgotten)."
        )
    if not demo.rank0:
        return {}
    _report(results, out, cfg, demo.world)
    return results


def _report(results: dict, out: str, cfg: TinyRunConfig, world: int) -> None:
    write_report(
        results,
        out,
        title="mmunlearn demo: tiny LLaVA on the synthetic benchmark",
        extra_tables=[(TEXT_TITLE, TEXT_COLUMNS)],
        details=True,
    )
    if cfg.progress:
        print(markdown_table(results))
        print(f"\n{TEXT_TITLE}:\n\n{markdown_table(results, TEXT_COLUMNS)}\n")
        print("\n".join(results["notes"]))
        env = results["environment"]
        print(
            f"seed {cfg.seed}, torch {env['torch']}, {env['threads']} CPU threads, "
            f"world size {world}, {env['device']}; {env['cpu']} ({env['cpu_capability']})"
        )
        print(f"wrote {out}/results.json, report.md, tradeoff.png in {results['seconds']} s")
