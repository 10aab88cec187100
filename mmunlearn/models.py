"""Model adapters for multimodal LLMs (LLaVA, Qwen2-VL / Qwen2.5-VL), tiny models and tokenizers.

An adapter knows, for one model family:

- its module groups: the vision side (LLaVA ``vision_tower`` + ``multi_modal_projector``,
  Qwen ``visual``) and the language side (everything else, ``lm_head`` included);
- its transformer block classes (vision encoder layer, decoder layer), for FSDP wrapping;
- its prompt template, with the right number of image placeholder tokens per image;
- how to turn :class:`~mmunlearn.data.schema.Sample` lists into a padded batch
  (:meth:`ModelAdapter.collate`): ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on
  the prompt and the padding with ``ans_only``) and the image inputs of the samples that have
  an image, in batch order.

Images are preprocessed here with PIL + numpy (square resize, CLIP mean/std), so no processor
download is ever needed. The tiny models (:func:`tiny_llava`, :func:`tiny_qwen2vl`) and the
locally trained tokenizer (:func:`build_tokenizer`) serve the tests and the demo.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmunlearn.data.schema import Sample

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)

# OpenAI CLIP normalisation (used by the LLaVA-1.5 and the Qwen2-VL image processors).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Words of the prompt templates, always put into the vocabulary of a locally built tokenizer.
TEMPLATE_TEXT = "USER: ASSISTANT: system user assistant"

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def build_tokenizer(
    texts: list[str], vocab_size: int = 4096, kind: str = "word", min_frequency: int = 1
):
    """Train a small tokenizer on ``texts`` with the ``tokenizers`` library (no download).

    ``kind="word"``: one token per lowercased word / punctuation mark (words beyond
    ``vocab_size`` become ``<unk>``); ``kind="bpe"``: byte-pair merges on the same pre-tokens.
    Normalisation: NFKC, lowercase, whitespace runs collapsed, stripped. Pre-tokenization:
    whitespace (``Metaspace``: a word carries its leading space as ``▁``) then punctuation, so
    ``decode`` restores the normalised text exactly. Special tokens: ``<pad>`` (id 0), ``<s>``,
    ``</s>``, ``<unk>``, ``<image>`` (``tokenizer.image_token``); the template words of the
    adapters are always in the vocabulary.

    Returns a ``transformers.PreTrainedTokenizerFast`` (saveable with ``save_pretrained``,
    reloadable with ``AutoTokenizer.from_pretrained``), right padding.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS)
    if kind == "word":
        tk = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials
        )
    elif kind == "bpe":
        tk = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials
        )
    else:
        raise ValueError(f"kind must be 'word' or 'bpe', got {kind!r}")
    tk.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            pre_tokenizers.Punctuation(),
        ]
    )
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.train_from_iterator([TEMPLATE_TEXT, *texts], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        image_token=IMAGE_TOKEN,
        padding_side="right",
    )
    return tok


def _token_id(tokenizer, token: str) -> int | None:
    """Id of ``token`` if the tokenizer has it as a single token, else None."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(tid)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def preprocess_image(image: Image.Image, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """RGB, bicubic resize to ``size`` × ``size``, scale to [0, 1], normalise with mean / std.

    Returns a float32 tensor of shape [3, size, size].
    """
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    img = image.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# --------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------


def _unwrap_config(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


class ModelAdapter:
    """Family-specific knowledge about one image-text-to-text model.

    ``model``: the model (needed by :meth:`vision_module_names`, :meth:`param_groups`,
    :meth:`block_classes`); ``tokenizer``: needed by :meth:`collate` and the templates;
    ``image_size``: square side images are resized to (default: from the config).
    Calling the adapter is :meth:`collate`.
    """

    family = "base"
    vision_attrs: tuple[str, ...] = ()

    def __init__(self, model, tokenizer=None, image_size: int | None = None):
        self.model = model
        self.config = _unwrap_config(model)
        self.tokenizer = tokenizer
        self.image_size = int(image_size or self.default_image_size())

    # --- module groups -----------------------------------------------------------------------
    def default_image_size(self) -> int:
        """Side length images are resized to when none is given."""
        raise NotImplementedError

    def _model(self):
        if self.model is None:
            raise ValueError(f"{type(self).__name__} was unpickled without its model")
        return self.model

    def vision_module_names(self) -> list[str]:
        """Dotted names (as in ``model.named_modules()``) of the vision-side modules; the
        shallowest module whose last name component is one of ``vision_attrs``.

        Returns e.g. ``["model.vision_tower", "model.multi_modal_projector"]`` (LLaVA,
        transformers 5.x) or ``["model.visual"]`` (Qwen2-VL)."""
        found: dict[str, str] = {}
        for name, _ in self._model().named_modules():
            last = name.rsplit(".", 1)[-1]
            if last in self.vision_attrs and last not in found:
                found[last] = name
        missing = [a for a in self.vision_attrs if a not in found]
        if missing:
            raise ValueError(f"{type(self.model).__name__}: no module named {missing}")
        return [found[a] for a in self.vision_attrs]

    def param_groups(self) -> dict[str, list[str]]:
        """Parameter names by group, grouped by module (not by substring).

        Returns ``{"vision": [...], "language": [...]}``; language = every parameter outside
        the vision modules (language model, ``lm_head``)."""
        prefixes = tuple(n + "." for n in self.vision_module_names())
        groups: dict[str, list[str]] = {"vision": [], "language": []}
        for name, _ in self._model().named_parameters():
            groups["vision" if name.startswith(prefixes) else "language"].append(name)
        return groups

    def block_classes(self) -> tuple[type, ...]:
        """The repeated transformer block classes: (vision encoder layer, decoder layer)."""
        raise NotImplementedError

    # --- tokens ------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        """Id of the image placeholder token in ``input_ids``."""
        return int(self.config.image_token_id)

    def num_image_tokens(self) -> int:
        """Placeholder tokens per image in the prompt."""
        raise NotImplementedError

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer for templates / collate")
        return self.tokenizer

    def _encode(self, text: str) -> list[int]:
        return list(self._tok()(text, add_special_tokens=False)["input_ids"])

    @property
    def answer_end(self) -> str:
        """Token string closing an answer (the tokenizer's eos)."""
        return self._tok().eos_token

    def prompt_text(self, sample: Sample) -> str:
        """The prompt string with the image placeholders expanded (none for text-only)."""
        raise NotImplementedError

    def format(self, sample: Sample, with_answer: bool = True) -> str:
        """Prompt (+ answer + end token) as one string, for display and debugging."""
        text = self.prompt_text(sample)
        if with_answer:
            text += " " + sample.answer + self.answer_end
        return text

    def encode(self, sample: Sample, with_answer: bool = True, ans_only: bool = True):
        """Token ids and labels of one sample.

        The prompt and the answer are tokenized separately (the answer boundary is exact).
        Returns ``(input_ids, labels)`` (lists of int): labels = ids on the answer and its end
        token; on the prompt ``-100`` with ``ans_only``, else the ids; ``-100`` on image
        placeholders always; ``labels`` is ``[]`` when ``with_answer`` is False."""
        tok = self._tok()
        ids = self._encode(self.prompt_text(sample))
        if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
            ids = [int(tok.bos_token_id)] + ids
        if not with_answer:
            return ids, []
        img = self.image_token_id
        prompt_labels = [IGNORE_INDEX if (ans_only or t == img) else t for t in ids]
        ans = self._encode(sample.answer) + [int(tok.convert_tokens_to_ids(self.answer_end))]
        return ids + ans, prompt_labels + ans

    # --- images ------------------------------------------------------------------------------
    def image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        """Model inputs for a list of PIL images (batch order)."""
        raise NotImplementedError

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Family-specific extra tensors computed from the padded ``input_ids``."""
        return {}

    # --- batch -------------------------------------------------------------------------------
    def collate(
        self, samples: list[Sample], ans_only: bool = True, with_answer: bool = True
    ) -> dict[str, torch.Tensor]:
        """Padded batch for ``model(**batch)`` / ``model.generate(**batch)``.

        ``with_answer=True``: prompt + answer + end token, right-padded, with ``labels``
        (``-100`` on padding, image placeholders and, with ``ans_only``, the prompt).
        ``with_answer=False``: the prompt only, left-padded (ready for ``generate``), no labels.
        Image inputs are present only if some sample has an image; they hold the images of those
        samples only, in batch order (the model maps placeholders to images in order).
        Returns a dict of tensors: ``input_ids``, ``attention_mask`` (long), [``labels``],
        and the family's image inputs."""
        if not samples:
            raise ValueError("collate needs at least one sample")
        tok = self._tok()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        enc = [self.encode(s, with_answer=with_answer, ans_only=ans_only) for s in samples]
        n = max(len(ids) for ids, _ in enc)
        bsz = len(samples)
        input_ids = torch.full((bsz, n), int(pad), dtype=torch.long)
        attention = torch.zeros((bsz, n), dtype=torch.long)
        labels = torch.full((bsz, n), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, lab) in enumerate(enc):
            k = len(ids)
            sl = slice(0, k) if with_answer else slice(n - k, n)
            input_ids[i, sl] = torch.tensor(ids, dtype=torch.long)
            attention[i, sl] = 1
            if with_answer:
                labels[i, sl] = torch.tensor(lab, dtype=torch.long)
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention}
        if with_answer:
            batch["labels"] = labels
        images = [s.image for s in samples if s.image is not None]
        if images:
            batch.update(self.image_inputs(images))
            batch.update(self.extra_inputs(input_ids))
        return batch

    def __call__(self, samples: list[Sample], ans_only: bool = True, with_answer: bool = True):
        """Same as :meth:`collate` (an adapter is a ``collate_fn``)."""
        return self.collate(samples, ans_only=ans_only, with_answer=with_answer)

    def __getstate__(self):
        # DataLoader workers pickle their collate_fn: ship config + tokenizer, not the model.
        state = dict(self.__dict__)
        state["model"] = None
        return state


class LlavaAdapter(ModelAdapter):
    """LLaVA (``LlavaForConditionalGeneration``), LLaVA-1.5 template::

        <s>USER: <image>×N\\n{question} ASSISTANT: {answer}</s>

    N = (image_size / patch)² (+1 with ``vision_feature_select_strategy="full"``).
    Batch: ``input_ids``, ``attention_mask``, [``labels``], [``pixel_values`` [n_img, 3, S, S]].
    """

    family = "llava"
    vision_attrs = ("vision_tower", "multi_modal_projector")

    def default_image_size(self) -> int:
        return int(self.config.vision_config.image_size)

    def num_image_tokens(self) -> int:
        vc = self.config.vision_config
        n = (self.image_size // vc.patch_size) ** 2
        return n + (1 if self.config.vision_feature_select_strategy == "full" else 0)

    def block_classes(self) -> tuple[type, ...]:
        vt = _get(self._model(), self.vision_module_names()[0])
        enc = vt.vision_model.encoder.layers[0] if hasattr(vt, "vision_model") else None
        if enc is None:
            enc = _first_layer(vt)
        return (type(enc), type(_first_layer(_language_model(self.model))))

    def prompt_text(self, sample: Sample) -> str:
        tok = self._tok()
        image = ""
        if sample.image is not None:
            image = tok.convert_ids_to_tokens(self.image_token_id) * self.num_image_tokens()
            image += "\n"
        return f"USER: {image}{sample.question} ASSISTANT:"

    def image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        pv = torch.stack([preprocess_image(im, self.image_size) for im in images])
        return {"pixel_values": pv}


class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
    ``Qwen2_5_VLForConditionalGeneration``).

    Template: the Qwen chat template when the tokenizer has ``<|im_start|>``::

        <|im_start|>user\\n<|vision_start|><|image_pad|>×N<|vision_end|>{question}<|im_end|>\\n
        <|im_start|>assistant\\n{answer}<|im_end|>

    otherwise (tiny tokenizers) the LLaVA-like ``USER: <image>×N\\n{question} ASSISTANT:``.
    Images are resized to a fixed square ``image_size`` (a multiple of patch × merge; default
    ``vision_config.image_size`` if set, else 448), N = (S / patch)² / merge².
    Batch: ``input_ids``, ``attention_mask``, [``labels``], and with images ``pixel_values``
    [n_img · (S/patch)², 3 · temporal_patch · patch²] (flattened patches, the layout of the
    Qwen2-VL image processor), ``image_grid_thw`` [n_img, 3] = (1, S/patch, S/patch) and
    ``mm_token_type_ids`` [B, T] (1 on image placeholders; transformers 5.x needs it for M-RoPE).
    """

    family = "qwen2vl"
    vision_attrs = ("visual",)

    def __init__(self, model, tokenizer=None, image_size: int | None = None):
        super().__init__(model, tokenizer, image_size)
        vc = self.config.vision_config
        unit = vc.patch_size * vc.spatial_merge_size
        if self.image_size % unit:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of patch_size × "
                f"spatial_merge_size = {unit}"
            )

    def default_image_size(self) -> int:
        return int(getattr(self.config.vision_config, "image_size", None) or 448)

    def num_image_tokens(self) -> int:
        vc = self.config.vision_config
        return (self.image_size // vc.patch_size) ** 2 // vc.spatial_merge_size**2

    def block_classes(self) -> tuple[type, ...]:
        visual = _get(self._model(), self.vision_module_names()[0])
        return (type(visual.blocks[0]), type(_first_layer(_language_model(self.model))))

    @property
    def chat(self) -> bool:
        """True when the tokenizer has the Qwen chat tokens."""
        return _token_id(self._tok(), "<|im_start|>") is not None

    @property
    def answer_end(self) -> str:
        return "<|im_end|>" if self.chat else self._tok().eos_token

    def prompt_text(self, sample: Sample) -> str:
        tok = self._tok()
        image = ""
        if sample.image is not None:
            image = tok.convert_ids_to_tokens(self.image_token_id) * self.num_image_tokens()
        if self.chat:
            if image:
                image = f"<|vision_start|>{image}<|vision_end|>"
            return f"<|im_start|>user\n{image}{sample.question}<|im_end|>\n<|im_start|>assistant\n"
        if image:
            return f"USER: {image}\n{sample.question} ASSISTANT:"
        return f"USER: {sample.question} ASSISTANT:"

    def image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        vc = self.config.vision_config
        p, m, tp = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        g = self.image_size // p
        x = torch.stack([preprocess_image(im, self.image_size) for im in images])  # [N,C,S,S]
        nimg, c = x.shape[:2]
        x = x.reshape(nimg, c, g // m, m, p, g // m, m, p)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [N, gh/m, gw/m, m, m, C, p, p]
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, tp, -1, -1)
        pv = x.reshape(nimg * g * g, c * tp * p * p).contiguous()
        thw = torch.tensor([[1, g, g]] * nimg, dtype=torch.long)
        return {"pixel_values": pv, "image_grid_thw": thw}

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32)}


def _get(model, dotted: str):
    return model.get_submodule(dotted) if dotted else model


def _language_model(model):
    for name in ("model.language_model", "language_model", "model.model", "model"):
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        if hasattr(m, "layers"):
            return m
    raise ValueError(f"{type(model).__name__}: cannot find the language model's decoder layers")


def _first_layer(module):
    for name in ("layers", "blocks"):
        seq = getattr(module, name, None)
        if seq is not None and len(seq):
            return seq[0]
    enc = getattr(module, "encoder", None)
    if enc is not None:
        return _first_layer(enc)
    raise ValueError(f"{type(module).__name__}: cannot find its transformer blocks")


def _adapter_classes() -> list[tuple[type, type[ModelAdapter]]]:
    import transformers

    pairs = []
    for cls_name, adapter in (
        ("LlavaForConditionalGeneration", LlavaAdapter),
        ("Qwen2VLForConditionalGeneration", Qwen2VLAdapter),
        ("Qwen2_5_VLForConditionalGeneration", Qwen2VLAdapter),
    ):
        cls = getattr(transformers, cls_name, None)
        if cls is not None:
            pairs.append((cls, adapter))
    return pairs


SUPPORTED = (
    "LlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
)


def adapter_for(model, tokenizer=None, image_size: int | None = None) -> ModelAdapter:
    """The adapter for ``model``, chosen by its class (subclasses too, e.g. FSDP2-wrapped).

    Returns a :class:`LlavaAdapter` or :class:`Qwen2VLAdapter`; raises ``TypeError`` naming the
    class for anything else."""
    for cls, adapter in _adapter_classes():
        if isinstance(model, cls):
            return adapter(model, tokenizer, image_size)
    raise TypeError(
        f"no model adapter for {type(model).__module__}.{type(model).__name__}; "
        f"supported: {', '.join(SUPPORTED)}"
    )


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------


def _special_ids(tokenizer) -> dict[str, int | None]:
    image_id = _token_id(tokenizer, getattr(tokenizer, "image_token", None) or IMAGE_TOKEN)
    if image_id is None:
        raise ValueError(f"the tokenizer has no image token {IMAGE_TOKEN!r}")
    return {
        "image": image_id,
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
    }


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
    ``video_token_id`` / ``vision_start`` / ``vision_end`` point at ``<unk>`` (unused).
    Returns a ``Qwen2VLForConditionalGeneration`` in eval mode.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = _special_ids(tokenizer)
    if image_size % (patch_size * merge_size):
        raise ValueError("image_size must be a multiple of patch_size * merge_size")
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
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": section,
        },
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
        video_token_id=ids["unk"],
        vision_start_token_id=ids["unk"],
        vision_end_token_id=ids["unk"],
    )
    config.vision_config.image_size = image_size
    config.pad_token_id = ids["pad"]
    return _seeded_build(Qwen2VLForConditionalGeneration, config, seed)


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def save_model(model, tokenizer, directory, state_dict: dict | None = None) -> Path:
    """``save_pretrained`` of model (safetensors) and tokenizer into ``directory``, atomically:
    written to a temporary sibling, then renamed into place (an existing directory is replaced).
    ``state_dict``: full tensors to write instead of the model's own (an FSDP2-sharded model:
    :func:`mmunlearn.fsdp.full_state_dict`); ``config.architectures`` names the real class,
    not FSDP2's ``FSDP<Class>`` wrapper, so the directory loads like any other.

    Returns the directory's ``Path``."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        cls = type(model)
        fsdp_cls = cls.__name__.startswith("FSDP") and len(cls.__bases__) > 1
        if fsdp_cls:
            # FSDP2 made the class FSDP<Class>(FSDPModule, <Class>); transformers picks the
            # architecture name and the key conversions by class, so save as <Class>
            model.__class__ = cls.__bases__[-1]
        try:
            model.save_pretrained(tmp, state_dict=state_dict)
        finally:
            model.__class__ = cls
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_model(path_or_dir, dtype: torch.dtype | str | None = None, device: Any = None):
    """Load a model and its tokenizer from a local directory (never the hub).

    The model through ``AutoModelForImageTextToText``, falling back to the exact class named in
    ``config.architectures``; ``dtype`` (e.g. ``torch.bfloat16``) is passed on if given.
    Returns ``(model, tokenizer)``, the model in eval mode (on ``device`` if given)."""
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    path = Path(path_or_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"not a model directory: {path}")
    kw: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kw["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kw)
    except (ValueError, KeyError):
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            raise
        model = cls.from_pretrained(path, **kw)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError):
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "LlavaAdapter",
    "ModelAdapter",
    "Qwen2VLAdapter",
    "adapter_for",
    "build_tokenizer",
    "load_model",
    "preprocess_image",
    "save_model",
    "tiny_llava",
    "tiny_qwen2vl",
]
