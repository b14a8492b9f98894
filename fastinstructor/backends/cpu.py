"""The cpu backend: the project's T5 encoder (``fastinstructor.encoder``) with the CPU op set, on packed tokens:
float32, bfloat16 or int8.

A batch arrives packed (``embed_packed``: ``batching.PackedBatch``, what the pipeline builds for it, ``packed_input``)
or padded (``embed``, which packs it first): the states are ``[T, d_model]``, so the projections and the FFN never
compute a padding token. The op set (``CpuOps``):

- projections on oneDNN, each weight prepared once in oneDNN's blocked layout at load: float32 and bfloat16
  ``PackedLinear`` (the FFN's ReLU fused); int8 ``Int8Linear``, int8 x int8 products (VNNI, and AMX where the
  CPU has it) with the weights quantized per output channel and the activations per token, both symmetric
  (``t5.quantize_rows_ref``: the same scheme as the triton backend's int8). torch's default float32 GEMM (MKL)
  reaches 200 GFLOP/s on the project's AMD EPYC machines where oneDNN reaches 460; without oneDNN, float32 and
  bfloat16 fall back to ``torch.nn.functional.linear`` (and int8 is not offered);
- the residual add + RMSNorm in one pass, quantizing its output per token for an int8 product, and the
  per-token quantization of the FFN's inner output: native C++ ops (``fastinstructor.native``, or their PyTorch
  references where the install did not build them);
- attention per sequence (``native.varlen_attention``), each reading its block of the batch's relative position
  bias ``[H, Lmax, Lmax]``, built once per batch and shared by every layer; no 1/sqrt(d_kv) scaling; for int8,
  the qkv product's per-token scale applied and the output quantized for the o product in the same op
  (``native.varlen_attention_quantized``);
- bfloat16 and int8 run attention and the states between products in bfloat16 (int8 in float32 on a CPU
  without native bfloat16); the residual stream, the RMSNorm statistics and the pooling head stay float32.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import native
from ..batching import PackedBatch, pack_padded
from ..checkpoint import Checkpoint
from ..encoder import Attention, build_encoder, qkv_views, relative_attention_bias
from ..hardware import VNNI, Hardware, cpu_flags
from ..t5 import packed_mean_pool, position_bias_matrix, quantize_rows_ref
from .base import BackendClass, Capability

_NATIVE_BFLOAT16 = {"avx512_bf16", "amx_bf16"}
_FORWARD_BYTES = 16 * 2**20  # the most one forward's FFN activation takes (CpuBackend.forward_tokens)


def state_dtype(precision: str) -> torch.dtype:
    """The dtype of the states between the products, and of an int8 product's output: bfloat16 for bfloat16, and for
    int8 on a CPU with native bfloat16; float32 otherwise. (On an AVX2-only CPU oneDNN has no int8 kernel with a
    bfloat16 output and runs its reference one: 0.1 GFLOP/s, where the same product with a float32 output runs at
    50-90 on a 2-core AMD EPYC.)"""
    if precision == "float32" or (precision == "int8" and not _NATIVE_BFLOAT16 & cpu_flags()):
        return torch.float32
    return torch.bfloat16


def shape_bucket(tokens: int) -> int:
    """``tokens`` rounded up to a multiple of 1/16 of its power of two, 8 at the least (1000 -> 1024, 1100 -> 1152,
    20 -> 24): at most 1/16 more rows, and about 16 sizes per doubling (``CpuBackend.fill_forwards``)."""
    step = max(8, 1 << max(0, tokens.bit_length() - 5))
    return -(-tokens // step) * step


class PackedLinear:
    """``y = x @ W.T`` (then ReLU if asked) on oneDNN, the weight reordered once into oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, activation: str = "none") -> None:
        self.out_features, self.activation = weight.shape[0], activation
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)

    @staticmethod
    def available() -> bool:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, self.activation, [], "")


class Int8Linear:
    """``y = (q @ Wq.T) * w_scale[None, :] * x_scale[:, None]`` (then ReLU if asked) from a per-token quantized
    input ``(q [T, K] int8, x_scale [T])``: oneDNN's int8 product with the weight quantized per output channel (in 7
    bits on a CPU without VNNI) and prepacked once, its output in ``out_dtype``. oneDNN applies the weight's scales
    (it takes one scale for the whole input, not one per token); the activations' scale is left to the next op,
    which reads its input scaled: the call returns ``(y, x_scale)`` (the RMSNorm, the quantization and the attention
    take such pairs).

    Without VNNI (``hardware.VNNI``) oneDNN's product is u8 x s8 with pairs summed in 16 bits: the weights are in 7
    bits, which cannot saturate it (8-bit ones did: on an AVX2-only AMD EPYC products were off by up to 30, of values
    about 30, in 2-4% of their elements), and the input goes in as u8 with zero point 128 (``q + 128``: the same
    output to the bit). An s8 input cost each call a conversion of its own, 1-3 ms at base's sizes whatever the
    token count: one text took 5x onnx int8's time.

    There, a product of fewer than ``FEW_TOKENS`` rows runs on FBGEMM (PyTorch's other x86 int8 library, built for
    small batches), on a second packing of the same 7-bit weight, with the same zero point: the same output to the
    bit; a layer's four products of base on a 2-core AVX2-only AMD EPYC 2.4x faster at 8 tokens, 1.5x at 32, 1.15x
    at 64, even at 96-128, 0.75-0.9x from 160 on (bench/bench_int8_products.py,
    bench/results/int8-products-2026-12-07-vm.md). oneDNN's first call at a new row count also costs more (about
    0.5 ms a product at 20-120 rows there), and a server's requests bring a new one nearly every time. One text,
    p50: 67 -> 46 ms, throughput unchanged (bench/results/2026-12-07-vm/evidence-cpu-int8-fbgemm.md). The int8
    weights take their memory twice there (load: 191 -> 326 MiB for base; float32 takes 488).

    The input is s8 only with AMX (``amx_int8``), where oneDNN multiplies s8 x s8 in its AMX kernels. Elsewhere
    it goes in as u8 with zero point 128, VNNI or not: on an AMD EPYC with AVX-512 VNNI (no AMX) an s8 input ran
    oneDNN's reference int8 matmul (``ref_int8`` in ``ONEDNN_VERBOSE``), 100-4,100x slower than the u8 one
    (``brg_matmul:avx512_core_vnni``), and the two give the same output to the bit
    (bench/results/int8-products-2026-12-08-vm.md)."""

    FEW_TOKENS: ClassVar[int] = 128

    def __init__(self, weight: torch.Tensor, activation: str, out_dtype: torch.dtype) -> None:
        flags = cpu_flags()
        self.reduce_range = not VNNI & flags
        self.input_zero_point = 0 if "amx_int8" in flags else 128
        wq, self.weight_scale = quantize_rows_ref(weight, torch.int8, reduce_range=self.reduce_range)
        self.packed = torch.ops.onednn.qlinear_prepack(wq, None)
        self.zero_points = torch.zeros(weight.shape[0], dtype=torch.int64)
        self.activation, self.out_dtype = activation, out_dtype
        few = self.reduce_range and out_dtype == torch.float32 and _fbgemm_available()
        self.few_tokens_packed = _fbgemm_prepack(wq, self.weight_scale) if few else None

    @staticmethod
    def available() -> bool:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")

    def __call__(self, x: tuple[torch.Tensor, torch.Tensor]):
        q, x_scale = x
        if self.few_tokens_packed is not None and q.shape[0] < self.FEW_TOKENS:
            # The op takes a float input and quantizes it as u8 with (scale 1, zero point 128): q + 128 exactly.
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                q.float(), 1.0, 128, self.few_tokens_packed
            )
            return (y.relu_() if self.activation == "relu" else y), x_scale
        if self.input_zero_point:
            q = q.view(torch.uint8) ^ 128  # q + 128, as u8
        y = torch.ops.onednn.qlinear_pointwise(
            q, 1.0, self.input_zero_point, self.packed, self.weight_scale, self.zero_points, None, 1.0, 0,
            self.out_dtype, self.activation, [], "",
        )  # fmt: skip
        return y, x_scale  # the ReLU commutes with the activations' scale (it is > 0)


def _fbgemm_available() -> bool:
    """Whether PyTorch's FBGEMM int8 linear runs here: x86 builds, with the quantized engine left to x86 or fbgemm."""
    return (
        torch.backends.quantized.engine in ("x86", "fbgemm")
        and hasattr(torch, "_make_per_channel_quantized_tensor")
        and hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")
    )


def _fbgemm_prepack(wq: torch.Tensor, scale: torch.Tensor):
    """FBGEMM's packing of an int8 weight quantized per output channel (symmetric: zero points 0)."""
    with warnings.catch_warnings():
        # PyTorch marks its quantized tensor types deprecated; FBGEMM's packing still takes one, and this is its
        # only use here (the packed weight is all that is kept).
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        zero_points = torch.zeros(wq.shape[0], dtype=torch.int64)
        qweight = torch._make_per_channel_quantized_tensor(wq, scale.double(), zero_points, 0)
    return torch.ops.quantized.linear_prepack(qweight, None)


def _with_scale(x) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An op's input as ``(y, x_scale)``: an int8 product's ``(y, x_scale)`` pair as it is, a tensor with no scale."""
    return x if isinstance(x, tuple) else (x, None)


class CpuOps:
    """The CPU op set of the encoder (``encoder.EncoderOps``): states between products in ``dtype``; with
    ``quantized``, products' inputs quantized per token, and their outputs ``(y, x_scale)`` pairs whose scale the
    norm or the next quantization applies (``Int8Linear``)."""

    def __init__(self, dtype: torch.dtype, quantized: bool, bias_table: torch.Tensor, max_distance: int, eps: float):
        self.dtype, self.quantized, self.eps = dtype, quantized, eps
        self.bias_table, self.max_distance = bias_table, max_distance

    def norm(self, x, weight, residual=None, last: bool = False):
        x, x_scale = _with_scale(x)
        if self.quantized and not last:
            return native.rms_norm_quantized(x, weight, self.eps, residual, x_scale)
        # The final states stay float32: the pooling head sums them.
        return native.rms_norm(x, weight, self.eps, residual, torch.float32 if last else self.dtype, x_scale)

    def product_input(self, x):
        if not self.quantized:
            return x
        x, x_scale = _with_scale(x)
        return native.quantize_rows(x, x_scale=x_scale)

    def batch_attention(self, max_len: int, tokens: int) -> Attention:
        # Covering the longest length + 15 lets the native op attend bfloat16 sequences as multiples of 16; it masks
        # those padded keys with the bias's columns from the longest length on, set to -inf here once per batch
        # (in bfloat16, as it attends) rather than in a copy of its own in every layer's call.
        max_len = max(max_len, 1)
        bias = position_bias_matrix(self.bias_table, max_len + 15, self.max_distance).to(self.dtype)
        if self.dtype == torch.bfloat16:
            bias[:, :, max_len:] = float("-inf")
        heads = self.bias_table.shape[1]

        def attention(qkv, cu_seqlens: torch.Tensor):
            # int8's qkv product leaves its per-token scale to the op, which applies it to each sequence's block
            # as it reads it, and quantizes the output's rows for the o product as it writes them: no pass of its
            # own over the [T, 3 * H * d_kv] input or the output.
            qkv, x_scale = _with_scale(qkv)
            if self.quantized:
                return native.varlen_attention_quantized(*qkv_views(qkv, heads), cu_seqlens, bias, x_scale)
            return native.varlen_attention(*qkv_views(qkv, heads), cu_seqlens, bias).view(tokens, -1)

        return attention

    def pool(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
        return packed_mean_pool(hidden, cu_seqlens, pool_start)


class CpuBackend(BackendClass):
    name: ClassVar[str] = "cpu"
    capabilities: ClassVar[tuple[Capability, ...]] = (
        Capability("float32", "cpu", 40),
        Capability("bfloat16", "cpu", 30),
        Capability("int8", "cpu", 7),  # before onnx/int8 (10): CpuBackend.rank
    )
    packed_input: ClassVar[bool] = True
    pytorch_cpu: ClassVar[bool] = True

    @classmethod
    def rank(cls, capability: Capability, hardware: Hardware) -> int | None:
        # Ahead of onnx/int8 (rank 10) where they were measured faster, `make bench` (evidence, same run):
        # - int8 on every CPU family measured: 2.6x onnx int8's tokens/s on the 2-core Xeon with AMX
        #   (bench/results/2026-12-01-vm/), 1.41x on the AMD EPYC with AVX-512 VNNI (2026-12-08-vm/; 1.51x on the mix
        #   with articles, mixed.md), 1.47x on the AVX2-only one (2026-12-07-vm/evidence-cpu-int8.md), and no export
        #   at the first load; one text takes about as long as onnx int8's (21 against 20 ms, 46 against 36);
        # - with AMX (bfloat16 tile units), bfloat16 too, and first, the more exact: 1.9x onnx int8 on the Xeon.
        if capability.precision == "bfloat16" and {"amx_bf16", "amx_int8"} <= hardware.cpu_flags:
            return 5
        return capability.rank

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return True, f"PyTorch {torch.__version__} on the CPU"

    @classmethod
    def unavailable(cls, precision: str, device: str, hardware: Hardware) -> str | None:
        if precision == "bfloat16" and not (_NATIVE_BFLOAT16 & hardware.cpu_flags):
            return "the CPU has no native bfloat16 (avx512_bf16 or AMX): slower than float32"
        if precision == "int8" and not Int8Linear.available():
            return "this torch build has no oneDNN int8 linear (torch.ops.onednn.qlinear_pointwise): use onnx int8"
        return None

    def __init__(self, checkpoint: Checkpoint, precision: str = "float32", device: str = "cpu") -> None:
        self.precision = precision = self.check_supported(precision, device)
        self.device = torch.device(device)
        quantized, dtype = precision == "int8", state_dtype(precision)
        cfg = checkpoint.config
        ops = CpuOps(dtype, quantized, relative_attention_bias(checkpoint).clone(), cfg.max_distance,
                     cfg.layer_norm_epsilon)  # fmt: skip

        def project(weight: torch.Tensor, name: str):
            activation = "relu" if name == "wi" else "none"
            if quantized:
                return Int8Linear(weight, activation, dtype)
            if PackedLinear.available():
                return PackedLinear(weight.to(dtype), activation)
            weight = weight.to(dtype, copy=True)  # a copy: the original is a view of the memory-mapped file
            return (lambda x: F.relu(F.linear(x, weight))) if name == "wi" else (lambda x: F.linear(x, weight))

        # A batch runs as forwards whose largest activation (the FFN's, [tokens, d_ff]) stays under 16 MiB: glibc
        # serves an allocation of up to 32 MiB from its heap again once one is freed, but maps a larger one afresh
        # each time, and every page of it then faults on first touch (about 1,000,000 faults per encode of 256
        # texts of the evidence + articles mix in 32-row batches of up to 16,000 tokens; with the split, on the
        # 2-core Xeon, bfloat16 5.09 -> 4.28 s and int8 4.66 -> 4.09 s, float32 unchanged). Below about 1,150 tokens
        # oneDNN runs bfloat16's d_model-wide products (o, wo) on one thread.
        self.forward_tokens = max(1, _FORWARD_BYTES // (cfg.d_ff * dtype.itemsize))
        # oneDNN builds (JIT-compiles) a bfloat16 product's kernels once per shape, 3 to 5 ms each on the 2-core
        # Xeon, and a corpus or a server brings a new token count with nearly every forward: bfloat16 forwards are
        # filled to their shape_bucket, so that the four projections' shapes recur. Each text once, fresh processes,
        # two runs (bench/results/fresh-shapes-2026-12-01-vm.md, -mixed-): 1.12-1.13x on evidence and 1.08x on the
        # mix, single texts 1.05-1.10x. int8's kernels build cheaply enough that the fill's rows cost about what
        # they save on a corpus (0.91-1.03x; single texts 1.00-1.09x), float32's too (0.98x): unfilled.
        self.fill_forwards = precision == "bfloat16"
        # Copies of the tensors used as they are: the checkpoint's are views of its memory-mapped file, and one
        # kept view would keep the whole file resident after the checkpoint lets its weights go.
        self.encoder = build_encoder(checkpoint, ops, project, place=torch.clone)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
        """A right-padded batch, packed first (``embed_packed``: one forward)."""
        return self.embed_packed(pack_padded(input_ids, attention_mask, pool_start))

    @torch.inference_mode()
    def embed_packed(self, batch: PackedBatch) -> torch.Tensor:
        """A packed batch, as forwards of at most about ``forward_tokens`` tokens each (``PackedBatch.split``), each
        filled with a row of pad tokens to its ``shape_bucket`` with ``fill_forwards``."""
        out = []
        for part in batch.split(self.forward_tokens):
            filled = part.filled_to(shape_bucket(part.tokens)) if self.fill_forwards else part
            embeddings = self.encoder.embed(filled.input_ids, filled.cu_seqlens, filled.pool_start, filled.max_len)
            out.append(embeddings[: part.rows])
        return torch.cat(out)
