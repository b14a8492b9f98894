"""Triton kernels for the CUDA backend, importable as ``fastinstructor.kernels``.

One op family per file, each with its pure-torch ``<op>_ref`` beside it (DESIGN section 7). The kernels
themselves (fused T5 attention with in-kernel relative position bias, fused RMSNorm, instruction-masked
pooling, int8 matmul) are tracked in issue 5; this package is installed and import-tested already so that
the layout of DESIGN section 2 holds for the editable install and the wheel.
"""
