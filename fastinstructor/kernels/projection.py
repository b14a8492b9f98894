"""One of the encoder's projections, ``y = act(x @ w^T)``, prepared once and run by the implementation chosen
for the batch's shape class (``kernels.tuning``).

The weight is kept in its implementation's layout: ``[N, K]`` in the compute dtype for float products, or
quantized per output channel (``quantize_rows_ref``) with its scales for int8 and float8. The input is a
tensor for float products, or ``(q, scale)`` quantized per token for int8 and float8 (made by the RMSNorm
before it, or by ``kernels.quantize.quantize_rows``).

Implementations (``run(choice, x)``):

- float, ``CUBLAS``: ``torch.mm`` (the ReLU through ``torch._addmm_activation``: cuBLASLt's bias + ReLU
  epilogue, with a zero bias), output in the input's dtype;
- float, a tile: ``kernels.matmul.linear`` (ReLU and output dtype in its epilogue);
- int8, ``CUBLAS``: ``torch._int_mm`` (int32), then the scales and ReLU in torch;
- int8, a tile: ``kernels.matmul.linear_int8`` (scales and ReLU in its epilogue);
- float8: ``torch._scaled_mm`` with row-wise scales (cuBLASLt), then the ReLU in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .matmul import linear, linear_int8
from .quantize import quantize_rows_ref

__all__ = ["CUBLAS", "SMALL_TOKENS", "Projection", "shape_class"]

CUBLAS = "cublas"  # the choice of cuBLAS (through torch) over a Triton tile
SMALL_TOKENS = 1024


def shape_class(tokens: int) -> str:
    """``small`` (up to ``SMALL_TOKENS`` packed tokens: single requests, where latency counts) or ``large``."""
    return "small" if tokens <= SMALL_TOKENS else "large"


@dataclass
class Projection:
    weight: torch.Tensor  # [N, K]: the compute dtype, int8 or float8_e4m3fn
    scale: torch.Tensor | None  # [N] float32 when quantized
    relu: bool
    out_dtype: torch.dtype
    choices: dict[str, str | dict] = field(default_factory=dict)  # shape class -> CUBLAS or a tile
    zero_bias: torch.Tensor | None = None  # cuBLASLt's ReLU epilogue comes with a bias

    @classmethod
    def prepare(cls, weight: torch.Tensor, relu: bool, out_dtype: torch.dtype, quant: torch.dtype | None) -> Projection:
        """``weight [N, K]`` in the compute dtype, or quantized to ``quant`` (int8, float8_e4m3fn) per channel."""
        if quant is None:
            w = weight.contiguous()
            bias = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if relu else None
            return cls(w, None, relu, out_dtype, zero_bias=bias)
        if quant == torch.float8_e4m3fn and (weight.shape[0] % 16 or weight.shape[1] % 16):
            raise ValueError(
                f"float8 needs projection sizes that are multiples of 16 (cuBLASLt's FP8 products); this "
                f"checkpoint has a {weight.shape[0]} x {weight.shape[1]} projection: use int8 or bfloat16"
            )
        wq, scale = quantize_rows_ref(weight, quant)
        return cls(wq, scale, relu, out_dtype)

    @property
    def quantized(self) -> torch.dtype | None:
        return None if self.scale is None else self.weight.dtype

    def __call__(self, x) -> torch.Tensor:
        rows = x[0].shape[0] if isinstance(x, tuple) else x.shape[0]
        return self.run(self.choices.get(shape_class(rows), CUBLAS), x)

    def run(self, choice: str | dict, x) -> torch.Tensor:
        activation = "relu" if self.relu else "none"
        if self.scale is None:
            if choice != CUBLAS:
                return linear(x, self.weight, activation, self.out_dtype, tile=choice)
            if self.relu:
                return torch._addmm_activation(self.zero_bias, x, self.weight.t())
            return torch.mm(x, self.weight.t())
        xq, sx = x
        if self.weight.dtype == torch.float8_e4m3fn:
            # cuBLASLt wants the second operand column-major: the [N, K] weight's transpose view is.
            y = torch._scaled_mm(
                xq, self.weight.t(), scale_a=sx[:, None], scale_b=self.scale[None, :], out_dtype=self.out_dtype
            )
            return y.relu_() if self.relu else y
        if choice != CUBLAS:
            return linear_int8(xq, sx, self.weight, self.scale, activation, self.out_dtype, tile=choice)
        y = torch._int_mm(xq, self.weight.t()).float() * sx[:, None] * self.scale[None, :]
        return (y.relu_() if self.relu else y).to(self.out_dtype)
