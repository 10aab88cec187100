"""The toolkit of tiny runs: one configuration (:class:`TinyRunConfig`), the tiny LLaVA and its
tokenizer for a built-in world (:func:`build_tiny`, :func:`tiny_model`), thread pinning
(:func:`pinned_threads`) and the environment a result depends on (:func:`environment`). Used by
the demo (:mod:`mmunlearn.demo`, :mod:`mmunlearn.demo_linked`), the ``--tiny`` model of the
CLI and the experiments."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from mmunlearn.config import RunConfig
from mmunlearn.methods import PAPER_METHODS
from mmunlearn.models import adapter_for, build_tokenizer, tiny_llava


@dataclass
class TinyRunConfig:
    """Every setting of a tiny run (the demo, the sweep, the fidelity study): the world, the
    tiny model, its vanilla training, the masks, and the unlearning run (``unlearn``, a
    :class:`~mmunlearn.config.RunConfig`; its seed is this config's ``seed``)."""

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
    # the unlearning run of every method: lr 1e-3, a forget step before every retain step,
    # constant lr (the other settings: RunConfig's)
    unlearn: RunConfig = field(
        default_factory=lambda: RunConfig(lr=1e-3, forget_freq=1, lr_schedule="constant")
    )
    gamma: float = 1.0
    fraction: float | None = None  # exact top-k mask fraction per group instead of γ
    methods: list = field(default_factory=lambda: list(PAPER_METHODS))
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

    def run_config(self, **overrides) -> RunConfig:
        """``unlearn`` with this config's seed (and ``overrides``)."""
        return replace(self.unlearn, seed=self.seed, **overrides)


def depth_settings(model) -> dict:
    """The layer-indexed methods' settings at a tiny model's depth (their defaults name the
    layers of a 7B model): RMU's layer in the middle of the language model, MANU over the last
    min(3, depth) blocks of each side. The paper's five methods do not read them."""
    cfg = model.config
    text = cfg.text_config.num_hidden_layers
    vision = getattr(getattr(cfg, "vision_config", None), "num_hidden_layers", text)
    return {"rmu_layer": text // 2, "manu_layers": max(1, min(3, text, vision))}


def pinned_threads(fn, *args, threads: int | None):
    """``fn(*args)`` with torch pinned to ``threads`` CPU threads (None or 0: left as it is),
    restored afterwards. Tiny runs sum in a thread-count-dependent order, so their results
    depend on it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def public(res: dict) -> dict:
    """An evaluation result without its private (``_``-prefixed) keys."""
    return {k: v for k, v in res.items() if not k.startswith("_")}


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


def build_tiny(bench, cfg: TinyRunConfig, dev):
    """Tokenizer trained on the benchmark's text (training items and every MCQ option) and a
    tiny LLaVA of the demo's size on ``dev``; returns (model, tokenizer, adapter)."""
    texts = [s.question + " " + s.answer for s in bench.train]
    for v in demo_eval_sets(bench).values():
        for s in v["mcq"]:
            texts += [s.question] + [str(o) for o in s.meta["options"].values()]
    tok = build_tokenizer(texts, vocab_size=4096)
    model = tiny_model(tok, cfg, dev)
    return model, tok, adapter_for(model, tok)


def tiny_model(tok, cfg: TinyRunConfig, dev):
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


__all__ = [
    "TinyRunConfig",
    "build_tiny",
    "cpu_name",
    "demo_eval_sets",
    "depth_settings",
    "environment",
    "pinned_threads",
    "public",
    "tiny_model",
]
