"""Any image-text-to-text model (issue 24), on real layouts of many families built offline
(tests/families.py: the real transformers class from a tiny config, saved with its real
processor class and a chat template):

* the vision / language partition covers every parameter exactly once, and the vision side is
  the family's encoder + projector / connector / image_newline (:data:`EXPECTED`);
* saliency → unlearn → eval through the CLI on each saved folder (small MLLMU-layout data);
* a save → load round trip gives the same weights and batches;
* FSDP2 on 2 gloo ranks gives the 1-process weights (LLaVA-NeXT, Idefics3);
* an unknown architecture gets the one-line error, and works with ``--vision-modules``;
* the per-family rules the generic one gets wrong, each with its reason (PaliGemma's answer
  as the causal suffix), and the generic rule agreeing with the built-in tables.
"""

from __future__ import annotations

import functools
import json
import pickle

import pytest
import torch
from families import BUILDERS, MODEL_ONLY, NO_PROCESSOR, UNAVAILABLE, model_only
from PIL import Image
from realformat import TRANSFORMERS_4, mllmu_root

from mmunlearn.cli import main
from mmunlearn.data.schema import Sample

# family → (model class, the vision side's module names: tests and docs/models.md agree)
EXPECTED = {
    "llava_next": ("LlavaNextForConditionalGeneration",
                   ["model.vision_tower", "model.multi_modal_projector", "model.image_newline"]),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration",
                        ["model.vision_tower", "model.multi_modal_projector",
                         "model.image_newline"]),
    "vipllava": ("VipLlavaForConditionalGeneration",
                 ["model.vision_tower", "model.multi_modal_projector"]),
    "gemma3": ("Gemma3ForConditionalGeneration",
               ["model.vision_tower", "model.multi_modal_projector"]),
    "idefics3": ("Idefics3ForConditionalGeneration", ["model.vision_model", "model.connector"]),
    "smolvlm": ("SmolVLMForConditionalGeneration", ["model.vision_model", "model.connector"]),
    "internvl": ("InternVLForConditionalGeneration",
                 ["model.vision_tower", "model.multi_modal_projector"]),
    "mistral3": ("Mistral3ForConditionalGeneration",
                 ["model.vision_tower", "model.multi_modal_projector"]),
    "mllama": ("MllamaForConditionalGeneration",
               ["model.vision_model", "model.multi_modal_projector"]),
    "paligemma": ("PaliGemmaForConditionalGeneration",
                  ["model.vision_tower", "model.multi_modal_projector"]),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", ["model.visual"]),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", ["model.visual"]),
    "aya_vision": ("AyaVisionForConditionalGeneration",
                   ["model.vision_tower", "model.multi_modal_projector"]),
    "blip-2": ("Blip2ForConditionalGeneration",
               ["vision_model", "qformer", "language_projection", "query_tokens"]),
}  # fmt: skip
WITH_PROCESSOR = sorted(BUILDERS)


# transformers 4.x's MllamaProcessor refuses a batch mixing image and text-only rows
MIXED = {"mllama": "transformers 4.x: MllamaProcessor takes no batch mixing image and text rows"}


def _here(families, mixed: bool = False):
    """``families`` as parameters, those the installed transformers lacks skipped (and with
    ``mixed``, batches of image and text-only rows, those whose 4.x processor refuses them)."""
    why = dict(UNAVAILABLE, **(MIXED if mixed and TRANSFORMERS_4 else {}))
    return [pytest.param(f, marks=pytest.mark.skip(reason=why[f])) if f in why else f
            for f in families]  # fmt: skip


IMG = Image.new("RGB", (40, 30), (200, 30, 30))
SAMPLES = [Sample("What is shown?", "a red box", image=IMG), Sample("Where?", "Rome", image=None)]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # restored by conftest


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {f: BUILDERS[f](root / f) for f in WITH_PROCESSOR if f not in UNAVAILABLE}
    out["mllmu"] = mllmu_root(root / "MLLMU-Bench", n_forget=2, n_people=4)
    return out


def _load(folder, **kw):
    from mmunlearn.models import load_checkpoint

    return load_checkpoint(folder, **kw)


def test_families_cover_the_issue_list():
    assert len(EXPECTED) >= 11 and set(WITH_PROCESSOR) | set(MODEL_ONLY) == set(EXPECTED)
    assert set(NO_PROCESSOR) == set(MODEL_ONLY)  # each one says why


@pytest.mark.parametrize("family", _here(sorted(EXPECTED)))
def test_partition_covers_every_parameter_once(folders, family):
    from mmunlearn.params import canonical_parameters, module_groups, vision_module_names

    if family in MODEL_ONLY:
        model = model_only(family)
    else:
        model, adapter = _load(folders[family])
        assert adapter.vision_module_names() == EXPECTED[family][1]
        assert adapter.family == {"qwen2_5_vl": "qwen2vl"}.get(family, family)  # (built-in)
    assert type(model).__name__ == EXPECTED[family][0]
    assert vision_module_names(model) == EXPECTED[family][1]
    groups = module_groups(model)
    names = list(canonical_parameters(model, trainable_only=True))
    assert sorted(groups["vision"] + groups["language"]) == sorted(names)
    assert not set(groups["vision"]) & set(groups["language"])
    for prefix in EXPECTED[family][1]:
        assert any(n == prefix or n.startswith(prefix + ".") for n in groups["vision"]), prefix
    assert any(".layers." in n for n in groups["language"])
    assert not any("language_model" in n or "text_model" in n for n in groups["vision"])


@pytest.mark.parametrize("family", _here(WITH_PROCESSOR, mixed=True))
def test_batches_forward_and_answer_labels(folders, family):
    """The processor's inputs the forward names; labels exactly on each answer."""
    model, adapter = _load(folders[family])
    batch = adapter.collate(SAMPLES)
    if adapter.collator.input_keys is not None:  # (None: the built-in Qwen2.5-VL adapter)
        assert set(batch) - {"labels"} <= adapter.collator.input_keys | {"attention_mask"}
    for i, s in enumerate(SAMPLES):
        lab = batch["labels"][i]
        text = adapter.tokenizer.decode(lab[lab != -100]).strip()
        assert text.startswith(s.answer) and "?" not in text, text
    out = model(**batch)
    assert torch.isfinite(out.loss)
    again = pickle.loads(pickle.dumps(adapter)).collate(SAMPLES)  # (DataLoader workers)
    assert again.keys() == batch.keys() and all(torch.equal(again[k], batch[k]) for k in batch)
    blocks = adapter.block_classes()
    assert len(blocks) >= 2 and all(isinstance(c, type) for c in blocks)


@pytest.mark.parametrize("family", _here(WITH_PROCESSOR, mixed=True))
def test_cli_saliency_unlearn_eval(folders, tmp_path, family):
    data = ["--mllmu", str(folders["mllmu"]), "--split", "5"]
    model = ["--model", str(folders[family])]
    sal = tmp_path / "sal"
    assert main(["saliency", *model, *data, "--fisher-batch-size", "4", "--out", str(sal)]) == 0
    for g in ("vision", "language", "both"):
        assert (sal / f"mask_{g}.safetensors").is_file()
    out = tmp_path / "u"
    argv = ["unlearn", *model, *data, "--mask", str(sal / "mask_both.safetensors")]
    argv += ["--lr", "1e-3", "--steps", "2", "--batch-size", "2", "--out", str(out)]
    assert main(argv) == 0
    log = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in log} == {"forget", "retain"}
    assert all(r["masked_fraction"] is not None for r in log if r["phase"] == "forget")
    ev = tmp_path / "ev"
    argv = ["eval", "--model", str(out / "model"), *data, "--limit", "2"]
    assert main([*argv, "--max-new-tokens", "2", "--out", str(ev)]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert set(next(iter(res["methods"].values()))) >= {"forget", "retain"}


@pytest.mark.parametrize("family", _here(WITH_PROCESSOR))
def test_save_load_round_trip(folders, tmp_path, family):
    from mmunlearn.models import save_model

    model, adapter = _load(folders[family])
    with torch.no_grad():
        next(model.parameters()).add_(0.5)  # not the folder's weights any more
    save_model(model, adapter.processor, tmp_path / "copy")
    again, adapter2 = _load(tmp_path / "copy")
    assert type(adapter2) is type(adapter) and type(again) is type(model)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    b1, b2 = adapter.collate(SAMPLES), adapter2.collate(SAMPLES)
    assert b1.keys() == b2.keys() and all(torch.equal(b1[k], b2[k]) for k in b1)


def test_generic_rule_agrees_with_the_builtin_tables():
    from mmunlearn.models import build_tokenizer, tiny_llava, tiny_qwen2vl
    from mmunlearn.params import model_family, vision_components, vision_module_names

    tok = build_tokenizer(["a b c"])
    for build, fam in ((tiny_llava, "llava"), (tiny_qwen2vl, "qwen2_vl")):
        model = build(tok)
        assert vision_module_names(model) == BUILTIN[fam][1]
        found = [n.rsplit(".", 1)[-1] for n in vision_module_names(model)]
        assert found == list(vision_components(model_family(model)))
    # LLaVA-NeXT is not "llava": its image_newline is vision too (a substring match made it so)
    assert model_family(model_only("llava_next")) is None


def test_paligemma_answer_is_the_causal_suffix(folders):
    """Why PaliGemma is in processing.SUFFIX_TOKEN_TYPES: token_type_ids 0 is its bidirectional
    prefix, so an answer left at 0 sees its own later tokens (its processor marks a suffix 1).
    With the rule, the logits before the last answer token ignore that token."""
    model, adapter = _load(folders["paligemma"])
    batch = adapter.collate(SAMPLES[:1])
    ans = batch["labels"][0] != -100
    assert (batch["token_type_ids"][0][ans] == 1).all()
    assert (batch["token_type_ids"][0][~ans & (batch["attention_mask"][0] == 1)] == 0).all()
    last = int(ans.nonzero()[-1])
    other = batch["input_ids"].clone()
    other[0, last] = next(t for t in adapter.tokenizer("Rome")["input_ids"] if t != other[0, last])
    # transformers 4.x reads token_type_ids only in a forward with labels (else all is prefix)
    lab = batch["labels"] if TRANSFORMERS_4 else None
    with torch.no_grad():
        x = model(**{**batch, "labels": lab}).logits[0, :last]
        y = model(**{**batch, "input_ids": other, "labels": lab}).logits[0, :last]
        torch.testing.assert_close(x, y)
        prefix = {**batch, "token_type_ids": torch.zeros_like(batch["token_type_ids"])}
        z = model(**{**prefix, "input_ids": other, "labels": lab}).logits[0, :last]
        x0 = model(**{**prefix, "labels": lab}).logits[0, :last]
    assert not torch.allclose(x0, z)  # all-prefix: the future leaks in


@pytest.mark.slow
def test_every_image_text_to_text_type_of_transformers_on_meta():
    """The generic rule over every model type ``AutoModelForImageTextToText`` maps, built on
    the meta device from its default config (no weights): a model with a ``vision_config``
    gets a vision side (a partition, the language model not in it) and block classes; one
    without (text-only defaults, UDOP's patch embedding inside its T5 encoder) the one-line
    error naming ``--vision-modules``. Types whose default config does not build (a missing
    optional package, defaults that need a checkpoint) are skipped."""
    import warnings

    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from mmunlearn.models.generic import block_classes
    from mmunlearn.params import canonical_parameters, module_groups

    found, bad = [], []
    for mt in sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                cfg = AutoConfig.for_model(mt)
                model = AutoModelForImageTextToText.from_config(cfg)
        except Exception:  # noqa: BLE001  (ImportError, defaults that need a checkpoint, …)
            continue
        model.requires_grad_(True)  # (Idefics' defaults freeze the vision side)
        try:
            groups = module_groups(model)
        except ValueError as e:
            msg = str(e)
            if getattr(cfg, "vision_config", None) is not None or "--vision-modules" not in msg:
                bad.append((mt, msg[:120]))
            continue
        names = list(canonical_parameters(model, trainable_only=True))
        ok = sorted(groups["vision"] + groups["language"]) == sorted(names) and groups["vision"]
        text = ("language_model.", "text_model.", "lm_head.")
        ok = ok and not any(t in n for n in groups["vision"] for t in text)
        (found.append(mt) if ok and block_classes(model) else bad.append((mt, "partition")))
    assert not bad, bad
    assert len(found) >= 50, found


def test_processor_that_expands_images_on_every_row(tmp_path):
    """BLIP-2's processor puts its query tokens on every text once images are given: a
    mixed batch is then split (text rows through the tokenizer), so rows without an image
    hold no image token and the forward matches images to placeholders."""
    from families import blip_2

    model, adapter = _load(blip_2(tmp_path / "blip2"))
    batch = adapter.collate(SAMPLES)
    image = adapter.image_token_id
    assert (batch["input_ids"][0] == image).sum() == 4 and (batch["input_ids"][1] != image).all()
    assert torch.isfinite(model(**batch).loss)


def test_a_processor_that_cannot_be_built_is_named(tmp_path):
    """Mistral 3 here: its PixtralProcessor needs torchvision; the error says so in one line."""
    import importlib.util

    from families import _tok, model_only
    from realformat import pil_image_processor

    PixtralImageProcessorPil = pil_image_processor("pixtral", "PixtralImageProcessor")

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: PixtralProcessor builds")
    if TRANSFORMERS_4:
        pytest.skip("transformers 4.x's PixtralProcessor needs no torchvision: it builds")
    model_only("mistral3").save_pretrained(tmp_path)
    _tok(["[IMG]"]).save_pretrained(tmp_path)
    PixtralImageProcessorPil().save_pretrained(tmp_path)
    pre = tmp_path / "preprocessor_config.json"
    pre.write_text(
        json.dumps({**json.loads(pre.read_text()), "processor_class": "PixtralProcessor"})
    )
    with pytest.raises(ValueError, match=r"cannot load the processor \(PixtralProcessor requires"):
        _load(tmp_path)


# --------------------------------------------------------------------------------------------
# an unknown architecture
# --------------------------------------------------------------------------------------------


def _toy(folder):
    """A custom model (registered with the Auto classes, no vision_config, its vision side
    named ``eye`` / ``bridge``) saved with a LLaVA processor and chat template."""
    from families import toy_checkpoint

    return toy_checkpoint(folder)


def test_unknown_architecture_one_line_error_then_vision_modules(folders, tmp_path, capsys):
    from mmunlearn.models import save_model
    from mmunlearn.params import module_groups

    toy = _toy(tmp_path / "toy")
    capsys.readouterr()
    data = ["--mllmu", str(folders["mllmu"]), "--split", "5", "--fisher-batch-size", "4"]
    assert main(["saliency", "--model", str(toy), *data, "--out", str(tmp_path / "s0")]) == 1
    err = [x for x in capsys.readouterr().err.strip().splitlines() if "error" in x]
    assert len(err) == 1 and "ToyVLM" in err[0], err
    assert "vision_config" in err[0] and "--vision-modules" in err[0], err
    with pytest.raises(ValueError, match="no module or parameter named 'nose'"):
        _load(toy, vision_modules="eye,nose")
    model, adapter = _load(toy, vision_modules="eye,bridge")
    assert adapter.vision_module_names() == ["eye", "bridge"]
    groups = module_groups(model)
    assert {n.split(".")[0] for n in groups["vision"]} == {"eye", "bridge"}
    # the names travel with the model: the saved copy runs the CLI without the option
    save_model(model, adapter.processor, tmp_path / "toy2")
    assert main(["saliency", "--model", str(tmp_path / "toy2"), *data,
                 "--out", str(tmp_path / "s")]) == 0  # fmt: skip
    assert (tmp_path / "s" / "mask_vision.safetensors").is_file()
    # --vision-modules on the command line of unlearn (saliency shares the option)
    argv = ["unlearn", "--model", str(toy), *data, "--vision-modules", "eye,bridge"]
    assert main([*argv, "--steps", "1", "--out", str(tmp_path / "u")]) == 0
    saved = json.loads((tmp_path / "u" / "model" / "config.json").read_text())
    assert "eye" in json.dumps(saved) and "bridge" in json.dumps(saved)


@pytest.mark.parametrize("cmd", ["eval", "saliency"])
def test_eval_vision_modules_option(folders, tmp_path, capsys, cmd):
    """--vision-modules naming a module the model lacks: a bad option value, exit 2 in every
    command (a model whose vision side is not found without it: exit 1, test above)."""
    argv = [cmd, "--model", str(folders["idefics3"]), "--mllmu", str(folders["mllmu"])]
    argv += ["--limit", "1", "--max-new-tokens", "1", "--no-unlearning-metrics"] * (cmd == "eval")
    assert main([*argv, "--vision-modules", "vision_model,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--vision-modules" in err and "'nope'" in err, err


# --------------------------------------------------------------------------------------------
# FSDP2 on 2 CPU ranks
# --------------------------------------------------------------------------------------------


def _steps(model, adapter, sharded: bool):
    """Two plain gradient-ascent steps on one fixed batch (every rank feeds the whole batch:
    FSDP2 averages the gradients, so they are the 1-process ones)."""
    batch = adapter.collate(SAMPLES)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        (-model(**batch).loss).backward()
        opt.step()


def _fsdp_worker(rank, world, out, folder):
    from mmunlearn import fsdp

    torch.manual_seed(0)
    model, adapter = _load(folder)
    fsdp.shard_model(model, adapter.block_classes())
    _steps(model, adapter, True)
    full = fsdp.full_state_dict(model)
    if rank == 0:
        out["sd"] = {k: v.clone() for k, v in full.items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava_next", "idefics3"])
def test_fsdp2_two_ranks_match_one_process(folders, family):
    from helpers import run_ranks

    torch.manual_seed(0)
    model, adapter = _load(folders[family])
    _steps(model, adapter, False)
    ref = model.state_dict()
    got = run_ranks(functools.partial(_fsdp_worker, folder=str(folders[family])))["sd"]
    assert got.keys() == ref.keys()
    moved = 0
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
        moved += 1
    assert moved


# --------------------------------------------------------------------------------------------
# mmunlearn estimate, and docs/models.md
# --------------------------------------------------------------------------------------------

ESTIMATED = ("gemma3", "internvl", "mllama")  # CLIP-like, [h, w] sizes, attention_heads
FSDP = ("llava_next", "idefics3")
BUILTIN = {  # the built-in adapters (a hand-written template for the tiny models too)
    "llava": ("LlavaForConditionalGeneration",
              ["model.vision_tower", "model.multi_modal_projector"],
              "test_real_job.py, test_fsdp_mllm.py, test_dist.py"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", ["model.visual"],
                 "test_real_job.py, test_dist.py"),
}  # fmt: skip


@pytest.mark.parametrize("family", _here(ESTIMATED))
def test_estimate_from_the_config(folders, family, capsys):
    from mmunlearn.estimate import count_parameters, load_config

    model, _ = _load(folders[family])
    cfg_file = str(folders[family] / "config.json")
    assert count_parameters(load_config(cfg_file))[0] == sum(p.numel() for p in model.parameters())
    assert main(["estimate", "--model", cfg_file, "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "activations: vision tower (2 layers" in out and "fits in 80 GiB" in out


def models_table() -> str:
    """The supported-models table of docs/models.md, from what this file tests."""
    rows = ["| family (`model_type`) | model class | vision modules found | tested |",
            "|---|---|---|---|"]  # fmt: skip
    for fam, (cls, vision, *where) in {**BUILTIN, **EXPECTED}.items():
        if fam in BUILTIN:
            what = f"built-in adapter: {where[0]}"
        elif fam in MODEL_ONLY:
            what = f"groups only (no processor here: {NO_PROCESSOR[fam]})"
        else:
            what = "groups, batches, CLI saliency → unlearn → eval, save → load"
            what += ", FSDP2 (2 ranks)" if fam in FSDP else ""
            what += ", estimate" if fam in ESTIMATED else ""
        names = ", ".join(f"`{v}`" for v in vision)
        rows.append(f"| {fam} | `{cls}` | {names} | {what} |")
    return "\n".join(rows)


def test_docs_models_table_matches_the_tests():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    start, end = "<!-- table: tests/test_families.py -->", "<!-- end table -->"
    table = doc.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == models_table(), (
        "regenerate: python -c 'import test_families as t; print(t.models_table())'"
    )
