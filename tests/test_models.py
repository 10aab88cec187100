"""Model adapters, tiny models, tokenizer, batches, save / load and sequence scores (CPU)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from realformat import TRANSFORMERS_4

from mmunlearn.data.schema import Sample
from mmunlearn.losses import per_sample_ce, sequence_logprob
from mmunlearn.models import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    LlavaAdapter,
    Qwen2VLAdapter,
    adapter_for,
    build_tokenizer,
    load_model,
    save_model,
    tiny_llava,
    tiny_qwen2vl,
)

FAMILIES = {"llava": tiny_llava, "qwen2vl": tiny_qwen2vl}


def _image(seed: int, size=(40, 36), color=None) -> Image.Image:
    """A small RGB image: random noise, or a flat colour with light noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    if color is None:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        arr = np.clip(np.asarray(color) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _mixed_samples() -> list[Sample]:
    """Two image samples around one text-only sample (the text one in the middle)."""
    return [
        Sample("What is the name of the person in the image?", "Alice Smith", _image(0)),
        Sample("Where was Bob Jones born?", "In New York, USA.", None, entity="bob", kind="text"),
        Sample("What does this person do for a living?", "She is a painter.", _image(1, (24, 48))),
    ]


CORPUS = [f"{s.question} {s.answer}" for s in _mixed_samples()] + [
    "Who is this? Carol Diaz. Dan Evans. What colour is the coat? red blue"
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


# ------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_roundtrip_and_special_tokens(tok, tmp_path):
    specials = [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token, tok.image_token]
    assert specials == ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
    ids = [tok.convert_tokens_to_ids(t) for t in specials]
    assert len(set(ids)) == 5 and tok.pad_token_id == 0
    for text in CORPUS:
        enc = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in enc
        assert tok.decode(enc) == _norm(text)  # exact, punctuation spacing included
    # special tokens are never split, and are skipped on decode
    enc = tok(f"USER: {IMAGE_TOKEN}{IMAGE_TOKEN}\nwho is this?</s>", add_special_tokens=False)
    toks = tok.convert_ids_to_tokens(enc["input_ids"])
    assert toks.count(IMAGE_TOKEN) == 2 and toks[-1] == "</s>"
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "user: who is this?"
    assert tok("zyzzyva")["input_ids"] == [tok.unk_token_id]
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tok2.get_vocab() == tok.get_vocab() and tok2.image_token == IMAGE_TOKEN
    assert tok2(CORPUS[0])["input_ids"] == tok(CORPUS[0])["input_ids"]
    bpe = build_tokenizer(CORPUS, vocab_size=120, kind="bpe")
    enc = bpe(CORPUS[1], add_special_tokens=False)["input_ids"]
    assert bpe.decode(enc) == _norm(CORPUS[1]) and len(bpe) <= 120
    with pytest.raises(ValueError, match="kind"):
        build_tokenizer(CORPUS, kind="char")


# ------------------------------------------------------------------------------------ batches


def _check_batch_layout(adapter, samples, batch, tok):
    """Labels are -100 exactly on prompt + padding; label tokens decode to the answers; image
    placeholders per row are as expected; image inputs hold only the image samples."""
    ids, att, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
    n_img_tok = adapter.num_image_tokens()
    img_id = adapter.image_token_id
    for i, s in enumerate(samples):
        n = int(att[i].sum())
        assert att[i, :n].all() and not att[i, n:].any()  # right padding
        assert (ids[i, n:] == tok.pad_token_id).all() and (lab[i, n:] == IGNORE_INDEX).all()
        ans = tok(s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        start = n - len(ans)
        assert ids[i, start:n].tolist() == ans
        assert lab[i, start:n].tolist() == ans  # the answer and its eos carry loss ...
        assert (lab[i, :start] == IGNORE_INDEX).all()  # ... and nothing else does
        labelled = lab[i][lab[i] != IGNORE_INDEX].tolist()
        assert tok.decode(labelled, skip_special_tokens=True) == _norm(s.answer)
        assert int((ids[i] == img_id).sum()) == (n_img_tok if s.image is not None else 0)
    n_images = sum(s.image is not None for s in samples)
    return n_images


@pytest.mark.parametrize("family", FAMILIES)
def test_collate_labels_image_tokens_and_image_inputs(tok, family):
    model = FAMILIES[family](tok)
    adapter = adapter_for(model, tok)
    samples = _mixed_samples()
    batch = adapter.collate(samples)
    n_images = _check_batch_layout(adapter, samples, batch, tok)
    assert n_images == 2
    s = adapter.image_size
    if family == "llava":
        assert isinstance(adapter, LlavaAdapter)
        assert adapter.num_image_tokens() == (32 // 8) ** 2 + 1
        assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
        assert batch["pixel_values"].shape == (n_images, 3, s, s)
    else:
        assert isinstance(adapter, Qwen2VLAdapter)
        assert adapter.num_image_tokens() == (32 // 8) ** 2 // 4
        assert adapter.mm_token_types is not TRANSFORMERS_4
        keys = {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"}
        # mm_token_type_ids where the forward takes it (transformers 5; 4.x has no such input)
        assert set(batch) == keys | ({"mm_token_type_ids"} if adapter.mm_token_types else set())
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * n_images
        assert batch["pixel_values"].shape == (n_images * 16, 3 * 2 * 8 * 8)
        if adapter.mm_token_types:
            assert torch.equal(
                batch["mm_token_type_ids"], (batch["input_ids"] == adapter.image_token_id).int()
            )
    assert batch["pixel_values"].dtype == torch.float32
    # the pixel values are those of the image samples, in order
    alone = adapter.collate([samples[2]])
    per_image = batch["pixel_values"].shape[0] // n_images
    assert torch.equal(alone["pixel_values"], batch["pixel_values"][per_image:])
    # ans_only=False: the prompt text carries loss too, never the image tokens or padding
    full = adapter.collate(samples, ans_only=False)
    assert torch.equal(full["input_ids"], batch["input_ids"])
    keep = (full["attention_mask"] == 1) & (full["input_ids"] != adapter.image_token_id)
    assert torch.equal(full["labels"] != IGNORE_INDEX, keep)
    # a text-only batch has no image inputs
    text_only = adapter.collate([samples[1]])
    assert set(text_only) == {"input_ids", "attention_mask", "labels"}
    # an adapter is a picklable collate_fn (DataLoader workers); the model is not shipped
    clone = pickle.loads(pickle.dumps(adapter))
    assert clone.model is None
    again = clone(samples)
    assert all(torch.equal(again[k], batch[k]) for k in batch)


def test_prompt_templates(tok):
    s = _mixed_samples()
    lla = adapter_for(tiny_llava(tok), tok)
    assert lla.prompt_text(s[1]) == "USER: Where was Bob Jones born? ASSISTANT:"
    assert lla.prompt_text(s[0]) == (
        "USER: " + IMAGE_TOKEN * 17 + "\nWhat is the name of the person in the image? ASSISTANT:"
    )
    assert lla.format(s[1]).endswith("ASSISTANT: In New York, USA.</s>")
    ids, _ = lla.encode(s[0])
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


# ------------------------------------------------------------------------------ forward / backward


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_forward_backward(tok, family):
    model = FAMILIES[family](tok)
    model.train()
    adapter = adapter_for(model, tok)
    batch = adapter.collate(_mixed_samples())
    out = model(**batch)
    assert torch.isfinite(out.loss)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    out.loss.backward()
    groups = adapter.param_groups()
    params = dict(model.named_parameters())
    for group in ("vision", "language"):
        grads = [params[n].grad for n in groups[group] if params[n].grad is not None]
        assert grads, group
        assert all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0, group
    # a text-only batch works too (no image inputs at all)
    model.zero_grad()
    text = adapter.collate([_mixed_samples()[1]])
    out = model(**text)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_qwen25vl_uses_the_qwen_adapter(tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    base = tiny_qwen2vl(tok).config
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        window_size=32,
        fullatt_block_indexes=[1],
    )
    cfg = Qwen2_5_VLConfig(
        text_config=base.text_config.to_dict(),
        vision_config=vision,
        image_token_id=base.image_token_id,
        video_token_id=base.video_token_id,
        vision_start_token_id=base.video_token_id,
        vision_end_token_id=base.video_token_id,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    adapter = adapter_for(model, tok, image_size=32)
    assert isinstance(adapter, Qwen2VLAdapter)
    assert [c.__name__ for c in adapter.block_classes()] == [
        "Qwen2_5_VLVisionBlock",
        "Qwen2_5_VLDecoderLayer",
    ]
    out = model(**adapter.collate(_mixed_samples()))
    out.loss.backward()
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------------------ adapters


@pytest.mark.parametrize("family", FAMILIES)
def test_module_groups_and_block_classes(tok, family):
    model = FAMILIES[family](tok)
    adapter = adapter_for(model, tok)
    names = adapter.vision_module_names()
    groups = adapter.param_groups()
    all_names = [n for n, _ in model.named_parameters()]
    assert sorted(groups["vision"] + groups["language"]) == sorted(all_names)
    if family == "llava":
        assert names == ["model.vision_tower", "model.multi_modal_projector"]
        assert [c.__name__ for c in adapter.block_classes()] == [
            "CLIPEncoderLayer",
            "LlamaDecoderLayer",
        ]
    else:
        assert names == ["model.visual"]
        assert [c.__name__ for c in adapter.block_classes()] == [
            "Qwen2VLVisionBlock",
            "Qwen2VLDecoderLayer",
        ]
    assert all(n.startswith(tuple(m + "." for m in names)) for n in groups["vision"])
    assert any(n.startswith("model.language_model.") for n in groups["language"])
    vision_cls = adapter.block_classes()[0]
    assert any(isinstance(m, vision_cls) for m in model.get_submodule(names[0]).modules())


def test_adapter_for_unsupported_model():
    with pytest.raises(TypeError, match="Linear"):
        adapter_for(torch.nn.Linear(2, 2))
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        adapter_for(llama)


def test_tiny_models_are_deterministic_and_small(tok):
    state = torch.random.get_rng_state()
    a, b, c = tiny_llava(tok, seed=0), tiny_llava(tok, seed=0), tiny_llava(tok, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert a.config.image_token_id == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert a.config.text_config.vocab_size == len(tok)
    assert a.generation_config.pad_token_id == tok.pad_token_id
    big = build_tokenizer([" ".join(f"w{i}" for i in range(600))], vocab_size=512)
    n = sum(p.numel() for p in tiny_llava(big).parameters())
    assert 150_000 < n < 200_000
    q1, q2 = tiny_qwen2vl(tok, seed=3), tiny_qwen2vl(tok, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(q1.parameters(), q2.parameters()))


def test_image_preprocessing_matches_the_reference_processors(tok):
    """Our PIL + numpy preprocessing equals the transformers image processors (built locally)."""
    from realformat import pil_image_processor

    Clip = pil_image_processor("clip", "CLIPImageProcessor")
    QwenProc = pil_image_processor("qwen2_vl", "Qwen2VLImageProcessor")
    imgs = [_image(5, (32, 32)), _image(6, (32, 32))]
    lla = adapter_for(tiny_llava(tok), tok)
    ref = Clip(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    got = lla.image_inputs(imgs)["pixel_values"]
    torch.testing.assert_close(got, ref(imgs, return_tensors="pt")["pixel_values"])
    qwen = adapter_for(tiny_qwen2vl(tok), tok)
    ref = QwenProc(
        patch_size=8,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32},
        min_pixels=32 * 32,  # (what transformers 4.x's processor reads instead of size)
        max_pixels=32 * 32,
    )
    want = ref(imgs, return_tensors="pt")
    got = qwen.image_inputs(imgs)
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"])
    assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])


# ------------------------------------------------------------------------------ training


def test_tiny_llava_learns_a_toy_set():
    """30 AdamW steps on 4 samples: the loss drops > 5x, and the two image questions (same
    text, different pictures) are answered from the picture."""
    samples = [
        Sample("Who is this?", "Carol Diaz", _image(10, color=(220, 40, 40))),
        Sample("Who is this?", "Dan Evans", _image(11, color=(40, 40, 220))),
        Sample("What colour is the coat of Carol Diaz?", "red", None, kind="text"),
        Sample("What colour is the coat of Dan Evans?", "blue", None, kind="text"),
    ]
    tok = build_tokenizer([f"{s.question} {s.answer}" for s in samples])
    model = tiny_llava(tok, seed=0)
    model.train()
    adapter = adapter_for(model, tok)
    batch = adapter.collate(samples)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, losses
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    pred = logits[:, :-1].argmax(-1)
    lab = batch["labels"][:, 1:]
    m = lab != IGNORE_INDEX
    assert torch.equal(pred[m], lab[m])  # every answer token right, incl. the image ones


# ------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip(tok, tmp_path, family):
    model = FAMILIES[family](tok, seed=2)
    target = tmp_path / "ckpt"
    save_model(model, tok, target)
    save_model(model, tok, target)  # overwriting an existing directory
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary siblings left
    assert (target / "model.safetensors").exists() and (target / "tokenizer.json").exists()
    model2, tok2 = load_model(target)
    assert type(model2) is type(model) and not model2.training
    assert tok2.get_vocab() == tok.get_vocab()
    samples = _mixed_samples()
    batch = adapter_for(model, tok).collate(samples)
    batch2 = adapter_for(model2, tok2).collate(samples)
    assert all(torch.equal(batch[k], batch2[k]) for k in batch)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model2(**batch2).logits)
    model3, _ = load_model(target, dtype=torch.bfloat16)
    assert next(model3.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_from_left_padded_prompts(tok, family):
    model = FAMILIES[family](tok, seed=4)
    adapter = adapter_for(model, tok)
    samples = _mixed_samples()
    batch = adapter.collate(samples, with_answer=False)
    assert "labels" not in batch
    att = batch["attention_mask"]
    assert att[:, -1].all() and not att[1, 0]  # left padding; the text-only prompt is shortest
    for i, s in enumerate(samples):  # the prompt ends the row, no answer in it
        ids = adapter.encode(s, with_answer=False)[0]
        assert batch["input_ids"][i, -len(ids) :].tolist() == ids
    kw = dict(
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        out = model.generate(**batch, **kw)
        n = batch["input_ids"].shape[1]
        assert out.sequences.shape == (len(samples), n + 4)
        # batched, left-padded generation scores each prompt as it would be alone
        for i, s in enumerate(samples):
            one = model.generate(**adapter.collate([s], with_answer=False), **kw)
            assert torch.equal(one.sequences[0, -4:], out.sequences[i, -4:])
            torch.testing.assert_close(one.scores[0][0], out.scores[0][i], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ scores


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_logprob_consistent_with_the_loss(tok, family):
    model = FAMILIES[family](tok, seed=5)
    adapter = adapter_for(model, tok)
    samples = _mixed_samples()
    batch = adapter.collate(samples)
    n_tok = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
    with torch.no_grad():
        out = model(**batch)
        lp = sequence_logprob(out.logits, batch["labels"])
        ce = per_sample_ce(out.logits, batch["labels"])
    assert lp.shape == ce.shape == (len(samples),)
    assert (lp < 0).all()
    torch.testing.assert_close(ce, -lp / n_tok)
    # token-weighted mean of the per-sample CE = the model's own (batch-mean) loss
    torch.testing.assert_close((ce * n_tok).sum() / n_tok.sum(), out.loss)
    with torch.no_grad():
        alone = model(**adapter.collate(samples[:1])).loss
    torch.testing.assert_close(ce[0], alone, atol=1e-5, rtol=1e-5)
    # gradients flow when the caller allows them (NPO)
    lp = sequence_logprob(model(**batch).logits, batch["labels"])
    lp.sum().backward()
    assert any(p.grad is not None for p in model.parameters())
