"""Triton kernels for the CUDA backend, importable as ``fastinstructor.kernels``.

One op family per file, each with its pure-torch ``<op>_ref`` beside it (docs/design.md section 7); the modules
import triton, so import them only where it is installed (the ``gpu`` extra; ``dev`` brings it for the
interpreter tests, ``TRITON_INTERPRET=1``):

- ``attention``: packed T5 self-attention with the relative position bias computed in the kernel.
- ``rms_norm``: residual add + T5 RMSNorm, fused (variance in float32).
- ``pooling``: instruction-masked mean pooling over packed sequences.
- ``matmul``: ``act(x @ w^T)`` with the ReLU in the epilogue, and the int8 path (per-token x per-channel).
- ``quantize``: per-token int8 / float8 quantization of activations (the RMSNorm kernel fuses it too).
- ``projection``: one projection prepared once (weights in their layout) and run by cuBLAS or a Triton tile.
- ``tuning``: which implementation and tile each projection and the attention run, by GPU and shape class.

Under the interpreter, ``_interpreter`` first fixes its bfloat16 ``tl.dot`` and its float32 -> bfloat16 / float8
casts (see there).
"""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from ._interpreter import round_float32_casts, widen_bfloat16_dot

    widen_bfloat16_dot()
    round_float32_casts()
