"""Numeric parity against the float32 reference: DESIGN section 5's tolerances in one place.

Tests, benchmarks and (later) the dispatcher judge every fast path with ``compare`` and ``TOLERANCES``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .batching import pad_batch
from .data import sample_passages

__all__ = [
    "TOLERANCES",
    "Tolerance",
    "ParityReport",
    "calibration_embeddings",
    "calibration_pairs",
    "compare",
]


@dataclass(frozen=True)
class Tolerance:
    min_cos: float  # per embedding, minimum over the set
    mean_cos: float | None = None
    max_abs: float | None = None  # per component

    def __str__(self) -> str:
        parts = [f"min cos ≥ {self.min_cos}"]
        if self.mean_cos is not None:
            parts.append(f"mean cos ≥ {self.mean_cos}")
        if self.max_abs is not None:
            parts.append(f"max abs ≤ {self.max_abs:g}")
        return ", ".join(parts)


TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(min_cos=0.99999, max_abs=1e-5),
    "bfloat16": Tolerance(min_cos=0.999),
    "float16": Tolerance(min_cos=0.999),
    "int8": Tolerance(min_cos=0.99, mean_cos=0.995),
}


@dataclass(frozen=True)
class ParityReport:
    rows: int
    min_cos: float
    mean_cos: float
    max_abs: float
    worst_rows: tuple[int, ...]  # lowest cosine first
    worst_cos: tuple[float, ...]
    max_abs_at: tuple[int, int]  # [row, component]
    non_finite_rows: tuple[int, ...]

    def failures(self, tolerance: Tolerance) -> list[str]:
        """Why these embeddings miss ``tolerance``; empty when they meet it."""
        problems = []
        if self.non_finite_rows:
            problems.append(f"non-finite values in rows {list(self.non_finite_rows[:10])}")
        if not self.min_cos >= tolerance.min_cos:  # `not >=` also catches NaN
            worst = ", ".join(f"{r}: {c:.7f}" for r, c in zip(self.worst_rows, self.worst_cos, strict=True))
            problems.append(f"min cosine {self.min_cos:.7f} < {tolerance.min_cos} (worst rows {worst})")
        if tolerance.mean_cos is not None and not self.mean_cos >= tolerance.mean_cos:
            problems.append(f"mean cosine {self.mean_cos:.7f} < {tolerance.mean_cos}")
        if tolerance.max_abs is not None and not self.max_abs <= tolerance.max_abs:
            problems.append(f"max abs difference {self.max_abs:.3g} > {tolerance.max_abs:g} at {list(self.max_abs_at)}")
        return problems


def compare(actual: np.ndarray, expected: np.ndarray) -> ParityReport:
    """Per-row cosine similarity and per-component absolute difference of ``actual`` against ``expected``."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape or actual.ndim != 2 or len(actual) == 0:
        raise ValueError(
            f"expected two non-empty [N, dim] arrays of one shape, got {actual.shape} and {expected.shape}"
        )
    norms = np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (actual * expected).sum(1) / norms
    diff = np.abs(actual - expected)
    worst = np.argsort(np.nan_to_num(cos, nan=-2.0))[:5]
    return ParityReport(
        rows=len(actual),
        min_cos=float(np.min(cos)),
        mean_cos=float(np.mean(cos)),
        max_abs=float(np.max(diff)),
        worst_rows=tuple(int(i) for i in worst),
        worst_cos=tuple(float(cos[i]) for i in worst),
        max_abs_at=tuple(int(i) for i in np.unravel_index(np.nanargmax(diff), diff.shape)),
        non_finite_rows=tuple(int(i) for i in np.where(~np.isfinite(actual).all(1))[0]),
    )


CALIBRATION_INSTRUCTIONS = (
    "Represent the Wikipedia document for retrieval:",
    "Represent the climate claim for retrieving supporting documents:",
    "Represent the sentence for clustering:",
)


def calibration_pairs(n: int = 30) -> list:
    """Real text of several lengths under several instructions, plus the edge cases of DESIGN section 4:
    an empty instruction, a one-character instruction, an empty text, a text past 512 tokens, a plain string."""
    passages, _ = sample_passages(n)
    texts = [text for _, text in passages]
    pairs: list = [[CALIBRATION_INSTRUCTIONS[i % len(CALIBRATION_INSTRUCTIONS)], t] for i, t in enumerate(texts)]
    long_text = " ".join(texts)
    while len(long_text.split()) < 800:  # past 512 tokens whatever the tokenizer
        long_text += " " + long_text
    return pairs + [
        ["", texts[0]],
        ["x", texts[1 % len(texts)]],
        [CALIBRATION_INSTRUCTIONS[0], ""],
        [CALIBRATION_INSTRUCTIONS[0], long_text],
        texts[2 % len(texts)],
    ]


def calibration_batches(tokenizer, batch_size: int = 8) -> list[tuple]:
    """The calibration set as padded backend inputs ``(input_ids, attention_mask, pool_start)``."""
    tokenized = tokenizer(calibration_pairs())
    return [
        pad_batch(tokenized.ids[i : i + batch_size], tokenized.pool_start[i : i + batch_size])
        for i in range(0, len(tokenized.ids), batch_size)
    ]


def calibration_embeddings(tokenizer, *backends) -> list[np.ndarray]:
    """Each backend's float32 embeddings ``[N, dim]`` of the calibration set, fed the same padded batches."""
    batches = calibration_batches(tokenizer)
    return [np.concatenate([b.embed(*batch).float().cpu().numpy() for batch in batches]) for b in backends]
