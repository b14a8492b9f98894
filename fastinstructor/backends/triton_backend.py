"""The triton backend: the T5 encoder on packed (unpadded) tokens with the project's Triton kernels and cuBLAS.

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
import torch.nn.functional as F

from ..batching import PackedBatch, pack_batch, pack_padded
from ..checkpoint import Checkpoint
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
        from ..kernels import attention, pooling, quantize, rms_norm
        from ..kernels.projection import Projection, shape_class
        from ..kernels.tuning import CLASSES, Site, gpu_tuner

        self._attention, self._pool, self._quantize = attention.t5_attention, pooling.masked_mean_pool, quantize
        self._shape_class = shape_class
        self._rms_norm = rms_norm
        self.device, self.precision = torch.device(device), precision
        cfg = self.config = checkpoint.config
        # Quantized precisions: int8/float8 products, everything between them in bfloat16.
        self.quant = _QUANTIZED.get(precision)
        self.dtype = torch.bfloat16 if self.quant else _DTYPES[precision]
        dtype_name = str(self.dtype).removeprefix("torch.")
        # T5's FFN output overflows float16: wo writes float32 there (docs/design.md section 5).
        wo_out = torch.float32 if self.dtype == torch.float16 else self.dtype
        self.tuner = gpu_tuner()
        w = {name: t.to(self.device) for name, t in checkpoint.weights.items()}

        def projection(weight: torch.Tensor, relu: bool = False, out: torch.dtype = self.dtype) -> Projection:
            proj = Projection.prepare(weight if self.quant else weight.to(self.dtype), relu, out, self.quant)
            if self.quant != torch.float8_e4m3fn:  # float8 has one implementation
                op = "linear_int8" if self.quant else "linear"
                site = Site(
                    op, "int8" if self.quant else dtype_name, str(out).removeprefix("torch."), relu, *weight.shape
                )
                proj.choices = {klass: self.tuner.choose(site, klass) for klass in CLASSES}
            return proj

        self.embed_table = w["shared.weight"]  # float32: the residual stream starts from it
        self.bias_table = w["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].contiguous()
        attention_site = Site("attention", dtype_name, n=cfg.num_heads, k=cfg.d_kv)
        self.attention_tile = {k: self.tuner.choose(attention_site, k) for k in CLASSES}
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"encoder.block.{i}.layer."
            attn = p + "0.SelfAttention."
            self.layers.append(
                {
                    "ln_attn": w[p + "0.layer_norm.weight"],
                    "qkv": projection(torch.cat([w[attn + n + ".weight"] for n in "qkv"])),  # [3 * inner, d]
                    "o": projection(w[attn + "o.weight"]),
                    "ln_ff": w[p + "1.layer_norm.weight"],
                    "wi": projection(w[p + "1.DenseReluDense.wi.weight"], relu=True),
                    "wo": projection(w[p + "1.DenseReluDense.wo.weight"], out=wo_out),
                }
            )
        self.ln_final = w["encoder.final_layer_norm.weight"]
        self.dense = None if checkpoint.dense_weight is None else checkpoint.dense_weight.to(self.device)
        self.normalize = checkpoint.normalize
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

    def _normalized(self, x, weight, residual=None, quantize: bool = True):
        """RMSNorm (+ the residual add): bfloat16/float16/float32 states, or quantized ones for the next product."""
        eps = self.config.layer_norm_epsilon
        if self.quant is not None and quantize:
            return self._rms_norm.rms_norm_quantized(x, weight, eps, residual, self.quant)
        return self._rms_norm.rms_norm(x, weight, eps, residual, self.dtype)

    def _product_input(self, x: torch.Tensor):
        """A product's input from the previous op's output: quantized per token for int8 and float8."""
        return self._quantize.quantize_rows(x, self.quant) if self.quant is not None else x

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
        """A right-padded batch: packed where it lies (on the host for ``pad_batch``'s tensors), then
        ``embed_packed``."""
        return self.embed_packed(pack_padded(input_ids, attention_mask, pool_start))

    @torch.inference_mode()
    def embed_packed(self, batch: PackedBatch) -> torch.Tensor:
        """``[B, out_dim]`` float32 on the device. The inputs go to the device with ``non_blocking`` copies (they
        overlap when the batch is in pinned memory), and nothing in the forward waits for the device: the token
        count comes from the host, and the attention checks ``cu_seqlens`` on the device (``torch._assert_async``)."""
        cfg = self.config
        ids = batch.input_ids.to(self.device, non_blocking=True)  # [T] real tokens only
        cu = batch.cu_seqlens.to(self.device, non_blocking=True)
        pool_start = batch.pool_start.to(self.device, non_blocking=True)
        tokens = batch.tokens
        tile = self.attention_tile[self._shape_class(tokens)]
        residual = F.embedding(ids, self.embed_table)  # [T, d] float32
        h = self._normalized(residual, self.layers[0]["ln_attn"])[0]
        for i, layer in enumerate(self.layers):
            qkv = layer["qkv"](h).view(tokens, 3, cfg.num_heads, cfg.d_kv)  # [T, 3, H, d_kv]
            q, k, v = qkv.unbind(1)  # views: the kernel reads them with their strides
            attn = self._attention(q, k, v, cu, self.bias_table, cfg.max_distance, tile=tile)  # [T, H, d_kv]
            out = layer["o"](self._product_input(attn.view(tokens, -1)))
            h, residual = self._normalized(out, layer["ln_ff"], residual)
            ff = layer["wo"](self._product_input(layer["wi"](h)))
            last = i + 1 == len(self.layers)
            following = self.ln_final if last else self.layers[i + 1]["ln_attn"]
            h, residual = self._normalized(ff, following, residual, quantize=not last)
        pooled = self._pool(h, cu, pool_start)  # [B, d] float32, final-norm states
        if self.dense is not None:
            pooled = pooled @ self.dense.t()
        if self.normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
        return pooled
