"""mmunlearn.kernels: fused Triton kernels and their PyTorch twins.

Every op exists as ``torch_<op>`` (reference, oracle), ``triton_<op>`` (GPU) and, for the
streaming ops, ``cpu_<op>`` (compiled C kernels for CPU tensors, kernels/_cpu.py) with the same
signature, plus one public function choosing at call time by
``backend="auto"|"torch"|"triton"|"cpu"`` (auto = Triton for CUDA tensors, the C kernels for
CPU tensors where they build, else the twins). Ops take lists of tensors and cover them in one
launch. Imports torch, triton and the standard library only. Constants (``BLOCK``,
``BACKENDS``, ``HAS_TRITON``, ``INTERPRET``) live in :mod:`mmunlearn.kernels._common`.
"""

from .adamw import (
    STATE_DTYPES,
    cpu_masked_adamw_,
    masked_adamw_,
    torch_masked_adamw_,
    triton_masked_adamw_,
)
from .bits import (
    MaskIndex,
    pack_bits,
    packed_size,
    torch_pack_bits,
    torch_unpack_bits,
    triton_pack_bits,
    triton_unpack_bits,
    unpack_bits,
)
from .fisher import (
    FisherBuckets,
    cpu_fisher_accumulate_,
    cpu_grad_sq_norm,
    fisher_accumulate_,
    grad_sq_norm,
    torch_fisher_accumulate_,
    torch_grad_sq_norm,
    triton_fisher_accumulate_,
    triton_grad_sq_norm,
)
from .saliency import (
    cpu_saliency_histogram,
    cpu_saliency_mask,
    float_to_key,
    key_to_float,
    saliency_histogram,
    saliency_mask,
    saliency_ratio,
    saliency_threshold_topk,
    topk_count,
    torch_saliency_histogram,
    torch_saliency_mask,
    triton_saliency_histogram,
    triton_saliency_mask,
)
from .sgd import cpu_masked_sgd_, masked_sgd_, torch_masked_sgd_, triton_masked_sgd_

# the dispatchers first (backend="auto"|"torch"|"triton"|"cpu"), then the classes and helpers,
# then the twins
__all__ = [
    "FisherBuckets",
    "MaskIndex",
    "STATE_DTYPES",
    "fisher_accumulate_",
    "grad_sq_norm",
    "masked_adamw_",
    "masked_sgd_",
    "pack_bits",
    "packed_size",
    "unpack_bits",
    "saliency_mask",
    "saliency_histogram",
    "saliency_threshold_topk",
    "saliency_ratio",
    "float_to_key",
    "key_to_float",
    "topk_count",
    "torch_fisher_accumulate_",
    "triton_fisher_accumulate_",
    "torch_grad_sq_norm",
    "triton_grad_sq_norm",
    "torch_masked_adamw_",
    "triton_masked_adamw_",
    "torch_masked_sgd_",
    "triton_masked_sgd_",
    "torch_pack_bits",
    "triton_pack_bits",
    "torch_unpack_bits",
    "triton_unpack_bits",
    "torch_saliency_mask",
    "triton_saliency_mask",
    "torch_saliency_histogram",
    "triton_saliency_histogram",
    "cpu_fisher_accumulate_",
    "cpu_grad_sq_norm",
    "cpu_masked_adamw_",
    "cpu_masked_sgd_",
    "cpu_saliency_mask",
    "cpu_saliency_histogram",
]
