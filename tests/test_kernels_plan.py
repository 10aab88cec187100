"""Launch plans (kernels/plan.py): a masked AdamW call over the same long-lived tensors re-uses
its validation, grouping and tables. Contract checked here: a call served by a plan gives the
bytes the same backend gives without plans, and those of the torch twin (the oracle; bit for bit
where the backend's arithmetic is the twin's: the cpu backend, and Triton except in an
interpreter whose tl.fma rounds twice, conftest.py), whatever changed between calls — new
gradient tensors, a parameter re-pointed with ``.data =``, a state tensor resized in place,
gradients of another dtype, non-contiguous gradients —, bad input still gets the full check's
one-line error, and fresh views of the same storage share a plan. Lists of ≥
plan.MIN_TENSORS tensors (shorter lists never get a plan). The Triton side runs in the
interpreter (conftest.py)."""

from __future__ import annotations

import pytest
import torch

import mmunlearn.kernels as K
from mmunlearn.kernels import _cpu, plan

from conftest import DEVICE, TRITON_FMA_EXACT

# 10 tensors of odd sizes (tails of partial mask bytes, several CPU chunks in one)
SHAPES = [(3,), (7, 5), (33,), (129,), (1000,), (2, 513), (17,), (4097,), (40001,), (9,)]
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
BACKENDS = ["cpu", "triton"]


def _need(backend):
    if backend == "cpu" and (DEVICE.type != "cpu" or not _cpu.available()):
        pytest.skip("the cpu backend runs on CPU tensors")


def _bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _same(a, b):
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


class _Pair:
    """The same state stepped by ``backend`` (served by plans), by ``backend`` with no plan, and
    by the torch twin."""

    def __init__(self, backend, pdt=torch.bfloat16, sdt=torch.float32, frac=0.4, gen=None):
        g = gen or torch.Generator().manual_seed(0)
        self.backend = backend
        self.params = [torch.randn(s, generator=g).to(DEVICE, pdt) for s in SHAPES]
        self.m = [torch.zeros(s, device=DEVICE, dtype=sdt) for s in SHAPES]
        self.v = [torch.zeros(s, device=DEVICE, dtype=sdt) for s in SHAPES]
        dense = [(torch.rand(s, generator=g) < frac).to(DEVICE) for s in SHAPES]
        self.masks = [K.pack_bits(d) for d in dense]
        self.index = [K.MaskIndex(k, d.numel()) for k, d in zip(self.masks, dense)]
        self.twin = [[x.clone() for x in lst] for lst in (self.params, self.m, self.v)]
        self.bare = [[x.clone() for x in lst] for lst in (self.params, self.m, self.v)]
        self.gen = g
        self.t = 0

    def grads(self, dtype=torch.bfloat16):
        return [torch.randn(s, generator=self.gen).to(DEVICE, dtype) for s in SHAPES]

    def step(self, grads=None, sr=True):
        grads = self.grads() if grads is None else grads
        self.t += 1
        kw = dict(step=self.t, sr_seed=100 + self.t if sr else None, param_sr=sr, **HP)
        K.masked_adamw_(self.params, grads, self.m, self.v, self.masks, mask_index=self.index,
                        backend=self.backend, **kw)  # fmt: skip
        p, m, v = self.twin
        K.masked_adamw_(p, grads, m, v, self.masks, mask_index=self.index, backend="torch", **kw)
        p, m, v = self.bare
        least, plan.MIN_TENSORS = plan.MIN_TENSORS, 1 << 30
        try:
            K.masked_adamw_(p, grads, m, v, self.masks, mask_index=self.index,
                            backend=self.backend, **kw)  # fmt: skip
        finally:
            plan.MIN_TENSORS = least

    def agree(self):
        ours = (self.params, self.m, self.v)
        if not all(_same(a, b) for a, b in zip(ours, self.bare)):
            return False
        if self.backend == "triton" and not TRITON_FMA_EXACT:
            return True  # (this interpreter's tl.fma rounds twice: only plan vs no plan)
        return all(_same(a, b) for a, b in zip(ours, self.twin))


@pytest.fixture(autouse=True)
def _fresh_plans():
    plan.clear_plans()
    yield
    plan.clear_plans()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16], ids=str)
def test_plan_steps_match_the_twin(backend, sdt):
    _need(backend)
    pair = _Pair(backend, sdt=sdt)
    fixed = pair.grads()
    for _ in range(3):  # the same gradient tensors: the plan and its tables as they are
        pair.step(fixed)
    assert len(plan._PLANS) == 1
    for _ in range(2):  # new gradient tensors every step (zero_grad(set_to_none=True))
        pair.step()
    assert len(plan._PLANS) == 1
    assert pair.agree()


@pytest.mark.parametrize("backend", BACKENDS)
def test_changes_between_calls_are_seen(backend):
    _need(backend)
    pair = _Pair(backend)
    pair.step()
    # a parameter re-pointed at new storage: the plan's pointer is stale, the call must not use it
    new = pair.params[4].clone() * 0.5
    pair.params[4].data = new
    pair.twin[0][4] = new.clone()
    pair.bare[0][4] = new.clone()
    pair.step()
    assert pair.params[4].data_ptr() == new.data_ptr()
    # gradients of another dtype (another group key), then non-contiguous gradients
    pair.step(pair.grads(torch.float32))
    g = [x.t().contiguous().t() if x.dim() == 2 else x for x in pair.grads()]
    assert not all(x.is_contiguous() for x in g)
    pair.step(g)
    pair.step()
    assert pair.agree()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_after_a_plan_still_raises(backend):
    _need(backend)
    pair = _Pair(backend)
    pair.step()
    bad = pair.grads()
    bad[8] = bad[8][:-1]
    with pytest.raises(ValueError, match=r"params\[8\] has 40001 elements .* grads\[8\] has 40000"):
        pair.step(bad)
    pair.m[2].resize_(30)  # resized in place (same storage): not a stale size in a table
    with pytest.raises(ValueError, match=r"exp_avgs\[2\]"):
        pair.step()
    with pytest.raises(ValueError, match="got 9 mask indexes for 10 params"):
        K.masked_adamw_(pair.params, pair.grads(), pair.m, pair.v, pair.masks, step=9,
                        mask_index=pair.index[:9], backend=backend, **HP)  # fmt: skip


def test_fresh_views_of_the_same_storage_share_a_plan():
    """FSDP2 hands the optimizer new ``to_local()`` views every step: a plan is keyed by what
    the launch reads (pointers), so new view objects of the same storage find it."""
    _need("cpu")
    pair = _Pair("cpu")
    pair.step()
    assert len(plan._PLANS) == 1
    views = [[x.view(x.shape) for x in lst] for lst in (pair.params, pair.m, pair.v)]
    pair.params, pair.m, pair.v = views
    pair.step()
    assert len(plan._PLANS) == 1
    assert pair.agree()


def test_memory_reused_by_another_dtype_is_a_miss():
    """A plan whose tensors were freed: a new tensor at the same address but of another dtype
    (a state re-created in bf16) must not be served the old plan's dtype group."""
    _need("cpu")
    pair = _Pair("cpu", sdt=torch.float32)
    pair.step()
    ptrs = [x.data_ptr() for x in pair.m]

    def as_bf16(x):  # the first numel bf16 values of x's storage: same address, same size
        return x.view(torch.bfloat16).reshape(-1)[: x.numel()].view(x.shape)

    pair.m, pair.v = [as_bf16(x) for x in pair.m], [as_bf16(x) for x in pair.v]
    assert [x.data_ptr() for x in pair.m] == ptrs
    pair.twin[1] = [x.clone() for x in pair.m]
    pair.twin[2] = [x.clone() for x in pair.v]
    pair.bare[1] = [x.clone() for x in pair.m]
    pair.bare[2] = [x.clone() for x in pair.v]
    pair.step()
    (served,) = plan._PLANS.values()  # rebuilt under the same pointers, for bf16 moments
    assert torch.bfloat16 in served.dtypes and torch.float32 not in served.dtypes
    assert pair.agree()


def test_short_lists_get_no_plan():
    _need("cpu")
    p = [torch.randn(5) for _ in range(plan.MIN_TENSORS - 1)]
    st = [torch.zeros(5) for _ in p]
    K.masked_adamw_(p, [torch.randn(5) for _ in p], st, [x.clone() for x in st], None, step=1,
                    backend="cpu", **HP)  # fmt: skip
    assert len(plan._PLANS) == 0


def test_device_step_counts_that_differ_launch_per_count():
    """CPU backend, per-tensor step counts (the optimizer with ``found_inf``): counts that
    differ take one launch per count, as the twin steps each tensor at its own count."""
    _need("cpu")
    pair = _Pair("cpu", sdt=torch.float32)
    grads = pair.grads()
    counts = [torch.tensor(float(1 + i % 3)) for i in range(len(SHAPES))]
    runs = (("cpu", (pair.params, pair.m, pair.v)), ("torch", pair.twin), ("cpu", pair.bare))
    for backend, (p, m, v) in runs:
        K.masked_adamw_(p, grads, m, v, pair.masks, mask_index=pair.index, step=counts,
                        backend=backend, **HP)  # fmt: skip
    assert pair.agree()
    same = [torch.tensor(4.0) for _ in SHAPES]
    for backend, (p, m, v) in runs:
        K.masked_adamw_(p, grads, m, v, pair.masks, mask_index=pair.index, step=same,
                        backend=backend, **HP)  # fmt: skip
    assert pair.agree()
