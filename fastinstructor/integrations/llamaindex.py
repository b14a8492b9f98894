"""LlamaIndex: ``InstructorEmbedding``, a ``BaseEmbedding`` for indexes, retrievers and ``Settings.embed_model``.

Queries are embedded with ``query_instruction``, texts (nodes, documents) with ``text_instruction``, as LlamaIndex's
own ``InstructorEmbedding`` (``llama-index-embeddings-instructor``) does and with its defaults for INSTRUCTOR models, on
this library's backends. ``pip install 'fastinstructor[llamaindex]'``.

>>> from llama_index.core import Settings
>>> from fastinstructor.integrations.llamaindex import InstructorEmbedding
>>> Settings.embed_model = InstructorEmbedding("hkunlp/instructor-large")
"""

from __future__ import annotations

import asyncio
import os

from ..model import DEFAULT_DOCUMENT_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION, Instructor
from ._common import load_options_of, missing_extra, resolve_model, texts_of
from ._common import model_name as name_of

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
except ImportError as err:
    raise missing_extra("llamaindex", "llama-index-core", err) from err

__all__ = ["InstructorEmbedding"]

# LlamaIndex hands texts to _get_text_embeddings in lists of embed_batch_size; the most its field allows lets
# Instructor.encode plan the batches (length-sorted, token budget) over as many texts as it can see.
DEFAULT_EMBED_BATCH_SIZE = 2048


class InstructorEmbedding(BaseEmbedding):
    """``model``: a model id or folder (loaded with ``backend``, ``precision``, ``device`` and ``load_options``, as
    ``fastinstructor.load``) or a loaded ``fastinstructor.Instructor``. Other keyword arguments are
    ``BaseEmbedding``'s (``callback_manager``, ``embed_batch_size``, ...)."""

    query_instruction: str = Field(default=DEFAULT_QUERY_INSTRUCTION, description="Instruction for queries.")
    text_instruction: str = Field(default=DEFAULT_DOCUMENT_INSTRUCTION, description="Instruction for texts (nodes).")
    # How the model was loaded: to_dict / from_dict, and a copy in another process (a pickled adapter, as
    # IngestionPipeline's workers take it: LlamaIndex drops the model and builds the adapter anew from its fields).
    backend: str = Field(default="auto", description="fastinstructor.load's backend.")
    precision: str = Field(default="auto", description="fastinstructor.load's precision.")
    device: str | None = Field(default=None, description="fastinstructor.load's device.")
    load_options: dict = Field(default_factory=dict, description="fastinstructor.load's other options.")
    _model: Instructor = PrivateAttr()

    def __init__(
        self,
        model: Instructor | str | os.PathLike | None = None,
        *,
        model_name: str | None = None,
        query_instruction: str = DEFAULT_QUERY_INSTRUCTION,
        text_instruction: str = DEFAULT_DOCUMENT_INSTRUCTION,
        backend: str = "auto",
        precision: str = "auto",
        device: str | None = None,
        load_options: dict | None = None,
        embed_batch_size: int = DEFAULT_EMBED_BATCH_SIZE,
        **kwargs,
    ) -> None:
        if kwargs.get("embeddings_cache") is not None and query_instruction != text_instruction:
            raise ValueError(
                "embeddings_cache keys LlamaIndex's cache by the text alone, for queries and texts alike: a query "
                "equal to a cached text would get the text's embedding (text_instruction's, not query_instruction's). "
                "Use one instruction for both, or no embeddings_cache"
            )
        if (model is None) == (model_name is None):
            raise TypeError("pass the model (or model_name=, as to_dict records it), once")
        model = model_name if model is None else model
        loaded = resolve_model(model, backend, precision, device, load_options)
        given = isinstance(model, Instructor)
        super().__init__(
            model_name=name_of(model),
            query_instruction=query_instruction,
            text_instruction=text_instruction,
            backend=loaded.backend_name if given else backend,
            precision=loaded.precision if given else precision,
            device=str(loaded.backend.device) if given else device,
            load_options=load_options_of(loaded) if given else dict(load_options or {}),
            embed_batch_size=embed_batch_size,
            **kwargs,
        )
        self._model = loaded

    @classmethod
    def class_name(cls) -> str:
        return "FastInstructorEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._model.encode([query], prompt=self.query_instruction)[0].tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._model.encode(texts_of(texts), prompt=self.text_instruction).tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
