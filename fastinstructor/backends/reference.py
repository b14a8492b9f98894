"""The trusted backend: Hugging Face ``T5EncoderModel`` in float32 eager mode plus the pooling head."""

from __future__ import annotations

import importlib.util
from typing import ClassVar

import torch

from ..checkpoint import Checkpoint
from ..t5 import hf_encoder, pool_head
from .base import BackendClass, Capability


class ReferenceBackend(BackendClass):
    name: ClassVar[str] = "reference"
    # The yardstick: last in auto's order, and never itself checked for parity.
    capabilities: ClassVar[tuple[Capability, ...]] = (
        Capability("float32", "cpu", 90),
        Capability("float32", "cuda", 90),
    )
    pytorch_cpu: ClassVar[bool] = True

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("transformers") is None:
            return False, "transformers is not installed (pip install transformers)"
        return True, "transformers T5EncoderModel, float32 eager"

    def __init__(self, checkpoint: Checkpoint, precision: str = "float32", device: str = "cpu") -> None:
        self.precision = self.check_supported(precision, device)
        self.checkpoint = checkpoint  # its fingerprint keys the calibration embeddings kept on disk (parity.py)
        self.model = hf_encoder(checkpoint, device)
        self.device = torch.device(device)
        self.dense_weight = None if checkpoint.dense_weight is None else checkpoint.dense_weight.to(device)
        self.normalize = checkpoint.normalize

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask, pool_start = (t.to(self.device) for t in (input_ids, attention_mask, pool_start))
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_head(hidden, attention_mask, pool_start, self.dense_weight, self.normalize)
