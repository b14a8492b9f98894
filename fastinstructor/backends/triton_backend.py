"""The triton backend: the T5 encoder on packed (unpadded) tokens with the project's Triton kernels.

A batch arrives packed (``embed_packed``: a ``batching.PackedBatch`` of token ids, ``cu_seqlens``, ``pool_start``
and ``max_len``, built on the host by the pipeline, ``packed_input``), or padded ``[B, L]`` (``embed``, which packs
it on the host and calls ``embed_packed``: one forward). The states are ``[T, d_model]``: the projections and the
FFN never touch padding, attention runs per sequence with the relative position bias computed in the kernel
(``kernels.attention``), RMSNorm is fused with the residual add (``kernels.rms_norm``), and pooling reads the
packed states (``kernels.pooling``). Weights are loaded once into the fused layouts (q, k, v concatenated). The
residual stream stays float32 (T5 overflows float16 there, docs/design.md section 5); the matrix products
(``kernels.matmul``) run in the compute dtype with float32 accumulation, the FFN's ReLU in their epilogue and its
output projection written in float32. ``int8`` quantizes the weights per output channel once and the activations
per token at run time (int32 accumulation).

Runs on CUDA. Under ``TRITON_INTERPRET=1`` it also runs on the CPU, slowly, for the tests.
"""

from __future__ import annotations

import importlib.util
import os
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..batching import PackedBatch, pack_padded
from ..checkpoint import Checkpoint
from .base import BackendClass, Capability

__all__ = ["TritonBackend"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(BackendClass):
    name: ClassVar[str] = "triton"
    capabilities: ClassVar[tuple[Capability, ...]] = (
        Capability("bfloat16", "cuda", 10),
        Capability("float16", "cuda", 20),
        Capability("float32", "cuda"),
        Capability("int8", "cuda"),
    )
    packed_input: ClassVar[bool] = True

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed: pip install 'fastinstructor[gpu]'"
        if _interpreted():
            return True, "Triton interpreter on the CPU (TRITON_INTERPRET=1: correct but slow, for tests)"
        if not torch.cuda.is_available():
            return False, "no CUDA device (Triton kernels need one; TRITON_INTERPRET=1 runs them on the CPU for tests)"
        return True, f"Triton on {torch.cuda.get_device_name(0)}"

    def __init__(self, checkpoint: Checkpoint, precision: str = "bfloat16", device: str = "cuda") -> None:
        # The interpreter runs the CUDA path on the CPU, for the tests.
        precision = self.check_supported(precision, "cuda" if _interpreted() else device)
        ok, why = self.availability()
        if not ok:
            raise ImportError(f"the triton backend is not available: {why}")
        self.device = torch.device(device)
        self.precision = precision
        from ..kernels.attention import t5_attention
        from ..kernels.matmul import linear, linear_int8, quantize_rows
        from ..kernels.pooling import masked_mean_pool
        from ..kernels.rms_norm import rms_norm

        self._attention, self._pool, self._rms_norm = t5_attention, masked_mean_pool, rms_norm
        self._linear, self._linear_int8, self._quantize = linear, linear_int8, quantize_rows
        cfg = checkpoint.config
        self.int8 = precision == "int8"
        # int8: weights int8 per output channel, activations int8 per token, everything between in float32.
        self.config, self.dtype = cfg, torch.float32 if self.int8 else _DTYPES[precision]
        w = {name: t.to(self.device) for name, t in checkpoint.weights.items()}

        def prepare(t: torch.Tensor):
            return quantize_rows(t) if self.int8 else t.to(self.dtype).contiguous()

        self.embed_table = w["shared.weight"]  # float32: the residual stream starts from it
        self.bias_table = w["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].contiguous()
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"encoder.block.{i}.layer."
            attn = p + "0.SelfAttention."
            self.layers.append(
                {
                    "ln_attn": w[p + "0.layer_norm.weight"],
                    "qkv": prepare(torch.cat([w[attn + n + ".weight"] for n in "qkv"])),  # [3 * inner, d]
                    "o": prepare(w[attn + "o.weight"]),
                    "ln_ff": w[p + "1.layer_norm.weight"],
                    "wi": prepare(w[p + "1.DenseReluDense.wi.weight"]),
                    "wo": prepare(w[p + "1.DenseReluDense.wo.weight"]),
                }
            )
        self.ln_final = w["encoder.final_layer_norm.weight"]
        self.dense = None if checkpoint.dense_weight is None else checkpoint.dense_weight.to(self.device)
        self.normalize = checkpoint.normalize

    def _project(self, x: torch.Tensor, weight, activation: str = "none", out_dtype: torch.dtype | None = None):
        """``act(x @ w^T)`` with the kernels of ``kernels.matmul``; int8 quantizes ``x`` per token first."""
        if self.int8:
            xq, sx = self._quantize(x)
            return self._linear_int8(xq, sx, *weight, activation, out_dtype or torch.float32)
        return self._linear(x, weight, activation, out_dtype)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
        """A right-padded batch: packed where it lies (on the host for ``pad_batch``'s tensors), then
        ``embed_packed``. Padded tensors already on the device cost one synchronization (``max_len``)."""
        return self.embed_packed(pack_padded(input_ids, attention_mask, pool_start))

    @torch.inference_mode()
    def embed_packed(self, batch: PackedBatch) -> torch.Tensor:
        """``[B, out_dim]`` float32 on the device. The inputs go to the device with ``non_blocking`` copies (they
        overlap when the batch is in pinned memory), and nothing in the forward waits for the device: ``max_len``
        comes from the host, and the attention checks ``cu_seqlens`` on the device (``torch._assert_async``)."""
        cfg, eps = self.config, self.config.layer_norm_epsilon
        ids = batch.input_ids.to(self.device, non_blocking=True)  # [T] real tokens only
        cu = batch.cu_seqlens.to(self.device, non_blocking=True)
        pool_start = batch.pool_start.to(self.device, non_blocking=True)
        residual = F.embedding(ids, self.embed_table)  # [T, d] float32
        tokens = residual.shape[0]
        h = self._rms_norm(residual, self.layers[0]["ln_attn"], eps)[0].to(self.dtype)
        for i, layer in enumerate(self.layers):
            qkv = self._project(h, layer["qkv"]).view(tokens, 3, cfg.num_heads, cfg.d_kv)  # [T, 3, H, d_kv]
            q, k, v = (qkv[:, j].to(self.dtype).contiguous() for j in range(3))
            attn = self._attention(q, k, v, cu, batch.max_len, self.bias_table, cfg.max_distance)  # [T, H, d_kv]
            out = self._project(attn.reshape(tokens, -1), layer["o"])
            h, residual = self._rms_norm(out.to(self.dtype), layer["ln_ff"], eps, residual)
            inner = self._project(h, layer["wi"], "relu").to(self.dtype)
            # The FFN output in float32 (float32 accumulation, no cast to float16): T5's wo overflows float16.
            ff = self._project(inner, layer["wo"], out_dtype=torch.float32)
            following = self.layers[i + 1]["ln_attn"] if i + 1 < len(self.layers) else self.ln_final
            h, residual = self._rms_norm(ff, following, eps, residual)
            h = h.to(self.dtype)
        pooled = self._pool(h, cu, pool_start)  # [B, d] float32, final-norm states
        if self.dense is not None:
            pooled = pooled @ self.dense.t()
        if self.normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
        return pooled
