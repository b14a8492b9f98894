"""The dispatcher (docs/design.md section 3): pick the fastest backend and precision that is proven right here.

``auto`` probes the hardware and the installed packages, walks the preference order for the machine
(CUDA: triton -> onnx -> reference; CPU: onnx -> cpu -> reference; fastest precision first), says why each
candidate was skipped, and accepts a candidate only after its parity check against the float32 reference
passes docs/design.md section 5's tolerance for its precision. Parity results are cached on disk per (model
fingerprint, backend, precision, device, library versions, and for onnx the graph's checksums), so a second
start costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from . import native
from .backends import BACKENDS
from .backends.base import Backend, why_not
from .calibration import calibration_pairs, calibration_sha256
from .checkpoint import Checkpoint
from .hardware import Hardware, device_type, probe
from .locking import cache_dir, write_atomic
from .parity import ParityResult, measure
from .precisions import canonical_precision
from .tokenization import PairTokenizer

__all__ = [
    "Hardware",
    "Candidate",
    "ParityResult",
    "probe",
    "candidates",
    "all_candidates",
    "unavailable_reason",
    "start_backend",
    "check_parity",
    "choose",
    "clear_cache",
    "NoBackendError",
]

log = logging.getLogger("fastinstructor.dispatch")
_PARITY_VERSION = 5  # bump when the measure or a backend's arithmetic changes: invalidates cached results


class NoBackendError(RuntimeError):
    """No backend x precision that was asked for runs and passes parity here; the message says what was tried
    and why each failed, and what this machine has. A RuntimeError, as before; the command line reports it in
    one line, as a usage error."""


@dataclass(frozen=True)
class Candidate:
    backend: str
    precision: str
    device: str

    def __str__(self) -> str:
        return f"{self.backend}/{self.precision}/{self.device}"


def _ranked(device: str, hardware: Hardware) -> list[Candidate]:
    """Every backend's ranked capabilities on ``device``, in auto's order of preference on this machine."""
    ranked = [
        (rank, Candidate(name, c.precision, c.device))
        for name, cls in BACKENDS.items()
        for c in cls.capabilities
        if c.device == device and (rank := cls.rank(c, hardware)) is not None
    ]
    return [candidate for _, candidate in sorted(ranked, key=lambda x: x[0])]


def candidates(hardware: Hardware) -> list[Candidate]:
    """The preference order for this machine, fastest first: the backends' ranked capabilities on its device."""
    return _ranked("cuda" if hardware.cuda else "cpu", hardware)


def all_candidates(hardware: Hardware) -> list[Candidate]:
    """The preference order, then the other device's, then every other capability of every backend."""
    devices = ("cuda", "cpu") if hardware.cuda else ("cpu", "cuda")
    ordered = [c for device in devices for c in _ranked(device, hardware)]
    every = [Candidate(name, c.precision, c.device) for name, cls in BACKENDS.items() for c in cls.capabilities]
    return ordered + [c for c in every if c not in ordered]


def unavailable_reason(candidate: Candidate, hardware: Hardware) -> str | None:
    """Why ``candidate`` cannot run here, or None."""
    if candidate.backend not in BACKENDS:
        return f"backend {candidate.backend!r} is not part of this build"
    return why_not(BACKENDS[candidate.backend], candidate.precision, candidate.device, hardware)


def start_backend(
    checkpoint: Checkpoint, candidate: Candidate, hardware: Hardware, **options
) -> tuple[Backend | None, str | None]:
    """``(the candidate's backend, None)``, or ``(None, why not)`` when it cannot run or fails to start here."""
    why = unavailable_reason(candidate, hardware)
    if why is not None:
        return None, why
    cls = BACKENDS[candidate.backend]
    try:
        return cls(checkpoint, precision=candidate.precision, device=candidate.device, **options), None
    except (ImportError, ValueError, RuntimeError, OSError) as err:
        return None, f"failed to start: {err}"


def _cache_path(
    checkpoint: Checkpoint, tokenizer: PairTokenizer, candidate: Candidate, hardware: Hardware, backend: Backend
) -> Path:
    # A backend that runs a graph from disk (onnx) names its checksums: a result holds for the graph it measured.
    graph = getattr(backend, "graph_checksums", None)
    # The tokenizer's files are in the fingerprint; its settings decide the calibration set's ids too.
    inputs = [calibration_sha256(), tokenizer.max_length, tokenizer.pooling_rule, native.availability()[0]]
    key = json.dumps(
        [_PARITY_VERSION, inputs, checkpoint.fingerprint, str(candidate), hardware.packages, graph], sort_keys=True
    )
    return cache_dir("parity") / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def clear_cache() -> int:
    """Delete every cached parity result and the reference's kept calibration embeddings; returns how many files
    there were."""
    folder = cache_dir("parity")
    files = [*folder.glob("*.json"), *folder.glob("reference-*.npy")]  # none where the folder is missing
    for f in files:
        f.unlink()
    return len(files)


def check_parity(
    checkpoint: Checkpoint,
    tokenizer: PairTokenizer,
    backend: Backend,
    candidate: Candidate,
    hardware: Hardware,
    *,
    reference: Backend | None = None,
    use_cache: bool = True,
    min_cosine: float | None = None,
) -> ParityResult:
    """``parity.measure`` of the candidate against the float32 reference, cached on disk."""
    path = _cache_path(checkpoint, tokenizer, candidate, hardware, backend)
    if use_cache and path.is_file():
        try:
            cached = ParityResult(**{**json.loads(path.read_text()), "cached": True})
        except (OSError, ValueError, TypeError) as err:  # torn, edited or from another layout: measure it again
            log.warning("cached parity result %s is unreadable (%s); measuring again", path, err)
        else:
            return cached.require(min_cosine)
    log.info(
        "checking %s against the float32 reference on the %d calibration inputs (once per model, machine and "
        "versions: the result is cached)", candidate, len(calibration_pairs()),
    )  # fmt: skip
    if reference is None:
        reference = BACKENDS["reference"](checkpoint, device=candidate.device)
    result = measure(backend, reference, tokenizer, candidate.precision, label=str(candidate), use_cache=use_cache)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        measured = json.dumps({k: v for k, v in asdict(result).items() if k != "cached"})
        write_atomic(path, lambda tmp: tmp.write_text(measured))
    return result.require(min_cosine)


def choose(
    checkpoint: Checkpoint,
    tokenizer: PairTokenizer,
    *,
    backend: str = "auto",
    precision: str = "auto",
    device: str | None = None,
    allow_int8: bool = True,
    min_cosine: float | None = None,
    allow_fallback: bool = True,
    use_cache: bool = True,
    hardware: Hardware | None = None,
    backend_options: dict | None = None,
):
    """The first candidate (in preference order, restricted by ``backend``/``precision``/``device``) that
    is available and passes parity; returns ``(backend instance, candidate, report)``.

    ``allow_fallback=False`` fails instead of degrading past the first available candidate.
    """
    hardware = hardware or probe()
    precision = canonical_precision(precision, allow_auto=True)
    skipped: list[dict] = []
    here = device_type(device) if device else ("cuda" if hardware.cuda else "cpu")
    if backend != "auto" and precision != "auto":  # fully explicit: exactly this, even off the preference order
        wanted = [Candidate(backend, precision, here)]
    else:  # the preference order of the device asked for (a CUDA machine's CPU too)
        wanted = [
            c
            for c in _ranked(here, hardware)
            if backend in ("auto", c.backend)
            and precision in ("auto", c.precision)
            and (allow_int8 or c.precision != "int8" or precision == "int8")
        ]
    reference = None
    for candidate in wanted:
        options = (backend_options or {}) if candidate.backend == "onnx" else {}  # onnx_dir
        instance, why = start_backend(checkpoint, candidate, hardware, **options)
        if instance is None:
            log.info("skipping %s: %s", candidate, why)
            skipped.append({"candidate": str(candidate), "why": why})
            continue
        if candidate.backend == "reference" and candidate.precision == "float32":
            result = None  # the reference is the yardstick itself
        else:
            cached = use_cache and _cache_path(checkpoint, tokenizer, candidate, hardware, instance).is_file()
            if reference is None and not cached:
                reference = BACKENDS["reference"](checkpoint, device=candidate.device)
            result = check_parity(
                checkpoint,
                tokenizer,
                instance,
                candidate,
                hardware,
                reference=reference,
                use_cache=use_cache,
                min_cosine=min_cosine,
            )
        if result is None or result.passed:
            report = {
                "backend": candidate.backend,
                "precision": candidate.precision,
                "device": candidate.device,
                "parity": None if result is None else asdict(result),
                "calibration_sha256": calibration_sha256(),
                "native_ops": native.availability()[1],  # the cpu backend's row ops and attention: C++ or the fallback
                "skipped": skipped,
                "hardware": hardware.describe(),
            }
            log.info("chose %s%s", candidate, "" if result is None else f" (min cos {result.min_cos:.6f})")
            return instance, candidate, report
        why = "parity failed: " + "; ".join(result.failures)
        if result.cached:
            why += " (a cached result: parity_cache=False, or `fastinstructor check --clear-cache`, measures again)"
        log.warning("skipping %s: %s", candidate, why)
        skipped.append({"candidate": str(candidate), "why": why, "parity": asdict(result)})
        if not allow_fallback:
            break
    order = ", ".join(str(c) for c in _ranked(here, hardware))
    tried = "; ".join(f"{s['candidate']}: {s['why']}" for s in skipped) or (
        f"nothing: no candidate of the {here} order matches (it is: {order})"
    )
    raise NoBackendError(
        f"no backend for backend={backend!r}, precision={precision!r}"
        f"{'' if device is None else f', device={device!r}'} on this machine. Tried: {tried}. "
        f"Backends here: {', '.join(f'{n} ({c.availability()[1]})' for n, c in BACKENDS.items())}"
    )
