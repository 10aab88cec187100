"""Per-layer linear CKA (Kornblith et al., ICML 2019, "Similarity of Neural Network
Representations Revisited", eq. 5 / its Gram form) between two models' hidden states on the
same inputs: the CKA probe of ``mmunlearn attack``.

For feature matrices ``X`` (n × p) and ``Y`` (n × q) of the same n inputs, with ``H`` the
centring matrix and ``K = X Xᵀ``, ``L = Y Yᵀ``:

    CKA(X, Y) = ⟨HKH, HLH⟩_F / (‖HKH‖_F ‖HLH‖_F) = ‖Y_cᵀ X_c‖²_F / (‖X_cᵀ X_c‖_F ‖Y_cᵀ Y_c‖_F)

(``X_c``, ``Y_c``: column-centred). It is 1 for ``Y = X Q c + b`` (orthogonal ``Q``, scalar
``c ≠ 0``, any offset), in [0, 1] always, and for one feature each the squared Pearson
correlation. It is NaN when one side is constant over the inputs (a zero centred Gram).

A model's hidden states are taken by forward hooks on its repeated blocks (the adapter's
``block_classes()``: vision encoder layers and decoder layers), each block's output pooled to
one vector per input: a decoder layer's ``[batch, tokens, h]`` by the mean over the attention
mask's tokens, a vision layer's ``[images, patches, h]`` by the mean over patches when every
input has one picture. Blocks whose output cannot be split per input (Qwen2-VL's vision blocks
work on the flattened patches of the whole batch) are left out and named.

The interval (:func:`cka_interval`) resamples the *inputs* (rows of both matrices together)
with :func:`mmunlearn.eval.bootstrap.bootstrap`, the project's one bootstrap.
"""

from __future__ import annotations

import numpy as np
import torch

from mmunlearn.data.batching import to_device
from mmunlearn.eval.bootstrap import bootstrap, rowwise


def _centred_gram(gram: np.ndarray) -> np.ndarray:
    """``H G H`` for a Gram matrix ``G`` (n × n)."""
    row = gram.mean(axis=0, keepdims=True)
    col = gram.mean(axis=1, keepdims=True)
    return gram - row - col + gram.mean()


def cka_from_grams(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Linear CKA of two (uncentred) Gram matrices ``K = X Xᵀ``, ``L = Y Yᵀ`` of the same
    inputs; NaN when one centred Gram is zero."""
    k, l = np.asarray(k, np.float64), np.asarray(l, np.float64)  # noqa: E741
    kc, lc = _centred_gram(k), _centred_gram(l)
    nk, nl = np.linalg.norm(kc), np.linalg.norm(lc)
    # a constant side centres to zero up to rounding (≈ 1e-16 of its Gram)
    if nk <= 1e-12 * np.linalg.norm(k) or nl <= 1e-12 * np.linalg.norm(l) or nk * nl == 0.0:
        return float("nan")
    return float(np.sum(kc * lc) / (nk * nl))


def _matrix(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be an (inputs × features) matrix, got shape {a.shape}")
    return a


def linear_cka(x, y) -> float:
    """Linear CKA between ``x`` (n × p) and ``y`` (n × q), the same n inputs in the same order
    (a 1-D array is one feature); NaN when one side is constant. ValueError on unequal n."""
    x, y = _matrix(x, "x"), _matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} inputs and y {y.shape[0]}; they must match")
    return cka_from_grams(x @ x.T, y @ y.T)


def cka_interval(x, y, n_boot=1000, seed=0, level=0.95, method="percentile") -> dict:
    """``{"estimate", "lo", "hi", "n"}``: :func:`linear_cka` and its bootstrap interval over
    the inputs (the same resampled rows of ``x`` and ``y``; draws where CKA is undefined, e.g.
    every row the same input, are dropped from a percentile interval)."""
    x, y = _matrix(x, "x"), _matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} inputs and y {y.shape[0]}; they must match")
    k, l = x @ x.T, y @ y.T  # noqa: E741

    def stat(idx):
        i = idx.astype(np.int64)
        return cka_from_grams(k[np.ix_(i, i)], l[np.ix_(i, i)])

    n = x.shape[0]
    est = cka_from_grams(k, l)
    if n < 3 or not np.isfinite(est):
        return {"estimate": est, "lo": est, "hi": est, "n": n}
    b = bootstrap([np.arange(n, dtype=np.float64)], rowwise(stat), n_boot=n_boot, seed=seed,
                  level=level, method=method)  # fmt: skip
    return {"estimate": est, "lo": float(b.lo), "hi": float(b.hi), "n": n}


def _pool(out, mask: torch.Tensor, n_images: int):
    """One vector per input of a block's output, or None (module docstring)."""
    h = out[0] if isinstance(out, (tuple, list)) else out
    if not torch.is_tensor(h) or h.dim() != 3:
        return None
    b, t = mask.shape
    h = h.detach().float()
    if h.shape[0] == b and h.shape[1] == t:  # a decoder layer: mean over the real tokens
        m = mask.to(h.device, h.dtype).unsqueeze(-1)
        return ((h * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu()
    if h.shape[0] == n_images == b:  # a vision layer, one picture per input
        return h.mean(1).cpu()
    return None


def block_names(model, adapter) -> list[str]:
    """Names of the model's repeated blocks (vision encoder layers, decoder layers), in module
    order."""
    classes = tuple(adapter.block_classes())
    return [n for n, m in model.named_modules() if n and isinstance(m, classes)]


@torch.no_grad()
def hidden_states(model, adapter, samples, batch_size: int = 16) -> tuple[dict, list]:
    """``({block name: float32 array (n inputs × hidden)}, [blocks left out])``: every block's
    output pooled per input (module docstring) over ``samples`` (prompt and answer, as the
    adapter collates them), in order."""
    names = block_names(model, adapter)
    mods = dict(model.named_modules())
    feats: dict[str, list] = {n: [] for n in names}
    skipped: set[str] = set()
    state: dict = {}

    def hook(name):
        def fn(_module, _inp, out):
            v = _pool(out, state["mask"], state["n_images"])
            if v is None:
                skipped.add(name)
            else:
                feats[name].append(v)

        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    dev = next(model.parameters()).device
    model.eval()
    try:
        for i in range(0, len(samples), batch_size):
            chunk = list(samples[i : i + batch_size])
            batch = to_device(adapter.collate(chunk, ans_only=True, with_answer=True), dev)
            state["mask"] = batch["attention_mask"]
            state["n_images"] = sum(1 for s in chunk if s.image is not None)
            batch.pop("labels", None)
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    n = len(samples)
    out = {}
    for name in names:
        rows = feats[name]
        if name in skipped or not rows or sum(len(r) for r in rows) != n:
            skipped.add(name)
            continue
        out[name] = torch.cat(rows).numpy()
    return out, [n for n in names if n in skipped]


__all__ = [
    "block_names",
    "cka_from_grams",
    "cka_interval",
    "hidden_states",
    "linear_cka",
]
