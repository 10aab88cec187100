"""Model adapters for multimodal LLMs with a built-in template (LLaVA, Qwen2-VL / Qwen2.5-VL);
every other image-text-to-text model gets :class:`~mmunlearn.models.generic.GenericAdapter`
(:func:`~mmunlearn.models.generic.adapter_for` picks).

An adapter knows, for one model family:

- its module groups (:func:`mmunlearn.params.module_groups`: the vision side, LLaVA
  ``vision_tower`` + ``multi_modal_projector`` / Qwen ``visual``, and the language side);
- its transformer block classes (vision encoder layer, decoder layer), for FSDP wrapping;
- its prompt template, with the right number of image placeholder tokens per image;
- how to turn :class:`~mmunlearn.data.schema.Sample` lists into a padded batch
  (:meth:`ModelAdapter.collate`): ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on
  the prompt and the padding with ``ans_only``) and the image inputs of the samples that have
  an image, in batch order.

Images are preprocessed here with PIL + numpy (square resize, CLIP mean/std).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from PIL import Image

from mmunlearn.data.schema import Sample
from mmunlearn.models.processing import LOSS_TOKENS, RAW_PROMPT, ChatCollator, images_of
from mmunlearn.models.tokenizer import IGNORE_INDEX, token_id
from mmunlearn.params import module_groups, unwrap, vision_components

# OpenAI CLIP normalisation (used by the LLaVA-1.5 and the Qwen2-VL image processors).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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

    def __init__(self, model, tokenizer=None, image_size: int | None = None, processor=None):
        self.model = model
        self.config = _unwrap_config(model)
        self.collator = None
        if processor is not None:
            # a real checkpoint: its processor and chat template build every batch
            chat_template, proc = processor
            self.collator = ChatCollator(proc, chat_template, self.image_token_id, self.family)
            tokenizer = self.collator.tokenizer
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

    @property
    def vision_attrs(self) -> tuple[str, ...]:
        """Module names of the vision side (:func:`mmunlearn.params.vision_components`)."""
        return vision_components(self.family)

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
        """Trainable parameter names by group: :func:`mmunlearn.params.module_groups` of the
        model (``{"vision": [...], "language": [...]}``; language includes ``lm_head``)."""
        return module_groups(self._model())

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
        """The family's prompt string for a sample, image placeholders expanded."""
        raise NotImplementedError

    @property
    def image_token(self) -> str:
        """The image placeholder token as a string (e.g. ``<image>``)."""
        return self._tok().convert_ids_to_tokens(self.image_token_id)

    @property
    def processor(self):
        """The checkpoint's processor (None for the built-in tiny models)."""
        return None if self.collator is None else self.collator.processor

    def prompt(self, sample: Sample) -> str:
        """The prompt string of a sample, image placeholders expanded: the family's template
        (:meth:`prompt_text`), or ``sample.meta["raw_prompt"]`` verbatim when given (a benchmark
        protocol's own prompt, e.g. few-shot; it holds :attr:`image_token` once per image, which
        is expanded here to the model's count)."""
        if self.collator is not None:
            return self.collator.prompt(sample)
        raw = (sample.meta or {}).get(RAW_PROMPT)
        if raw is None:
            return self.prompt_text(sample)
        n_img = len(images_of(sample))
        if raw.count(self.image_token) != n_img:
            raise ValueError(
                f"raw_prompt must hold the image token {self.image_token!r} {n_img} time(s), "
                f"found {raw.count(self.image_token)}: {raw[:80]!r}"
            )
        return raw.replace(self.image_token, self.image_token * self.num_image_tokens())

    def format(self, sample: Sample, with_answer: bool = True) -> str:
        """Prompt (+ answer + end token) as one string, for display and debugging."""
        text = self.prompt(sample)
        if with_answer:
            text += " " + sample.answer + self.answer_end
        return text

    def template(self) -> dict:
        """The prompt template, for the protocol record: ``{"family", "vqa", "qa"}``
        (``{question}`` / ``{answer}`` placeholders; the image placeholder run shown once with
        its count, e.g. ``<image>×17``)."""
        if self.collator is not None:
            return self.collator.template()
        img_tok = self._tok().convert_ids_to_tokens(self.image_token_id)
        n = self.num_image_tokens()
        with_img = self.format(Sample("{question}", "{answer}", image=Image.new("RGB", (1, 1))))
        return {
            "family": self.family,
            "vqa": with_img.replace(img_tok * n, f"{img_tok}×{n}"),
            "qa": self.format(Sample("{question}", "{answer}", image=None)),
        }

    def encode(self, sample: Sample, with_answer: bool = True, ans_only: bool = True):
        """Token ids and labels of one sample.

        The prompt and the answer are tokenized separately (the answer boundary is exact).
        Returns ``(input_ids, labels)`` (lists of int): labels = ids on the answer and its end
        token; on the prompt ``-100`` with ``ans_only``, else the ids; ``-100`` on image
        placeholders always; ``labels`` is ``[]`` when ``with_answer`` is False."""
        tok = self._tok()
        ids = self._encode(self.prompt(sample))
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
        self,
        samples: list[Sample],
        ans_only: bool = True,
        with_answer: bool = True,
        loss_tokens: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Padded batch for ``model(**batch)`` / ``model.generate(**batch)``.

        ``with_answer=True``: prompt + answer + end token, right-padded, with ``labels``
        (``-100`` on padding, image placeholders and, with ``ans_only``, the prompt).
        ``with_answer=False``: the prompt only, left-padded (ready for ``generate``), no labels.
        Image inputs are present only if some sample has an image; they hold the images of those
        samples only, in batch order (the model maps placeholders to images in order).
        Returns a dict of tensors: ``input_ids``, ``attention_mask`` (long), [``labels``],
        and the family's image inputs. ``loss_tokens`` (``"answer"``, ``"all"``,
        ``"all_with_image"``) overrides ``ans_only``; a real checkpoint's batches come from its
        processor and chat template (:class:`~mmunlearn.models.processing.ChatCollator`)."""
        if self.collator is not None:
            return self.collator.collate(samples, ans_only, with_answer, loss_tokens)
        if not samples:
            raise ValueError("collate needs at least one sample")
        if loss_tokens is not None:
            if loss_tokens not in LOSS_TOKENS:
                raise ValueError(f"loss_tokens must be one of {LOSS_TOKENS}, got {loss_tokens!r}")
            ans_only = loss_tokens == "answer"
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
        if with_answer and loss_tokens == "all_with_image":
            labels = torch.where(attention.bool(), input_ids, labels)
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention}
        if with_answer:
            batch["labels"] = labels
        images = [im for s in samples for im in images_of(s)]
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
        run = self.image_token * self.num_image_tokens() + "\n"
        image = run * len(images_of(sample))
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
    ``mm_token_type_ids`` [B, T] (1 on image placeholders; transformers 5.x needs it for M-RoPE,
    4.x has no such input).
    """

    family = "qwen2vl"

    def __init__(self, model, tokenizer=None, image_size: int | None = None, processor=None):
        super().__init__(model, tokenizer, image_size, processor)
        # transformers 5.x forwards take mm_token_type_ids (M-RoPE); 4.x's have no such input
        # and generate() rejects it
        forward = type(unwrap(model)).forward if model is not None else None
        self.mm_token_types = forward is None or (
            "mm_token_type_ids" in inspect.signature(forward).parameters
        )
        if self.collator is not None:
            self.collator.mm_token_types = self.mm_token_types
        vc = self.config.vision_config
        unit = vc.patch_size * vc.spatial_merge_size
        if self.collator is None and self.image_size % unit:
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
        return token_id(self._tok(), "<|im_start|>") is not None

    @property
    def answer_end(self) -> str:
        return "<|im_end|>" if self.chat else self._tok().eos_token

    def prompt_text(self, sample: Sample) -> str:
        n = len(images_of(sample))
        run = self.image_token * self.num_image_tokens()
        if self.chat:
            image = f"<|vision_start|>{run}<|vision_end|>" * n
            return f"<|im_start|>user\n{image}{sample.question}<|im_end|>\n<|im_start|>assistant\n"
        if n:
            return f"USER: {run * n}\n{sample.question} ASSISTANT:"
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
        if not self.mm_token_types:
            return {}
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


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "RAW_PROMPT",
    "SUPPORTED",
    "LlavaAdapter",
    "ModelAdapter",
    "Qwen2VLAdapter",
    "preprocess_image",
]
