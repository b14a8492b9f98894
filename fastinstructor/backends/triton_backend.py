"""The triton backend: the project's T5 encoder (``fastinstructor.encoder``) on packed (unpadded) tokens with the
Triton op set: the project's Triton kernels and cuBLAS.

A batch arrives packed (``embed_packed``: a ``batching.PackedBatch`` of token ids, ``cu_seqlens`` and
``pool_start``, built on the host by the pipeline, ``packed_input``), or padded ``[B, L]`` (``embed``, which packs
it on the host and calls ``embed_packed``: one forward). The states are ``[T, d_model]``: the projections and the
FFN never touch padding, attention runs per sequence with the relative position bias computed in the kernel
(``kernels.attention``, reading q, k and v as views of the fused projection's output), RMSNorm is fused with
the residual add (``kernels.rms_norm``), and pooling reads the packed states (``kernels.pooling``). The residual
stream stays float32 (T5 overflows float16 there, docs/design.md section 5).

Each projection (``kernels.projection``) runs cuBLAS or a Triton tile, whichever ``kernels.tuning`` chose for
this GPU and the batch's shape class (a committed table, this machine's tuning file, or a measurement at
load). ``int8`` and ``float8`` quantize the weights per output channel once, and the activations per token
at run time: fused into the RMSNorm before ``qkv`` and ``wi``, one pass of ``kernels.quantize`` before ``o`` and
``wo``; attention and the states between run in bfloat16. ``float8`` (e4m3, ``torch._scaled_mm``) needs FP8
tensor cores (compute capability 8.9: Ada, Hopper and later).

Loading compiles every kernel specialization the backend can meet (``warm_up``): no batch, served or timed,
waits for Triton's compiler. Runs on CUDA. Under ``TRITON_INTERPRET=1`` it also runs on the CPU, slowly, for
the tests.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from typing import ClassVar

import torch

from ..batching import PackedBatch, pack_batch, pack_padded
from ..checkpoint import Checkpoint
from ..encoder import build_encoder, qkv_views, relative_attention_bias
from ..hardware import Hardware
from .base import BackendClass, Capability

__all__ = ["TritonBackend"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_QUANTIZED = {"int8": torch.int8, "float8": torch.float8_e4m3fn}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(BackendClass):
    name: ClassVar[str] = "triton"
    capabilities: ClassVar[tuple[Capability, ...]] = (
        Capability("bfloat16", "cuda", 10),
        Capability("float16", "cuda", 20),
        Capability("float32", "cuda"),
        Capability("int8", "cuda"),
        Capability("float8", "cuda"),
    )
    packed_input: ClassVar[bool] = True
    large_batches: ClassVar[bool] = True

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed: pip install 'fastinstructor[gpu]'"
        if _interpreted():
            return True, "Triton interpreter on the CPU (TRITON_INTERPRET=1: correct but slow, for tests)"
        if not torch.cuda.is_available():
            return False, "no CUDA device (Triton kernels need one; TRITON_INTERPRET=1 runs them on the CPU for tests)"
        return True, f"Triton on {torch.cuda.get_device_name(0)}"

    @classmethod
    def unavailable(cls, precision: str, device: str, hardware: Hardware) -> str | None:
        capability = hardware.cuda_capability
        if precision == "float8" and device == "cuda" and capability is not None and tuple(capability) < (8, 9):
            return (
                f"float8 needs FP8 tensor cores (compute capability 8.9 or later: Ada, Hopper); "
                f"{hardware.cuda_device} is {capability[0]}.{capability[1]}: use int8 or bfloat16"
            )
        return None

    def __init__(self, checkpoint: Checkpoint, precision: str = "bfloat16", device: str = "cuda") -> None:
        # The interpreter runs the CUDA path on the CPU, for the tests.
        precision = self.check_supported(precision, "cuda" if _interpreted() else device)
        ok, why = self.availability()
        if not ok:
            raise ImportError(f"the triton backend is not available: {why}")
        from ..kernels.projection import Projection
        from ..kernels.tuning import CLASSES, Site, gpu_tuner

        self.device, self.precision = torch.device(device), precision
        cfg = checkpoint.config
        # Quantized precisions: int8/float8 products, everything between them in bfloat16.
        quant = _QUANTIZED.get(precision)
        dtype = torch.bfloat16 if quant else _DTYPES[precision]
        dtype_name = str(dtype).removeprefix("torch.")
        # T5's FFN output overflows float16: wo writes float32 there (docs/design.md section 5).
        wo_out = torch.float32 if dtype == torch.float16 else dtype
        self.tuner = tuner = gpu_tuner()

        def project(weight: torch.Tensor, name: str) -> Projection:
            weight, relu, out = weight.to(self.device), name == "wi", wo_out if name == "wo" else dtype
            proj = Projection.prepare(weight if quant else weight.to(dtype), relu, out, quant)
            if quant != torch.float8_e4m3fn:  # float8 has one implementation
                op = "linear_int8" if quant else "linear"
                site = Site(op, "int8" if quant else dtype_name, str(out).removeprefix("torch."), relu, *weight.shape)
                proj.choices = {klass: tuner.choose(site, klass) for klass in CLASSES}
            return proj

        attention_site = Site("attention", dtype_name, n=cfg.num_heads, k=cfg.d_kv)
        ops = TritonOps(
            dtype, quant, cfg, relative_attention_bias(checkpoint).to(self.device).contiguous(),
            {klass: tuner.choose(attention_site, klass) for klass in CLASSES},
        )  # fmt: skip
        self.encoder = build_encoder(checkpoint, ops, project, place=lambda t: t.to(self.device))
        started = time.perf_counter()
        if not _interpreted():  # nothing to compile in the interpreter
            self.warm_up()
        self.warm_up_seconds = time.perf_counter() - started

    # Packed batches (sequence lengths) that meet every specialization: T = 1, a multiple of 16 and neither, B = 1, 2,
    # 3 and 16, in each shape class (up to 1,024 tokens, and past it).
    WARM_UP_BATCHES: ClassVar[list[list[int]]] = [
        [1], [16], [1] * 16, [8, 9], [1025], [520, 520], [65] * 16, [347] * 3,
    ]  # fmt: skip

    def warm_up(self) -> None:
        """Run every kernel specialization the backend can meet, so that Triton compiles them now (its cache on
        disk makes later loads quick). Triton specializes a kernel on its constexprs and on each integer argument
        being 1 or a multiple of 16: the packed token count ``T`` reaches the products and the batch size ``B``
        the attention as such integers, and the shape class picks the implementation and the tiles."""
        for lengths in self.WARM_UP_BATCHES:
            ids = [[2 + (i % 30) for i in range(n)] for n in lengths]
            self.embed_packed(pack_batch(ids, [n // 2 for n in lengths], pin_memory=self.device.type == "cuda"))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
        """A right-padded batch: packed where it lies (on the host for ``pad_batch``'s tensors), then
        ``embed_packed``."""
        return self.embed_packed(pack_padded(input_ids, attention_mask, pool_start))

    @torch.inference_mode()
    def embed_packed(self, batch: PackedBatch) -> torch.Tensor:
        """``[B, out_dim]`` float32 on the device. The inputs go to the device with ``non_blocking`` copies (they
        overlap when the batch is in pinned memory), and nothing in the forward waits for the device: the token
        count comes from the host, and the attention checks ``cu_seqlens`` on the device (``torch._assert_async``)."""
        ids = batch.input_ids.to(self.device, non_blocking=True)  # [T] real tokens only
        cu = batch.cu_seqlens.to(self.device, non_blocking=True)
        pool_start = batch.pool_start.to(self.device, non_blocking=True)
        return self.encoder.embed(ids, cu, pool_start, batch.max_len)


class TritonOps:
    """The triton backend's op set of the encoder (``encoder.EncoderOps``): ``kernels.rms_norm`` (quantizing its
    output for an int8 or float8 product), ``kernels.quantize``, ``kernels.attention`` with the tile chosen for
    the batch's shape class, and ``kernels.pooling``."""

    def __init__(self, dtype: torch.dtype, quant: torch.dtype | None, config, bias_table: torch.Tensor, tiles: dict):
        from ..kernels import attention, pooling, quantize, rms_norm
        from ..kernels.projection import shape_class

        self.dtype, self.quant, self.eps = dtype, quant, config.layer_norm_epsilon
        self.bias_table, self.max_distance, self.tiles, self.shape_class = (
            bias_table,
            config.max_distance,
            tiles,
            shape_class,
        )
        self.t5_attention, self.masked_mean_pool = attention.t5_attention, pooling.masked_mean_pool
        self.quantize_rows, self.rms_norm, self.rms_norm_quantized = (
            quantize.quantize_rows, rms_norm.rms_norm, rms_norm.rms_norm_quantized,
        )  # fmt: skip

    def norm(self, x, weight, residual=None, last: bool = False):
        if self.quant is not None and not last:
            return self.rms_norm_quantized(x, weight, self.eps, residual, self.quant)
        return self.rms_norm(x, weight, self.eps, residual, self.dtype)

    def product_input(self, x: torch.Tensor):
        return self.quantize_rows(x, self.quant) if self.quant is not None else x

    def batch_attention(self, max_len: int, tokens: int):
        tile = self.tiles[self.shape_class(tokens)]
        heads = self.bias_table.shape[1]

        def attention(qkv: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
            out = self.t5_attention(*qkv_views(qkv, heads), cu, self.bias_table, self.max_distance, tile=tile)
            return self.product_input(out.reshape(tokens, -1))

        return attention

    def pool(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
        return self.masked_mean_pool(hidden, cu_seqlens, pool_start)
