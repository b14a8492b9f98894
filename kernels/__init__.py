"""Triton kernels for the CUDA backend, importable as ``fastinstructor.kernels``.

One op family per file, each with its pure-torch ``<op>_ref`` beside it (DESIGN section 7); the modules
import triton, so import them only where it is installed (the ``gpu`` extra; ``dev`` brings it for the
interpreter tests, ``TRITON_INTERPRET=1``):

- ``rms_norm``: residual add + T5 RMSNorm, fused (variance in float32).
- ``pooling``: instruction-masked mean pooling over packed (unpadded) sequences.

Still to come (issue 5): the fused T5 attention with the relative position bias computed in the kernel,
the FFN matmul with ReLU and int8 paths, and the ``triton`` backend that runs the encoder with them.
"""
