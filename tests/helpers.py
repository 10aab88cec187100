"""Shared test helpers: a verbose allclose that prints the worst elements."""

from __future__ import annotations

import torch


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
