"""Tiny, randomly initialised LLaVA and Qwen2-VL models built from small configs (real
Hugging Face classes, deterministic in a seed), for the tests and the demo."""

from __future__ import annotations

import torch

from mmunlearn.models.tokenizer import IMAGE_TOKEN, token_id


def _special_ids(tokenizer) -> dict[str, int | None]:
    image_id = token_id(tokenizer, getattr(tokenizer, "image_token", None) or IMAGE_TOKEN)
    if image_id is None:
        raise ValueError(f"the tokenizer has no image token {IMAGE_TOKEN!r}")
    return {
        "image": image_id,
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
    }


def mrope_fields(theta: float, section: list[int]) -> dict:
    """A Qwen2-VL text config's M-RoPE entries: transformers 5's ``rope_parameters``, or on
    4.x (no ``rope_parameters``) ``rope_theta`` + ``rope_scaling`` with ``type: mrope``."""
    from transformers import Qwen2VLConfig

    if "rope_parameters" in Qwen2VLConfig().text_config.to_dict():
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta,
                                    "mrope_section": list(section)}}  # fmt: skip
    return {"rope_theta": theta, "rope_scaling": {"type": "mrope", "mrope_section": list(section)}}


def _seeded_build(cls, config, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.eval()
    gc = model.generation_config
    gc.pad_token_id = config.text_config.pad_token_id
    gc.bos_token_id = config.text_config.bos_token_id
    gc.eos_token_id = config.text_config.eos_token_id
    return model


def tiny_llava(
    tokenizer,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    vision_feature_layer: int = -1,
):
    """A tiny, randomly initialised LLaVA (CLIP vision tower + Llama), deterministic in ``seed``.

    ``vision_feature_select_strategy="full"`` ((image_size/patch)² + 1 image tokens);
    ``vision_feature_layer=-1`` so every vision layer is used (LLaVA-1.5 uses -2, which leaves
    the last CLIP layer without gradient). Vocabulary = ``len(tokenizer)``; image / pad / bos /
    eos ids from the tokenizer. Returns a ``LlavaForConditionalGeneration`` in eval mode (about
    170 k parameters at the defaults with a ~500-word vocabulary).
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    ids = _special_ids(tokenizer)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
    )
    n_img = (image_size // patch_size) ** 2 + 1
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["image"],
        image_seq_length=n_img,
        vision_feature_select_strategy="full",
        vision_feature_layer=vision_feature_layer,
    )
    config.pad_token_id = ids["pad"]
    return _seeded_build(LlavaForConditionalGeneration, config, seed)


def tiny_qwen2vl(
    tokenizer,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    merge_size: int = 2,
    vision_dim: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
):
    """A tiny, randomly initialised Qwen2-VL, deterministic in ``seed``.

    Vision: ``depth`` ``vision_layers``, ``embed_dim`` ``vision_dim``, patch ``patch_size``,
    spatial merge ``merge_size``, temporal patch 2; ``vision_config.image_size`` is recorded
    (not a Qwen field) so the adapter resizes images to it ((image_size/patch)²/merge² image
    tokens: 4 at the defaults). Text: M-RoPE sections summing to head_dim / 2.
    ``video_token_id`` / ``vision_start`` / ``vision_end`` are ``len(tokenizer)``, one past the
    vocabulary: no input holds them (transformers 4.x's M-RoPE reads the token after each
    ``vision_start`` as an image or a video; with ``<unk>`` there, as before, a text with two
    unknown words in a row, e.g. an SMFA refusal, was taken for a video and the forward failed).
    Returns a ``Qwen2VLForConditionalGeneration`` in eval mode.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = _special_ids(tokenizer)
    if image_size % (patch_size * merge_size):
        raise ValueError("image_size must be a multiple of patch_size * merge_size")
    unused = len(tokenizer)  # an id outside the vocabulary (see above)
    half = hidden // heads // 2
    h = (half - half // 4) // 2  # Qwen2-VL-7B: head_dim 128 -> [16, 24, 24]
    section = [half - 2 * h, h, h]
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 512,
        "max_window_layers": layers,
        **mrope_fields(10000.0, section),
        "pad_token_id": ids["pad"],
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
    }
    vision = {
        "depth": vision_layers,
        "embed_dim": vision_dim,
        "hidden_size": hidden,
        "mlp_ratio": 2,
        "num_heads": vision_heads,
        "patch_size": patch_size,
        "spatial_merge_size": merge_size,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=unused,
        vision_start_token_id=unused,
        vision_end_token_id=unused,
    )
    config.vision_config.image_size = image_size
    config.pad_token_id = ids["pad"]
    return _seeded_build(Qwen2VLForConditionalGeneration, config, seed)


__all__ = ["tiny_llava", "tiny_qwen2vl"]
