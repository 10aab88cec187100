"""The real job end to end through the CLI, on inputs built in the real formats (tests/
realformat.py): a llava-hf-layout and a Qwen2-VL-layout checkpoint with their own processor and
chat template, MLLMU-Bench- and CLEAR-layout parquet folders; saliency → unlearn → eval for each
family × benchmark, a checkpoint without a tokenizer loaded with --processor, and the
checkpoint's processor being what collates."""

from __future__ import annotations

import json

import pytest
import torch
from realformat import (
    NON_CLIP_MEAN,
    NON_CLIP_STD,
    clear_root,
    llava_checkpoint,
    mllmu_root,
    qwen2vl_checkpoint,
)

from mmunlearn.cli import main

from conftest import needs_cpu_fsdp

FAMILIES = {"llava": llava_checkpoint, "qwen2vl": qwen2vl_checkpoint}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # restored by conftest


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {
        "llava": llava_checkpoint(root / "llava"),
        "qwen2vl": qwen2vl_checkpoint(root / "qwen2vl"),
        "mllmu": mllmu_root(root / "MLLMU-Bench"),
        "clear": clear_root(root / "CLEAR"),
    }


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
@pytest.mark.parametrize("bench", ["mllmu", "clear"])
def test_saliency_unlearn_eval(files, tmp_path, family, bench, capsys):
    data = [f"--{bench}", str(files[bench]), "--split", "5"]
    model = ["--model", str(files[family])]
    sal = tmp_path / "sal"
    assert main(["saliency", *model, *data, "--out", str(sal)]) == 0
    for g in ("vision", "language", "both"):
        assert (sal / f"mask_{g}.safetensors").is_file()
    info = json.loads((sal / "saliency.json").read_text())
    assert info["data"]["forget"] > 0 and info["config"]["recipe"] == "mmunlearn"
    out = tmp_path / "u"
    mask = str(sal / "mask_both.safetensors")
    argv = ["unlearn", *model, *data, "--mask", mask, "--lr", "1e-3", "--out", str(out)]
    assert main(argv) == 0
    log = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in log} == {"forget", "retain"}
    for r in log:
        assert {"step", "loss", "lr", "grad_norm", "seconds"} <= set(r)
    assert all(r["masked_fraction"] is not None for r in log if r["phase"] == "forget")
    # the unlearned model directory loads as a checkpoint with its processor, and evaluates
    ev = tmp_path / "ev"
    argv = ["eval", "--model", str(files[family]), "--model", str(out / "model"), *data]
    argv += ["--max-new-tokens", "4", "--out", str(ev)]
    assert main(argv) == 0
    res = json.loads((ev / "results.json").read_text())
    assert len(res["methods"]) == 2
    assert set(next(iter(res["methods"].values()))) >= {"forget", "retain"}
    # evaluated through the checkpoint's own chat template, not the built-in one
    for tpl in res["_protocol"]["template"].values():
        assert "×" not in tpl["vqa"]  # (the built-in template shows its image-token count)
        marker = "You are a helpful assistant." if family == "qwen2vl" else "USER: <image>\n"
        assert marker in tpl["vqa"], tpl


def test_checkpoint_without_tokenizer_needs_processor(files, tmp_path, capsys):
    bare = llava_checkpoint(tmp_path / "bare", with_processor=False)
    data = ["--mllmu", str(files["mllmu"]), "--split", "5"]
    assert main(["saliency", "--model", str(bare), *data, "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--processor" in err and "no tokenizer" in err and str(bare) in err, err
    argv = ["saliency", "--model", str(bare), "--processor", str(files["llava"]), *data]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "mask_both.safetensors").is_file()


def test_unsupported_family_is_named(tmp_path, capsys, files):
    from transformers import BertConfig

    (tmp_path / "bert").mkdir()
    BertConfig().save_pretrained(tmp_path / "bert")
    data = ["--mllmu", str(files["mllmu"])]
    assert main(["saliency", "--model", str(tmp_path / "bert"), *data]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert "unsupported model family 'bert'" in err and "Qwen2-VL" in err


def test_the_checkpoints_processor_is_what_collates(files, tmp_path):
    """Non-CLIP mean/std (LLaVA) and Qwen's min/max pixels change the pixels the model sees."""
    from PIL import Image

    from mmunlearn.data.schema import Sample
    from mmunlearn.models import load_checkpoint

    img = Image.new("RGB", (90, 50), (255, 0, 0))
    s = Sample("What is shown?", "red", image=img)
    _, llava = load_checkpoint(files["llava"])
    pv = llava.collate([s])["pixel_values"]
    assert tuple(pv.shape) == (1, 3, 32, 32)  # shortest edge 32 then the 32×32 centre crop
    want = [(1.0 - NON_CLIP_MEAN[0]) / NON_CLIP_STD[0], -NON_CLIP_MEAN[1] / NON_CLIP_STD[1]]
    assert pv[0, 0].mean().item() == pytest.approx(want[0], abs=1e-4)
    assert pv[0, 1].mean().item() == pytest.approx(want[1], abs=1e-4)
    big = qwen2vl_checkpoint(tmp_path / "qbig", min_pixels=64 * 64, max_pixels=128 * 128)
    _, q_small = load_checkpoint(files["qwen2vl"])
    _, q_big = load_checkpoint(big)
    a, b = q_small.collate([s]), q_big.collate([s])
    ga, gb = a["image_grid_thw"][0].tolist(), b["image_grid_thw"][0].tolist()
    assert ga != gb and ga[1] * ga[2] * 64 <= 64 * 64 < gb[1] * gb[2] * 64  # dynamic resolution
    # the image placeholders follow the grid: prod(thw) / merge² tokens, all masked from the loss
    n_img = int((a["input_ids"] == q_small.image_token_id).sum())
    assert n_img == ga[0] * ga[1] * ga[2] // 4
    assert (a["labels"][a["input_ids"] == q_small.image_token_id] == -100).all()


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_answer_only_labels_are_exactly_the_assistant_turn(files, family):
    from PIL import Image

    from mmunlearn.data.schema import Sample
    from mmunlearn.models import load_checkpoint

    _, ad = load_checkpoint(files[family])
    img = Image.new("RGB", (40, 40), (0, 128, 0))
    samples = [Sample("Who is this person?", "Ann Bell, a baker", image=img),
               Sample("Where was Ann Bell born?", "Rome", image=None)]  # fmt: skip
    b = ad.collate(samples)
    tok = ad.tokenizer
    for i, s in enumerate(samples):
        lab = b["labels"][i]
        text = tok.decode(lab[lab != -100])
        assert text.strip().startswith(s.answer), text
        assert "?" not in text  # no prompt token carries loss
    full = ad.collate(samples, loss_tokens="all_with_image")
    assert (full["labels"] != -100).sum() == full["attention_mask"].sum()


def test_estimate_takes_the_run_config_and_says_whether_it_fits(files, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {files['llava']}\nmllmu: {files['mllmu']}\nrecipe: official\nmethod: npo\n"
        "batch_size: 2\ngradient_checkpointing: true\ndtype: bf16\nlr: 1.0e-5\n"
    )
    assert main(["estimate", "--config", str(cfg), "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "reference model (frozen)" in out  # NPO's reference, from the config's method
    assert "saliency:" in out and "fits in 80 GiB" in out
    assert main(["estimate", "--config", str(cfg), "--gpu-memory", "0.0001"]) == 0
    assert "does NOT fit in 0.0001 GiB" in capsys.readouterr().out


def test_hub_id_from_the_local_cache_offline(files, tmp_path, monkeypatch):
    """A Hub id resolves to its snapshot in the local cache, offline; an uncached id is a clear
    error that says nothing is downloaded."""
    import shutil

    from mmunlearn.models import load_checkpoint

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llava"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(files["llava"], snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))  # read when a lookup runs
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    model, adapter = load_checkpoint("acme/tiny-llava")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and adapter.processor
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load_checkpoint("acme/not-there")


def test_run_log_grad_accum_workers_eval_every_and_resume(files, tmp_path):
    data = ["--mllmu", str(files["mllmu"]), "--model", str(files["llava"])]
    out = tmp_path / "u"
    argv = ["unlearn", *data, "--method", "ga_diff", "--lr", "1e-3", "--batch-size", "1"]
    argv += ["--grad-accum", "2", "--workers", "1", "--eval-every", "1", "--eval-items", "2"]
    argv += ["--checkpoint-every", "1", "--out", str(out)]
    assert main(argv) == 0
    log = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["phase"] != "eval"]
    evals = [r for r in log if r["phase"] == "eval"]
    assert train and len(evals) == len(train)  # --eval-every 1
    assert all({"forget_ce", "retain_ce", "score"} <= set(r) for r in evals)
    summary = json.loads((out / "unlearn.json").read_text())
    best = summary["best"]
    assert best["score"] == max(r["score"] for r in evals)
    assert (out / "best" / "model.safetensors").is_file()  # the best checkpoint, loadable
    from mmunlearn.models import load_checkpoint

    load_checkpoint(out / "best")
    # resuming the finished run changes nothing
    before = (out / "model" / "model.safetensors").read_bytes()
    assert main([*argv, "--resume"]) == 0
    assert (out / "model" / "model.safetensors").read_bytes() == before


def test_tensorboard_report(files, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    argv = ["unlearn", "--mllmu", str(files["mllmu"]), "--model", str(files["llava"])]
    assert main([*argv, "--method", "ga", "--report-to", "tensorboard", "--out", str(out)]) == 0
    assert list((out / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_several_images_in_one_prompt(files, family):
    """A few-shot prompt with its exemplars' pictures: ``Sample.image`` a list, the raw prompt
    holding the image token once per picture, every picture expanded and in order."""
    from PIL import Image

    from mmunlearn.data.schema import Sample
    from mmunlearn.models import load_checkpoint

    model, ad = load_checkpoint(files[family])
    imgs = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0))]
    t = ad.image_token
    raw = f"USER: {t}\nWho? ASSISTANT: Ann\nUSER: {t}\nWho? ASSISTANT:"
    s = Sample("Who?", "Bo", image=imgs, meta={"raw_prompt": raw})
    one = Sample("Who?", "Bo", image=imgs[1])
    b = ad.collate([s, one])
    n_tok = (b["input_ids"] == ad.image_token_id).sum(1)
    assert int(n_tok[0]) == 2 * int(n_tok[1]) > 0
    with torch.no_grad():
        assert torch.isfinite(model(**b).loss)
    with pytest.raises(ValueError, match="2 time"):
        ad.collate([Sample("Who?", "Bo", image=imgs, meta={"raw_prompt": f"{t} Who?"})])


@needs_cpu_fsdp
def test_real_checkpoint_under_torchrun_matches_one_process(files, tmp_path):
    """Qwen2-VL-layout checkpoint, CLEAR layout, its processor's dynamic-resolution batches
    dealt across 2 FSDP2 ranks: the same weights as one process, within reduction order."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    from test_cli_torchrun import _port

    def run(out, nproc):
        env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
        env.pop("WORLD_SIZE", None)
        cli = ["-m", "mmunlearn.cli", "unlearn", "--model", str(files["qwen2vl"])]
        cli += ["--clear", str(files["clear"]), "--method", "ga_diff", "--lr", "1e-3"]
        cli += ["--out", str(out)]
        cmd = [sys.executable, *cli]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
            cmd += ["--master-port", str(_port()), *cli, "--fsdp"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return load_file(out / "model" / "model.safetensors")

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-5, msg=k)
