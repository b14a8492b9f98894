"""The trusted backend: Hugging Face ``T5EncoderModel`` in float32 eager mode plus the pooling head."""

from __future__ import annotations

import importlib.util
from typing import ClassVar

import torch

from ..checkpoint import Checkpoint
from .base import check_precision, pool_head


class ReferenceBackend:
    name: ClassVar[str] = "reference"
    precisions: ClassVar[tuple[str, ...]] = ("float32",)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("transformers") is None:
            return False, "transformers is not installed (pip install transformers)"
        return True, "transformers T5EncoderModel, float32 eager"

    def __init__(self, checkpoint: Checkpoint, precision: str = "float32", device: str = "cpu") -> None:
        check_precision(type(self), precision)
        from transformers import T5Config, T5EncoderModel

        config = T5Config.from_dict(checkpoint.hf_config)
        config._attn_implementation = "eager"
        with torch.device("meta"):  # no random initialization: every tensor comes from the checkpoint
            model = T5EncoderModel(config)
        model.load_state_dict(checkpoint.weights, strict=False, assign=True)
        model.tie_weights()
        leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if leftovers:
            raise RuntimeError(f"reference backend: tensors not loaded from the checkpoint: {leftovers}")
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.dense_weight = None if checkpoint.dense_weight is None else checkpoint.dense_weight.to(device)
        self.normalize = checkpoint.normalize

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask, pool_start = (t.to(self.device) for t in (input_ids, attention_mask, pool_start))
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_head(hidden, attention_mask, pool_start, self.dense_weight, self.normalize)
