"""Numeric parity against the float32 reference: docs/design.md section 5's tolerances and the one routine
that measures a backend against the reference.

``measure`` runs a candidate backend and the reference on the shipped calibration set (``calibration.py``)
and judges the result against the precision's tolerance; the dispatcher, ``fastinstructor export``,
``check`` and ``bench`` all call it. ``compare`` is the arithmetic, for tests that hold their own arrays.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backends.base import Backend
from .batching import DEFAULT_EMBED_POLICY, BatchPolicy, pad_batch
from .calibration import calibration_pairs, calibration_sha256
from .hardware import cpu_model
from .locking import cache_dir, write_atomic
from .precisions import canonical_precision
from .tokenization import PairTokenizer

__all__ = [
    "REFERENCE_POLICY",
    "TOLERANCES",
    "Tolerance",
    "ParityReport",
    "ParityResult",
    "calibration_batches",
    "calibration_embeddings",
    "compare",
    "measure",
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
    "float8": Tolerance(min_cos=0.99, mean_cos=0.995),  # as int8 (issue 15): 8-bit weights and activations
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
        max_abs_at=tuple(int(i) for i in np.unravel_index(np.argmax(np.nan_to_num(diff, nan=np.inf)), diff.shape)),
        non_finite_rows=tuple(int(i) for i in np.where(~np.isfinite(actual).all(1))[0]),
    )


# The reference's batches: padded to at most 2,048 tokens. Under the pipeline's policy one batch of the set's 32
# longest inputs (140 to 512 tokens) took 16,384 padded tokens for 6,666 real ones, and the reference (padded, eager)
# took 63 s for the set; in batches of at most 2,048 tokens, 28-33 s, its embeddings within 1e-7 of those (base, 2-core
# AVX2-only AMD EPYC, bench/results/parity-cost-2026-12-07-vm.md). The candidate keeps the pipeline's batches: the
# shapes the embed job gives it are the ones checked.
REFERENCE_POLICY = BatchPolicy(max_rows=32, max_tokens=2048)


def calibration_batches(
    tokenizer: PairTokenizer, policy: BatchPolicy = DEFAULT_EMBED_POLICY
) -> list[tuple[list[int], tuple]]:
    """The calibration set batched by ``policy`` (by default the pipeline's, ``DEFAULT_EMBED_POLICY``: sorted by
    length, bounded by rows and tokens): ``(input rows, (input_ids, attention_mask, pool_start))`` per batch."""
    tokenized = tokenizer(calibration_pairs())
    plan = policy.plan([len(row) for row in tokenized.ids])
    return [
        (rows, pad_batch([tokenized.ids[i] for i in rows], [tokenized.pool_start[i] for i in rows])) for rows in plan
    ]


def calibration_embeddings(tokenizer: PairTokenizer, backend: Backend, policy: BatchPolicy, label: str) -> np.ndarray:
    """The backend's float32 embeddings ``[N, dim]`` of the calibration set in file order, batched by ``policy``,
    under a progress bar named ``label`` on a terminal (a first check of base on a 2-core CPU takes a minute or
    more)."""
    batches = calibration_batches(tokenizer, policy)
    out: np.ndarray | None = None
    rows_in_set = sum(len(rows) for rows, _ in batches)
    # disable=None: shown only where stderr is a terminal; leave=False: gone once the check is done.
    with tqdm(total=rows_in_set, desc=label, unit="text", disable=None, leave=False) as progress:
        for rows, batch in batches:
            embeddings = backend.embed(*batch).float().cpu().numpy()
            if out is None:
                out = np.empty((rows_in_set, embeddings.shape[1]), dtype=np.float32)
            out[rows] = embeddings
            progress.update(len(rows))
    return out


# The reference's embeddings of the calibration set, per reference instance and tokenizer setting: the
# dispatcher and `check` measure several candidates against one reference, which is deterministic. (A reference
# is built from one checkpoint, whose files include its tokenizer's.)
_REFERENCE_EMBEDDINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reference_cache_path(tokenizer: PairTokenizer, reference: Backend) -> Path:
    """Where the reference's calibration embeddings are kept on disk, in the parity cache: the key is all that
    decides them, the checkpoint (its files include the tokenizer's), the tokenizer settings, the calibration set
    and its batches, the device and the versions of torch and transformers."""
    device = reference.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    versions = [importlib.metadata.version(name) for name in ("torch", "transformers")]
    inputs = [tokenizer.max_length, tokenizer.pooling_rule, calibration_sha256(), repr(REFERENCE_POLICY)]
    key = json.dumps([reference.checkpoint.fingerprint, inputs, device.type, device_name, versions])
    return cache_dir("parity") / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"


def _read_kept(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The embeddings kept at ``path``; None where there are none, or they are torn, of another shape or not finite."""
    try:
        embeddings = np.load(path)
    except (OSError, ValueError):
        return None
    return embeddings if embeddings.shape == shape and np.isfinite(embeddings).all() else None


def _reference_embeddings(tokenizer: PairTokenizer, reference: Backend, use_cache: bool) -> np.ndarray:
    """The reference's calibration embeddings, once per reference instance and, with ``use_cache``, once per
    ``reference_cache_path``: the reference is most of a first check's time (for base on a 2-core AMD EPYC, a
    first cpu/float32 load took 112 s, and 27 s with them kept, before ``REFERENCE_POLICY``), and every other
    candidate of that model on that machine is measured against the same embeddings."""
    kept = _REFERENCE_EMBEDDINGS.setdefault(reference, {})
    key = (tokenizer.max_length, tokenizer.pooling_rule, calibration_sha256())
    if key in kept:
        return kept[key]
    path = reference_cache_path(tokenizer, reference) if use_cache else None
    shape = (len(calibration_pairs()), reference.checkpoint.out_dim)
    embeddings = None if path is None else _read_kept(path, shape)
    if embeddings is None:
        embeddings = calibration_embeddings(tokenizer, reference, REFERENCE_POLICY, "parity check: float32 reference")
        if path is not None:  # replaces a torn file too
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda tmp: _save_npy(tmp, embeddings))
    kept[key] = embeddings
    return embeddings


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: given a name, np.save would append ".npy" to it
        np.save(f, array)


def _topk_agreement(actual: np.ndarray, expected: np.ndarray, k: int = 5) -> float:
    """Mean overlap of each row's ``k`` nearest neighbours among the rows, against the reference's."""

    def neighbours(e: np.ndarray) -> np.ndarray:
        sims = e @ e.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :k]

    a, b = neighbours(actual), neighbours(expected)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


@dataclass
class ParityResult:
    """A backend against the float32 reference on the calibration set, judged for its precision."""

    candidate: str
    rows: int
    min_cos: float
    mean_cos: float
    max_abs: float
    topk_agreement: float  # mean overlap of each row's 5 nearest neighbours with the reference's
    tolerance: str
    passed: bool
    failures: list[str] = field(default_factory=list)
    calibration_sha256: str = ""  # the calibration set it was measured on
    cached: bool = False

    def require(self, min_cosine: float | None) -> ParityResult:
        """Fail this result too when its min cosine is below ``min_cosine`` (a stricter policy than the precision's)."""
        if min_cosine is not None and self.min_cos < min_cosine:
            self.passed = False
            self.failures = [*self.failures, f"min cosine {self.min_cos:.6f} < the required {min_cosine}"]
        return self


def measure(
    candidate: Backend,
    reference: Backend,
    tokenizer: PairTokenizer,
    precision: str,
    *,
    label: str | None = None,
    min_cosine: float | None = None,
    use_cache: bool = True,
) -> ParityResult:
    """``candidate`` against ``reference`` on the calibration set, judged by ``TOLERANCES[precision]``; with
    ``use_cache``, the reference's embeddings come from disk where this machine has measured them before."""
    tolerance = TOLERANCES[canonical_precision(precision)]
    actual = calibration_embeddings(
        tokenizer, candidate, DEFAULT_EMBED_POLICY, f"parity check: {label or candidate.name}"
    )  # the embed job's batches: the shapes it will run
    expected = _reference_embeddings(tokenizer, reference, use_cache)
    report = compare(actual, expected)
    failures = report.failures(tolerance)
    result = ParityResult(
        candidate=label or f"{candidate.name}/{precision}",
        rows=report.rows,
        min_cos=report.min_cos,
        mean_cos=report.mean_cos,
        max_abs=report.max_abs,
        topk_agreement=_topk_agreement(actual, expected),
        tolerance=str(tolerance),
        passed=not failures,
        failures=failures,
        calibration_sha256=calibration_sha256(),
    )
    return result.require(min_cosine)
