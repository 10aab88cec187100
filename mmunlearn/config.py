"""One run configuration: every setting of an unlearning run, in one frozen dataclass.

:class:`RunConfig` is what the loop reads (:func:`mmunlearn.loop.unlearn`), what a recipe
returns (:mod:`mmunlearn.presets`: ``mmunlearn`` and ``official`` are functions building one),
what the command line and ``--config`` files build (every field with a flag becomes an option
of ``mmunlearn unlearn`` / ``saliency`` through :func:`mmunlearn.cli.common.add_run_options`),
what the demo and the experiments build, and what a run saves and its resume compares. There
is no second copy of these settings anywhere: a new field added here reaches the loop from the
CLI, a config file and the Python API with no other edit. Overrides are
``dataclasses.replace(cfg, lr=3e-4)``.

Each field's ``metadata`` says how it is exposed:

- ``group``: where its option sits in ``--help`` and which commands have it (:data:`GROUPS`);
- ``commands``: the commands that have it when not all of its group's (``forget_freq`` is in
  the schedule group but means nothing to ``finetune``);
- ``help``: the option's help text;
- ``flag``: the option name when it is not the field's (``max_steps`` is ``--steps``);
- ``choices``: the accepted values (checked here too, for the API);
- ``identity``: False for settings a resume may change (logging, workers, backend, ...);
- ``many``: a comma-separated list; the option may be repeated (``--report-to a --report-to b``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from mmunlearn.methods import KL_FORMS, METHODS, NPO_FORMS, OPTION_RANGES, check_method_options

RECIPES = ("mmunlearn", "official")
REPORTERS = ("tensorboard", "wandb", "mlflow")

# option groups: (title in --help, commands that have it)
GROUPS = {
    "recipe": ("recipe", ("saliency", "unlearn")),
    "fisher": ("saliency (Fisher pass)", ("saliency", "unlearn")),
    "optimizer": ("optimizer", ("unlearn", "finetune")),
    "schedule": ("schedule", ("unlearn", "finetune")),
    "mask": ("masked steps", ("unlearn",)),
    "method": ("method's loss", ("unlearn",)),
    "watch": ("watching the run", ("unlearn", "finetune")),
    "lora": ("LoRA (baselines only; PEFT)", ("unlearn",)),
    "system": ("system", ("saliency", "unlearn", "finetune")),
}


def _f(default, group: str, help: str, *, flag=None, choices=None, identity=True, cli=True,
       many=False, commands=None):  # fmt: skip
    meta = {"group": group, "help": help, "identity": identity, "cli": cli, "many": many}
    if commands:
        meta["commands"] = tuple(commands)
    if flag:
        meta["flag"] = flag
    if choices:
        meta["choices"] = tuple(choices)
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    """Every setting of an unlearning run (defaults: ours, the ``mmunlearn`` recipe at the
    paper's lr). Build one with :func:`mmunlearn.presets.resolve` for a recipe, or directly."""

    recipe: str = _f("mmunlearn", "recipe", "the preset these settings came from",
                     choices=RECIPES, cli=False)  # fmt: skip
    # optimizer
    lr: float = _f(1e-5, "optimizer", "peak learning rate (the paper: 1e-5)")
    weight_decay: float = _f(0.0, "optimizer", "AdamW decoupled weight decay")
    betas: tuple = _f((0.9, 0.999), "optimizer", "Adam β1 β2", cli=False)
    eps: float = _f(1e-8, "optimizer", "Adam ε (the official code: transformers' AdamW, 1e-6)")
    max_grad_norm: float | None = _f(1.0, "optimizer", "clip the global gradient norm of "
                                     "forget steps (finetune: of every step; none: no "
                                     "clipping)")  # fmt: skip
    retain_max_grad_norm: float | str | None = _f(
        "same",
        "optimizer",
        "clip of retain steps: a number, none, or same (as --max-grad-norm)",
        commands=("unlearn",),
    )
    state_dtype: str = _f("fp32", "optimizer", "Adam moments' dtype: fp32, or bf16 written "
                          "with stochastic rounding (half the optimizer memory)",
                          choices=("fp32", "bf16"))  # fmt: skip
    param_sr: bool | None = _f(None, "optimizer", "write bf16 parameters with stochastic "
                               "rounding, so updates below half an ulp are not lost "
                               "(default: on with bf16 state)")  # fmt: skip
    compact_state: bool = _f(False, "optimizer", "keep moments only for the masked elements "
                             "(only for runs where every step is masked)",
                             commands=("unlearn",))  # fmt: skip
    grad_release: bool = _f(False, "optimizer", "step each parameter as soon as its gradient "
                            "is complete and free the gradient (one gradient alive; clipping "
                            "becomes per parameter; needs grad_accum 1, no FSDP2)")  # fmt: skip
    backend: str = _f("auto", "system", "kernel backend (auto: Triton on CUDA, the C kernels "
                      "on the CPU; torch: the PyTorch twins)",
                      choices=("auto", "torch", "triton", "cpu"), identity=False)  # fmt: skip
    # schedule
    batch_size: int = _f(4, "schedule", "samples per batch")
    grad_accum: int = _f(1, "schedule", "batches per optimizer step")
    epochs: int = _f(1, "schedule", "passes over the retain set (forget set for GA / "
                     "NPO; finetune: the training set)")  # fmt: skip
    forget_freq: int | None = _f(None, "schedule", "a forget step every N retain steps "
                                 "(default: len(retain) // len(forget))",
                                 commands=("unlearn",))  # fmt: skip
    forget_cap: bool = _f(False, "schedule", "each forget batch at most once per epoch "
                          "(the official loop)", commands=("unlearn",))  # fmt: skip
    lr_schedule: str = _f("linear", "schedule", "lr decays linearly to 0, or stays",
                          choices=("linear", "constant"))  # fmt: skip
    schedule_unit: str = _f("step", "schedule", "the lr scheduler steps every step or every "
                            "epoch (official)", choices=("step", "epoch"))  # fmt: skip
    max_steps: int | None = _f(None, "schedule", "stop after N steps", flag="--steps")
    seed: int = _f(0, "system", "seed of every random draw")
    # masked steps
    mask_mode: str = _f("masked_step", "mask", "masked_step: only salient weights move, the "
                        "rest untouched; zero_grad: the official grad *= mask then a plain step",
                        choices=("masked_step", "zero_grad"))  # fmt: skip
    mask_filter: str = _f("all", "mask", "mask every trainable tensor, or only the official "
                          "keyword names (proj, fc, linear, mlp, qkv)",
                          choices=("all", "official"))  # fmt: skip
    clip_order: str = _f("clip_then_mask", "mask", "clip the whole gradient, then mask "
                         "(official), or clip the masked gradient",
                         choices=("clip_then_mask", "mask_then_clip"))  # fmt: skip
    unmasked: str = _f("freeze", "mask", "parameters without a mask on masked steps: frozen, "
                       "or updated", choices=("freeze", "update"))  # fmt: skip
    # loss
    loss_tokens: str = _f("answer", "method", "tokens that carry the loss",
                          choices=("answer", "all", "all_with_image"),
                          commands=("unlearn", "finetune"))  # fmt: skip
    alpha: float = _f(1.0, "method", "ascent weight α of the forget loss")
    beta: float = _f(0.4, "method", "NPO's β")
    kl: str = _f("answer_mean", "method", "KL_Min's KL term", choices=KL_FORMS)
    npo: str = _f("sequence", "method", "NPO's log-ratio", choices=NPO_FORMS)
    rmu_layer: int = _f(7, "method", "RMU: the language model's decoder layer whose output is "
                        "steered (0-based; negative: from the end)")  # fmt: skip
    rmu_coeff: float = _f(20.0, "method", "RMU: steering coefficient c, the norm of the "
                          "random target of forget activations")  # fmt: skip
    rmu_alpha: float = _f(100.0, "method", "RMU: weight α of the retain activation loss")
    undial_strength: float = _f(10.0, "method", "UNDIAL: γ, how far the true token's logit is "
                                "lowered in the reference's target")  # fmt: skip
    manu_percent: float = _f(10.0, "method", "MANU: percent of each modality's MLP neurons "
                             "pruned (the top by forget/retain activation ratio)")  # fmt: skip
    manu_layers: int = _f(3, "method", "MANU: its neurons are the MLPs' of the last N blocks of "
                          "the vision encoder and of the language model")  # fmt: skip
    smfa_multi_k: float = _f(5.0, "method", "SMFA: sculpting threshold k of the multimodal "
                             "forget update (larger: fewer elements zeroed)")  # fmt: skip
    smfa_text_k: float = _f(10.0, "method", "SMFA: sculpting threshold k of the text-only "
                            "forget update")  # fmt: skip
    mip_topk: int = _f(5, "method", "MIP-Editor: input channels edited (zeroed and held) per "
                       "FFN output projection")  # fmt: skip
    mip_batches: int = _f(4, "method", "MIP-Editor: forget batches that score the paths")
    mip_coeff: float = _f(1.0, "method", "MIP-Editor: norm c of the random steering target "
                          "of the last FFN output on forget tokens")  # fmt: skip
    mip_forget_weight: float = _f(5.0, "method", "MIP-Editor: weight of the steering loss "
                                  "(Open-MMunlearning: forget_beta·control_coeff)")  # fmt: skip
    mip_retain_weight: float = _f(0.5, "method", "MIP-Editor: weight of the retain CE "
                                  "(Open-MMunlearning: gamma·retain_alpha)")  # fmt: skip
    # Fisher pass (saliency)
    fisher_batch_size: int = _f(16, "fisher", "samples per Fisher batch")
    fisher_loss_tokens: str = _f("answer", "fisher", "tokens that carry the Fisher pass's loss",
                                 choices=("answer", "all", "all_with_image"))  # fmt: skip
    fisher_parity: bool = _f(False, "fisher", "square gradients on the CPU in the parameter's "
                             "dtype, as the official code")  # fmt: skip
    language_preserve: str = _f("forget_text", "fisher", "the language mask's preserve set: "
                                "the forget people's text QA, or every profile's (official)",
                                choices=("forget_text", "all_text"))  # fmt: skip
    grad_checkpointing: bool = _f(False, "system", "recompute activations in backward (less "
                                  "memory, ≈30 %% more time)", flag="--gradient-checkpointing",
                                  identity=False)  # fmt: skip
    workers: int = _f(0, "system", "DataLoader worker processes", identity=False)
    # watching the run
    checkpoint_every: int = _f(0, "watch", "steps between checkpoints (0: at the end)",
                               identity=False)  # fmt: skip
    log_every: int = _f(1, "watch", "steps between reading the loss back (a host sync) and "
                        "logging it", identity=False)  # fmt: skip
    eval_every: int = _f(0, "watch", "steps between evaluations (0: never)", identity=False,
                         commands=("unlearn",))  # fmt: skip
    report_to: str = _f("none", "watch", "where to log besides log.jsonl: none, or any of "
                        "tensorboard, wandb (offline unless WANDB_MODE is set), mlflow (a file "
                        "store under the run folder unless MLFLOW_TRACKING_URI is set), comma-"
                        "separated or repeated", identity=False, many=True)  # fmt: skip
    progress: bool = _f(True, "watch", "a progress bar", identity=False, cli=False)
    # LoRA (the official baselines'; MLLMU-Bench's values are the defaults)
    lora: bool = _f(False, "lora", "train a LoRA adapter, not every weight (GA, GA_Diff, "
                    "KL_Min, NPO; not MMUnlearner: its mask is over base weights)")  # fmt: skip
    lora_r: int = _f(16, "lora", "LoRA rank (MLLMU-Bench: 16)")
    lora_alpha: float = _f(16.0, "lora", "LoRA α (MLLMU-Bench: 16)")
    lora_dropout: float = _f(0.05, "lora", "LoRA dropout (MLLMU-Bench: 0.05)")
    lora_targets: str = _f("mllmu", "lora", "modules to adapt: mllmu (MLLMU-Bench's rule: "
                           "every linear layer named like one outside the projector and "
                           "vision model, but lm_head), or names (PEFT suffixes), A,B")  # fmt: skip
    lora_save: str = _f("merged", "lora", "write the model with the adapter merged in, or the "
                        "adapter alone (loads onto its base)", choices=("merged", "adapter"),
                        identity=False)  # fmt: skip

    def __post_init__(self):
        object.__setattr__(self, "report_to", ",".join(report_targets(self.report_to)) or "none")
        for f in fields(self):
            v, ok = getattr(self, f.name), f.metadata.get("choices")
            if ok and v not in ok:
                raise ValueError(f"{f.name} must be one of {', '.join(ok)}, got {v!r}")
        for name in ("lr", "alpha", "beta", "eps", "lora_alpha"):
            _positive(name, getattr(self, name))
        for name in ("batch_size", "grad_accum", "epochs", "log_every", "fisher_batch_size",
                     "lora_r"):  # fmt: skip
            _at_least(name, getattr(self, name), 1)
        for name in ("forget_freq", "max_steps"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        for name in ("workers", "checkpoint_every", "eval_every"):
            _at_least(name, getattr(self, name), 0)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number ≥ 0, got {self.weight_decay}")
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm)
        r = self.retain_max_grad_norm
        if r is not None and r != "same":
            if isinstance(r, str):
                raise ValueError(f"retain_max_grad_norm must be a number, None or 'same': {r!r}")
            _positive("retain_max_grad_norm", r)
        if self.grad_release and self.grad_accum != 1:
            raise ValueError(
                f"grad_release steps each parameter inside backward, so it cannot accumulate "
                f"gradients: grad_accum must be 1 (got {self.grad_accum})"
            )
        if self.grad_release and self.mask_mode == "zero_grad":
            raise ValueError(
                "grad_release needs mask_mode masked_step: zero_grad's mask multiply and "
                "global clip need every gradient before any parameter steps"
            )
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not str(self.lora_targets).strip(","):
            raise ValueError("lora_targets must be mllmu or module names, got nothing")
        check_method_options(**{k: getattr(self, k) for k in OPTION_RANGES})
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")

    @property
    def retain_clip(self) -> float | None:
        """The clip of retain steps (``retain_max_grad_norm``, "same" resolved)."""
        r = self.retain_max_grad_norm
        return self.max_grad_norm if r == "same" else r

    def method_for(self, name: str):
        """The :class:`~mmunlearn.methods.Method` ``name`` with this config's loss forms."""
        from mmunlearn.methods import Method

        return Method(name, alpha=self.alpha, beta=self.beta, kl=self.kl, npo=self.npo,
                      rmu_layer=self.rmu_layer, rmu_coeff=self.rmu_coeff,
                      rmu_alpha=self.rmu_alpha, undial_strength=self.undial_strength,
                      manu_percent=self.manu_percent, manu_layers=self.manu_layers,
                      smfa_multi_k=self.smfa_multi_k, smfa_text_k=self.smfa_text_k,
                      mip_topk=self.mip_topk, mip_batches=self.mip_batches,
                      mip_coeff=self.mip_coeff, mip_forget_weight=self.mip_forget_weight,
                      mip_retain_weight=self.mip_retain_weight, seed=self.seed)  # fmt: skip

    def to_dict(self) -> dict:
        """Every setting, JSON-able (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def identity(self) -> dict:
        """The settings that define the run (a resume must match them): every field whose
        ``identity`` metadata is true."""
        d = self.to_dict()
        return {f.name: d[f.name] for f in fields(self) if f.metadata.get("identity", True)}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """The config saved by :meth:`to_dict` (unknown keys: ValueError naming them)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown run setting {unknown[0]!r}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def report_targets(value) -> tuple[str, ...]:
    """The reporters of a ``report_to`` value (``"tensorboard,wandb"``, a list, ``"none"``), in
    order, each once; ValueError naming an unknown one."""
    items = value if isinstance(value, (list, tuple)) else str(value or "none").split(",")
    names = [str(x).strip().lower() for x in items if str(x).strip()]
    out = []
    for n in names:
        if n not in (*REPORTERS, "none"):
            raise ValueError(f"report_to must name none or {', '.join(REPORTERS)}, got {n!r}")
        if n != "none" and n not in out:
            out.append(n)
    if "none" in names and out:
        raise ValueError(f"report_to: none together with {', '.join(out)}")
    return tuple(out)


def _positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")


def _at_least(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer ≥ {lo}, got {v!r}")


def cli_fields(command: str) -> list:
    """The fields that are options of ``command`` (``saliency`` / ``unlearn`` / ``finetune``),
    in order."""
    return [
        f
        for f in fields(RunConfig)
        if f.metadata.get("cli", True)
        and command in f.metadata.get("commands", GROUPS[f.metadata["group"]][1])
    ]


__all__ = ["GROUPS", "METHODS", "RECIPES", "REPORTERS", "RunConfig", "cli_fields", "report_targets"]
