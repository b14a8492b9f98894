"""Haystack: ``InstructorTextEmbedder`` (a query: ``run(text)`` -> ``embedding``) and ``InstructorDocumentEmbedder``
(``run(documents)`` -> ``documents`` with their ``embedding`` set), for indexing and query pipelines.

As Haystack's own embedders: the document embedder embeds the ``meta_fields_to_embed`` values before the content,
joined by ``embedding_separator``; the model loads in ``warm_up`` (a pipeline calls it; ``run`` does when it was not);
``to_dict`` / ``from_dict`` serialize a component given a model id or folder. Each has its instruction: a query one for
the text embedder, a document one for the document embedder. ``pip install 'fastinstructor[haystack]'``.

>>> from fastinstructor.integrations.haystack import InstructorDocumentEmbedder, InstructorTextEmbedder
>>> InstructorTextEmbedder("hkunlp/instructor-large").run("What causes sea level rise?")["embedding"]
"""

# No `from __future__ import annotations`: Haystack reads run()'s annotations as types to build its sockets.
import dataclasses
import os
from typing import Any

from ..model import DEFAULT_DOCUMENT_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION, Instructor
from ._common import check_model, missing_extra, model_name, resolve_model

try:
    from haystack import Document, component, default_from_dict, default_to_dict
except ImportError as err:
    raise missing_extra("haystack", "haystack-ai", err) from err

__all__ = ["InstructorDocumentEmbedder", "InstructorTextEmbedder"]


class _Embedder:
    """The model handling both components share: a loaded ``Instructor`` now, or an id or folder loaded in
    ``warm_up``; serialization of the id or folder. (``@component`` rebuilds the class, which breaks ``super()``:
    the components call ``_Embedder.__init__`` by name.)"""

    def __init__(self, model, instruction, backend, precision, device, load_options) -> None:
        if isinstance(model, Instructor):  # loading options with a loaded model are refused there
            self._model, self.model = resolve_model(model, backend, precision, device, load_options), model
        else:
            self._model, self.model = None, os.fspath(check_model(model))
        self.instruction = instruction
        self.backend, self.precision, self.device = backend, precision, device
        self.load_options = load_options

    def warm_up(self) -> None:
        if self._model is None:
            self._model = resolve_model(self.model, self.backend, self.precision, self.device, self.load_options)

    def _init_parameters(self) -> dict[str, Any]:
        if isinstance(self.model, Instructor):
            raise TypeError(
                f"{type(self).__name__} holds a loaded Instructor ({model_name(self.model)}), which cannot be "
                "serialized: create it from the model id or folder to save the pipeline"
            )
        return {
            "model": self.model,
            "instruction": self.instruction,
            "backend": self.backend,
            "precision": self.precision,
            "device": self.device,
            "load_options": self.load_options,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return default_from_dict(cls, data)


@component
class InstructorTextEmbedder(_Embedder):
    """Embeds one text (a query) with ``instruction``. ``model``: a model id or folder (loaded in ``warm_up`` with
    ``backend``, ``precision``, ``device`` and ``load_options``, as ``fastinstructor.load``) or a loaded
    ``fastinstructor.Instructor``."""

    def __init__(
        self,
        model: Instructor | str | os.PathLike,
        *,
        instruction: str = DEFAULT_QUERY_INSTRUCTION,
        backend: str = "auto",
        precision: str = "auto",
        device: str | None = None,
        load_options: dict | None = None,
    ) -> None:
        _Embedder.__init__(self, model, instruction, backend, precision, device, load_options)  # see _Embedder

    def to_dict(self) -> dict[str, Any]:
        return default_to_dict(self, **self._init_parameters())

    @component.output_types(embedding=list[float])
    def run(self, text: str):
        if not isinstance(text, str):
            raise TypeError(
                f"InstructorTextEmbedder embeds one string, got {type(text).__name__}: embed documents with "
                "InstructorDocumentEmbedder"
            )
        self.warm_up()
        return {"embedding": self._model.encode([text], prompt=self.instruction)[0].tolist()}


@component
class InstructorDocumentEmbedder(_Embedder):
    """Embeds documents with ``instruction``: each document's ``meta_fields_to_embed`` values (those it has and that
    are not None), then its content, joined by ``embedding_separator``. Returns copies with ``embedding`` set.
    ``model`` and the loading options: as ``InstructorTextEmbedder``'s."""

    def __init__(
        self,
        model: Instructor | str | os.PathLike,
        *,
        instruction: str = DEFAULT_DOCUMENT_INSTRUCTION,
        meta_fields_to_embed: list[str] | None = None,
        embedding_separator: str = "\n",
        progress_bar: bool = False,
        backend: str = "auto",
        precision: str = "auto",
        device: str | None = None,
        load_options: dict | None = None,
    ) -> None:
        _Embedder.__init__(self, model, instruction, backend, precision, device, load_options)  # see _Embedder
        self.meta_fields_to_embed = list(meta_fields_to_embed or [])
        self.embedding_separator = embedding_separator
        self.progress_bar = progress_bar

    def to_dict(self) -> dict[str, Any]:
        return default_to_dict(
            self,
            **self._init_parameters(),
            meta_fields_to_embed=self.meta_fields_to_embed,
            embedding_separator=self.embedding_separator,
            progress_bar=self.progress_bar,
        )

    def text_to_embed(self, document: Document) -> str:
        meta = [str(document.meta[key]) for key in self.meta_fields_to_embed if document.meta.get(key) is not None]
        return self.embedding_separator.join([*meta, document.content or ""])

    @component.output_types(documents=list[Document])
    def run(self, documents: list[Document]):
        if not isinstance(documents, list) or not all(isinstance(d, Document) for d in documents):
            raise TypeError(
                "InstructorDocumentEmbedder embeds a list of Documents: embed a string with InstructorTextEmbedder"
            )
        self.warm_up()
        texts = [self.text_to_embed(document) for document in documents]
        vectors = self._model.encode(texts, prompt=self.instruction, show_progress_bar=self.progress_bar)
        return {
            "documents": [
                dataclasses.replace(document, embedding=vector.tolist())
                for document, vector in zip(documents, vectors, strict=True)
            ]
        }
