"""The contenders: fastinstructor's backends x precisions this machine can run (from the backends' capability
tables and the dispatcher's reasons), the float32 reference, and sentence-transformers' INSTRUCTOR mode; each
with the parity of ``parity.measure`` against the reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..backends import BACKENDS
from ..dispatch import Candidate, all_candidates, probe, unavailable_reason
from ..parity import measure
from ..precisions import PRECISIONS, canonical_precision

__all__ = [
    "REFERENCE",
    "SENTENCE_TRANSFORMERS",
    "ST_BATCH_SIZE",
    "Contender",
    "load_sentence_transformers",
    "plan_contenders",
]

REFERENCE = "reference"
SENTENCE_TRANSFORMERS = "sentence-transformers"
ST_BATCH_SIZE = 32  # sentence-transformers' default


@dataclass
class Contender:
    name: str
    backend: str
    precision: str  # selects the parity tolerance and the roofline ceiling
    encode: Callable[[list[list[str]], int, int | None], np.ndarray]  # (pairs, batch rows, token budget)
    load_s: float = 0.0
    first_call_s: float = 0.0  # the first call on a few texts ...
    warmup_s: float = 0.0  # ... less the same call once warm: one-time work (kernel selection, caches)
    load_mib: float | None = None
    device: str = "cpu"
    instance: object = None  # the backend it runs: what parity.measure feeds the calibration set
    parity: dict | None = None  # parity.ParityResult as a dict; None for the reference (the baseline) until measured


def fastinstructor_contender(model_path, backend: str, precision: str, device: str | None) -> Contender:
    """``fastinstructor.load`` of this backend and precision; its parity is the dispatcher's check at load."""
    from ..model import load

    model = load(model_path, backend=backend, precision=precision, device=device)

    def encode(pairs, rows, budget):
        return model.encode(pairs, batch_size=rows, max_batch_tokens=budget)

    name = backend if backend == REFERENCE else f"{backend} {precision}"
    return Contender(
        name,
        backend,
        precision,
        encode,
        device=str(model.backend.device),
        instance=model.backend,
        parity=model.backend_report.get("parity"),
    )


def load_sentence_transformers(model_path, device: str | None = None):
    """sentence-transformers' native INSTRUCTOR mode: the instruction as ``prompt``, kept out of the mean."""
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # sentence-transformers before 5.2
        from sentence_transformers.models import Pooling

    model = SentenceTransformer(str(model_path), device=device or "cpu")
    if not isinstance(model[1], Pooling):
        raise RuntimeError(f"{model_path}: module 1 is {type(model[1]).__name__}, expected Pooling")
    model[1].include_prompt = False
    return model


class _SentenceTransformersBackend:
    """sentence-transformers' modules behind the ``Backend`` interface, for ``parity.measure``: the same token ids
    as every backend through its transformer, its pooling with the instruction left out (``prompt_length``, one
    per call, so rows are grouped by where pooling starts), its Dense and Normalize."""

    name = SENTENCE_TRANSFORMERS

    def __init__(self, model) -> None:
        self.model = model
        self.device = model.device

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
        out: list = [None] * len(input_ids)
        for start in pool_start.unique().tolist():
            rows = (pool_start == start).nonzero().flatten()
            features = {
                "input_ids": input_ids[rows].to(self.device),
                "attention_mask": attention_mask[rows].to(self.device),
                "prompt_length": int(start),
            }
            for row, vector in zip(rows.tolist(), self.model(features)["sentence_embedding"], strict=True):
                out[row] = vector.float().cpu()
        return torch.stack(out)


def sentence_transformers_contender(model_path, device: str | None) -> Contender:
    model = load_sentence_transformers(model_path, device)

    def encode(pairs, rows, budget):
        # As a user runs it: one call per instruction (it takes one prompt per call), its default batch size at
        # most, and no token budget (it has none).
        rows = min(rows, ST_BATCH_SIZE)
        out: list = [None] * len(pairs)
        groups: dict[str, list[int]] = {}
        for i, (instruction, _) in enumerate(pairs):
            groups.setdefault(instruction, []).append(i)
        for instruction, rows_of in groups.items():
            vectors = model.encode(
                [pairs[i][1] for i in rows_of], prompt=instruction, batch_size=rows, show_progress_bar=False
            )
            for i, vector in zip(rows_of, vectors, strict=True):
                out[i] = vector
        return np.stack(out)

    instance = _SentenceTransformersBackend(model)
    return Contender(
        SENTENCE_TRANSFORMERS, SENTENCE_TRANSFORMERS, "float32", encode, device=str(model.device), instance=instance
    )


def measure_parity(contender: Contender, reference: Contender, tokenizer) -> None:
    """``parity.measure`` of a contender that loading did not check (sentence-transformers) against the reference."""
    if contender.parity is None and contender.name != REFERENCE:
        result = measure(contender.instance, reference.instance, tokenizer, contender.precision, label=contender.name)
        contender.parity = asdict(result)


def _skip(backend: str, precision: str, reason: str) -> dict:
    return {"backend": backend, "precision": precision, "reason": reason}


def _plan_backend(name: str, wanted: list[str] | None, device: str, hardware) -> tuple[list, list]:
    """(backend, precision) pairs of one backend on ``device``, and the ones skipped with why."""
    cls = BACKENDS[name]
    ok, why = cls.availability()
    if not ok:
        return [], [_skip(name, "*", why)]
    here = [c.precision for c in all_candidates(hardware) if c.backend == name and c.device == device]
    here = sorted(set(here), key=PRECISIONS.index)
    if not here:
        return [], [_skip(name, "*", f"runs {cls.runs()}")]
    chosen, skipped = [], []
    for precision in wanted or here:
        if precision not in here:
            why = f"supports {', '.join(here)} on this device"
        else:
            why = unavailable_reason(Candidate(name, precision, device), hardware)
        if why:
            skipped.append(_skip(name, precision, why))
        else:
            chosen.append((name, precision))
    return chosen, skipped


def plan_contenders(
    backends: Sequence[str], precisions: Sequence[str] | None, device: str | None
) -> tuple[list[tuple[str, str]], list[dict]]:
    """(backend, precision) pairs to run, and the ones skipped with why. The reference always runs first.

    The pairs come from the backends' capability tables on the device (``device``, else CUDA when there is one),
    in the order float32, bfloat16, float16, int8; what this machine cannot run is skipped with the
    dispatcher's reason. ``precisions`` takes aliases (``fp16``).
    """
    hardware = probe()
    kind = torch.device(device).type if device else ("cuda" if hardware.cuda else "cpu")
    wanted = list(dict.fromkeys(canonical_precision(p) for p in precisions)) if precisions else None
    chosen, skipped = [(REFERENCE, "float32")], []
    for backend in dict.fromkeys(backends):
        if backend == REFERENCE:
            continue
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        more, less = _plan_backend(backend, wanted, kind, hardware)
        chosen += more
        skipped += less
    return chosen, skipped
