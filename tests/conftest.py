"""Test configuration.

Without CUDA the Triton kernels run in triton's CPU interpreter. triton reads TRITON_INTERPRET
when a kernel is decorated, i.e. when mmunlearn.kernels is first imported, so it is set here,
before any test module imports the package.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where the Triton backend runs in this session: the GPU when there is one, else the interpreter.
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def _triton_fma_rounds_once() -> bool:
    """Whether tl.fma rounds once here, as on a GPU: triton's interpreter before its fma_fp32
    (e.g. triton 3.2, our minimum) multiplies and adds in two roundings, so fp32 results of the
    Triton kernels then differ from the torch twins by an ulp (and a stochastic rounding
    decision, now and then, with them)."""
    if HAS_CUDA:
        return True
    from triton.runtime import interpreter

    return hasattr(getattr(interpreter, "_interpreter", None), "fma_fp32")


TRITON_FMA_EXACT = _triton_fma_rounds_once()


def _cpu_fsdp() -> bool:
    from mmunlearn.fsdp import CPU_FSDP  # (after TRITON_INTERPRET is set above)

    return CPU_FSDP


# tests that run FSDP2 on CPU ranks (gloo): torch 2.6's fully_shard fails there
needs_cpu_fsdp = pytest.mark.skipif(
    not _cpu_fsdp(), reason=f"FSDP2 on CPU (gloo) needs torch 2.7+, this is {torch.__version__}"
)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


# Every test draws fresh random inputs from this seed; set MMU_TEST_SEED to try others.
SEED = int(os.environ.get("MMU_TEST_SEED", "1234"))


def pytest_report_header(config):
    import mmunlearn  # where it is imported from: the source tree or a non-editable install

    return (
        f"mmunlearn: MMU_TEST_SEED={SEED}, triton backend on {DEVICE}"
        + (" (TRITON_INTERPRET=1)" if not HAS_CUDA else "")
        + f"\nmmunlearn {mmunlearn.__version__} from {os.path.dirname(mmunlearn.__file__)};"
        + f" torch {torch.__version__}"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that pins torch's thread count must not leak it into the tests after it: rounding
    (and so tight tolerances) depends on how many threads split a reduction."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
