"""A fix for Triton's CPU interpreter (``TRITON_INTERPRET=1``), applied when the kernels load under it.

The interpreter stores bfloat16 as uint16, and its ``tl.dot`` multiplies those raw bit patterns (values around
1e10; triton-lang/triton#11584, where upstream says bfloat16 is not supported yet), so every bfloat16 kernel
here would compute garbage on the CPU. ``widen_bfloat16_dot`` converts bfloat16 operands to float32 before the
product, as the interpreter's own cast path does: that is what a GPU's bfloat16 MMA computes (exact products,
float32 accumulation). It changes the simulator of ``tl.dot`` only, never the kernels, and only bfloat16 dots,
which were wrong before.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter


def widen_bfloat16_dot() -> None:
    if interpreter._get_np_dtype(tl.bfloat16) != np.dtype(np.uint16):
        return  # a Triton that stores bfloat16 otherwise: nothing to fix
    original = interpreter.InterpreterBuilder.create_dot
    if getattr(original, "widens_bfloat16", False):
        return  # already applied

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, *args):
        return original(self, widen(a), widen(b), d, *args)

    create_dot.widens_bfloat16 = True
    interpreter.InterpreterBuilder.create_dot = create_dot
