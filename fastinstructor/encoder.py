"""The project's T5 encoder, written once over packed tokens; each backend supplies its op set.

The forward (docs/design.md sections 3 and 5) on a ``batching.PackedBatch``'s tensors: states ``[T, d_model]`` of the
batch's real tokens, sequence ``b`` its rows ``cu_seqlens[b]:cu_seqlens[b + 1]``, so no product ever computes a
padding token::

    s = embedding(ids)                                        residual stream, float32
    h = rms_norm(s, ln_attn[0])
    for each layer:
        a = attention(qkv(h))                                  one fused projection [3 * H * d_kv, d_model];
                                                               per sequence, T5's relative position bias
        h, s = rms_norm(o(a) + s, ln_ff)                       the residual add fused into the norm
        h, s = rms_norm(wo(relu(wi(h))) + s, next ln_attn)     the final norm after the last layer
    embedding = normalize(Dense(mean of h over each sequence's text tokens))

A backend is its weights in its layout (``Layer``: the four projections as callables, the norm weights) and
an ``EncoderOps``: its RMSNorm (quantizing the output for an int8 product), the conversion of an op's output
into a product's input, its attention (reading q, k and v from the qkv projection's output, ``qkv_views``) and
its pooling. The cpu backend's op set is PyTorch, oneDNN and the native CPU ops (``fastinstructor.native``); its
float32 set is exact (<= 1e-5 against the reference) and is the readable reference forward of the project. The
triton backend's is ``fastinstructor.kernels``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint, EncoderConfig
from .t5 import dense_and_normalize

__all__ = [
    "EncoderOps",
    "Layer",
    "PackedEncoder",
    "build_encoder",
    "projection_weights",
    "qkv_views",
    "relative_attention_bias",
]

# A projection: its input as the op set's ``norm``, ``product_input`` or attention made it (a tensor, or a quantized
# pair) -> its output [T, N] as the op set's next op reads it (the cpu int8 products': ``(y, x_scale)`` pairs).
Projection = Callable[[Any], torch.Tensor]
# The batch's attention: (the qkv projection's output as it returns it, cu_seqlens) -> its output [T, H * d_kv] as
# the o projection takes it (quantized, for int8).
Attention = Callable[[Any, torch.Tensor], Any]


def qkv_views(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v ``[T, H, d_kv]``: views of the fused projection's output ``[T, 3 * H * d_kv]``."""
    return qkv.view(qkv.shape[0], 3, num_heads, -1).unbind(1)


class EncoderOps(Protocol):
    """The operations a backend runs the encoder with."""

    def norm(
        self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None, last: bool = False
    ) -> tuple[Any, torch.Tensor | None]:
        """``(h, s)``: ``s = x + residual`` (None without a residual) and ``h = rms_norm(s)`` as the next product
        takes it, or, ``last``, the final states as the pooling takes them (``t5.rms_norm_ref``'s maths)."""

    def product_input(self, x: torch.Tensor) -> Any:
        """wi's output as wo takes it (quantized, for int8)."""

    def batch_attention(self, max_len: int, tokens: int) -> Attention:
        """The attention for a batch whose longest sequence has ``max_len`` tokens, ``tokens`` in all: its output as
        the o projection takes it."""

    def pool(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
        """``[B, d_model]`` float32: each sequence's mean from ``pool_start`` on (``t5.packed_mean_pool``)."""


@dataclass
class Layer:
    ln_attn: torch.Tensor
    qkv: Projection
    o: Projection
    ln_ff: torch.Tensor
    wi: Projection  # with the ReLU
    wo: Projection


@dataclass
class PackedEncoder:
    config: EncoderConfig
    ops: EncoderOps
    embed_table: torch.Tensor  # [vocab, d_model] float32: the residual stream starts from it
    layers: list[Layer]
    ln_final: torch.Tensor
    dense: torch.Tensor | None  # [out_dim, d_model], or None
    normalize: bool

    def states(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
        """Packed token ids ``[T]`` -> the final (normalized) states ``[T, d_model]``, as ``ops.norm(last=True)``
        gives them."""
        ops = self.ops
        attention = ops.batch_attention(max_len, input_ids.shape[0])
        residual = F.embedding(input_ids, self.embed_table)  # [T, d] float32
        h, _ = ops.norm(residual, self.layers[0].ln_attn)
        for i, layer in enumerate(self.layers):
            h, residual = ops.norm(layer.o(attention(layer.qkv(h), cu_seqlens)), layer.ln_ff, residual)
            ff = layer.wo(ops.product_input(layer.wi(h)))
            last = i + 1 == len(self.layers)
            h, residual = ops.norm(ff, self.ln_final if last else self.layers[i + 1].ln_attn, residual, last)
        return h

    def embed(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, pool_start: torch.Tensor, max_len: int
    ) -> torch.Tensor:
        """``[B, out_dim]`` float32: the pooling head on the final states. The tensors are a ``PackedBatch``'s, on
        the backend's device; ``max_len`` (and the token count, ``input_ids``' length) come from the host."""
        hidden = self.states(input_ids, cu_seqlens, max_len)
        return dense_and_normalize(self.ops.pool(hidden, cu_seqlens, pool_start), self.dense, self.normalize)


def build_encoder(
    checkpoint: Checkpoint,
    ops: EncoderOps,
    project: Callable[[torch.Tensor, str], Projection],
    place: Callable[[torch.Tensor], torch.Tensor],
) -> PackedEncoder:
    """The encoder of ``checkpoint`` with ``ops``: ``place`` puts each tensor used as it is where the backend
    wants it (its device, or a copy of the memory-mapped original), and ``project(weight, name)`` prepares each
    projection, ``name`` one of ``qkv`` (q, k and v fused), ``o``, ``wi`` (with the ReLU) and ``wo``."""
    w = checkpoint.weights
    layers = []
    for i in range(checkpoint.config.num_layers):
        p = f"encoder.block.{i}.layer."
        projections = {name: project(weight, name) for name, weight in projection_weights(checkpoint, i).items()}
        layers.append(
            Layer(ln_attn=place(w[p + "0.layer_norm.weight"]), ln_ff=place(w[p + "1.layer_norm.weight"]), **projections)
        )
    return PackedEncoder(
        config=checkpoint.config,
        ops=ops,
        embed_table=place(w["shared.weight"]),
        layers=layers,
        ln_final=place(w["encoder.final_layer_norm.weight"]),
        dense=None if checkpoint.dense_weight is None else place(checkpoint.dense_weight),
        normalize=checkpoint.normalize,
    )


def projection_weights(checkpoint: Checkpoint, layer: int) -> dict[str, torch.Tensor]:
    """Layer ``layer``'s projection weights ``[out, in]`` by the encoder's names: ``qkv`` (q, k and v fused, in that
    order), ``o``, ``wi`` and ``wo``."""
    w = checkpoint.weights
    attn = f"encoder.block.{layer}.layer.0.SelfAttention."
    ff = f"encoder.block.{layer}.layer.1.DenseReluDense."
    return {
        "qkv": torch.cat([w[attn + n + ".weight"] for n in "qkv"]),
        "o": w[attn + "o.weight"],
        "wi": w[ff + "wi.weight"],
        "wo": w[ff + "wo.weight"],
    }


def relative_attention_bias(checkpoint: Checkpoint) -> torch.Tensor:
    """Layer 0's ``[num_buckets, H]`` table, shared by every layer (docs/design.md section 5)."""
    return checkpoint.weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
