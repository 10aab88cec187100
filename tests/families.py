"""Real-layout checkpoints of many image-text-to-text families, built offline (nothing is
downloaded): ``save_pretrained`` of the real transformers class from a tiny config (text:
hidden 64, 2 layers, 4 heads, 2 KV heads; vision: hidden 32, 2 layers, 32 px, patch 8; random
weights), with the family's real processor class (its ``*Pil`` image processor: no torchvision
needed), a byte-level BPE tokenizer holding the family's special tokens and a chat template.

:data:`BUILDERS` maps a family (its ``model_type``) to a builder ``f(folder) -> folder``;
:data:`NO_PROCESSOR` lists the families whose processor cannot be built here and why (their
model is still built and checked: :func:`model_only`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T
from realformat import TRANSFORMERS_4, _tokenizer, pil_image_processor

from mmunlearn.models.processing import without_video
from mmunlearn.models.tiny import mrope_fields

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
BASE = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|end|>"]


def template(image: str, bos: str = "") -> str:
    """A chat template: ``<|user|>`` / ``<|assistant|>`` turns closed by ``<|end|>``; each
    image rendered as ``image`` (the text the family's processor expands)."""
    return (
        bos + "{% for message in messages %}<|{{ message['role'] }}|>"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}" + image + "{% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )


def _tok(extra: list[str], **named):
    """The tokenizer: :data:`BASE` + ``extra`` special tokens; ``named`` = the family's named
    special tokens (e.g. ``boi_token="<start_of_image>"``: ``tok.boi_token`` /
    ``tok.boi_token_id``, saved in tokenizer_config.json)."""
    from transformers import PreTrainedTokenizerFast

    tok = _tokenizer(BASE + extra, "<s>", "</s>", "<pad>", "<unk>")
    if not named:
        return tok
    return PreTrainedTokenizerFast(
        tokenizer_object=tok._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens=named,
    )  # fmt: skip


def _as_family_tokenizer(tok, cls_name: str):
    """``tok`` as the tokenizer class ``cls_name``: transformers 4.x processors check the class
    (5.x takes any fast tokenizer)."""
    import transformers as T

    if not TRANSFORMERS_4:
        return tok
    specials = dict(unk_token=tok.unk_token, bos_token=tok.bos_token, eos_token=tok.eos_token,
                    pad_token=tok.pad_token)  # fmt: skip
    out = getattr(T, cls_name)(tokenizer_object=tok.backend_tokenizer, **specials)
    out.chat_template = tok.chat_template
    return out


def _ids(tok) -> dict:
    return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id}  # fmt: skip


def _text(tok, **kw) -> dict:
    return {**TEXT, "vocab_size": len(tok), **_ids(tok), **kw}


def _save(folder, cls, cfg, tok, proc, seed=0) -> Path:
    folder = Path(folder)
    for k, v in _ids(tok).items():
        setattr(cfg, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def llava_next(folder):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextProcessor
    from transformers import LlavaNextForConditionalGeneration as M

    LlavaNextImageProcessorPil = pil_image_processor("llava_next", "LlavaNextImageProcessor")

    tok = _tok(["<image>"])
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**VISION, projection_dim=32),
        text_config=LlamaConfig(**_text(tok)),
        image_grid_pinpoints=[[32, 32]],
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
    )
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size=32,
                                    image_grid_pinpoints=[[32, 32]])  # fmt: skip
    proc = LlavaNextProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1,
                              chat_template=template("<image>\n"))  # fmt: skip
    return _save(folder, M, cfg, tok, proc)


def vipllava(folder):
    """VipLlava (visual prompts): CLIP features of several layers concatenated into its
    projector, served by the LLaVA processor."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaProcessor, VipLlavaConfig
    from transformers import VipLlavaForConditionalGeneration as M

    CLIPImageProcessorPil = pil_image_processor("clip", "CLIPImageProcessor")

    tok = _tok(["<image>"])
    cfg = VipLlavaConfig(
        vision_config=CLIPVisionConfig(**VISION, projection_dim=32),
        text_config=LlamaConfig(**_text(tok)),
        vision_feature_layers=[-2, -1],
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1,
                          chat_template=template("<image>\n"))  # fmt: skip
    return _save(folder, M, cfg, tok, proc)


def llava_onevision(folder):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers import LlavaOnevisionForConditionalGeneration as M

    LlavaOnevisionImageProcessorPil = pil_image_processor(
        "llava_onevision", "LlavaOnevisionImageProcessor"
    )

    tok = _tok(["<image>", "<video>"])
    cfg = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**VISION),
        text_config=Qwen2Config(**_text(tok)),
        image_grid_pinpoints=[[32, 32]],
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
    )
    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                         image_grid_pinpoints=[[32, 32]])  # fmt: skip
    proc = without_video(LlavaOnevisionProcessor)(ip, tok, num_image_tokens=16,
                                   vision_feature_select_strategy="full",
                                   chat_template=template("<image>\n"))  # fmt: skip
    return _save(folder, M, cfg, tok, proc)


def gemma3(folder):
    from transformers import Gemma3Config, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig
    from transformers import Gemma3ForConditionalGeneration as M

    Gemma3ImageProcessorPil = pil_image_processor("gemma3", "Gemma3ImageProcessor")

    specials = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tok = _tok(specials, boi_token=specials[0], eoi_token=specials[1], image_token=specials[2])
    cfg = Gemma3Config(
        vision_config=SiglipVisionConfig(**VISION),
        text_config=Gemma3TextConfig(**_text(tok), sliding_window=64, head_dim=16),
        mm_tokens_per_image=4,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
    )
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    proc = Gemma3Processor(ip, tok, chat_template=template("<start_of_image>"),
                           image_seq_length=4)  # fmt: skip
    return _save(folder, M, cfg, tok, proc)


def idefics3(folder):
    import transformers as T

    Idefics3ImageProcessorPil = pil_image_processor("idefics3", "Idefics3ImageProcessor")

    tok = _tok(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"])
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                   do_image_splitting=False)  # fmt: skip
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = T.Idefics3Config(vision_config=dict(VISION), text_config=T.LlamaConfig(**_text(tok)),
                           scale_factor=2, image_token_id=image_id)  # fmt: skip
    proc = T.Idefics3Processor(ip, tok, image_seq_len=4, chat_template=template("<image>"))
    return _save(folder, T.Idefics3ForConditionalGeneration, cfg, tok, proc)


def internvl(folder):
    import transformers as T

    GotOcr2ImageProcessorPil = pil_image_processor("got_ocr2", "GotOcr2ImageProcessor")

    named = {"start_image_token": "<img>", "end_image_token": "</img>",
             "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}  # fmt: skip
    tok = _tok(list(named.values()), **named)
    vision = dict(VISION, image_size=[32, 32], patch_size=[8, 8])
    cfg = T.InternVLConfig(vision_config=vision, text_config=T.Qwen2Config(**_text(tok)),
                           downsample_ratio=0.5,
                           image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))  # fmt: skip
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
    tpl = template("<IMG_CONTEXT>\n")
    proc = without_video(T.InternVLProcessor)(ip, tok, image_seq_length=4, chat_template=tpl)
    return _save(folder, T.InternVLForConditionalGeneration, cfg, tok, proc)


def mllama(folder):
    import transformers as T

    MllamaImageProcessorPil = pil_image_processor("mllama", "MllamaImageProcessor")

    tok = _tok(["<|image|>", "<|python_tag|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_global_layers=1, attention_heads=2, image_size=32, patch_size=8,
                  vision_output_dim=64, intermediate_layers_indices=[0], max_num_tiles=1,
                  supported_aspect_ratios=[[1, 1]])  # fmt: skip
    text = dict(_text(tok), cross_attention_layers=[1])
    if TRANSFORMERS_4:  # (its text config has no default RoPE type there)
        text["rope_scaling"] = {"rope_type": "default"}
    cfg = T.MllamaConfig(vision_config=vision, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<|image|>"))  # fmt: skip
    ip = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=1)
    proc = T.MllamaProcessor(ip, tok, chat_template=template("<|image|>"))
    return _save(folder, T.MllamaForConditionalGeneration, cfg, tok, proc)


def paligemma(folder):
    import transformers as T

    SiglipImageProcessorPil = pil_image_processor("siglip", "SiglipImageProcessor")

    tok = _as_family_tokenizer(_tok(["<image>"]), "GemmaTokenizerFast")
    ip = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ip.image_seq_length = 16
    tpl = (
        "{% for message in messages %}{% for c in message['content'] %}"
        "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% endif %}{% endfor %}"
    )
    proc = T.PaliGemmaProcessor(ip, tok, chat_template=tpl)  # adds its location tokens
    text = T.GemmaConfig(**_text(tok), head_dim=16)
    cfg = T.PaliGemmaConfig(vision_config=dict(VISION, projection_dim=64), text_config=text,
                            projection_dim=64,
                            image_token_index=tok.convert_tokens_to_ids("<image>"))  # fmt: skip
    return _save(folder, T.PaliGemmaForConditionalGeneration, cfg, tok, proc)


def _qwen(folder, kind: str):
    import transformers as T
    from realformat import QWEN_SPECIALS, QWEN_TEMPLATE

    Qwen2VLImageProcessorPil = pil_image_processor("qwen2_vl", "Qwen2VLImageProcessor")

    tok = _tokenizer(QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>", None)
    tok.chat_template = QWEN_TEMPLATE
    tok = _as_family_tokenizer(tok, "Qwen2TokenizerFast")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, **mrope_fields(10000.0, [2, 3, 3]))  # fmt: skip
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64)  # fmt: skip
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])  # fmt: skip
    if kind == "qwen2_5_vl":
        vision.update(fullatt_block_indexes=[1], window_size=32)
        cfg = T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        cls, proc_cls = T.Qwen2_5_VLForConditionalGeneration, T.Qwen2_5_VLProcessor
    else:
        text["head_dim"] = 16
        vision.update(deepstack_visual_indexes=[1], num_position_embeddings=64)
        cfg = T.Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
        cls, proc_cls = T.Qwen3VLForConditionalGeneration, T.Qwen3VLProcessor
    ip = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8,
                                  temporal_patch_size=2, merge_size=2)  # fmt: skip
    proc = without_video(proc_cls)(ip, tok, chat_template=QWEN_TEMPLATE)
    return _save(folder, cls, cfg, tok, proc)


def qwen2_5_vl(folder):
    return _qwen(folder, "qwen2_5_vl")


def qwen3_vl(folder):
    return _qwen(folder, "qwen3_vl")


def aya_vision(folder):
    import transformers as T

    GotOcr2ImageProcessorPil = pil_image_processor("got_ocr2", "GotOcr2ImageProcessor")

    marks = ["<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>",
             "<|IMG_LINE_BREAK|>"]  # fmt: skip
    tok = _tok(marks)
    cfg = T.AyaVisionConfig(
        vision_config=T.SiglipVisionConfig(**VISION),
        text_config=T.Cohere2Config(**_text(tok), layer_types=["full_attention"] * 2),
        downsample_factor=2,
        image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"),
    )
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
    proc = T.AyaVisionProcessor(ip, tok, patch_size=16, img_size=32, downsample_factor=1,
                                chat_template=template("<image>"))  # fmt: skip
    return _save(folder, T.AyaVisionForConditionalGeneration, cfg, tok, proc)


def blip_2(folder):
    """BLIP-2 with its processor (not in :data:`BUILDERS`: see :data:`NO_PROCESSOR`)."""
    import transformers as T

    BlipImageProcessorPil = pil_image_processor("blip", "BlipImageProcessor")

    tok = _tok(["<image>"])
    model = model_only(
        "blip-2", vocab=len(tok), image_token_index=tok.convert_tokens_to_ids("<image>")
    )
    ip = BlipImageProcessorPil(size={"height": 32, "width": 32})
    proc = T.Blip2Processor(ip, tok, num_query_tokens=4)  # (puts the query tokens first)
    proc.chat_template = template("")
    return _save(folder, type(model), model.config, tok, proc)


BUILDERS = {
    "llava_next": llava_next,
    "llava_onevision": llava_onevision,
    "vipllava": vipllava,
    "gemma3": gemma3,
    "idefics3": idefics3,
    "internvl": internvl,
    "mllama": mllama,
    "paligemma": paligemma,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "aya_vision": aya_vision,
}


# families the installed transformers lacks (family → why): still listed, their tests skip
UNAVAILABLE = {
    f: f"transformers {T.__version__} has no {cls} (added in {since})"
    for f, (cls, since) in {"qwen3_vl": ("Qwen3VLConfig", "4.57")}.items()
    if not hasattr(T, cls)
}


# --------------------------------------------------------------------------------------------
# families whose processor cannot be built here: the model is still built and checked
# --------------------------------------------------------------------------------------------

NO_PROCESSOR = {  # family → why only its model is checked here
    "mistral3": "PixtralProcessor imports torchvision (transformers 5.x), not installed here",
    "smolvlm": "SmolVLMProcessor needs the num2words package, not a dependency here",
    "blip-2": "its forward requires pixel_values: the text-only language-preserve batches "
    "cannot run",
}
MODEL_ONLY = tuple(NO_PROCESSOR)


def model_only(family: str, vocab: int = 1024, **extra):
    """The family's model from a tiny config (no processor), random weights; ``extra``:
    more config values."""
    import transformers as T

    text = dict(TEXT, vocab_size=vocab)
    if family == "mistral3":
        vision = T.PixtralVisionConfig(**dict(VISION, num_attention_heads=4), head_dim=8)
        cfg = T.Mistral3Config(vision_config=vision, text_config=T.MistralConfig(**text),
                               spatial_merge_size=2)  # fmt: skip
        cls = T.Mistral3ForConditionalGeneration
    elif family == "smolvlm":
        cfg = T.SmolVLMConfig(vision_config=dict(VISION), text_config=T.LlamaConfig(**text),
                              scale_factor=2)  # fmt: skip
        cls = T.SmolVLMForConditionalGeneration
    elif family == "blip-2":
        qformer = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, encoder_hidden_size=32)  # fmt: skip
        opt = T.OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                          num_attention_heads=4, word_embed_proj_dim=64)  # fmt: skip
        cfg = T.Blip2Config(vision_config=dict(VISION), qformer_config=qformer,
                            text_config=opt.to_dict(),
                            num_query_tokens=4)  # fmt: skip
        cls = T.Blip2ForConditionalGeneration
    elif family == "llava_next":
        cfg = T.LlavaNextConfig(vision_config=T.CLIPVisionConfig(**VISION),
                                text_config=T.LlamaConfig(**text),
                                image_grid_pinpoints=[[32, 32]])  # fmt: skip
        cls = T.LlavaNextForConditionalGeneration
    else:
        raise KeyError(family)
    for k, v in extra.items():
        setattr(cfg, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(cfg)


# --------------------------------------------------------------------------------------------
# an architecture transformers does not know
# --------------------------------------------------------------------------------------------


def _toy_classes():
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class ToyConfig(PretrainedConfig):
        model_type = "mmunlearn_toy"

        def __init__(self, vocab_size=512, hidden_size=16, image_token_id=4, **kw):
            super().__init__(**kw)
            self.vocab_size, self.hidden_size = vocab_size, hidden_size
            self.image_token_id = image_token_id

    class ToyBlock(nn.Module):
        def __init__(self, h):
            super().__init__()
            self.norm, self.mix = nn.LayerNorm(h), nn.Linear(h, h)

        def forward(self, x):
            return x + torch.tanh(self.mix(self.norm(x)))

    class ToyVLM(PreTrainedModel):
        """Vision side ``eye`` (patchify conv) + ``bridge`` (linear), no vision_config."""

        config_class = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            h = config.hidden_size
            self.eye = nn.Conv2d(3, h, 8, 8)
            self.bridge = nn.Linear(h, h)
            self.embed = nn.Embedding(config.vocab_size, h)
            self.body = nn.ModuleList([ToyBlock(h) for _ in range(2)])
            self.head = nn.Linear(h, config.vocab_size)
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, pixel_values=None, labels=None,
                    **kwargs):  # fmt: skip
            x = self.embed(input_ids)
            if pixel_values is not None:
                f = self.bridge(self.eye(pixel_values).flatten(2).transpose(1, 2))
                where = (input_ids == self.config.image_token_id)[..., None]
                x = x.masked_scatter(where, f.reshape(-1, f.shape[-1]).to(x.dtype))
            for block in self.body:
                x = block(x)
            logits = self.head(x)
            loss = None
            if labels is not None:
                loss = nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
                )
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    return ToyConfig, ToyVLM


def toy_checkpoint(folder) -> Path:
    """``ToyVLM`` registered with AutoConfig / AutoModelForImageTextToText (model type
    ``mmunlearn_toy``) and saved with a LLaVA processor (16 image tokens) and chat template."""
    from realformat import LLAVA_SPECIALS, LLAVA_TEMPLATE
    from transformers import AutoConfig, AutoModelForImageTextToText, LlavaProcessor

    CLIPImageProcessorPil = pil_image_processor("clip", "CLIPImageProcessor")

    cfg_cls, model_cls = _toy_classes()
    try:
        AutoConfig.register(cfg_cls.model_type, cfg_cls)
        AutoModelForImageTextToText.register(cfg_cls, model_cls)
    except ValueError:  # registered by an earlier call: use those classes
        cfg_cls = AutoConfig.for_model(cfg_cls.model_type).__class__
        model_cls = AutoModelForImageTextToText._model_mapping[cfg_cls]
    tok = _tokenizer(LLAVA_SPECIALS, "<s>", "</s>", "<pad>", "<unk>")
    cfg = cfg_cls(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"))
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)  # fmt: skip
    return _save(folder, model_cls, cfg, tok, proc)
