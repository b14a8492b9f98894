"""Shared fixtures: random-weight checkpoints built once per session, and real text."""

from __future__ import annotations

import numpy as np
import pytest

from fastinstructor.data import read_jsonl_texts, sample_passages, shared_data_dir
from fastinstructor.testmodel import make_test_model

INSTRUCTIONS = [
    "Represent the Wikipedia document for retrieval:",
    "Represent the climate claim for retrieving supporting documents:",
    "Represent the sentence for clustering: ",
    "Represent the Science title:",
]


@pytest.fixture(scope="session")
def make_model(tmp_path_factory):
    """``make_model(preset)``: the path of a checkpoint of that preset, built once per session."""
    built = {}

    def get(preset: str):
        if preset not in built:
            built[preset] = make_test_model(preset, tmp_path_factory.mktemp("models") / preset)
        return built[preset]

    return get


@pytest.fixture(scope="session")
def tiny_model(make_model):
    return make_model("tiny")


@pytest.fixture(scope="session")
def real_texts() -> list[str]:
    """Real claims and evidence sentences (../shared/data), or the project's own doc passages without it."""
    data = shared_data_dir()
    if data is None:
        return [text for _, text in sample_passages(48)[0]]
    claims = read_jsonl_texts(data / "climate_fever_claims.jsonl", 24)
    evidence = read_jsonl_texts(data / "climate_fever_evidence.jsonl", 24)
    return [text for _, text in claims + evidence]


@pytest.fixture(scope="session")
def real_pairs(real_texts) -> list[list[str]]:
    """Real text under several instructions, plus plain strings."""
    pairs = [[INSTRUCTIONS[i % len(INSTRUCTIONS)], text] for i, text in enumerate(real_texts)]
    return pairs + real_texts[:4]


def assert_parity(
    actual: np.ndarray,
    expected: np.ndarray,
    *,
    min_cos: float,
    max_abs: float | None = None,
    mean_cos: float | None = None,
) -> None:
    """DESIGN section 5's tolerances, per embedding; on failure name the worst rows."""
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all(), f"non-finite values in rows {np.where(~np.isfinite(actual).all(1))[0][:10]}"
    cos = (actual * expected).sum(1) / (np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1))
    worst = np.argsort(cos)[:5]
    assert cos.min() >= min_cos, f"min cosine {cos.min():.7f} < {min_cos}; worst rows {worst} {cos[worst]}"
    if mean_cos is not None:
        assert cos.mean() >= mean_cos, f"mean cosine {cos.mean():.7f} < {mean_cos}"
    if max_abs is not None:
        diff = np.abs(actual - expected)
        row, col = np.unravel_index(diff.argmax(), diff.shape)
        assert diff.max() <= max_abs, f"max abs difference {diff.max():.3g} > {max_abs} at [{row}, {col}]"
