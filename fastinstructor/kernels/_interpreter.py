"""Fixes for Triton's CPU interpreter (``TRITON_INTERPRET=1``), applied when the kernels load under it.

Each changes the interpreter's simulation of an operation to what a GPU computes, never the kernels:

- ``widen_bfloat16_dot``: the interpreter stores bfloat16 as uint16, and its ``tl.dot`` multiplies those raw bit
  patterns (values around 1e10; triton-lang/triton#11584, where upstream says bfloat16 is not supported yet), so
  every bfloat16 kernel here would compute garbage on the CPU. The fix converts bfloat16 operands to float32
  before the product, as the interpreter's own cast path does: that is what a GPU's bfloat16 MMA computes
  (exact products, float32 accumulation). Only bfloat16 dots change, which were wrong before.
- ``round_float32_casts``: the interpreter casts float32 to bfloat16 by truncation (1.9999 -> 1.992) and to
  float8 with a rounding carry that never reaches the exponent (124.7 -> 64 in e4m3), where a GPU rounds to
  the nearest even value (``cvt.rn``). The fix does those casts with torch's conversion, which rounds so.
"""

from __future__ import annotations

import numpy as np
import torch
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


# The narrow float types by their torch twins, and the unsigned type that holds their bits.
_NARROW = {
    tl.bfloat16: (torch.bfloat16, torch.uint16),
    tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8),
    tl.float8e5: (torch.float8_e5m2, torch.uint8),
}


def round_float32_casts() -> None:
    original = interpreter._convert_float
    if getattr(original, "rounds_to_nearest_even", False):
        return  # already applied

    def convert_float(data, input_dtype, output_dtype, rounding_mode):
        narrow = _NARROW.get(output_dtype)
        rtz = getattr(getattr(interpreter, "_ir", None), "ROUNDING_MODE", None)
        if input_dtype != tl.float32 or narrow is None or (rtz is not None and rounding_mode == rtz.RTZ):
            return original(data, input_dtype, output_dtype, rounding_mode)
        values = torch.from_numpy(np.ascontiguousarray(data).view(np.float32))
        return values.to(narrow[0]).view(narrow[1]).numpy()

    convert_float.rounds_to_nearest_even = True
    interpreter._convert_float = convert_float
