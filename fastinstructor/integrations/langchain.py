"""LangChain: ``InstructorEmbeddings``, an ``Embeddings`` for any vector store, retriever or chain.

A drop-in for ``langchain_community``'s ``HuggingFaceInstructEmbeddings``: the same ``embed_instruction`` and
``query_instruction`` (with the same defaults), ``embed_documents`` / ``embed_query`` and their async forms, on this
library's backends instead of the ``InstructorEmbedding`` package. ``pip install 'fastinstructor[langchain]'``.

>>> from fastinstructor.integrations.langchain import InstructorEmbeddings
>>> embeddings = InstructorEmbeddings("hkunlp/instructor-large")
>>> embeddings.embed_query("What causes sea level rise?")       # list of 768 floats
"""

from __future__ import annotations

import os

from ..model import DEFAULT_DOCUMENT_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION, Instructor
from ._common import missing_extra, resolve_model, texts_of

try:
    from langchain_core.embeddings import Embeddings
    from langchain_core.runnables.config import run_in_executor
except ImportError as err:
    raise missing_extra("langchain", "langchain-core", err) from err

__all__ = ["DEFAULT_EMBED_INSTRUCTION", "DEFAULT_QUERY_INSTRUCTION", "InstructorEmbeddings"]

DEFAULT_EMBED_INSTRUCTION = DEFAULT_DOCUMENT_INSTRUCTION  # HuggingFaceInstructEmbeddings' name for it
_SET_BY_THE_ADAPTER = {"prompt", "convert_to_numpy", "convert_to_tensor", "precision", "output_value"}


class InstructorEmbeddings(Embeddings):
    """Documents embedded with ``embed_instruction``, queries with ``query_instruction``.

    ``model``: a model id or folder (loaded with ``backend``, ``precision``, ``device`` and ``load_options``, as
    ``fastinstructor.load``) or a loaded ``fastinstructor.Instructor``. ``encode_kwargs`` go to every
    ``Instructor.encode`` call (e.g. ``{"batch_size": 64}``). As ``HuggingFaceInstructEmbeddings``: ``model_name``
    for ``model``, and ``model_kwargs={"device": ...}``.
    """

    def __init__(
        self,
        model: Instructor | str | os.PathLike | None = None,
        *,
        model_name: str | None = None,
        model_kwargs: dict | None = None,
        embed_instruction: str = DEFAULT_EMBED_INSTRUCTION,
        query_instruction: str = DEFAULT_QUERY_INSTRUCTION,
        backend: str = "auto",
        precision: str = "auto",
        device: str | None = None,
        load_options: dict | None = None,
        encode_kwargs: dict | None = None,
        show_progress: bool = False,
    ) -> None:
        if (model is None) == (model_name is None):
            raise TypeError("pass the model (or, as HuggingFaceInstructEmbeddings, model_name=), once")
        if set(model_kwargs or {}) - {"device"}:
            raise ValueError(
                f"model_kwargs {sorted(model_kwargs)}: only 'device' applies; pass load options as load_options="
            )
        if clashing := sorted(set(encode_kwargs or {}) & _SET_BY_THE_ADAPTER):
            raise ValueError(f"encode_kwargs {clashing}: the adapter sets these (instructions, float vectors as lists)")
        device = (model_kwargs or {}).get("device", device)
        self.client = resolve_model(
            model if model_name is None else model_name, backend, precision, device, load_options
        )
        self.embed_instruction = embed_instruction
        self.query_instruction = query_instruction
        self.encode_kwargs = dict(encode_kwargs or {})
        self.show_progress = show_progress

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        options = {"show_progress_bar": self.show_progress, **self.encode_kwargs}
        return self.client.encode(texts_of(texts), prompt=self.embed_instruction, **options).tolist()

    def embed_query(self, text: str) -> list[float]:
        if not isinstance(text, str):
            raise TypeError(f"embed_query takes one text (a str), got {type(text).__name__}")
        return self.client.encode([text], prompt=self.query_instruction, **self.encode_kwargs)[0].tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """``embed_documents`` in the event loop's executor (the model runs in a thread, not on the loop)."""
        return await run_in_executor(None, self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await run_in_executor(None, self.embed_query, text)
