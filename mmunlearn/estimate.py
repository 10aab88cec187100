"""Peak memory per rank, by phase, for saliency and unlearning runs (FSDP2 sharding).

A planning tool: ``mmunlearn estimate --model DIR_OR_CONFIG --world-size N``. The parameter
count comes from building the model on the ``meta`` device from its config (no weights, no
download); the rest is arithmetic, stated per term so it can be checked:

- weights / grads: ``P·b / N`` (FSDP2 shards both; ``b`` = bytes of the parameter dtype), plus
  the largest block all-gathered in full (×2: current + prefetched) during forward/backward;
- AdamW moments: ``2·4·P / N`` (fp32 state, whatever the parameter dtype), ``2·2·P / N`` (bf16
  state), times the selected fraction with compacted state; mask ``P / 8 / N``;
- Fisher (saliency phase): two fp32 accumulators (forget, preserve) ``2·4·P / N``;
- reference model (KL_Min, NPO): ``P·b / N`` frozen weights;
- activations: see below (:func:`activation_terms`); not sharded (per-rank batch).

Activations
-----------
The textbook count (Korthikanti et al. 2022, ``s·b·h·(34 + 5·a·s/h)`` bytes per layer at
16 bit) is for a GPT-style layer (LayerNorm, 4h GELU MLP, dropout masks, unfused attention).
Hugging Face Llama/LLaVA layers differ on every point, so the count here is derived from what
autograd really saves in those layers (read off ``saved_tensors_hooks`` on CPU, see
``docs/estimate.md``). Per token, with ``b`` = bytes of the dtype, ``h`` hidden, ``i``
intermediate, ``a`` heads, ``k = a_kv·head_dim`` (GQA), ``s`` sequence:

- RMSNorm (Llama): ``(4 + 2b)·h + 4`` — the fp32 upcast of the input, the normalised input
  in the dtype before and after the weight, the fp32 ``rsqrt``;
  LayerNorm (CLIP): ``2b·h + 8`` — input, output, fp32 mean / rstd;
- attention, fused (``sdpa``, flash): ``b·(2h + 2k) + 4a`` — q, k, v (k, v at the GQA width:
  the kernels take them un-repeated), the output (``o_proj`` saves a view of it), the fp32
  log-sum-exp; no ``s²`` term;
- attention, ``eager``: ``4b·h + (4 + b')·a·s`` — q, k, v repeated to ``h`` (``repeat_kv``),
  the output made contiguous, the fp32 softmax output and, below fp32 (``b' = b``, else 0),
  its cast back to the dtype: the ``s²`` term;
- MLP, SwiGLU (Llama): ``4b·i`` (gate, SiLU(gate), up, the product); GELU MLP: ``2b·i``,
  quick-GELU (CLIP): ``3b·i``;
- decoder layer = 2 RMSNorms + attention + MLP; CLIP layer = 2 LayerNorms + attention + MLP
  (``8b·h_v + 3b·i_v + …`` with sdpa).

Per model: the int64 token ids and labels, the final norm, RoPE ``cos``/``sin``
(``2·s·head_dim·b`` bytes), the logits in the dtype (held by the model output) and the fp32
log-softmax the Hugging Face loss saves after its ``.float()`` upcast (``(b + 4)·V`` per token;
``8·V`` at fp32, where the upcast is a no-op). Multimodal (LLaVA-style) configs add the vision
tower on ``n_img·(patches + 1)`` tokens per sample (only the layers up to
``vision_feature_layer``: the later ones are computed but leave no graph), the pixels, the
pre-LayerNorm and the projector (``b·(h_v + 2h)`` per image token); the image tokens are part of
``seq`` on the language side.

With gradient checkpointing (non-reentrant, as HF enables it) each checkpointed layer holds
only its input, ``b·h`` per token (``b·h_v`` in the vision tower); the eager causal mask
(``b·s²`` per sample) is kept alive for the recomputation.

The peak is reached during backward, on top of what is held at the end of forward: either at
the loss (fp32 grad of the log-probs + grad of the logits, ``8·V`` per token), or, later,
when the logits are freed, while one layer is recomputed in full (checkpointing) and its MLP
backward runs (two ``i``-wide grads, ``2b·i``; eager: the softmax backward, ``(4 + b)·a·s``,
once the MLP and second norm are freed), the fp32 log-softmax freed but the logits still held
by the model output: ``backward transient = max(loss, layer)``.
Measured on CPU (``tests/test_estimate.py``, ``docs/estimate.md``) the held bytes agree with
this count within ±2 % (LLaVA checkpointed: −8 %), the peak within ±1 % without checkpointing
and −1 … +10 % with it; one known miss (LLaVA, bf16, sdpa, checkpointed: some random sizes
peak ~6·V bytes per token higher at the loss). Allocator rounding / fragmentation is not in it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def load_config(model: str):
    """The model config of a checkpoint folder, a ``config.json`` file or a Hub id already in
    the local cache (only the config is read)."""
    from transformers import AutoConfig

    from mmunlearn.models.loading import resolve

    if os.path.isfile(model):
        with open(model) as f:
            d = json.load(f)
        return AutoConfig.for_model(**d)
    try:
        folder = resolve(model, "--model")
    except FileNotFoundError as e:
        raise ValueError(str(e)) from e
    return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)


def _text_dims(cfg):
    t = getattr(cfg, "text_config", None) or cfg
    return dict(
        hidden=t.hidden_size,
        layers=t.num_hidden_layers,
        heads=t.num_attention_heads,
        vocab=t.vocab_size,
    )


def _meta_model(cfg):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    with torch.device("meta"):
        try:
            return AutoModelForImageTextToText.from_config(cfg)
        except ValueError:
            return AutoModelForCausalLM.from_config(cfg)


def largest_parameter(cfg) -> int:
    """Elements of the config's largest parameter tensor (usually the embedding or the LM
    head): the gradient memory of a run with ``--grad-release``."""
    return max(p.numel() for p in _meta_model(cfg).parameters())


def count_parameters(cfg) -> tuple[int, int]:
    """(total parameters, parameters of the largest repeated block) of a config's model."""
    model = _meta_model(cfg)
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


_FUSED = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def _attn_impl(cfg, attn: str | None) -> str:
    if attn is None:
        # the explicitly set value only: older transformers report "eager" when it is unset
        attn = getattr(cfg, "_attn_implementation_internal", None) or "sdpa"
    if attn != "eager" and attn not in _FUSED:
        raise ValueError(f"attn must be 'eager' or one of {_FUSED}, got {attn!r}")
    return attn


def _rms_norm(h: int, b: int) -> float:
    """Bytes per token an HF RMSNorm saves: fp32 upcast, normed input (2×, dtype), fp32 rsqrt."""
    return (4 + 2 * b) * h + 4


def _layer_norm(h: int, b: int) -> float:
    """Bytes per token a LayerNorm saves: input, output, fp32 mean and rstd."""
    return 2 * b * h + 8


def _attention(h: int, kv: int, heads: int, s_kv: int, b: int, attn: str) -> float:
    """Bytes per token the attention saves (q, k, v, output, + softmax or log-sum-exp)."""
    if attn == "eager":
        probs = (4 + (b if b < 4 else 0)) * heads * s_kv
        return 4 * b * h + probs
    return b * (2 * h + 2 * kv) + 4 * heads


def _mlp(i: int, b: int, act: str, gated: bool) -> float:
    if gated:
        return 4 * b * i
    return (3 if act == "quick_gelu" else 2) * b * i


def _side(x) -> tuple[int, int]:
    """(height, width) of an int or a [height, width] size (InternVL's vision config)."""
    return (int(x[0]), int(x[-1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


def _vision_heads(v) -> int:
    for key in ("num_attention_heads", "attention_heads", "num_heads"):  # (Mllama, Qwen)
        if getattr(v, key, None):
            return int(getattr(v, key))
    return 1


def _vision(cfg):
    """(vision config, layers whose activations are held, tokens per image in the
    tower, image tokens per image in the text sequence) or None for a text-only config (and
    for vision configs without a fixed image size, e.g. Qwen's dynamic resolution)."""
    v = getattr(cfg, "vision_config", None)
    if v is None or not all(hasattr(v, k) for k in ("image_size", "patch_size", "hidden_size")):
        return None
    (ih, iw), (ph, pw) = _side(v.image_size), _side(v.patch_size)
    n_patch = (ih // ph) * (iw // pw)
    tower_tokens = n_patch + 1  # + CLS (CLIP); SigLIP has none: a 1-token overestimate
    fl = getattr(cfg, "vision_feature_layer", -1)
    fls = fl if isinstance(fl, (list, tuple)) else [fl]
    L_v = getattr(v, "num_hidden_layers", None) or getattr(v, "depth", 0)
    held = max((L_v + 1 + f) if f < 0 else f for f in fls)
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    text_tokens = tower_tokens if strategy == "full" else n_patch
    return v, held, tower_tokens, text_tokens


def activation_terms(
    cfg,
    dtype: str = "bf16",
    batch: int = 4,
    seq: int = 1024,
    grad_checkpointing: bool = False,
    attn: str | None = None,
    images_per_sample: int = 1,
) -> dict:
    """Activation bytes of one forward + backward, by named term (see the module docstring).

    ``seq`` is the language-side sequence length, image tokens included. The terms sum to
    the activation peak; ``held`` (= all terms but the backward transient) is what is alive
    at the end of the forward pass.
    """
    b = _DTYPE_BYTES[dtype]
    attn = _attn_impl(cfg, attn)
    t = getattr(cfg, "text_config", None) or cfg
    h, L, a, V = t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size
    hd = getattr(t, "head_dim", None) or h // a
    kv = (getattr(t, "num_key_value_heads", None) or a) * hd
    i = getattr(t, "intermediate_size", None) or 4 * h
    rms = hasattr(t, "rms_norm_eps")
    act = getattr(t, "hidden_act", "silu")
    gated = rms  # the RMSNorm families (Llama, Mistral, Qwen2, Gemma) have gated MLPs
    T = batch * seq
    norm = _rms_norm(h, b) if rms else _layer_norm(h, b)
    attn_b = _attention(a * hd, kv, a, seq, b, attn)
    mlp = _mlp(i, b, act, gated)
    full_layer = 2 * norm + attn_b + mlp
    terms = {}
    held_layer = b * h if grad_checkpointing else full_layer
    ck = ", checkpointed" if grad_checkpointing else ""
    terms[f"activations: {L} decoder layers ({attn}{ck})"] = L * held_layer * T
    fixed = 8 * T + norm * T + 8 * T + 2 * seq * hd * b  # ids, final norm, labels, rope
    if grad_checkpointing and attn == "eager":
        fixed += batch * seq * seq * b  # causal mask, kept for the recomputation
    terms["activations: embeddings, final norm, rope, labels"] = fixed
    recompute = full_layer * T
    vis = _vision(cfg)
    if vis is not None:
        v, L_v, n_tower, n_text = vis
        hv, av = v.hidden_size, _vision_heads(v)
        iv = getattr(v, "intermediate_size", None) or 4 * hv
        Tv = batch * images_per_sample * n_tower
        Ti = batch * images_per_sample * n_text
        v_layer = (
            2 * _layer_norm(hv, b)
            + _attention(hv, hv, av, n_tower, b, attn)
            + _mlp(iv, b, getattr(v, "hidden_act", "gelu"), False)
        )
        pixels = batch * images_per_sample * 3 * _side(v.image_size)[0] * _side(v.image_size)[1] * b
        pre_ln = (b * hv + 8) * Tv
        projector = b * (hv + 2 * h) * Ti
        v_held = (b * hv if grad_checkpointing else v_layer) * L_v * Tv
        terms[f"activations: vision tower ({L_v} layers × {n_tower} tokens{ck}) + projector"] = (
            v_held + pixels + pre_ln + projector + T  # + the bool image-token mask
        )
        recompute = max(recompute, v_layer * Tv)
    if b == 4:
        logits = 8 * V * T
        lname = "logits (fp32) + log-softmax (fp32)"
    else:
        logits = (b + 4) * V * T
        lname = f"logits ({dtype}) + log-softmax (fp32 upcast)"
    terms[lname] = logits
    loss_grads = 8 * V * T
    # backward of one layer, once the logits are freed: its MLP (two i-wide grads) or, eager,
    # its softmax (grad of the probabilities, fp32 grad of the scores: (4 + b)·a·s) after the
    # MLP and the second norm are freed
    layer_bwd = 2 * b * i
    if attn == "eager":
        layer_bwd = max(layer_bwd, (4 + b) * a * seq - mlp - norm)
    # the fp32 log-softmax is freed by then; the logits stay (the model output holds them)
    layer_phase = (recompute if grad_checkpointing else 0) + layer_bwd * T - 4 * V * T
    terms["backward transient (max: loss grads | recomputed layer + its grads)"] = max(
        loss_grads, layer_phase, 0
    )
    return {k: int(x) for k, x in terms.items()}


def activation_held(terms: dict) -> int:
    """Bytes alive at the end of the forward pass: every activation term but the transient."""
    return sum(v for k, v in terms.items() if not k.startswith("backward transient"))


def estimate(
    cfg,
    world_size: int = 1,
    dtype: str = "bf16",
    batch: int = 4,
    seq: int = 1024,
    method: str = "mmunlearner",
    grad_checkpointing: bool = False,
    attn: str | None = None,
    images_per_sample: int = 1,
    fisher_offload: bool = False,
    state_dtype: str = "fp32",
    compact_fraction: float | None = None,
    grad_release: bool = False,
) -> list[Estimate]:
    """Per-rank byte estimates for the saliency and unlearning phases.

    ``attn``: ``"eager"`` or a fused kernel (``"sdpa"``, flash); default: the config's
    attention implementation when one was set explicitly, else ``"sdpa"``.
    ``images_per_sample``: images per sequence for multimodal configs (their tokens are part of
    ``seq``). ``fisher_offload``: finished Fishers move to the CPU (``build_masks(offload=True)``),
    so one set of fp32 accumulators is on the device at a time. ``state_dtype``: the AdamW
    moments' dtype (``"fp32"``, or ``"bf16"`` with stochastic rounding: half the bytes);
    ``compact_fraction``: moments kept only for this fraction of the elements
    (``MaskedAdamW(compact_state=True)`` with a mask selecting it). ``grad_release``: the
    unlearning step runs inside backward (``unlearn --grad-release``), so one parameter's
    gradient — the largest — is alive at a time instead of all of them (one rank only).
    """
    if grad_release and world_size > 1:
        raise ValueError("grad_release runs on one rank (FSDP2 is not supported with it)")
    b = _DTYPE_BYTES[dtype]
    P, block = count_parameters(cfg)
    d = _text_dims(cfg)
    N = world_size
    V = d["vocab"]
    acts = activation_terms(cfg, dtype, batch, seq, grad_checkpointing, attn, images_per_sample)
    common = {
        "weights (sharded)": P * b / N,
        "unsharded blocks (2 in flight)": 2 * block * b if N > 1 else 0,
        "grads (sharded)": P * b / N,
        **acts,
    }
    if fisher_offload and N == 1:  # (FSDP2 shards the Fisher instead)
        fisher = {"fisher accumulators (1 × fp32; the finished one on the CPU)": 4 * P / N}
    else:
        fisher = {"fisher accumulators (2 × fp32)": 8 * P / N}
    sal = Estimate("saliency", {**common, **fisher})
    per = 8 if state_dtype == "fp32" else 4
    label = f"AdamW moments ({state_dtype})"
    if compact_fraction is not None:
        per *= compact_fraction
        label = f"AdamW moments ({state_dtype}, compacted to {100 * compact_fraction:g} %)"
    unl_terms = {**common, label: per * P / N, "mask (1 bit)": P / 8 / N}
    if grad_release:
        del unl_terms["grads (sharded)"]
        unl_terms["grads (one tensor at a time: step in backward)"] = largest_parameter(cfg) * b
    if method in ("kl_min", "npo", "undial", "rmu"):
        unl_terms["reference model (frozen)"] = P * b / N
    if method in ("kl_min", "npo", "undial"):
        unl_terms["reference logits (fp32)"] = 4 * batch * seq * V
    elif method == "rmu":  # the forward stops at its layer: the reference's hidden states only
        unl_terms["reference hidden states at the RMU layer"] = batch * seq * d["hidden"] * b
    elif method == "manu":  # one forward-only edit: no gradients, moments or mask
        unl_terms = {k: v for k, v in unl_terms.items() if not k.startswith(("grads", "AdamW"))}
        unl_terms.pop("mask (1 bit)", None)
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
