"""Sample text: the real text in ``../shared/data`` where present, else passages of the project's own docs.

The repository never contains a copy of the shared data; ``FASTINSTRUCTOR_DATA`` points elsewhere.
"""

from __future__ import annotations

import ast
import json
import os
import re
import textwrap
from pathlib import Path

__all__ = ["shared_data_dir", "read_jsonl_texts", "sample_passages", "tokenizer_training_text"]

_PACKAGE = Path(__file__).resolve().parent
# About the longest evidence sentence's length in ../shared/data (their mean is 170): longer doc paragraphs are
# split at sentence ends, so the fallback text costs the tests about what the evidence does.
_PASSAGE_CHARS = 400


def shared_data_dir() -> Path | None:
    """``$FASTINSTRUCTOR_DATA`` when set (only that), else ``../shared/data`` beside the checkout or the cwd."""
    if "FASTINSTRUCTOR_DATA" in os.environ:
        candidates = [Path(os.environ["FASTINSTRUCTOR_DATA"])]
    else:
        candidates = [_PACKAGE.parent.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if (c / "climate_fever_evidence.jsonl").is_file()), None)


def read_jsonl_texts(path: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """``(id, text)`` rows of a JSON Lines file with ``id`` and ``text`` fields."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            record = json.loads(line)
            rows.append((str(record["id"]), record["text"]))
    return rows


def _doc_texts() -> list[str]:
    """The project's own prose: README/docs where the checkout has them, and every docstring in the package."""
    texts = []
    for doc in [_PACKAGE.parent / "README.md", *sorted((_PACKAGE.parent / "docs").glob("*.md"))]:
        if doc.is_file():
            texts.append(doc.read_text(encoding="utf-8"))
    for source in sorted(_PACKAGE.rglob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
                texts.append(ast.get_docstring(node))
    return texts


def _chunks(paragraph: str) -> list[str]:
    """Whole sentences up to _PASSAGE_CHARS each; a longer sentence (a code block) cut at spaces."""
    chunks = [""]
    for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
        for piece in textwrap.wrap(sentence, _PASSAGE_CHARS, break_long_words=False, break_on_hyphens=False):
            if chunks[-1] and len(chunks[-1]) + 1 + len(piece) > _PASSAGE_CHARS:
                chunks.append("")
            chunks[-1] = f"{chunks[-1]} {piece}".strip()
    return chunks


def _doc_passages() -> list[tuple[str, str]]:
    passages = []
    for text in _doc_texts():
        for paragraph in text.split("\n\n"):
            for chunk in _chunks(" ".join(paragraph.split())):
                if len(chunk) > 40:
                    passages.append((f"doc-{len(passages)}", chunk))
    return passages


def sample_passages(limit: int | None = None) -> tuple[list[tuple[str, str]], str]:
    """Passages to embed in the demo, and where they came from."""
    data = shared_data_dir()
    if data is not None:
        path = data / "climate_fever_evidence.jsonl"
        return read_jsonl_texts(path, limit), str(path)
    passages = _doc_passages()
    return passages[:limit], "the fastinstructor package's own documentation (../shared/data not found)"


def tokenizer_training_text() -> tuple[list[str], str]:
    """Sentences to train a test SentencePiece model on, and where they came from."""
    data = shared_data_dir()
    if data is None:
        return [text for _, text in _doc_passages()], "the fastinstructor package's own documentation"
    texts = []
    for name in ("climate_fever_claims.jsonl", "climate_fever_evidence.jsonl", "climate_fever_articles.jsonl"):
        texts += [text for _, text in read_jsonl_texts(data / name)]
    with open(data / "stsb_test_subset.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            texts += line.rstrip("\n").split("\t")[5:7]
    return texts, str(data)
