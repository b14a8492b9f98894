"""The project's own T5 encoder in PyTorch, for the CPU, on packed tokens: float32, bfloat16 or int8.

A batch arrives packed (``embed_packed``: ``batching.PackedBatch``, what the pipeline builds for it, ``packed_input``)
or padded (``embed``, which packs it first): the states are ``[T, d_model]``, so the projections and the FFN never
compute a padding token. Differences from ``transformers.T5EncoderModel`` (the maths is the same, docs/design.md
section 5):

- q, k and v are one fused projection ``[3 * heads * d_kv, d_model]``;
- attention runs per sequence (``fastinstructor.native.varlen_attention``: the C++ op where the install built it,
  else its PyTorch fallback), each reading its block of the batch's relative position bias ``[H, Lmax, Lmax]``,
  built once per batch and shared by every layer; no 1/sqrt(d_kv) scaling;
- bfloat16 runs the matrix products and attention in bfloat16 while the residual stream, RMSNorm statistics and
  the pooling head stay float32;
- float32 and bfloat16 linear layers run on oneDNN with each weight reordered once into its blocked layout
  and the feed-forward ReLU fused (``PackedLinear``): torch's default float32 GEMM (MKL) reaches 200 GFLOP/s
  on the project's AMD EPYC machines where oneDNN reaches 460 (``load`` then lets the checkpoint's float32
  originals go, so the packed copies replace them in memory); without oneDNN they stay ``nn.Linear``;
- int8 is PyTorch dynamic quantization of every linear layer (int8 weights per output channel, activations
  quantized per batch at run time); attention stays float32.

Packed against the padded forward this backend had before (same 32-row batches, 2-core Xeon,
``bench/results/packed-cpu-2026-12-01-vm.md``): 1.22-1.40x on evidence sentences, 1.43-1.48x on a mix with
articles, at each precision.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..batching import PackedBatch, pack_padded
from ..checkpoint import Checkpoint, EncoderConfig
from ..hardware import Hardware
from ..native import varlen_attention
from ..t5 import (
    dense_and_normalize,
    packed_mean_pool,
    position_bias_matrix,
    rms_norm,
)
from .base import BackendClass, Capability


class T5Block(nn.Module):
    def __init__(self, config: EncoderConfig, weights: dict[str, torch.Tensor], prefix: str) -> None:
        super().__init__()
        d, inner, ff = config.d_model, config.inner_dim, config.d_ff
        self.heads, self.d_kv, self.eps = config.num_heads, config.d_kv, config.layer_norm_epsilon
        attn = prefix + "0.SelfAttention."
        self.qkv = nn.Linear(d, 3 * inner, bias=False)
        self.o = nn.Linear(inner, d, bias=False)
        self.wi = nn.Sequential(nn.Linear(d, ff, bias=False), nn.ReLU())
        self.wo = nn.Linear(ff, d, bias=False)
        self.qkv.weight.data = torch.cat([weights[attn + n + ".weight"] for n in "qkv"])
        self.o.weight.data = weights[attn + "o.weight"]
        self.wi[0].weight.data = weights[prefix + "1.DenseReluDense.wi.weight"]
        self.wo.weight.data = weights[prefix + "1.DenseReluDense.wo.weight"]
        self.register_buffer("ln_attn", weights[prefix + "0.layer_norm.weight"].clone())  # clones: see T5Encoder
        self.register_buffer("ln_ff", weights[prefix + "1.layer_norm.weight"].clone())

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, position_bias: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        # x: [T, D] float32 residual stream of packed sequences; position_bias: [H, max_len, max_len]
        tokens = x.shape[0]
        h = rms_norm(x, self.ln_attn, self.eps).to(dtype)
        q, k, v = self.qkv(h).view(tokens, 3, self.heads, self.d_kv).unbind(1)  # views [T, H, d_kv]
        attn = varlen_attention(q, k, v, cu_seqlens, position_bias)  # [T, H, d_kv]
        x = x + self.o(attn.reshape(tokens, -1)).float()
        h = rms_norm(x, self.ln_ff, self.eps).to(dtype)
        return x + self.wo(self.wi(h)).float()


class PackedLinear(nn.Module):
    """``y = x @ W.T`` (then ReLU if asked) on oneDNN, the weight reordered once into oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, activation: str = "none") -> None:
        super().__init__()
        self.out_features, self.activation = weight.shape[0], activation
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)

    @staticmethod
    def available() -> bool:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, self.activation, [], "")


class T5Encoder(nn.Module):
    """Embedding, blocks and final RMSNorm over packed tokens; returns float32 states ``[T, D]``."""

    def __init__(self, config: EncoderConfig, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.config = config
        # Copies of the tensors used as they are: the checkpoint's are views of its memory-mapped file, and one
        # kept view would keep the whole file resident after the checkpoint lets its weights go.
        self.register_buffer("embed", weights["shared.weight"].clone())
        self.register_buffer(
            "bias_table", weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].clone()
        )
        self.register_buffer("ln_final", weights["encoder.final_layer_norm.weight"].clone())
        self.blocks = nn.ModuleList(
            T5Block(config, weights, f"encoder.block.{i}.layer.") for i in range(config.num_layers)
        )
        self.compute_dtype = torch.float32

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
        """Packed tokens ``[T]`` -> final states ``[T, D]`` float32; attention per sequence (``native``)."""
        x = F.embedding(input_ids, self.embed)  # [T, D] float32
        position_bias = position_bias_matrix(self.bias_table, max(max_len, 1), self.config.max_distance)
        for block in self.blocks:
            x = block(x, cu_seqlens, position_bias, self.compute_dtype)
        return rms_norm(x, self.ln_final, self.config.layer_norm_epsilon)


class CpuBackend(BackendClass):
    name: ClassVar[str] = "cpu"
    capabilities: ClassVar[tuple[Capability, ...]] = (
        Capability("float32", "cpu", 50),
        Capability("bfloat16", "cpu", 40),
        Capability("int8", "cpu", 30),
    )
    packed_input: ClassVar[bool] = True

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return True, f"PyTorch {torch.__version__} on the CPU"

    @classmethod
    def unavailable(cls, precision: str, device: str, hardware: Hardware) -> str | None:
        if precision == "bfloat16" and not ({"avx512_bf16", "amx_bf16"} & hardware.cpu_flags):
            return "the CPU has no native bfloat16 (avx512_bf16 or AMX): slower than float32"
        return None

    def __init__(self, checkpoint: Checkpoint, precision: str = "float32", device: str = "cpu") -> None:
        self.precision = precision = self.check_supported(precision, device)
        self.device = torch.device(device)
        encoder = T5Encoder(checkpoint.config, checkpoint.weights).eval()
        if precision == "bfloat16":
            encoder.blocks.to(torch.bfloat16)
            encoder.compute_dtype = torch.bfloat16
        if precision == "int8":
            encoder = _quantize_int8(encoder)
        elif PackedLinear.available():
            _pack_linears(encoder)
        self.encoder = encoder
        self.dense_weight = checkpoint.dense_weight
        self.normalize = checkpoint.normalize

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
        """A right-padded batch, packed first (``embed_packed``: one forward)."""
        return self.embed_packed(pack_padded(input_ids, attention_mask, pool_start))

    @torch.inference_mode()
    def embed_packed(self, batch: PackedBatch) -> torch.Tensor:
        hidden = self.encoder(batch.input_ids, batch.cu_seqlens, batch.max_len)  # [T, D] float32
        pooled = packed_mean_pool(hidden, batch.cu_seqlens, batch.pool_start)
        return dense_and_normalize(pooled, self.dense_weight, self.normalize)


def _pack_linears(encoder: T5Encoder) -> None:
    for block in encoder.blocks:
        block.qkv, block.o = PackedLinear(block.qkv.weight), PackedLinear(block.o.weight)
        block.wi, block.wo = PackedLinear(block.wi[0].weight, "relu"), PackedLinear(block.wo.weight)


def _quantize_int8(encoder: T5Encoder) -> T5Encoder:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao's eager dynamic quantization is deprecated in favour of torchao, but it is in torch 2.13,
        # uses fbgemm's VNNI kernels, and adds no dependency.
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated.*")
        return quantize_dynamic(encoder, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
