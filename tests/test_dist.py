"""Distributed primitives on 2 gloo processes (CPU): exact top-k over shards."""

from __future__ import annotations

import pytest
import torch

from mmunlearn.kernels import saliency_threshold_topk

from helpers import run_ranks


def _inputs():
    g = torch.Generator().manual_seed(5)
    shapes = [(1000,), (37, 41), (4097,)]
    ff = [torch.rand(s, generator=g) ** 4 for s in shapes]
    fp = [torch.rand(s, generator=g) ** 4 for s in shapes]
    return ff, fp


def _worker(rank, world, out):
    from mmunlearn.saliency import topk_threshold

    ff, fp = _inputs()
    # each rank holds an uneven row-shard of every tensor, as FSDP2 would
    loc_f = [t.reshape(-1).tensor_split(world)[rank] for t in ff]
    loc_p = [t.reshape(-1).tensor_split(world)[rank] for t in fp]
    out[rank] = [topk_threshold(loc_f, loc_p, f, backend="torch") for f in (0.001, 0.1, 0.5)]
    # a rank with no shard at all (more ranks than rows) still joins the three all-reduces
    whole_f = [t.reshape(-1) for t in ff] if rank == 0 else []
    whole_p = [t.reshape(-1) for t in fp] if rank == 0 else []
    out[f"empty{rank}"] = topk_threshold(whole_f, whole_p, 0.1, backend="torch")


def test_distributed_topk_equals_single_process_bit_for_bit():
    ff, fp = _inputs()
    want = [saliency_threshold_topk(ff, fp, f, backend="torch") for f in (0.001, 0.1, 0.5)]
    out = run_ranks(_worker)
    assert out[0] == want and out[1] == want
    assert out["empty0"] == out["empty1"] == want[1]


def _mixed_batch(family):
    """A collated global batch of 7 rows mixing image rows and text-only rows."""
    import random

    from mmunlearn.data.synthetic import make_benchmark
    from mmunlearn.models import adapter_for, build_tokenizer, tiny_llava, tiny_qwen2vl

    bench = make_benchmark(n_people=4, forget_ratio=0.25, seed=0, n_train_images=2, n_test_images=1)
    tok = build_tokenizer([s.question + " " + s.answer for s in bench.train])
    model = (tiny_llava if family == "llava" else tiny_qwen2vl)(tok, seed=0)
    items = bench.retain_vqa[:4] + bench.retain_text[:3]
    random.Random(1).shuffle(items)
    return model, adapter_for(model, tok).collate(items)


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
@pytest.mark.parametrize("world", [2, 3])
def test_shard_batch_keeps_images_with_their_rows(family, world):
    """Every row lands on exactly one rank with exactly its own images, every rank gets an
    image, and each shard runs through the model (placeholders match the features)."""
    from mmunlearn.distributed import image_token_id, shard_batch

    model, batch = _mixed_batch(family)
    itok = image_token_id(model)
    shards = [shard_batch(batch, r, world, image_token_id=itok) for r in range(world)]
    rows = sorted(tuple(row.tolist()) for s in shards for row in s["input_ids"])
    assert rows == sorted(tuple(row.tolist()) for row in batch["input_ids"])
    assert sum(s["pixel_values"].shape[0] for s in shards) == batch["pixel_values"].shape[0]
    with torch.no_grad():
        for s in shards:
            assert (s["input_ids"] == itok).any(), "a rank without an image"
            assert torch.isfinite(model(**s).loss)


def test_shard_batch_short_batches_replicate_or_refuse():
    """Fewer image rows (or rows) than ranks: by default every rank takes the whole batch (the
    global-count loss then is the plain mean on each rank); ``short="error"`` refuses."""
    from mmunlearn.distributed import image_token_id, shard_batch

    model, batch = _mixed_batch("llava")
    itok = image_token_id(model)
    with pytest.raises(ValueError, match="rows with images for 5 ranks"):
        shard_batch(batch, 0, 5, image_token_id=itok, short="error")
    for r in range(5):
        assert shard_batch(batch, r, 5, image_token_id=itok) is batch
    text = {k: v[:2] for k, v in batch.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="2 rows for 3 ranks"):
        shard_batch(text, 1, 3, short="error")
    assert shard_batch(text, 2, 3) is text
    with pytest.raises(ValueError, match="short must be"):
        shard_batch(batch, 0, 2, image_token_id=itok, short="drop")
    with pytest.raises(ValueError, match="image_token_id"):
        shard_batch(batch, 0, 2)
