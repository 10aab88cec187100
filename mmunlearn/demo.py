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

The torch thread count is pinned (``DemoConfig.threads``, 2): the table depends on it.
"""

from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import asdict, dataclass, field

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
from mmunlearn.loop import UnlearnConfig, unlearn
from mmunlearn.masks import build_masks
from mmunlearn.methods import METHODS, Method
from mmunlearn.models import adapter_for, build_tokenizer, save_model, tiny_llava
from mmunlearn.train import finetune


@dataclass
class DemoConfig:
    seed: int = 0
    device: str = "cpu"
    n_people: int = 40
    forget_ratio: float = 0.2
    vanilla_steps: int = 2500  # measured: VQA/QA MCQ 0.97–1.0 (seed 0); 400 steps stay at chance
    vanilla_lr: float = 1e-3  # 3e-3 left picture recognition at chance after 2500 steps
    hidden: int = 128
    vision_hidden: int = 64
    batch_size: int = 16
    unlearn_steps: int = 50  # forget steps per method (retain steps interleaved 1:1)
    unlearn_lr: float = 1e-3
    gamma: float = 1.0
    fraction: float | None = None  # exact top-k mask fraction per group instead of γ
    methods: list = field(default_factory=lambda: list(METHODS))
    # the reference an unlearned model is measured against: the vanilla recipe (same init,
    # steps, lr, seed) trained without the forget people's pictures (their text QA kept)
    reference: bool = True
    # torch CPU threads for the run (None: leave torch's setting). 2,500 fine-tuning steps sum
    # in a thread-count-dependent order, so the vanilla model, the γ = 1 mask coverage (34 % at
    # 2 threads, 18 % at 1, seed 0) and the whole table depend on it (docs/demo_grid.md)
    threads: int | None = 2
    mixed_precision: str = "none"  # under torchrun (FSDP2): "none" or "bf16"
    # the linked world (run_linked_demo): AdamW steps per stage, lr decaying to 0 in each
    # (the gates pass on seeds 0-4 with these), the cap on forget steps while seeking matched
    # forgetting, and whether failed gates stop the run (off only for smoke configurations)
    stage_steps: dict = field(
        default_factory=lambda: {"text": 500, "identity": 800, "grounding": 800}
    )
    max_unlearn_steps: int = 200
    enforce_gates: bool = True
    save_models: bool = True
    progress: bool = True


def public(res: dict) -> dict:
    """An evaluation result without its private (``_``-prefixed) keys."""
    return {k: v for k, v in res.items() if not k.startswith("_")}


def run_demo(out: str = "runs/demo", cfg: DemoConfig | None = None) -> dict:
    """Run the whole comparison; returns the results dict also written to ``out``.

    Under torchrun (a process group of ``WORLD_SIZE > 1`` already started, as the CLI does)
    every model is FSDP2-sharded per block and trained on its ranks' rows of the same global
    batches; models are gathered one tensor at a time to rank 0, which evaluates them and
    writes every file (other ranks return ``{}``). ``cfg.threads`` is set for the run and
    restored afterwards."""
    return _pinned(_run_demo, out, cfg or DemoConfig())


def _pinned(fn, out: str, cfg: DemoConfig) -> dict:
    """``fn(out, cfg)`` with torch pinned to ``cfg.threads`` threads, restored afterwards."""
    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return fn(out, cfg)
    finally:
        torch.set_num_threads(before)


def _run_demo(out: str, cfg: DemoConfig) -> dict:
    t0 = time.time()
    dev = torch.device(cfg.device)
    world = world_size()
    sharded = world > 1
    rank0 = is_rank0()
    progress = cfg.progress and rank0
    torch.manual_seed(cfg.seed)
    bench = make_benchmark(n_people=cfg.n_people, forget_ratio=cfg.forget_ratio, seed=cfg.seed)
    sets = demo_eval_sets(bench, cloze_gen=True)
    model, tok, adapter = build_tiny(bench, cfg, dev)
    blocks = adapter.block_classes()

    def shard(m):
        fsdp.broadcast_from_rank0(m)  # every rank starts from rank 0's weights
        fsdp.shard_model(m, blocks, mixed_precision=cfg.mixed_precision)
        return m

    if sharded:
        shard(model)
    finetune(
        model,
        adapter,
        bench.train,
        cfg.vanilla_steps,
        cfg.vanilla_lr,
        cfg.batch_size,
        cfg.seed,
        dev,
        progress,
    )
    # MCQ by option likelihood (the main table), cloze and greedy generation (ROUGE / BLEU:
    # the second table); the letter MCQ is left out: this tiny model is never taught letters
    ecfg = EvalConfig(
        batch_size=32, seed=cfg.seed, letter_mcq=False, generation=True, progress=False
    )

    def evaluate_and_save(m, name, state=None):
        """Evaluate (rank 0; a sharded model is gathered into an unsharded copy first, unless
        its full ``state`` is given) and save the model under out/name."""
        if sharded:
            if state is None:
                state = fsdp.full_state_dict(m)  # every rank: collective
            if not rank0:
                return None
            m = tiny_model(tok, cfg, dev)
            m.load_state_dict(state)
            m.eval()
        res = public(evaluate(m, adapter.collate, tok, sets, ecfg))
        if cfg.save_models:
            save_model(m, tok, os.path.join(out, name))
        return res

    results = {
        "methods": {},
        "config": asdict(cfg),
        "environment": environment(dev, world),
    }
    # gathered once, to every rank: evaluated here, and the start of every method's copy
    vanilla_state = fsdp.full_state_dict(model, to_all=True) if sharded else None
    results["methods"]["vanilla"] = evaluate_and_save(model, "vanilla", vanilla_state)

    def fresh(requires_grad=True):
        """A working copy of the vanilla model (sharded like it under torchrun)."""
        if not sharded:
            return copy.deepcopy(model)
        m = tiny_model(tok, cfg, dev)
        m.load_state_dict(vanilla_state)
        return shard(m).requires_grad_(requires_grad)

    rng = random.Random(cfg.seed)
    bs = cfg.batch_size
    data = synthetic_sets(bench)
    forget = to_device(make_batches(adapter, data.forget, bs, rng, cfg.unlearn_steps), dev)
    retain_mm = to_device(make_batches(adapter, data.retain, bs, rng, cfg.unlearn_steps), dev)
    # saliency (method.md §2): vision group vs multimodal retain; language group vs the forget
    # people's text QA + multimodal retain; both = union
    f_b = to_device(make_batches(adapter, data.forget, bs, rng), dev)
    v_pres = to_device(make_batches(adapter, data.vision_preserve, bs, rng), dev)
    l_pres = to_device(make_batches(adapter, data.language_preserve, bs, rng), dev)
    masks = build_masks(
        model, f_b, v_pres, l_pres, gamma=cfg.gamma, fraction=cfg.fraction, progress=progress
    )
    coverage = {k: m.coverage()["total"] for k, m in masks.items()}
    results["mask_coverage"] = coverage
    if cfg.save_models and rank0:
        masks["both"].save(os.path.join(out, "mask_both.safetensors"))

    ucfg = UnlearnConfig(
        lr=cfg.unlearn_lr,
        weight_decay=0.0,
        max_grad_norm=1.0,
        forget_freq=1,
        lr_schedule="constant",
        seed=cfg.seed,
        progress=progress,
    )
    for name in cfg.methods:
        m = fresh()
        kw = {}
        if name == "mmunlearner":
            kw["masks"] = masks["both"].for_model(m)
        if sharded and Method(name).needs_reference:
            kw["ref_model"] = fresh(requires_grad=False).eval()
        unlearn(m, name, forget, retain_mm, config=ucfg, **kw)
        results["methods"][name] = evaluate_and_save(m, name)
        del m, kw
    if cfg.reference:
        # same init (the model is rebuilt from the seed), recipe and batch order; the forget
        # people's pictures left out
        ref = tiny_model(tok, cfg, dev)
        if sharded:
            shard(ref)
        pictures = {id(s) for s in bench.forget_vqa}
        kept = [s for s in bench.train if id(s) not in pictures]
        finetune(
            ref,
            adapter,
            kept,
            cfg.vanilla_steps,
            cfg.vanilla_lr,
            cfg.batch_size,
            cfg.seed,
            dev,
            progress,
        )
        results["methods"]["reference"] = evaluate_and_save(ref, "reference")
    results["seconds"] = round(time.time() - t0, 1)
    results["protocol"] = ecfg.__dict__
    cov = ", ".join(f"{k} {100 * v['fraction']:.1f} %" for k, v in coverage.items())
    rule = f"γ = {cfg.gamma:g}" if cfg.fraction is None else f"top-k {cfg.fraction:g}"
    results["notes"] = [f"Mask coverage ({rule}): {cov} of the weights."]
    if cfg.reference:
        results["notes"].append(
            "reference: the vanilla recipe (same init, steps, lr, batch order) trained without "
            "the forget people's pictures; what an ideal visual unlearning would reach "
            "(forget VQA near it, not below it: below chance the answer is avoided, "
            "not forgotten)."
        )
    if not rank0:
        return {}
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
    return results


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else ``platform.processor()``)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(dev, world: int) -> dict:
    """What the demo's numbers depend on besides the seed: the fine-tune is chaotic enough that
    the summation order matters, and that is set by the thread count and by the vector width
    ATen/oneDNN/MKL pick for this CPU (AVX2 vs AVX-512: README, "Same seed, other CPU")."""
    cap = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "world_size": world,
        "device": str(dev),
        "cpu": cpu_name(),
        "cpu_capability": cap() if cap else "unknown",
    }


def build_tiny(bench, cfg: DemoConfig, dev):
    """Tokenizer trained on the benchmark's text (training items and every MCQ option) and a
    tiny LLaVA of the demo's size on ``dev``; returns (model, tokenizer, adapter)."""
    texts = [s.question + " " + s.answer for s in bench.train]
    for v in demo_eval_sets(bench).values():
        for s in v["mcq"]:
            texts += [s.question] + [str(o) for o in s.meta["options"].values()]
    tok = build_tokenizer(texts, vocab_size=4096)
    model = tiny_model(tok, cfg, dev)
    return model, tok, adapter_for(model, tok)


def tiny_model(tok, cfg: DemoConfig, dev):
    """The demo's tiny LLaVA for ``tok`` (initialised from ``cfg.seed``) on ``dev``."""
    return tiny_llava(
        tok,
        seed=cfg.seed,
        hidden=cfg.hidden,
        intermediate=2 * cfg.hidden,
        vision_hidden=cfg.vision_hidden,
    ).to(dev)


def demo_eval_sets(bench, cloze_gen: bool = False) -> dict:
    """Evaluation sets of the demo: forget / forget_test / forget_link and the same for
    retain (see :meth:`SyntheticBenchmark.eval_sets`); MCQ only (the sweep, and the tokenizer's
    training text), or with the cloze and generation items too (``cloze_gen``: the demo)."""
    keep = ("mcq", "cloze", "gen") if cloze_gen else ("mcq",)
    return {k: {w: v[w] for w in keep} for k, v in bench.eval_sets().items()}


# ---------------------------------------------------------------------------------------------
# the linked world: every method at matched forgetting
# ---------------------------------------------------------------------------------------------

# the trade-off plot: forgetting (x; matched: near the reference's line) against what is kept
