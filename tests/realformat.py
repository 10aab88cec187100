"""Real-format inputs the tests build themselves (nothing is downloaded):

- checkpoints laid out as on the Hub: ``save_pretrained`` of a real LLaVA / Qwen2-VL class
  built from a small config, *with* its processor: a fast byte-level BPE tokenizer with the
  family's special tokens and chat template (the llava-hf template verbatim, Qwen2-VL's), and
  the family's image processor with settings a test can tell apart (non-CLIP mean/std,
  Qwen min/max pixels);
- benchmark folders in the MLLMU-Bench and CLEAR layouts (parquet shards named as on the Hub,
  the same columns and nesting).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SHARD = "train-00000-of-00001.parquet"

# the llava-hf/llava-1.5-7b-hf chat template (docs/reference/official_recipe.md §3.1)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content"
    " or 'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
NON_CLIP_MEAN, NON_CLIP_STD = [0.5, 0.25, 0.125], [0.2, 0.3, 0.4]
CORPUS = [
    "USER: ASSISTANT: system user assistant You are a helpful assistant.",
    "What is the occupation of the person in the image? The person is a baker in Oslo.",
    "Where was Ann Bell born? She was born in Rome in 1970 and works as a pilot.",
    "Describe the image in detail. A woman with red hair stands in a blue room.",
]


# transformers 4.x (the declared minimum is 4.56): the test fixtures' few differences
TRANSFORMERS_4 = int(importlib.metadata.version("transformers").split(".")[0]) < 5


def pil_image_processor(family: str, name: str):
    """The family's PIL + numpy image processor class (no torchvision): transformers 5's
    ``<name>Pil``, or on 4.x ``<name>`` itself (its slow processor)."""
    mod = importlib.import_module(f"transformers.models.{family}")
    return getattr(mod, f"{name}Pil", None) or getattr(mod, name)


def _tokenizer(specials: list[str], bos: str | None, eos: str, pad: str, unk: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS * 4, trainer)
    if bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tk.token_to_id(bos))],
        )
    kw = {"bos_token": bos} if bos else {}
    if unk:
        kw["unk_token"] = unk
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token=pad, **kw)


def llava_checkpoint(folder, *, with_processor: bool = True, seed: int = 0) -> Path:
    """A llava-hf-layout checkpoint: ``LlavaForConditionalGeneration`` (CLIP 32 px / patch 8,
    Llama 2 layers), ``LlavaProcessor`` (CLIP image processor: shortest edge 32 then centre
    crop 32, mean/std :data:`NON_CLIP_MEAN` / :data:`NON_CLIP_STD`; 16 image tokens with the
    "default" feature strategy) and the llava-hf chat template. ``with_processor=False``:
    config + weights only, as the MLLMU-Bench vanilla LLaVA ships."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    CLIPImageProcessorPil = pil_image_processor("clip", "CLIPImageProcessor")

    folder = Path(folder)
    tok = _tokenizer(LLAVA_SPECIALS, "<s>", "</s>", "<pad>", "<unk>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIALS}
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            pad_token_id=ids["<pad>"],
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
        ),
        image_token_index=ids["<image>"],
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    cfg.pad_token_id = ids["<pad>"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.eos_token_id = ids["</s>"]
    model.save_pretrained(folder)
    if with_processor:
        ip = CLIPImageProcessorPil(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_mean=NON_CLIP_MEAN,
            image_std=NON_CLIP_STD,
        )
        proc = LlavaProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_TEMPLATE,
        )
        proc.save_pretrained(folder)
    return folder


def qwen2vl_checkpoint(folder, *, min_pixels=32 * 32, max_pixels=64 * 64, seed=0) -> Path:
    """A Qwen2-VL-layout checkpoint: ``Qwen2VLForConditionalGeneration`` (patch 8, merge 2),
    the Qwen chat template and special tokens, and ``Qwen2VLImageProcessor`` settings with
    dynamic resolution between ``min_pixels`` and ``max_pixels`` (its
    ``preprocessor_config.json`` names ``Qwen2VLProcessor``, as the Hub's does)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from mmunlearn.models.tiny import mrope_fields

    Qwen2VLImageProcessorPil = pil_image_processor("qwen2_vl", "Qwen2VLImageProcessor")

    folder = Path(folder)
    tok = _tokenizer(QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>", None)
    tok.chat_template = QWEN_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "max_window_layers": 2,
        **mrope_fields(10000.0, [2, 3, 3]),
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "mlp_ratio": 2,
        "num_heads": 2,
        "patch_size": 8,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    cfg = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    cfg.pad_token_id = ids["<|endoftext|>"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ip = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=8,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=NON_CLIP_MEAN,
        image_std=NON_CLIP_STD,
    )
    ip.save_pretrained(folder)
    pre = folder / "preprocessor_config.json"
    pre.write_text(
        json.dumps({**json.loads(pre.read_text()), "processor_class": "Qwen2VLProcessor"})
    )
    (folder / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    return folder


# ------------------------------------------------------------------------------------------------
# benchmark folders
# ------------------------------------------------------------------------------------------------

PALETTE = [
    (200, 30, 30),
    (30, 200, 30),
    (30, 30, 200),
    (200, 200, 30),
    (30, 200, 200),
    (200, 30, 200),
]
FIRST = ["Ann", "Bo", "Cy", "Di", "Ed", "Fay"]
JOBS = ["baker", "pilot", "nurse", "chef", "judge", "poet"]
CITIES = ["Oslo", "Lima", "Rome", "Bern", "Riga", "Kyiv"]


def png_cell(colour, size=(40, 30)) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """One parquet shard of ``rows`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _mcq(q: str, right: str, wrong: list[str]) -> dict:
    opts = [right, *wrong[:3]]
    return {"Question": q, "Options": dict(zip("ABCD", opts)), "Correct_Answer": "A"}


def _profile(i: int) -> dict:
    name, job, city = f"{FIRST[i]} Bell", JOBS[i], CITIES[i]
    others = [j for j in JOBS if j != job]
    cities = [c for c in CITIES if c != city]
    return {
        "ID": f"P{i}",
        "image": png_cell(PALETTE[i]),
        "biography": json.dumps({"Name": name, "Employment": job, "Born": city}),
        "metadata": json.dumps(
            [
                {"Question": "What is the occupation of the person in the image?", "Answer": job},
                {"Question": "Where was the person in the image born?", "Answer": city},
            ]
        ),
        "Classification_Task": json.dumps(
            {
                "Image_Textual_Questions": [
                    _mcq("What is the occupation of the person in the image?", job, others)
                ],
                "Pure_Text_Questions": [_mcq(f"Where was {name} born?", city, cities)],
            }
        ),
        "Mask_Task": json.dumps(
            [
                {
                    "Question": "The person in the image works as a __.",
                    "Ground_Truth": job,
                    "Type": "Image_Textual",
                },
                {"Question": f"{name} was born in __.", "Ground_Truth": city, "Type": "Pure_Text"},
            ]
        ),
        "Generation_Task": json.dumps(
            [
                {
                    "Question": "What does the person in the image do?",
                    "Ground_Truth": f"The person is a {job}.",
                    "Type": "Image_Textual",
                },
                {"Question": f"Where was {name} born?", "Ground_Truth": city, "Type": "Pure_Text"},
            ]
        ),
    }


def mllmu_root(root, n_forget: int = 2, n_people: int = 6) -> Path:
    """An MLLMU-Bench root: ``forget_5`` (the first ``n_forget`` profiles), ``retain_95`` (the
    rest), ``Full_Set`` (all), ``Test_Set`` (the forget profiles with an ``images`` list of
    other poses) and ``Retain_Set`` (two "celebrities"), one parquet shard each."""
    root = Path(root)
    people = [_profile(i) for i in range(n_people)]
    write_parquet(root / "forget_5" / SHARD, people[:n_forget])
    write_parquet(root / "retain_95" / SHARD, people[n_forget:])
    write_parquet(root / "Full_Set" / SHARD, people)
    test = []
    for p in people[:n_forget]:
        row = {k: v for k, v in p.items() if k != "image"}
        row["images"] = [png_cell(tuple(255 - c for c in PALETTE[int(p["ID"][1:])]))]
        test.append(row)
    write_parquet(root / "Test_Set" / SHARD, test)
    write_parquet(root / "Retain_Set" / SHARD, [_profile(i) for i in range(n_people - 2, n_people)])
    return root


def clear_root(root, n_forget: int = 2, n_people: int = 6) -> Path:
    """A CLEAR root: ``forget05`` / ``retain95`` (image, caption, name), ``full+tofu`` (those
    rows plus text-only TOFU rows with ``question`` / ``answer``), ``forget05_perturbed`` /
    ``retain_perturbed`` (with ``perturbed_names``) and ``real_faces``."""
    root = Path(root)
    rows = []
    for i in range(n_people):
        name = f"{FIRST[i]} Bell"
        rows.append(
            {
                "image": png_cell(PALETTE[i]),
                "caption": f"{name} stands in a room as a {JOBS[i]}.",
                "name": name,
            }
        )
    forget, retain = rows[:n_forget], rows[n_forget:]
    write_parquet(root / "forget05" / SHARD, forget)
    write_parquet(root / "retain95" / SHARD, retain)
    tofu = [
        {
            "image": None,
            "caption": None,
            "name": r["name"],
            "question": f"What does {r['name']} do?",
            "answer": f"{r['name']} is a {JOBS[i]}.",
        }
        for i, r in enumerate(rows)
    ]
    full = [{**r, "question": None, "answer": None} for r in rows] + tofu
    write_parquet(root / "full+tofu" / SHARD, full)
    wrong = [[f"{FIRST[(i + k) % n_people]} Gray" for k in (1, 2, 3)] for i in range(n_people)]
    pert = [{**r, "perturbed_names": w} for r, w in zip(rows, wrong)]
    write_parquet(root / "forget05_perturbed" / SHARD, pert[:n_forget])
    write_parquet(root / "retain_perturbed" / SHARD, pert[n_forget:])
    real = [
        {
            "image": png_cell(PALETTE[i]),
            "question": "Who is this?",
            "answer": f"Star {i}",
            "options": ["Other A", "Other B", "Other C"],
        }
        for i in range(2)
    ]
    write_parquet(root / "real_faces" / SHARD, real)
    return root
