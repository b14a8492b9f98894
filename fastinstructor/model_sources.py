"""Where a model comes from: a local folder, or a Hugging Face hub id, from the local cache first and downloaded
otherwise (``resolve_model_path``); and the weight files a folder may hold (``find_weights``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CheckpointError", "WEIGHT_FILES", "find_weights", "resolve_model_path"]

# Weight files we read, in order of preference. safetensors first: it cannot execute code.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A model path or checkpoint folder that cannot be used; the message names the problem and the fix."""


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and os.sep not in model.replace("/", "")


def resolve_model_path(model: str | os.PathLike, *, cache_dir: str | None = None, revision: str | None = None) -> Path:
    """A local folder as is; a hub id (``org/name``) from the Hugging Face cache, downloading if allowed."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"model path {path} is a file; pass the checkpoint folder that contains it")
        return path
    text = str(model)
    if not _looks_like_hub_id(text):
        raise CheckpointError(
            f"model {text!r}: no such folder, and it is not a hub id of the form 'org/name'. "
            "Pass a checkpoint folder, a hub id such as 'hkunlp/instructor-large', or build a test checkpoint "
            "with `fastinstructor make-test-model --preset tiny --out DIR`."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise CheckpointError(
            f"model {text!r}: no such folder, and not a valid hub id (letters, digits, '-', '_' and '.' only, "
            "as in 'hkunlp/instructor-large'); pass a checkpoint folder or a hub id"
        ) from None

    # Weights: safetensors when the repo has them, pytorch_model.bin otherwise; never both.
    metadata = ["*.json", "*.model", "*.txt", "*.md"]
    try:
        local = Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, local_files_only=True))
        if find_weights(local) is not None:
            return local
    except LocalEntryNotFoundError:
        pass

    def download(patterns: list[str]) -> Path:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, allow_patterns=metadata + patterns))

    try:
        local = download(["*.safetensors", "*.safetensors.index.json"])
        if find_weights(local) is None:
            local = download(["*.bin", "*.bin.index.json"])
        return local
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"hub id {text!r}: no such repository on the Hugging Face hub (check the spelling)"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise CheckpointError(
            f"hub id {text!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(err).__name__}), and no folder {path} exists here. On an offline machine, download it elsewhere "
            f"(`hf download {text}`) and copy the folder here, then pass the folder path; or set HF_HOME to a cache "
            "that holds it."
        ) from None


def find_weights(folder: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None
