"""Peak memory per rank, by phase, for saliency and unlearning runs (FSDP2 sharding).

A planning tool: ``mmunlearn estimate --model DIR_OR_CONFIG --world-size N``. The parameter
count comes from building the model on the ``meta`` device from its config (no weights, no
download); the rest is arithmetic, stated per term so it can be checked:

- weights / grads: ``P·b / N`` (FSDP2 shards both; ``b`` = bytes of the parameter dtype), plus
  the largest block all-gathered in full (×2: current + prefetched) during forward/backward;
- AdamW moments: ``2·4·P / N`` (fp32, whatever the parameter dtype); mask ``P / 8 / N``;
- Fisher (saliency phase): two fp32 accumulators (forget, preserve) ``2·4·P / N``;
- reference model (KL_Min, NPO): ``P·b / N`` frozen weights;
- activations (Korthikanti et al. 2022, per decoder layer, 16-bit): ``s·b·h·(34 + 5·a·s/h)``
  bytes without checkpointing; with checkpointing ``2·s·b·h`` per layer plus one layer in full;
  plus fp32 logits and their gradient ``2·4·b·s·V``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def _load_config(model: str):
    from transformers import AutoConfig

    if os.path.isdir(model):
        return AutoConfig.from_pretrained(model, local_files_only=True)
    if os.path.isfile(model):
        with open(model) as f:
            d = json.load(f)
        return AutoConfig.for_model(**d)
    raise ValueError(f"--model must be a model directory or a config.json file, got {model!r}")


def _text_dims(cfg):
    t = getattr(cfg, "text_config", None) or cfg
    return dict(
        hidden=t.hidden_size,
        layers=t.num_hidden_layers,
        heads=t.num_attention_heads,
        vocab=t.vocab_size,
    )


def count_parameters(cfg) -> tuple[int, int]:
    """(total parameters, parameters of the largest repeated block) of a config's model."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    with torch.device("meta"):
        try:
            model = AutoModelForImageTextToText.from_config(cfg)
        except ValueError:
            model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    largest = 0
    for m in model.modules():
        name = type(m).__name__
        if name.endswith(("DecoderLayer", "EncoderLayer", "Block")):
            largest = max(largest, sum(p.numel() for p in m.parameters()))
    return total, largest


@dataclass
class Estimate:
    phase: str
    terms: dict  # name → bytes per rank

    @property
    def total(self) -> int:
        return int(sum(self.terms.values()))


def estimate(
    cfg,
    world_size: int = 1,
    dtype: str = "bf16",
    batch: int = 4,
    seq: int = 1024,
    method: str = "mmunlearner",
    grad_checkpointing: bool = False,
) -> list[Estimate]:
    """Per-rank byte estimates for the saliency and unlearning phases."""
    b = _DTYPE_BYTES[dtype]
    P, block = count_parameters(cfg)
    d = _text_dims(cfg)
    N = world_size
    s, h, a, L, V = seq, d["hidden"], d["heads"], d["layers"], d["vocab"]
    per_layer = s * batch * h * (34 + 5 * a * s / h) * (b / 2)
    acts = (L * 2 * s * batch * h * b + per_layer) if grad_checkpointing else L * per_layer
    logits = 2 * 4 * batch * s * V
    common = {
        "weights (sharded)": P * b / N,
        "unsharded blocks (2 in flight)": 2 * block * b if N > 1 else 0,
        "grads (sharded)": P * b / N,
        "activations": acts,
        "logits + grad (fp32)": logits,
    }
    sal = Estimate("saliency", {**common, "fisher accumulators (2 × fp32)": 8 * P / N})
    unl_terms = {**common, "AdamW moments (fp32)": 8 * P / N, "mask (1 bit)": P / 8 / N}
    if method in ("kl_min", "npo"):
        unl_terms["reference model (frozen)"] = P * b / N
        unl_terms["reference logits (fp32)"] = 4 * batch * s * V
    return [sal, Estimate("unlearning", unl_terms)]


def format_report(ests: list[Estimate], params: int, world_size: int) -> str:
    gib = 1024**3
    lines = [
        f"parameters: {params:,}; world size {world_size}",
        "",
        "| phase | term | GiB per rank |",
        "|---|---|---:|",
    ]
    for e in ests:
        for k, v in e.terms.items():
            lines.append(f"| {e.phase} | {k} | {v / gib:.3f} |")
        lines.append(f"| {e.phase} | **peak (sum)** | **{e.total / gib:.3f}** |")
    return "\n".join(lines)
