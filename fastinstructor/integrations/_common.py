"""What the framework adapters share: the model they embed with, and the error for a framework that is missing."""

from __future__ import annotations

import os

from ..model import Instructor, load

__all__ = ["check_model", "load_options_of", "missing_extra", "model_name", "resolve_model", "texts_of"]


def missing_extra(extra: str, package: str, err: ImportError) -> ImportError:
    """The error an adapter module raises when its framework cannot be imported: what is missing and how to fix it."""
    return ImportError(
        f"fastinstructor.integrations.{extra} needs the {package} package ({err}): "
        f"pip install 'fastinstructor[{extra}]'"
    )


def resolve_model(
    model: Instructor | str | os.PathLike,
    backend: str = "auto",
    precision: str = "auto",
    device: str | None = None,
    load_options: dict | None = None,
) -> Instructor:
    """``model`` itself when it is a loaded ``Instructor``; else ``fastinstructor.load(model, backend, precision,
    device=device, **load_options)``. Load options with a loaded model are an error: it is loaded already."""
    if isinstance(model, Instructor):
        given = {"backend": backend != "auto", "precision": precision != "auto", "device": device is not None}
        given |= dict.fromkeys(load_options or {}, True)
        if any(given.values()):
            names = ", ".join(name for name, set_ in given.items() if set_)
            raise ValueError(
                f"{names} apply when the adapter loads the model; this one is loaded already ({model!r}). Pass them "
                "to fastinstructor.load, or pass the model id or folder instead of the Instructor."
            )
        return model
    return load(check_model(model), backend=backend, precision=precision, device=device, **(load_options or {}))


def check_model(model):
    """``model`` if it is a model id, a folder or a loaded ``Instructor``; else a TypeError that says so."""
    if not isinstance(model, Instructor | str | os.PathLike):
        raise TypeError(
            f"model must be a model id, a folder or a fastinstructor.Instructor, got {type(model).__name__}"
        )
    return model


def model_name(model: Instructor | str | os.PathLike) -> str:
    """What a framework records as the model's name: the id or folder given, or the loaded model's folder."""
    return str(model.checkpoint.path) if isinstance(model, Instructor) else os.fspath(model)


def texts_of(texts) -> list[str]:
    """``texts`` as a list; a TypeError for a bare string (``list`` would make it one text per character)."""
    if isinstance(texts, str):
        raise TypeError("pass a list of texts, not one str (it would be embedded a character at a time)")
    return list(texts)


def load_options_of(model: Instructor) -> dict:
    """The load options of a loaded model that change its embeddings: what a framework must record for a model
    rebuilt from its configuration (or in another process) to embed as this one."""
    options: dict = {}
    if model.tokenizer.max_length != model.checkpoint.max_seq_length:
        options["max_seq_length"] = model.tokenizer.max_length
    if model.tokenizer.pooling_rule != "instructor":
        options["pooling_rule"] = model.tokenizer.pooling_rule
    return options
