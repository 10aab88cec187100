"""Benchmark cases shared by the pytest-benchmark suite and the table script (bench/run.py).

Each case builds its inputs once and exposes one callable per implementation:
``triton`` (our kernel, one launch per step; CUDA), ``cpu`` (our C kernels, one call per step;
CPU), ``torch`` (our reference twin), ``eager`` (the natural per-tensor PyTorch loop a user would
write), ``compile`` (torch.compile of that loop; CUDA only: a CPU inductor compile of 437 tensors
takes minutes on 2 cores), ``fused_adamw`` (``grad.mul_(mask)`` then
``torch.optim.AdamW(fused=True)``, moments in the parameter dtype as torch keeps them) and
``official`` (the official MMUnlearner way: gradient copied to the CPU and squared there; bool
mask on the host copied to the device every step). ``bytes_moved`` is the minimum DRAM traffic
of the op (design.md's byte budget for the case's dtype), used for GB/s and the fraction of
measured copy bandwidth. ``dtype`` is the parameter and gradient dtype (Fishers and moments are
always fp32).
"""

from __future__ import annotations

import math

import torch

import mmunlearn.kernels as K

# Parameter shapes of a LLaVA-1.5-7B-like model, scaled down uniformly to reach a target count:
# (rows, cols, count). Mixed sizes matter: multi-tensor launches are the point.
_LLAVA7B_SHAPES = [
    (4096, 4096, 4 * 32),  # q/k/v/o projections
    (11008, 4096, 3 * 32),  # gate/up/down MLP
    (4096, 1, 2 * 32 + 1),  # RMSNorm weights
    (32000, 4096, 2),  # embeddings + lm_head
    (1024, 1024, 4 * 24),  # CLIP ViT-L attention
    (4096, 1024, 2 * 24),  # CLIP MLP
    (4096, 1024, 1),  # projector fc1
    (4096, 4096, 1),  # projector fc2
]


def model_shapes(total: int) -> list[tuple[int, ...]]:
    """A list of 2-D shapes in LLaVA-7B proportions whose sizes add up to about ``total``."""
    full = sum(r * c * n for r, c, n in _LLAVA7B_SHAPES)
    s = math.sqrt(total / full)
    shapes = []
    for r, c, n in _LLAVA7B_SHAPES:
        rr, cc = max(1, round(r * s)), max(1, round(c * s)) if c > 1 else 1
        shapes += [(rr, cc)] * n
    return shapes


BYTES_PER_ELEMENT = {  # bf16 grads/params, fp32 state, 1-bit masks (design.md)
    "fisher_accumulate": 10.0,
    "saliency_mask": 8.125,
    "saliency_histogram": 8.0,
    "masked_adamw": 22.125,
    "masked_sgd": 6.125,
    "grad_sq_norm": 2.0,
}
# bytes per element of a grad / param in the ops above (the rest is fp32 state or the mask)
_PARAM_BYTES = {"fisher_accumulate": 1, "masked_adamw": 3, "masked_sgd": 3, "grad_sq_norm": 1}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def bytes_per_element(op: str, dtype: str = "bf16") -> float:
    """design.md's byte budget of ``op`` with params/grads in ``dtype`` (fp32: 2 more bytes per
    param or grad access)."""
    extra = 2 * _PARAM_BYTES.get(op, 0) if dtype == "fp32" else 0
    return BYTES_PER_ELEMENT[op] + extra


class Case:
    """Inputs for one (op, size); ``impls()`` maps implementation name → zero-arg callable."""

    def __init__(self, op: str, total: int, device: str, seed: int = 0, dtype: str = "bf16"):
        torch.manual_seed(seed)
        self.op, self.device, self.dtype = op, torch.device(device), dtype
        self.shapes = model_shapes(total)
        self.numel = sum(math.prod(s) for s in self.shapes)
        dev = self.device
        bf16 = DTYPES[dtype]
        self.grads = [torch.randn(s, device=dev, dtype=bf16) for s in self.shapes]
        if op in ("fisher_accumulate", "saliency_mask", "saliency_histogram"):
            self.f1 = [torch.rand(s, device=dev) for s in self.shapes]
            self.f2 = [torch.rand(s, device=dev) for s in self.shapes]
        if op in ("masked_adamw", "masked_sgd"):
            self.params = [torch.randn(s, device=dev, dtype=bf16) for s in self.shapes]
            self.m = [torch.zeros(s, device=dev) for s in self.shapes]
            self.v = [torch.zeros(s, device=dev) for s in self.shapes]
            self.dense = [torch.rand(s, device=dev) < 0.5 for s in self.shapes]
            self.masks = [K.pack_bits(d) for d in self.dense]

    @property
    def bytes_moved(self) -> float:
        return bytes_per_element(self.op, self.dtype) * self.numel

    @property
    def ours(self) -> str:
        """Our implementation on this device: the Triton kernels on CUDA, the C kernels on CPU."""
        return "triton" if self.device.type == "cuda" else "cpu"

    def impls(self) -> dict:
        op = self.op
        on_cuda = self.device.type == "cuda"
        out = {"torch": getattr(self, f"_{op}")("torch")}
        out[self.ours] = getattr(self, f"_{op}")(self.ours)
        eager = getattr(self, f"_{op}_eager", None)
        if eager is not None:
            out["eager"] = eager
            if on_cuda:  # CPU inductor compiles take minutes on 2 cores; GPU is the target
                out["compile"] = torch.compile(eager)
        for extra in ("fused_adamw", "official"):
            fn = getattr(self, f"_{op}_{extra}", None)
            if fn is not None:
                out[extra] = fn
        return out

    # ---------------------------------------------------------------- fisher
    def _fisher_accumulate(self, backend):
        return lambda: K.fisher_accumulate_(self.f1, self.grads, 0.5, backend=backend)

    def _fisher_accumulate_eager(self):
        for a, g in zip(self.f1, self.grads):
            a.add_(g.float().square(), alpha=0.5)

    def _fisher_accumulate_official(self):
        # official: every batch, each gradient goes to the host and is squared there
        for a, g in zip(self.f2, self.grads):
            a.add_(g.detach().cpu().square().to(a.device, a.dtype))

    # ---------------------------------------------------------------- mask
    def _saliency_mask(self, backend):
        return lambda: K.saliency_mask(self.f1, self.f2, 1.0, backend=backend)

    def _saliency_mask_eager(self):
        return [(a + 1e-15) / (b + 1e-15) >= 1.0 for a, b in zip(self.f1, self.f2)]

    def _saliency_histogram(self, backend):
        return lambda: K.saliency_histogram(self.f1, self.f2, 0, backend=backend)

    # ---------------------------------------------------------------- steps
    def _masked_adamw(self, backend):
        kw = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
        return lambda: K.masked_adamw_(
            self.params, self.grads, self.m, self.v, self.masks, backend=backend, **kw
        )

    def _masked_adamw_fused_adamw(self):
        # the gradient backward left is masked in place (idempotent for a 0/1 mask, so the timed
        # call needs no fresh copy), then one fused AdamW step over every tensor
        if not hasattr(self, "_fused"):
            self._leaf = [p.clone().requires_grad_(True) for p in self.params]
            for p, g in zip(self._leaf, self.grads):
                p.grad = g.clone()
            self._fused = torch.optim.AdamW(self._leaf, lr=1e-5, weight_decay=0.0, fused=True)
        for p, d in zip(self._leaf, self.dense):
            p.grad.mul_(d)
        self._fused.step()

    def _masked_adamw_official(self):
        # official: the bool mask lives on the host and is copied to the device every forget
        # step, the gradient is multiplied by it, then a stock AdamW (foreach) steps everything
        if not hasattr(self, "_off"):
            self._off_leaf = [p.clone().requires_grad_(True) for p in self.params]
            for p, g in zip(self._off_leaf, self.grads):
                p.grad = g.clone()
            self._off = torch.optim.AdamW(self._off_leaf, lr=1e-5, weight_decay=0.0)
            self._host_masks = [d.cpu() for d in self.dense]
        for p, hm in zip(self._off_leaf, self._host_masks):
            p.grad.mul_(hm.to(p.device, non_blocking=False))
        self._off.step()

    def _masked_sgd(self, backend):
        return lambda: K.masked_sgd_(self.params, self.grads, self.masks, lr=1e-5, backend=backend)

    def _masked_sgd_eager(self):
        for p, g, d in zip(self.params, self.grads, self.dense):
            p.sub_(g * d, alpha=1e-5)

    # ---------------------------------------------------------------- norm
    def _grad_sq_norm(self, backend):
        return lambda: K.grad_sq_norm(self.grads, backend=backend)

    def _grad_sq_norm_eager(self):
        return torch.stack([g.float().square().sum() for g in self.grads]).sum()


OPS = list(BYTES_PER_ELEMENT)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, numel: int = 1 << 26, reps: int = 10) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of an fp32 buffer)."""
    import time

    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * 4 * numel / times[len(times) // 2]


# ---------------------------------------------------------------- masked AdamW state sweep (#21)
SELECTIONS = (0.01, 0.05, 0.35, 1.0)
LAYOUTS = ("scattered", "clustered")
CLUSTER = 8192  # clustered masks select whole runs of this many elements


def adamw_bytes(impl: str, s: float) -> float:
    """Minimum DRAM bytes per parameter element of one step at selection fraction ``s``
    (bf16 params and grads for ours; the mask is 1/8 byte). Ours read and write the parameter
    and read the gradient everywhere (2+2+2), the moments where selected with compacted state
    (16·s fp32, 8·s bf16) and everywhere otherwise. ``fused_*``: ``grad.mul_(bool mask)``
    (grad read + write, mask byte) then torch's fused AdamW over every element."""
    return {
        "ours fp32 state": 6.125 + 16,
        "ours bf16 state": 6.125 + 8,
        "ours compact fp32": 6.125 + 16 * s,
        "ours compact bf16": 6.125 + 8 * s,
        "fused fp32 params": (4 + 4 + 1) + (4 + 4 + 4 + 16),
        "fused bf16 params": (2 + 2 + 1) + (2 + 2 + 2 + 8),
    }[impl]


class AdamWStateCase:
    """One (size, selection, layout) point of the masked-AdamW state sweep: our step with fp32 /
    bf16 (SR) / compacted state — masks with their MaskIndex, so chunks selecting nothing are
    not launched — against ``grad.mul_(mask)`` + ``torch.optim.AdamW(fused=True)`` with fp32
    params (fp32 state) and with bf16 params (torch keeps bf16 moments for them)."""

    def __init__(self, total: int, device: str, selection: float, layout: str, seed: int = 0):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.selection, self.layout = selection, layout
        self.shapes = model_shapes(total)
        self.numel = sum(math.prod(s) for s in self.shapes)
        dev = self.device
        self.params = [torch.randn(s, device=dev, dtype=torch.bfloat16) for s in self.shapes]
        self.grads = [torch.randn(s, device=dev, dtype=torch.bfloat16) for s in self.shapes]
        self.dense = [self._mask(s) for s in self.shapes]
        self.masks = [K.pack_bits(d) for d in self.dense]
        self.index = [K.MaskIndex(k, d.numel()) for k, d in zip(self.masks, self.dense)]
        self.selected = sum(ix.count for ix in self.index)
        self._step = 0

    def _mask(self, shape) -> torch.Tensor:
        n = math.prod(shape)
        if self.selection >= 1.0:
            return torch.ones(shape, dtype=torch.bool, device=self.device)
        if self.layout == "scattered":
            return torch.rand(shape, device=self.device) < self.selection
        runs = (n + CLUSTER - 1) // CLUSTER
        pick = torch.rand(runs, device=self.device) < self.selection
        return pick.repeat_interleave(CLUSTER)[:n].reshape(shape)

    def _ours(self, sdt, compact):
        dev = self.device
        if compact:
            m = [torch.zeros(ix.count, device=dev, dtype=sdt) for ix in self.index]
        else:
            m = [torch.zeros(s, device=dev, dtype=sdt) for s in self.shapes]
        v = [torch.zeros_like(x) for x in m]
        params = [p.clone() for p in self.params]
        sr = sdt == torch.bfloat16
        kw = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)

        def fn():
            self._step += 1
            K.masked_adamw_(params, self.grads, m, v, self.masks, mask_index=self.index,
                            compact=compact, sr_seed=self._step if sr else None, param_sr=sr,
                            **kw)  # fmt: skip

        return fn

    def _fused(self, dtype):
        leaf = [p.to(dtype).requires_grad_(True) for p in self.params]
        for p, g in zip(leaf, self.grads):
            p.grad = g.to(dtype)
        opt = torch.optim.AdamW(leaf, lr=1e-5, weight_decay=0.0, fused=True)

        def fn():
            for p, d in zip(leaf, self.dense):
                p.grad.mul_(d)
            opt.step()

        return fn

    def impls(self) -> dict:
        return {
            "ours fp32 state": self._ours(torch.float32, False),
            "ours bf16 state": self._ours(torch.bfloat16, False),
            "ours compact fp32": self._ours(torch.float32, True),
            "ours compact bf16": self._ours(torch.bfloat16, True),
            "fused fp32 params": self._fused(torch.float32),
            "fused bf16 params": self._fused(torch.bfloat16),
        }
