"""Batches through a real checkpoint's own processor and chat template.

For LLaVA-1.5 (llava-hf), Qwen2-VL and Qwen2.5-VL checkpoints the checkpoint decides how a
sample becomes tokens and pixels: its chat template renders the conversation (user turn =
image + question, assistant turn = answer), its image processor resizes and normalises
(llava-hf: shortest edge then centre crop; Qwen2-VL: dynamic resolution between
``min_pixels`` and ``max_pixels``), and its processor expands each image placeholder into the
model's number of image tokens. :class:`ChatCollator` does exactly that and adds the labels:

- the answer-only boundary is where the prompt (rendered with ``add_generation_prompt=True``)
  ends in the full conversation's tokens; image placeholders are matched across their
  expansion (:func:`answer_start`), so the boundary is exact whatever the image's token count;
- ``loss_tokens``: ``"answer"`` (assistant turn only), ``"all"`` (every non-pad token but the
  image tokens) or ``"all_with_image"`` (every non-pad token: the official MLLMU MMUnlearner
  driver, labels = input_ids with pads ignored);
- with ``with_answer=False`` the prompts are left-padded for ``generate``.

When ``AutoProcessor`` cannot build the family's processor (transformers 5.x builds Qwen2-VL's
only with torchvision installed, for its video processor) :class:`ComposedProcessor` does the
same job from the folder's image processor, tokenizer and chat template.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from mmunlearn.data.schema import Sample

IGNORE_INDEX = -100
LOSS_TOKENS = ("answer", "all", "all_with_image")
RAW_PROMPT = "raw_prompt"  # Sample.meta key of a verbatim prompt (see ChatCollator.prompt)
# Families whose forward attends bidirectionally over every token with token_type_ids 0 (the
# prefix): the answer is marked 1 (causal), as their processor does for ``suffix=``; left at
# 0 it would see its own later tokens (tests/test_families.py checks the causality).
SUFFIX_TOKEN_TYPES = ("paligemma",)


def images_of(sample: Sample) -> list:
    """A sample's images in prompt order: ``[]``, ``[image]``, or the list it holds (a
    few-shot prompt's exemplar pictures, then its own)."""
    if sample.image is None:
        return []
    return list(sample.image) if isinstance(sample.image, (list, tuple)) else [sample.image]


def messages(sample: Sample, with_answer: bool) -> list[dict]:
    """The conversation of a sample in the multimodal chat format processors render."""
    user = [{"type": "text", "text": sample.question}]
    user = [{"type": "image"} for _ in images_of(sample)] + user
    msgs = [{"role": "user", "content": user}]
    if with_answer:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": sample.answer}]})
    return msgs


def answer_start(row: Sequence[int], prompt: Sequence[int], image_id: int | None) -> int:
    """Index in ``row`` (the full conversation's ids, image placeholders expanded) where the
    tokens of ``prompt`` (the prompt's ids, placeholders not necessarily expanded) end.

    Both are walked together, skipping image tokens on either side, so a placeholder expanded
    into N tokens matches; where they first differ (a tokenizer merging across the
    prompt/answer boundary) the boundary is put there, so no answer token is ever hidden."""
    i = j = 0
    while j < len(prompt) and i < len(row):
        if prompt[j] == image_id:
            j += 1
        elif row[i] == image_id:
            i += 1
        elif row[i] == prompt[j]:
            i += 1
            j += 1
        else:
            break
    while i < len(row) and row[i] == image_id:
        i += 1
    return i


class ComposedProcessor:
    """A Qwen2-VL / Qwen2.5-VL processor from its parts (``image_processor``, ``tokenizer``,
    ``chat_template``), for when ``AutoProcessor`` cannot build one. Calling it does what
    ``Qwen2VLProcessor`` does for images: every ``<|image_pad|>`` is expanded into
    ``prod(image_grid_thw) / merge_size²`` copies, in order; plus ``mm_token_type_ids``."""

    def __init__(self, image_processor, tokenizer, chat_template: str, image_token: str):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_token = image_token

    def __call__(self, text, images=None, padding=True, return_tensors="pt", **kw):
        texts = list(text)
        extra: dict = {}
        if images:
            extra = dict(self.image_processor(images=images, return_tensors="pt"))
            merge = int(getattr(self.image_processor, "merge_size", 2))
            counts = (extra["image_grid_thw"].prod(-1) // (merge * merge)).tolist()
            k, out = 0, []
            for t in texts:
                parts = t.split(self.image_token)
                s = parts[0]
                for p in parts[1:]:
                    if k >= len(counts):
                        raise ValueError("more image placeholders in the text than images")
                    s += self.image_token * int(counts[k]) + p
                    k += 1
                out.append(s)
            if k != len(counts):
                raise ValueError(f"{len(counts)} images for {k} image placeholders in the text")
            texts = out
        enc = self.tokenizer(texts, padding=padding, return_tensors=return_tensors)
        enc = dict(enc)
        enc.update(extra)
        return enc

    def save_pretrained(self, directory) -> None:
        from pathlib import Path

        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        (Path(directory) / "chat_template.jinja").write_text(self.chat_template)


@functools.cache
def without_video(cls):
    """A subclass of the processor class ``cls`` without its video processor (``None``), so a
    family's processor is built, called on images and saved where its video processor cannot be
    (transformers' video processors need torchvision). ``cls`` itself when it has none."""
    # transformers 5: get_attributes() (from __init__'s argument names); 4.x: a class list
    legacy = not hasattr(cls, "get_attributes")
    every = list(cls.attributes) if legacy else cls.get_attributes()
    attrs = [a for a in every if "video" not in a]
    if attrs == every:
        return cls

    # cls.__init__ is kept (transformers reads its code's argument names); it passes
    # video_processor (None) on to ProcessorMixin, which zips it away with the attributes
    body = {"get_attributes": classmethod(lambda c: list(attrs)), "video_processor": None}
    if legacy:
        body["attributes"] = list(attrs)
    # (pickled as cls + state: DataLoader workers started with spawn get the adapter)
    body["__reduce__"] = lambda self: (_without_video_instance, (cls, dict(self.__dict__)))
    return type(cls.__name__, (cls,), {**body, "__module__": cls.__module__})


def _without_video_instance(cls, state: dict):
    sub = without_video(cls)
    obj = sub.__new__(sub)
    obj.__dict__.update(state)
    return obj


class ChatCollator:
    """``collate(samples, ans_only, with_answer, loss_tokens)`` → a padded model batch, built
    by ``processor`` (an HF processor or :class:`ComposedProcessor`) and its chat template."""

    def __init__(self, processor, chat_template: str, image_token_id: int, family: str):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.chat_template = chat_template
        self.image_token_id = int(image_token_id)
        self.family = family
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        # the model's forward inputs (GenericAdapter): other processor outputs are dropped
        self.input_keys: frozenset[str] | None = None
        # the built-in Qwen2-VL adapter: whether its forward takes mm_token_type_ids (5.x)
        self.mm_token_types = True
        self._takes_text: bool | None = None

    # --- text ----------------------------------------------------------------------------------
    def render(self, msgs: list[dict], add_generation_prompt: bool) -> str:
        """The chat template applied to ``msgs`` (a string; tokenisation comes later)."""
        return self.tokenizer.apply_chat_template(
            msgs,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def prompt(self, sample: Sample) -> str:
        """The prompt text: ``sample.meta["raw_prompt"]`` verbatim when given (a benchmark
        protocol's own prompt, holding :attr:`image_token` once per image), else the chat
        template's user turn with the generation prompt."""
        raw = (sample.meta or {}).get(RAW_PROMPT)
        if raw is not None:
            n_img = len(images_of(sample))
            if raw.count(self.image_token) != n_img:
                raise ValueError(
                    f"raw_prompt must hold the image token {self.image_token!r} {n_img} "
                    f"time(s), found {raw.count(self.image_token)}: {raw[:80]!r}"
                )
            return raw
        return self.render(messages(sample, False), True)

    def full(self, sample: Sample) -> str:
        """Prompt and answer: the whole conversation rendered (and stripped, as the official
        drivers do), or a raw prompt followed by a space and the answer."""
        if (sample.meta or {}).get(RAW_PROMPT) is not None:
            p = self.prompt(sample)
            return p + ("" if p.endswith((" ", "\n")) else " ") + sample.answer
        return self.render(messages(sample, True), False).strip()

    # --- batch ---------------------------------------------------------------------------------
    def _encode(self, texts: list[str], per_sample: list[list], side: str) -> dict:
        tok = self.tokenizer
        before = tok.padding_side
        tok.padding_side = side
        images = [im for ims in per_sample for im in ims]
        try:
            if self.input_keys is not None and not all(per_sample) and not self._text_alone():
                enc = self._split_encode(texts, per_sample)  # (PaliGemma)
            else:
                if images and self.input_keys is not None:
                    images = per_sample  # any family: one list per text (Gemma 3, Mllama …)
                try:
                    enc = self.processor(
                        text=texts, images=images or None, padding=True, return_tensors="pt"
                    )
                except ValueError:
                    # transformers 4.x image processors take no empty list for a text's images
                    if self.input_keys is None or all(per_sample) or not images:
                        raise
                    # (text rows through the processor too: Mllama's adds its own BOS there)
                    enc = self._split_encode(texts, per_sample, self._text_alone())
                else:
                    if self._image_tokens_in_text_rows(enc, per_sample):
                        enc = self._split_encode(texts, per_sample)  # (BLIP-2: queries everywhere)
        finally:
            tok.padding_side = before
        batch = {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)}
        keys = self.input_keys
        if keys is not None:
            batch = {k: v for k, v in batch.items() if k in keys or k == "attention_mask"}
        else:  # the built-in LLaVA / Qwen2-VL: no token_type_ids input (4.x tokenizers return it)
            batch.pop("token_type_ids", None)
        wants_mm = (self.family == "qwen2vl" and self.mm_token_types) or (
            keys is not None and "mm_token_type_ids" in keys
        )
        if wants_mm and images and "mm_token_type_ids" not in batch:
            # transformers 5.x Qwen2-VL forwards need it (1 on image tokens) for M-RoPE
            batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).to(torch.int32)
        return batch

    def _image_tokens_in_text_rows(self, enc, per_sample: list[list]) -> bool:
        """Whether the processor put image tokens in a row without an image (it expands
        images for the whole batch, not per text)."""
        if self.input_keys is None or all(per_sample) or not any(per_sample):
            return False
        ids = enc["input_ids"]
        rows = [i for i, ims in enumerate(per_sample) if not ims]
        return bool((ids[rows] == self.image_token_id).any())

    def _text_alone(self) -> bool:
        """Whether the processor takes a text without an image (PaliGemma's does not)."""
        if self._takes_text is None:
            try:
                self.processor(text=["a"], return_tensors="pt")
                self._takes_text = True
            except (ValueError, TypeError):
                self._takes_text = False
        return self._takes_text

    def _split_encode(
        self, texts: list[str], per_sample: list[list], text_rows_by_processor: bool = False
    ) -> dict:
        """For processors that want an image with every text: the texts with images through
        the processor, the others through the tokenizer (or the processor alone with
        ``text_rows_by_processor``), rows merged back in batch order (padded on the
        tokenizer's side; per-token inputs of text rows are 0)."""
        tok = self.tokenizer
        with_img = [i for i, ims in enumerate(per_sample) if ims]
        text_only = [i for i, ims in enumerate(per_sample) if not ims]
        if not with_img:
            return dict(tok(texts, padding=True, return_tensors="pt"))
        a = dict(
            self.processor(
                text=[texts[i] for i in with_img],
                padding=True,
                images=[per_sample[i] for i in with_img],
                return_tensors="pt",
            )
        )
        plain_rows = [texts[i] for i in text_only]
        if text_rows_by_processor:
            b = dict(self.processor(text=plain_rows, padding=True, return_tensors="pt"))
        else:
            b = dict(tok(plain_rows, padding=True, return_tensors="pt"))
        n = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
        shape = tuple(a["input_ids"].shape)
        out = {}
        for key, v in a.items():
            if not isinstance(v, torch.Tensor) or tuple(v.shape[:2]) != shape:
                out[key] = v  # image inputs: the image rows' only
                continue
            fill = tok.pad_token_id if key == "input_ids" else 0
            full = v.new_full((len(texts), n, *v.shape[2:]), fill)
            plain = b.get(key)
            if plain is None:
                plain = v.new_zeros((*b["input_ids"].shape, *v.shape[2:]))
            for rows, src in ((with_img, v), (text_only, plain)):
                for j, i in enumerate(rows):
                    k = src.shape[1]
                    if tok.padding_side == "left":
                        full[i, n - k :] = src[j]
                    else:
                        full[i, :k] = src[j]
            out[key] = full
        return out

    def _prompt_ids(self, sample: Sample) -> list[int]:
        """The prompt's ids: tokenized (LLaVA / Qwen), or through the processor with the
        sample's images (any family: what it adds around images and texts is then the same
        as in the full conversation's row)."""
        if self.input_keys is None:
            return self.tokenizer(self.prompt(sample))["input_ids"]
        enc = self._encode([self.prompt(sample)], [images_of(sample)], "right")
        return enc["input_ids"][0].tolist()

    def collate(
        self,
        samples: list[Sample],
        ans_only: bool = True,
        with_answer: bool = True,
        loss_tokens: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """A padded batch: ``input_ids``, ``attention_mask``, the processor's image inputs
        (``pixel_values``; Qwen: ``image_grid_thw``, ``mm_token_type_ids``) and, with
        ``with_answer``, ``labels`` (``-100`` where no loss is taken). ``loss_tokens``
        (:data:`LOSS_TOKENS`) overrides ``ans_only`` (``True`` = ``"answer"``,
        ``False`` = ``"all"``). Without the answer the prompts are left-padded for
        ``generate`` and there are no labels."""
        if not samples:
            raise ValueError("collate needs at least one sample")
        mode = loss_tokens or ("answer" if ans_only else "all")
        if mode not in LOSS_TOKENS:
            raise ValueError(f"loss_tokens must be one of {LOSS_TOKENS}, got {mode!r}")
        images = [images_of(s) for s in samples]
        if not with_answer:
            return self._encode([self.prompt(s) for s in samples], images, "left")
        batch = self._encode([self.full(s) for s in samples], images, "right")
        ids, att = batch["input_ids"], batch["attention_mask"]
        labels = ids.clone()
        labels[att == 0] = IGNORE_INDEX
        if mode != "all_with_image":
            labels[ids == self.image_token_id] = IGNORE_INDEX
        suffix = self.family in SUFFIX_TOKEN_TYPES and "token_type_ids" in batch
        if self.family in SUFFIX_TOKEN_TYPES and "token_type_ids" in (self.input_keys or ()):
            # transformers 4.x's processor returns them only with suffix=: all prefix (0) here
            suffix = True
            batch.setdefault("token_type_ids", torch.zeros_like(ids))
        if mode == "answer" or suffix:
            for i, s in enumerate(samples):
                p_ids = self._prompt_ids(s)
                row = ids[i][att[i].bool()].tolist()
                start = answer_start(row, p_ids, self.image_token_id)
                first = int(att[i].nonzero()[0]) if att[i].any() else 0
                if mode == "answer":
                    labels[i, : first + start] = IGNORE_INDEX
                if suffix:  # the answer is the causal suffix, as with the processor's suffix=
                    batch["token_type_ids"][i, first + start :] = att[i, first + start :]
        batch["labels"] = labels
        return batch

    def template(self) -> dict:
        """The prompt template for the protocol record: ``{"family", "vqa", "qa"}`` with
        ``{question}`` / ``{answer}`` placeholders."""
        from PIL import Image

        img = Image.new("RGB", (1, 1))  # (one image: the template's shape)
        return {
            "family": self.family,
            "vqa": self.full(Sample("{question}", "{answer}", image=img)),
            "qa": self.full(Sample("{question}", "{answer}", image=None)),
        }


__all__ = [
    "ChatCollator",
    "ComposedProcessor",
    "IGNORE_INDEX",
    "LOSS_TOKENS",
    "RAW_PROMPT",
    "answer_start",
    "images_of",
    "messages",
    "without_video",
]
