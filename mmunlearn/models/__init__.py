"""Models: adapters (LLaVA, Qwen2-VL / Qwen2.5-VL with a built-in template; any other
image-text-to-text model through its processor), tiny models built from configs, locally
trained tokenizers, and model directories (save / load)."""

from mmunlearn.models.adapters import (
    CLIP_MEAN,
    CLIP_STD,
    SUPPORTED,
    LlavaAdapter,
    ModelAdapter,
    Qwen2VLAdapter,
    preprocess_image,
)
from mmunlearn.models.generic import GenericAdapter, adapter_for
from mmunlearn.models.loading import load_checkpoint, load_model, save_model
from mmunlearn.models.tiny import tiny_llava, tiny_qwen2vl
from mmunlearn.models.tokenizer import IGNORE_INDEX, IMAGE_TOKEN, build_tokenizer

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "GenericAdapter",
    "SUPPORTED",
    "LlavaAdapter",
    "ModelAdapter",
    "Qwen2VLAdapter",
    "adapter_for",
    "build_tokenizer",
    "load_checkpoint",
    "load_model",
    "preprocess_image",
    "save_model",
    "tiny_llava",
    "tiny_qwen2vl",
]
