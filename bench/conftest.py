"""Fixtures for the micro-benchmarks in ``bench/test_micro.py`` (pytest-benchmark).

Run them from the repository root with ``.venv/bin/python -m pytest bench/ --benchmark-only``; a plain
``pytest`` never collects this folder (``testpaths = ["tests"]`` in pyproject.toml).

- ``model``: the random-weight ``tiny`` preset, built once per session in a temporary folder with
  ``fastinstructor.testmodel.make_test_model`` and loaded on the cpu backend in float32 (no parity cache).
- ``pairs``: 256 ``[instruction, text]`` pairs of real text: the first 256 evidence sentences of
  ``../shared/data/climate_fever_evidence.jsonl`` (or ``$FASTINSTRUCTOR_DATA``) under four instructions, or,
  without that folder, passages of the project's own documentation (``fastinstructor.data.sample_passages``).
- ``FASTINSTRUCTOR_CACHE`` points at a temporary folder for the whole session: nothing is written to the
  user's cache.
"""

from __future__ import annotations

import itertools

import pytest

import fastinstructor
from fastinstructor.data import read_jsonl_texts, sample_passages, shared_data_dir
from fastinstructor.testmodel import make_test_model

N_PAIRS = 256
INSTRUCTIONS = [
    "Represent the Wikipedia document for retrieval:",
    "Represent the climate claim for retrieving supporting documents:",
    "Represent the sentence for clustering: ",
    "Represent the Science title:",
]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Any cache the library writes (ONNX exports, parity results) goes to a temporary folder."""
    patch = pytest.MonkeyPatch()
    patch.setenv("FASTINSTRUCTOR_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def model(tmp_path_factory, _isolated_cache):
    """The ``tiny`` random-weight checkpoint on the cpu backend, float32."""
    path = make_test_model("tiny", tmp_path_factory.mktemp("models") / "tiny")
    return fastinstructor.load(path, backend="cpu", precision="float32", parity_cache=False)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """256 real texts: climate-fever evidence sentences, else the project's doc passages (cycled to 256)."""
    data = shared_data_dir()
    if data is not None:
        rows = read_jsonl_texts(data / "climate_fever_evidence.jsonl", N_PAIRS)
    else:
        rows = sample_passages(N_PAIRS)[0]
    return list(itertools.islice(itertools.cycle(text for _, text in rows), N_PAIRS))


@pytest.fixture(scope="session")
def pairs(texts) -> list[list[str]]:
    """The texts under four instructions, in turn."""
    return [[INSTRUCTIONS[i % len(INSTRUCTIONS)], text] for i, text in enumerate(texts)]


@pytest.fixture(scope="session")
def tokenized(model, pairs):
    """``Tokenized(ids, pool_start, truncated)`` of the pairs, for the batching benchmarks."""
    return model.tokenizer(pairs)
