"""Shared test helpers: a verbose allclose that prints the worst elements."""

from __future__ import annotations

from pathlib import Path

import torch


def mmunlearn_pythonpath() -> str:
    """PYTHONPATH for a subprocess that runs ``python -m mmunlearn.cli``: the folder this
    process imports mmunlearn from (the source tree; site-packages under a non-editable
    install, as .ci/min-versions runs the tests), so the child runs the same code."""
    try:
        import mmunlearn
    except ImportError:  # (tests/soak.py run as a script without an install)
        return str(Path(__file__).resolve().parents[1])
    return str(Path(mmunlearn.__file__).resolve().parents[1])


def assert_close_verbose(actual, expected, *, rtol, atol, name="tensor", show=5):
    """Elementwise |a - e| <= atol + rtol·|e| (fp64); on failure list the worst elements."""
    a = actual.detach().double().reshape(-1).cpu()
    e = expected.detach().double().reshape(-1).cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    same_nan = torch.isnan(a) & torch.isnan(e)
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = ~((err <= tol) | same_nan)
    if bad.any():
        excess = torch.where(bad, err - tol, torch.zeros_like(err))
        idx = excess.argsort(descending=True)[:show]
        rows = "\n".join(
            f"  [{i}] actual={a[i].item():.9g} expected={e[i].item():.9g} err={err[i].item():.3g}"
            for i in idx.tolist()
        )
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements exceed atol={atol} rtol={rtol}; "
            f"worst:\n{rows}"
        )


def max_rel_err(actual, expected, floor=1e-12):
    """max |a - e| / max(|e|, floor), elementwise, in fp64."""
    a, e = actual.double(), expected.double()
    return ((a - e).abs() / e.abs().clamp_min(floor)).max().item()


def ulp(dtype: torch.dtype) -> float:
    """Relative spacing of a dtype (2^-mantissa bits)."""
    return torch.finfo(dtype).eps


def run_ranks(worker, world: int = 2) -> dict:
    """Run ``worker(rank, world, out)`` in ``world`` spawned processes joined into one gloo
    group (torchrun's environment variables set, ``mmunlearn.dist.init_from_env`` called);
    returns the shared ``out`` dict the workers filled."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank_main, args=(world, port, worker, out), nprocs=world, join=True)
    return dict(out)


def _rank_main(rank, world, port, worker, out):
    import os

    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    from mmunlearn import distributed as mdist

    assert mdist.init_from_env("gloo")
    try:
        worker(rank, world, out)
        # Every rank reaches this point before any tears gloo down: a rank destroying its
        # group while a peer still has a collective in flight aborts that peer
        # ("terminate called without an active exception", seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # leave without interpreter teardown: gloo's background threads have aborted a rank
    # ("terminate called without an active exception") while Python finalised
    os._exit(0)


def tiny_llama(seed: int = 0):
    """A real 2-layer ``LlamaForCausalLM`` (vocab 64, hidden 32), seeded, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()
