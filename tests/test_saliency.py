"""Saliency engine: Fisher through grad hooks vs a plain loop, groups, masks, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mmunlearn.fisher import collect_fisher, load_fisher, save_fisher
from mmunlearn.masks import build_masks, masks_from_fishers
from mmunlearn.params import canonical_name, module_groups
from mmunlearn.saliency import SaliencyMask

IMAGE_TOKEN = 3
VOCAB = 128
N_IMG = (32 // 8) ** 2 + 1  # "full" strategy: patches + CLS


# ------------------------------------------------------------------ tiny models and batches
def tiny_llava():
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
        image_token_index=IMAGE_TOKEN,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(cfg)


def llava_batch(b=2, text=6, image=True):
    """input_ids: [bos-ish token, N_IMG image tokens, text tokens]; labels on the text only."""
    ids = torch.randint(5, VOCAB, (b, 1 + N_IMG + text))
    labels = ids.clone()
    if image:
        ids[:, 1 : 1 + N_IMG] = IMAGE_TOKEN
        labels[:, : 1 + N_IMG] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if image:
        batch["pixel_values"] = torch.randn(b, 3, 32, 32)
    return batch


def tiny_llama(tied=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


def text_batch(b=2, n=8):
    ids = torch.randint(0, VOCAB, (b, n))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class MLP(nn.Module):
    def __init__(self, d=16, h=32, out=4):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, out)
        self.norm = nn.LayerNorm(d)

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.fc2(torch.tanh(self.fc1(self.norm(x)))), y)


def mlp_loss(model, batch):
    return model(*batch)


def mlp_batches(n=3, b=8):
    return [(torch.randn(b, 16), torch.randint(0, 4, (b,))) for _ in range(n)]


def plain_fisher(model, batches, loss_fn):
    """Oracle: loss.backward() per batch, sum p.grad², mean over batches."""
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for b in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, b).backward()
        for n, p in params.items():
            if p.grad is not None:
                acc[n] += p.grad.float() ** 2
    model.zero_grad(set_to_none=True)
    return {canonical_name(n): a / len(batches) for n, a in acc.items()}


def hf_loss(model, batch):
    return model(**batch).loss


def assert_fisher_equal(got, want, rtol=1e-5):
    assert list(got) == list(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=1e-30, msg=n)


def assert_clean(model):
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert not p._post_accumulate_grad_hooks, n  # None or empty after removal


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    m = tiny_llava()
    m.train()
    return m


def random_fishers(names_shapes, zeros=0.2):
    ff, fp = {}, {}
    for n, s in names_shapes.items():
        a, b = torch.rand(s) ** 4, torch.rand(s) ** 4
        a[torch.rand(s) < zeros] = 0.0
        b[torch.rand(s) < zeros] = 0.0
        ff[n], fp[n] = a, b
    return ff, fp


SHAPES = {
    "a.fc.weight": (13, 7),
    "a.fc.bias": (13,),
    "b.norm.weight": (5,),
    "c.proj.weight": (3, 9),
}


# ------------------------------------------------------------------ names
def test_canonical_name():
    assert canonical_name("module.model.x.weight") == "model.x.weight"
    assert canonical_name("_orig_mod.model.x.weight") == "model.x.weight"
    assert canonical_name("module._orig_mod.model.x.weight") == "model.x.weight"
    assert canonical_name("base_model.model.model.layers.0.q_proj.weight") == (
        "model.layers.0.q_proj.weight"
    )
    assert canonical_name(
        "model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.mlp.weight"
    ) == ("model.layers.0.mlp.weight")
    # "model." alone, or "module" inside a path, is not a wrapper prefix
    assert canonical_name("model.module.weight") == "model.module.weight"
    assert canonical_name("base_model.weight") == "base_model.weight"


# ------------------------------------------------------------------ Fisher
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fisher_mlp_matches_plain_loop(backend):
    model = MLP()
    batches = mlp_batches()
    want = plain_fisher(model, batches, mlp_loss)
    got = collect_fisher(model, batches, loss_fn=mlp_loss, progress=False, backend=backend)
    assert_fisher_equal(got, want)
    assert all(t.dtype == torch.float32 for t in got.values())
    assert_clean(model)


def test_fisher_abs_mode_and_param_subset():
    model = MLP()
    batches = mlp_batches(2)
    got = collect_fisher(
        model,
        batches,
        ["fc1.weight", "module.fc2.bias"],
        mode="abs",
        loss_fn=mlp_loss,
        progress=False,
        backend="torch",
    )
    assert list(got) == ["fc1.weight", "fc2.bias"]
    want = torch.zeros_like(model.fc1.weight)
    for b in batches:
        model.zero_grad(set_to_none=True)
        mlp_loss(model, b).backward()
        want += model.fc1.weight.grad.abs()
    torch.testing.assert_close(got["fc1.weight"], want / 2, rtol=1e-5, atol=0)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="nope"):
        collect_fisher(model, batches, ["nope"], loss_fn=mlp_loss, progress=False)


def test_fisher_llava_matches_plain_loop(llava):
    batches = [llava_batch(), llava_batch(image=False), llava_batch(b=1)]
    want = plain_fisher(llava, batches, hf_loss)
    got = collect_fisher(llava, batches, progress=False, backend="torch")
    assert_fisher_equal(got, want)
    assert_clean(llava)
    # the vision and language sides both received gradient (CLIPVisionModel's parameters sit
    # under ``vision_model.`` on transformers 4.x, directly under the tower on 5.x)
    (fc1,) = [n for n in got if n.startswith("model.vision_tower.")
              and n.endswith("encoder.layers.0.mlp.fc1.weight")]  # fmt: skip
    assert got[fc1].sum() > 0
    assert got["model.multi_modal_projector.linear_1.weight"].sum() > 0
    assert got["lm_head.weight"].sum() > 0


def test_fisher_errors_no_labels_and_tied_listed_twice():
    model = tiny_llama(tied=False)
    b = text_batch()
    del b["labels"]
    with pytest.raises(ValueError, match="labels"):
        collect_fisher(model, [b], progress=False)
    assert_clean(model)
    tied = tiny_llama(tied=True)
    with pytest.raises(ValueError, match="tied"):
        collect_fisher(
            tied,
            [b],
            {
                "lm_head.weight": tied.lm_head.weight,
                "model.embed_tokens.weight": tied.model.embed_tokens.weight,
            },
            progress=False,
        )


@pytest.mark.parametrize("ckpt", [None, "nonreentrant", "reentrant"])
def test_fisher_tied_weights_and_checkpointing(ckpt):
    model = tiny_llama(tied=True)
    model.train()
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied, once
    batches = [text_batch(), text_batch()]
    want = plain_fisher(model, batches, hf_loss)  # total gradient of the shared weight, squared
    if ckpt is not None:
        kw = {"use_reentrant": ckpt == "reentrant"}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        assert (
            getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        )
    got = collect_fisher(model, batches, progress=False, backend="torch")
    assert_fisher_equal(got, want)
    assert_clean(model)


class SharedTwice(nn.Module):
    """One Linear applied in two checkpointed segments."""

    def __init__(self, reentrant):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        x = x.requires_grad_()
        h = checkpoint(self.lin, x, use_reentrant=self.reentrant)
        h = checkpoint(self.lin, torch.tanh(h), use_reentrant=self.reentrant)
        return (h**2).mean()


def test_fisher_shared_weight_in_two_reentrant_segments_raises():
    batches = [torch.randn(4, 8) for _ in range(2)]
    model = SharedTwice(reentrant=False)
    loss = lambda m, b: m(b)
    got = collect_fisher(model, batches, loss_fn=loss, progress=False)
    assert_fisher_equal(got, plain_fisher(model, batches, loss))
    model.reentrant = True  # the hook fires once per segment: partial gradients
    with pytest.raises(RuntimeError, match="fired twice.*use_reentrant"):
        collect_fisher(model, batches, loss_fn=loss, progress=False)
    assert_clean(model)


def test_fisher_hooks_removed_when_loss_raises():
    model = MLP()
    good = mlp_batches(2)

    def batches():
        yield good[0]
        yield good[1]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collect_fisher(model, batches(), loss_fn=mlp_loss, progress=False)
    assert_clean(model)

    def bad_loss(model, batch):
        loss = mlp_loss(model, batch)
        if batch is good[1]:
            raise ValueError("bad batch")
        return loss

    with pytest.raises(ValueError, match="bad batch"):
        collect_fisher(model, good, loss_fn=bad_loss, progress=False)
    assert_clean(model)
    # and the model still works normally afterwards
    mlp_loss(model, good[0]).backward()
    assert model.fc1.weight.grad is not None


def test_fisher_official_parity_bf16():
    model = MLP().to(torch.bfloat16)
    batches = [(x.bfloat16(), y) for x, y in mlp_batches(2)]
    got = collect_fisher(model, batches, loss_fn=mlp_loss, progress=False, official_parity=True)
    for n in dict(model.named_parameters()):
        assert got[n].dtype == torch.bfloat16 and got[n].device.type == "cpu"
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b in batches:
        model.zero_grad(set_to_none=True)
        mlp_loss(model, b).backward()
        for n, p in model.named_parameters():
            want[n] += p.grad.cpu() * p.grad.cpu()  # squared and summed in bf16
    model.zero_grad(set_to_none=True)
    for n in want:
        torch.testing.assert_close(got[n], want[n] / 2, rtol=0, atol=0)


def test_save_load_fisher(tmp_path):
    ff, _ = random_fishers(SHAPES)
    path = save_fisher(tmp_path / "f.safetensors", ff, {"set": "forget", "n": 3})
    got, meta = load_fisher(path)
    assert list(got) == list(ff) and meta["set"] == "forget" and meta["n"] == 3
    for n in ff:
        assert torch.equal(got[n], ff[n])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("gamma", [1.0, 0.37])
def test_mask_bits_match_formula(backend, gamma):
    ff, fp = random_fishers(SHAPES)
    ff["a.fc.bias"][:4] = fp["a.fc.bias"][:4]  # exact ratio 1
    eps = 1e-15
    mask = SaliencyMask.from_fisher(ff, fp, gamma=gamma, eps=eps, backend=backend)
    assert mask.names == list(SHAPES)
    total_sel = 0
    for n in SHAPES:
        want = (ff[n] + eps) / (fp[n] + eps) >= gamma
        got = mask.dense(n)
        assert got.dtype == torch.bool and got.shape == want.shape
        assert torch.equal(got, want), n
        assert mask.coverage()["parameters"][n]["selected"] == int(want.sum())
        total_sel += int(want.sum())
    cov = mask.coverage()["total"]
    assert cov["selected"] == total_sel
    assert cov["total"] == sum(torch.Size(s).numel() for s in SHAPES.values())
    # zero / zero selects at gamma = 1 (the documented quirk of the rule)
    z = SaliencyMask.from_fisher({"w": torch.zeros(3)}, {"w": torch.zeros(3)}, backend=backend)
    assert z.dense("w").all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_topk_global_and_layer(backend):
    ff, fp = random_fishers(SHAPES, zeros=0.0)  # continuous: no ties
    n_total = sum(torch.Size(s).numel() for s in SHAPES.values())
    m = SaliencyMask.topk(ff, fp, 0.1, scope="global", backend=backend)
    k = -(-n_total // 10)
    assert m.coverage()["total"]["selected"] == k
    ratios = torch.cat([((ff[n] + 1e-15) / (fp[n] + 1e-15)).reshape(-1) for n in SHAPES])
    sel = torch.cat([m.dense(n).reshape(-1) for n in SHAPES])
    assert torch.equal(sel, ratios >= ratios.topk(k).values.min())
    assert m.meta["rule"] == "topk" and m.meta["scope"] == "global"
    lay = SaliencyMask.topk(ff, fp, 0.25, scope="layer", backend=backend)
    for n, s in SHAPES.items():
        numel = torch.Size(s).numel()
        r = ((ff[n] + 1e-15) / (fp[n] + 1e-15)).reshape(-1)
        kk = -(-numel // 4)
        assert lay.coverage()["parameters"][n]["selected"] == kk
        assert torch.equal(lay.dense(n).reshape(-1), r >= r.topk(kk).values.min())


def test_union_filter_and_coverage_groups():
    ff, fp = random_fishers(SHAPES)
    a = SaliencyMask.from_fisher(
        {n: ff[n] for n in ("a.fc.weight", "a.fc.bias")},
        {n: fp[n] for n in ("a.fc.weight", "a.fc.bias")},
        groups={"g1": ["a.fc.weight", "a.fc.bias"]},
    )
    b = SaliencyMask.topk(ff, fp, 0.5, groups={"g2": list(SHAPES)})
    u = a | b
    assert u.names == list(SHAPES) and u.meta["rule"] == "union"
    for n in SHAPES:
        want = b.dense(n) | (a.dense(n) if n in a else False)
        assert torch.equal(u.dense(n), want)
    cov = u.coverage()
    assert set(cov["groups"]) == {"g1", "g2"}
    assert cov["groups"]["g2"]["selected"] == cov["total"]["selected"]
    off = u.official_filter()  # the official substring test keeps the *_proj / fc biases too
    assert off.names == ["a.fc.weight", "a.fc.bias", "c.proj.weight"]
    assert off.meta["official_filter"] is True


def test_save_load_roundtrip(tmp_path):
    ff, fp = random_fishers(SHAPES)
    m = SaliencyMask.from_fisher(ff, fp, gamma=0.8, groups={"all": list(SHAPES)}, model_class="X")
    path = m.save(tmp_path / "sub" / "mask.safetensors")
    assert not [p for p in path.parent.iterdir() if p.name != "mask.safetensors"]
    got = SaliencyMask.load(path)
    assert got == m and got.names == m.names
    for n in SHAPES:
        assert torch.equal(got.packed(n), m.packed(n))
        assert got.shape(n) == torch.Size(SHAPES[n])
    assert got.meta == m.meta and got.groups == m.groups
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        assert f.get_tensor("a.fc.weight").dtype == torch.uint8
        assert f.get_tensor("a.fc.weight").numel() == (13 * 7 + 7) // 8
    assert meta["format_version"] == 1 and meta["rule"] == "gamma" and meta["gamma"] == 0.8
    assert meta["eps"] == 1e-15 and meta["model_class"] == "X" and meta["bit_order"] == "little"
    assert meta["shapes"]["a.fc.weight"] == [13, 7] and meta["groups"] == {"all": list(SHAPES)}
    assert "mmunlearn_version" in meta


def test_load_rejects_bad_files_and_mismatched_models(tmp_path):
    model = MLP()
    fisher = {n: torch.rand(p.shape) for n, p in model.named_parameters()}
    m = SaliencyMask.from_fisher(fisher, {n: torch.rand_like(t) for n, t in fisher.items()})
    path = m.save(tmp_path / "m.safetensors")
    assert SaliencyMask.load(path, model=model) == m
    other = MLP(h=48)  # fc1.weight is the first mismatch (named_parameters order)
    with pytest.raises(ValueError, match=r"fc1\.weight.*\(32, 16\).*\(48, 16\)"):
        SaliencyMask.load(path, model=other)
    missing = nn.Sequential(nn.Linear(16, 32))
    with pytest.raises(ValueError, match=r"'fc1\.weight' is not a parameter"):
        SaliencyMask.load(path, model=missing)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="bad.safetensors"):
        SaliencyMask.load(bad)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors.*not an mmunlearn"):
        SaliencyMask.load(foreign)
    fpath = save_fisher(tmp_path / "fisher.safetensors", fisher)
    with pytest.raises(ValueError, match="fisher.safetensors"):
        SaliencyMask.load(fpath)
    with pytest.raises(ValueError, match="nothere"):
        SaliencyMask.load(tmp_path / "nothere.safetensors")


class DDPLike(nn.Module):
    """Stands in for DDP: the real model under ``.module`` → names ``module.*``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *a, **k):
        return self.module(*a, **k)


def test_canonical_names_bind_wrapped_mask_to_bare_model(tmp_path):
    bare = MLP()
    wrapped = DDPLike(bare)
    assert next(iter(dict(wrapped.named_parameters()))).startswith("module.")
    batches = mlp_batches(2)
    ff = collect_fisher(wrapped, batches, loss_fn=mlp_loss, progress=False)
    fp = collect_fisher(wrapped, batches[:1], loss_fn=mlp_loss, progress=False)
    assert "fc1.weight" in ff
    m = SaliencyMask.from_fisher(ff, fp)
    m2 = SaliencyMask.load(m.save(tmp_path / "m.safetensors"), model=bare)
    for mm in (m, m2):
        bound = mm.for_model(bare)
        assert set(bound) == set(bare.parameters())
        assert bound[bare.fc1.weight].dtype == torch.uint8
        assert torch.equal(bound[bare.fc1.weight], mm.packed("fc1.weight"))
        assert set(mm.for_model(wrapped)) == set(bare.parameters())


# ------------------------------------------------------------------ groups
def test_groups_llava(llava):
    g = module_groups(llava)
    names = [n for n, p in llava.named_parameters() if p.requires_grad]
    assert sorted(g["vision"] + g["language"]) == sorted(names)
    assert all(
        n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in g["vision"]
    )
    assert "lm_head.weight" in g["language"]
    assert "model.language_model.embed_tokens.weight" in g["language"]
    assert any(n.startswith("model.multi_modal_projector.") for n in g["vision"])


def test_groups_qwen2vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from mmunlearn.models.tiny import mrope_fields

    hidden, heads = 32, 4
    half = hidden // heads // 2  # head_dim / 2 = 4
    cfg = Qwen2VLConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": hidden,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            **mrope_fields(10000.0, [half - 2, 1, 1]),
        },
        vision_config={
            "depth": 1,
            "embed_dim": 16,
            "hidden_size": hidden,
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=IMAGE_TOKEN,
        video_token_id=4,
    )
    model = Qwen2VLForConditionalGeneration(cfg)
    g = module_groups(model)
    assert g["vision"] and all(n.startswith("model.visual.") for n in g["vision"])
    assert g["language"] and not any(".visual." in n for n in g["language"])
    assert "model.language_model.embed_tokens.weight" in g["language"]
    assert any(n.startswith("model.visual.merger.") for n in g["vision"])  # the projector
    assert len(g["vision"]) + len(g["language"]) == len(list(model.parameters()))


def test_groups_unknown_family_and_rules():
    model = MLP()
    with pytest.raises(ValueError, match="MLP"):
        module_groups(model)
    g = module_groups(model, rules={"vision": [r"^norm\."], "language": [r"^fc"]})
    assert g == {
        "vision": ["norm.weight", "norm.bias"],
        "language": ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
    }
    model.fc2.requires_grad_(False)  # frozen parameters belong to no group
    assert module_groups(model, rules={"language": [r"fc"]}) == {
        "language": ["fc1.weight", "fc1.bias"]
    }


def test_groups_look_through_wrappers(llava):
    assert module_groups(DDPLike(llava)) == module_groups(llava)


# ------------------------------------------------------------------ build_masks
def test_build_masks_llava(llava, tmp_path, caplog):
    forget = [llava_batch(), llava_batch()]
    v_pres = [llava_batch()]
    l_pres = [llava_batch(image=False), llava_batch()]
    with caplog.at_level("INFO", logger="mmunlearn.masks"):
        masks = build_masks(
            llava,
            forget,
            v_pres,
            l_pres,
            gamma=1.0,
            progress=False,
            backend="torch",
            fisher_dir=tmp_path,
        )
    assert set(masks) == {"vision", "language", "both"}
    assert "saliency mask both" in caplog.text
    g = module_groups(llava)
    assert masks["vision"].names == g["vision"] and masks["language"].names == g["language"]
    both = masks["both"]
    assert both == masks["vision"] | masks["language"]
    for n in both.names:
        src = masks["vision"] if n in masks["vision"] else masks["language"]
        assert torch.equal(both.dense(n), src.dense(n))
    cov = both.coverage()
    assert set(cov["groups"]) == {"vision", "language"}
    assert 0 < cov["total"]["selected"] < cov["total"]["total"]
    assert_clean(llava)
    # the vision mask follows the formula on the vision preserve Fisher
    ff = collect_fisher(llava, forget, g["vision"], progress=False, backend="torch")
    fp = collect_fisher(llava, v_pres, g["vision"], progress=False, backend="torch")
    assert masks["vision"] == SaliencyMask.from_fisher(ff, fp, backend="torch")
    # masks at another threshold from the saved Fishers, no forward pass
    f_f, _ = load_fisher(tmp_path / "forget.safetensors")
    f_v, _ = load_fisher(tmp_path / "vision_preserve.safetensors")
    f_l, meta = load_fisher(tmp_path / "language_preserve.safetensors")
    assert meta["set"] == "language_preserve"
    again = masks_from_fishers(f_f, f_v, f_l, g, gamma=1.0)
    assert again["both"] == both
    top = masks_from_fishers(f_f, f_v, f_l, g, fraction=0.05)
    for k in ("vision", "language"):
        c = top[k].coverage()["total"]
        assert c["selected"] >= -(-c["total"] // 20)
    bound = both.for_model(llava)
    assert len(bound) == len(both.names)


def test_build_masks_offload_gives_the_same_masks(llava):
    """Offloading finished Fishers to the CPU changes where the masks are computed, not them."""
    forget, v_pres = [llava_batch(), llava_batch()], [llava_batch()]
    l_pres = [llava_batch(image=False), llava_batch()]
    a = build_masks(llava, forget, v_pres, l_pres, progress=False)
    b = build_masks(llava, forget, v_pres, l_pres, progress=False, offload=True)
    for k in ("vision", "language", "both"):
        assert a[k] == b[k], k


def test_fisher_is_one_accumulate_launch_per_bucket_not_per_parameter(monkeypatch):
    """#16: 120 parameters, 3 batches: 3 accumulate calls (one bucket per backward), and the
    same Fisher as the plain per-batch loop."""
    import mmunlearn.kernels.fisher as kf

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(60)])
    batches = [{"x": torch.randn(4, 6)} for _ in range(3)]
    loss_fn = lambda m, b: m(b["x"]).pow(2).mean()  # noqa: E731
    calls = []
    real = kf.fisher_accumulate_
    monkeypatch.setattr(
        kf, "fisher_accumulate_", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k)
    )
    got = collect_fisher(model, batches, loss_fn=loss_fn, progress=False)
    assert calls == [120, 120, 120]
    want = plain_fisher(model, batches, loss_fn)
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-12)
