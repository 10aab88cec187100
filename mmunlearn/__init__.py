"""mmunlearn: multimodal machine unlearning with fused Triton kernels."""

__version__ = "0.1.0"
