"""Chroma: ``InstructorEmbeddingFunction``, an ``EmbeddingFunction`` with a document and a query instruction.

Chroma embeds what a collection stores (``add``, ``upsert``) with ``__call__``, here with ``instruction``, and the
``query_texts`` of ``query`` with ``embed_query``, here with ``query_instruction``: the split INSTRUCTOR retrieval
needs, which Chroma's own ``InstructorEmbeddingFunction`` (one instruction for both) lacks. Registered with Chroma as
``"fastinstructor"``, so a persistent collection finds it again from its configuration.
``pip install 'fastinstructor[chroma]'``.

>>> import chromadb
>>> from fastinstructor.integrations.chroma import InstructorEmbeddingFunction
>>> collection = chromadb.EphemeralClient().create_collection(
...     "claims", embedding_function=InstructorEmbeddingFunction("hkunlp/instructor-large"))
"""

from __future__ import annotations

import json
import os
import weakref
from typing import Any

from ..model import DEFAULT_DOCUMENT_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION, Instructor
from ._common import check_model, load_options_of, missing_extra, model_name, resolve_model, texts_of

try:
    from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
    from chromadb.utils.embedding_functions import register_embedding_function
except ImportError as err:
    raise missing_extra("chroma", "chromadb", err) from err

__all__ = ["InstructorEmbeddingFunction"]

# Models by what get_config records of them: Chroma rebuilds the function from its config on its own (is_legacy() on
# create_collection, each read of a collection's configuration), and each rebuild would load the model again.
_models: weakref.WeakValueDictionary[str, Instructor] = weakref.WeakValueDictionary()


def _model_key(config: dict[str, Any]) -> str:
    keys = ("model", "backend", "precision", "device", "load_options")
    return json.dumps({key: config.get(key) for key in keys}, sort_keys=True, default=str)


@register_embedding_function
class InstructorEmbeddingFunction(EmbeddingFunction[Documents]):
    """``model``: a model id or folder (loaded with ``backend``, ``precision``, ``device`` and ``load_options``, as
    ``fastinstructor.load``) or a loaded ``fastinstructor.Instructor``. ``instruction`` embeds the documents a
    collection stores, ``query_instruction`` its queries; ``None`` embeds plain texts (pooled over every token)."""

    def __init__(
        self,
        model: Instructor | str | os.PathLike,
        *,
        instruction: str | None = DEFAULT_DOCUMENT_INSTRUCTION,
        query_instruction: str | None = DEFAULT_QUERY_INSTRUCTION,
        backend: str = "auto",
        precision: str = "auto",
        device: str | None = None,
        load_options: dict | None = None,
    ) -> None:
        loaded = isinstance(check_model(model), Instructor)
        if loaded:
            resolve_model(model, backend, precision, device, load_options)  # refuses load options with a loaded model
        self._config = {  # what get_config records: enough to load the same model again
            "model": model_name(model),
            "backend": model.backend_name if loaded else backend,
            "precision": model.precision if loaded else precision,
            "device": str(model.backend.device) if loaded else device,
            "load_options": load_options_of(model) if loaded else dict(load_options or {}),
        }
        key = _model_key(self._config)
        self._model = model if loaded else _models.get(key)
        if self._model is None:
            self._model = resolve_model(model, backend, precision, device, load_options)
        _models.setdefault(key, self._model)
        self.instruction = instruction
        self.query_instruction = query_instruction

    def __call__(self, input: Documents) -> Embeddings:
        return list(self._model.encode(texts_of(input), prompt=self.instruction))

    def embed_query(self, input: Documents) -> Embeddings:
        return list(self._model.encode(texts_of(input), prompt=self.query_instruction))

    @staticmethod
    def name() -> str:
        return "fastinstructor"

    def default_space(self) -> str:
        return "cosine"

    def supported_spaces(self) -> list[str]:
        return ["cosine", "ip", "l2"]  # unit-norm embeddings: all three rank alike

    def get_config(self) -> dict[str, Any]:
        return {**self._config, "instruction": self.instruction, "query_instruction": self.query_instruction}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> InstructorEmbeddingFunction:
        options = {key: config[key] for key in ("backend", "precision", "device", "load_options") if key in config}
        return InstructorEmbeddingFunction(
            config["model"],
            instruction=config.get("instruction", DEFAULT_DOCUMENT_INSTRUCTION),
            query_instruction=config.get("query_instruction", DEFAULT_QUERY_INSTRUCTION),
            **options,
        )
