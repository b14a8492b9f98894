"""The roofline: the model's matmul FLOPs at the workload's real lengths, and the machine's matmul ceilings
measured in the same run, per precision, with the libraries the backends use."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..checkpoint import EncoderConfig

__all__ = ["encoder_flops", "matmul_ceilings", "device_kind"]


def encoder_flops(config: EncoderConfig, lengths: Sequence[int], dense_out: int | None) -> int:
    """Matmul FLOPs (2 per multiply-add) to embed sequences of these real lengths, padding excluded.

    Per layer and sequence of n tokens: the q, k, v, o projections 8 n d_model inner, the ReLU feed-forward
    4 n d_model d_ff, and attention's two products (scores, weighted values) 4 n^2 inner, with inner =
    heads x d_kv; then the Dense head 2 d_model dense_out per sequence. Norms, softmax, the bias and pooling
    are elementwise and left out.
    """
    d, inner, ff = config.d_model, config.inner_dim, config.d_ff
    total = 0
    for n in lengths:
        total += config.num_layers * (8 * n * d * inner + 4 * n * d * ff + 4 * n * n * inner)
        total += 2 * d * dense_out if dense_out else 0
    return total


_CEILING_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}


def matmul_ceilings(precisions: Sequence[str], device: str = "cpu", size: int = 2048, repeat: int = 3) -> dict:
    """GFLOP/s of a large ``size``-cube matmul per precision on ``device``: the best library, best of ``repeat``.

    Each library the backends use is measured and the fastest counts, so that no backend can beat its ceiling by
    using a faster GEMM than the one measured: torch (``a @ a``; int8 is ``torch._int_mm``, int8 x int8 -> int32,
    what VNNI / AMX / tensor cores run; float8 is ``torch._scaled_mm`` on e4m3) and, on the CPU, oneDNN with a
    prepacked weight (the cpu backend's ``PackedLinear``, and its ``Int8Linear`` for int8, its output as the backend
    has it) and ONNX Runtime (``MatMul``; int8 is ``MatMulInteger`` on uint8 x int8, as its dynamically quantized
    graphs run). A precision nothing here can multiply in is recorded with the reason instead of a figure.
    """
    out = {}
    for precision in dict.fromkeys(precisions):
        by, errors = {}, []
        runners = {"torch": _torch_matmul(precision, device, size)}
        if not device.startswith("cuda") and precision in ("float32", "bfloat16", "int8"):
            runners["onednn"] = _onednn_matmul(precision, size)
        if not device.startswith("cuda") and precision in ("float32", "int8"):
            runners["onnxruntime"] = _onnxruntime_matmul(precision, size)
        for library, make in runners.items():
            try:
                run = make()
                if run is None:
                    continue
                run()  # warm-up
                best = math.inf
                for _ in range(repeat):
                    _sync(device)
                    start = time.perf_counter()
                    run()
                    _sync(device)
                    best = min(best, time.perf_counter() - start)
                by[library] = 2 * size**3 / best / 1e9
            except (RuntimeError, NotImplementedError) as err:
                errors.append(f"{library}: {type(err).__name__}: {err}"[:200])
        out[precision] = {"gflops": max(by.values()) if by else None, "by_library": by, "size": size}
        if errors:
            out[precision]["errors"] = errors
    return out


def _torch_matmul(precision: str, device: str, size: int):
    def make():
        if precision == "int8":
            a, b = (torch.randint(-128, 128, (size, size), dtype=torch.int8, device=device) for _ in range(2))
            # b transposed, as a Linear's [N, K] weight: the layout cuBLAS and oneDNN's int8 GEMMs are fast in.
            return lambda: torch._int_mm(a, b.t())
        if precision == "float8":  # e4m3 x e4m3 -> bfloat16, what the triton backend's float8 runs (cuBLASLt)
            a, b = (torch.randn(size, size, device=device).to(torch.float8_e4m3fn) for _ in range(2))
            one = torch.ones((), device=device)
            return lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        a = torch.randn(size, size, device=device).to(_CEILING_DTYPES[precision])
        return lambda: a @ a

    return make


def _onednn_matmul(precision: str, size: int):
    def make():
        from ..backends.cpu import Int8Linear, PackedLinear, state_dtype

        if precision == "int8":
            if not Int8Linear.available():
                return None
            a = torch.randint(-127, 128, (size, size), dtype=torch.int8), torch.ones(size)
            linear = Int8Linear(torch.randn(size, size), "none", state_dtype("int8"))  # as the cpu backend runs it
            return lambda: linear(a)
        if not PackedLinear.available():
            return None
        dtype = _CEILING_DTYPES[precision]
        a, linear = torch.randn(size, size).to(dtype), PackedLinear(torch.randn(size, size).to(dtype))
        return lambda: linear(a)

    return make


def _onnxruntime_matmul(precision: str, size: int):
    def make():
        try:
            import onnxruntime as ort
            from onnx import TensorProto, helper
        except ImportError:
            return None
        if precision == "int8":
            node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
            types = (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32)
            feeds = {
                "a": np.random.randint(0, 256, (size, size), dtype=np.uint8),
                "b": np.random.randint(-128, 128, (size, size), dtype=np.int8),
            }
        else:
            node = helper.make_node("MatMul", ["a", "b"], ["y"])
            types = (TensorProto.FLOAT,) * 3
            feeds = {name: np.random.randn(size, size).astype(np.float32) for name in ("a", "b")}
        graph = helper.make_graph(
            [node],
            "matmul",
            [helper.make_tensor_value_info(n, t, [size, size]) for n, t in zip("ab", types[:2], strict=True)],
            [helper.make_tensor_value_info("y", types[2], [size, size])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return lambda: session.run(None, feeds)

    return make


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_kind(device: str) -> str:
    """``cuda`` for any CUDA device (``cuda:1``), else ``cpu``: what the ceilings are keyed by."""
    return "cuda" if device.startswith("cuda") else "cpu"
