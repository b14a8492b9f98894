"""The dispatcher (DESIGN section 3): pick the fastest backend and precision that is proven right here.

``auto`` probes the hardware and the installed packages, walks the preference order for the machine
(CUDA: triton -> onnx -> reference; CPU: onnx -> cpu -> reference; fastest precision first), says why each
candidate was skipped, and accepts a candidate only after its parity check against the float32 reference
passes DESIGN section 5's tolerance for its precision. Parity results are cached on disk per (model
fingerprint, backend, precision, device, library versions, and for onnx the graph's checksums), so a second
start costs nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backends import BACKENDS
from .checkpoint import Checkpoint
from .parity import TOLERANCES, calibration_embeddings, compare
from .tokenization import PairTokenizer

__all__ = [
    "Hardware",
    "Candidate",
    "ParityResult",
    "probe",
    "candidates",
    "all_candidates",
    "unavailable_reason",
    "check_parity",
    "choose",
    "clear_cache",
    "NoBackendError",
]

log = logging.getLogger("fastinstructor.dispatch")
_PARITY_VERSION = 1  # bump when the calibration set or the measure changes: invalidates cached results
_VERSIONED = ("fastinstructor", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "triton")


class NoBackendError(RuntimeError):
    """No backend x precision that was asked for runs and passes parity here; the message says what was tried
    and why each failed, and what this machine has. A RuntimeError, as before; the command line reports it in
    one line, as a usage error."""


@dataclass(frozen=True)
class Hardware:
    cuda_device: str | None  # name of GPU 0, or None
    cuda_capability: tuple[int, int] | None
    cpu_flags: frozenset[str]
    packages: dict[str, str | None]  # installed versions of the packages that decide the backends
    onnx_providers: tuple[str, ...]

    @property
    def cuda(self) -> bool:
        return self.cuda_device is not None

    def describe(self) -> dict:
        flags = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")
        return {
            "cuda_device": self.cuda_device,
            "cuda_capability": self.cuda_capability,
            "cpu_flags": {f: f in self.cpu_flags for f in flags},
            "packages": self.packages,
            "onnx_providers": list(self.onnx_providers),
        }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe() -> Hardware:
    """What this machine has: a CUDA device, CPU features, and the packages the backends need."""
    cuda_device = capability = None
    if torch.cuda.is_available():
        cuda_device = torch.cuda.get_device_name(0)
        capability = torch.cuda.get_device_capability(0)
    flags: frozenset[str] = frozenset()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        line = next((x for x in cpuinfo.read_text().splitlines() if x.startswith("flags")), "")
        flags = frozenset(line.partition(":")[2].split())
    providers: tuple[str, ...] = ()
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    return Hardware(cuda_device, capability, flags, {p: _version(p) for p in _VERSIONED}, providers)


@dataclass(frozen=True)
class Candidate:
    backend: str
    precision: str
    device: str

    def __str__(self) -> str:
        return f"{self.backend}/{self.precision}/{self.device}"


def candidates(hardware: Hardware) -> list[Candidate]:
    """The preference order for this machine, fastest first (DESIGN section 3)."""
    if hardware.cuda:
        return [
            Candidate("triton", "bfloat16", "cuda"),
            Candidate("triton", "float16", "cuda"),
            Candidate("onnx", "float16", "cuda"),
            Candidate("reference", "float32", "cuda"),
        ]
    return [
        Candidate("onnx", "int8", "cpu"),
        Candidate("onnx", "float32", "cpu"),
        Candidate("cpu", "int8", "cpu"),
        Candidate("cpu", "bfloat16", "cpu"),
        Candidate("cpu", "float32", "cpu"),
        Candidate("reference", "float32", "cpu"),
    ]


def all_candidates(hardware: Hardware) -> list[Candidate]:
    """The preference order, then every other backend x precision x device this build knows."""
    on_cuda = dataclasses.replace(hardware, cuda_device=hardware.cuda_device or "none")
    ordered = candidates(hardware) + [c for c in candidates(on_cuda) if c not in candidates(hardware)]
    devices = ["cpu", "cuda"] if hardware.cuda else ["cpu"]
    extra = [Candidate(name, p, d) for name, cls in BACKENDS.items() for p in cls.precisions for d in devices]
    return ordered + [c for c in extra if c not in ordered]


def unavailable_reason(candidate: Candidate, hardware: Hardware) -> str | None:
    """Why ``candidate`` cannot run here, or None."""
    if candidate.backend not in BACKENDS:
        return f"backend {candidate.backend!r} is not part of this build yet"
    ok, why = BACKENDS[candidate.backend].availability()
    if not ok:
        return why
    if candidate.device == "cuda" and not hardware.cuda:
        return "no CUDA device"
    if candidate.backend == "triton" and candidate.device != "cuda":
        return "the triton backend runs on CUDA (TRITON_INTERPRET=1 on the CPU is for its tests)"
    if (
        candidate.backend == "onnx"
        and candidate.device == "cuda"
        and "CUDAExecutionProvider" not in (hardware.onnx_providers)
    ):
        return "onnxruntime has no CUDA provider (install onnxruntime-gpu instead of onnxruntime)"
    if (
        candidate.backend == "cpu"
        and candidate.precision == "bfloat16"
        and not ({"avx512_bf16", "amx_bf16"} & hardware.cpu_flags)
    ):
        return "the CPU has no native bfloat16 (avx512_bf16 or AMX): slower than float32"
    return None


@dataclass
class ParityResult:
    candidate: str
    rows: int
    min_cos: float
    mean_cos: float
    max_abs: float
    topk_agreement: float  # mean overlap of each row's 5 nearest neighbours with the reference's
    tolerance: str
    passed: bool
    failures: list[str] = field(default_factory=list)
    cached: bool = False


def _cache_path(checkpoint: Checkpoint, candidate: Candidate, hardware: Hardware, backend) -> Path:
    root = Path(os.environ.get("FASTINSTRUCTOR_CACHE", "~/.cache/fastinstructor")).expanduser()
    # A backend that runs a graph from disk (onnx) names its checksums: a result holds for the graph it measured.
    graph = getattr(backend, "graph_checksums", None)
    key = json.dumps(
        [_PARITY_VERSION, checkpoint.fingerprint, str(candidate), hardware.packages, graph], sort_keys=True
    )
    return root / "parity" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def clear_cache() -> int:
    """Delete every cached parity result; returns how many there were."""
    root = Path(os.environ.get("FASTINSTRUCTOR_CACHE", "~/.cache/fastinstructor")).expanduser() / "parity"
    files = list(root.glob("*.json")) if root.is_dir() else []
    for f in files:
        f.unlink()
    return len(files)


def _topk_agreement(actual: np.ndarray, expected: np.ndarray, k: int = 5) -> float:
    def neighbours(e: np.ndarray) -> np.ndarray:
        sims = e @ e.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :k]

    a, b = neighbours(actual), neighbours(expected)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


def check_parity(
    checkpoint: Checkpoint,
    tokenizer: PairTokenizer,
    backend,
    candidate: Candidate,
    hardware: Hardware,
    *,
    reference=None,
    use_cache: bool = True,
    min_cosine: float | None = None,
) -> ParityResult:
    """The candidate against the float32 reference on the calibration set; cached on disk."""
    path = _cache_path(checkpoint, candidate, hardware, backend)
    if use_cache and path.is_file():
        result = ParityResult(**{**json.loads(path.read_text()), "cached": True})
    else:
        if reference is None:
            from .backends.reference import ReferenceBackend

            reference = ReferenceBackend(checkpoint, device=candidate.device)
        actual_all, expected_all = calibration_embeddings(tokenizer, backend, reference)
        report = compare(actual_all, expected_all)
        tolerance = TOLERANCES[candidate.precision]
        failures = report.failures(tolerance)
        result = ParityResult(
            str(candidate),
            report.rows,
            report.min_cos,
            report.mean_cos,
            report.max_abs,
            _topk_agreement(actual_all, expected_all),
            str(tolerance),
            not failures,
            failures,
        )
        if use_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps({k: v for k, v in asdict(result).items() if k != "cached"}))
            os.replace(tmp, path)
    if min_cosine is not None and result.min_cos < min_cosine:  # a stricter policy than the precision's
        result.passed = False
        result.failures = [*result.failures, f"min cosine {result.min_cos:.6f} < the required {min_cosine}"]
    return result


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
    skipped: list[dict] = []
    if backend != "auto" and precision != "auto":  # fully explicit: exactly this, even off the preference order
        here = "cuda" if hardware.cuda else "cpu"
        wanted = [Candidate(backend, precision, torch.device(device).type if device else here)]
    else:
        wanted = [
            c
            for c in candidates(hardware)
            if backend in ("auto", c.backend)
            and precision in ("auto", c.precision)
            and (device is None or torch.device(device).type == c.device)
            and (allow_int8 or c.precision != "int8" or precision == "int8")
        ]
    reference = None
    for candidate in wanted:
        why = unavailable_reason(candidate, hardware)
        if why is None:
            options = (backend_options or {}) if candidate.backend == "onnx" else {}  # onnx_dir, threads
            try:
                cls = BACKENDS[candidate.backend]
                instance = cls(checkpoint, precision=candidate.precision, device=candidate.device, **options)
            except (ImportError, ValueError, RuntimeError, OSError) as err:
                why = f"failed to start: {err}"
        if why is not None:
            log.info("skipping %s: %s", candidate, why)
            skipped.append({"candidate": str(candidate), "why": why})
            continue
        if candidate.backend == "reference" and candidate.precision == "float32":
            result = None  # the reference is the yardstick itself
        else:
            cached = use_cache and _cache_path(checkpoint, candidate, hardware, instance).is_file()
            if reference is None and not cached:
                from .backends.reference import ReferenceBackend

                reference = ReferenceBackend(checkpoint, device=candidate.device)
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
                "skipped": skipped,
                "hardware": hardware.describe(),
            }
            log.info("chose %s%s", candidate, "" if result is None else f" (min cos {result.min_cos:.6f})")
            return instance, candidate, report
        why = "parity failed: " + "; ".join(result.failures)
        log.warning("skipping %s: %s", candidate, why)
        skipped.append({"candidate": str(candidate), "why": why, "parity": asdict(result)})
        if not allow_fallback:
            break
    tried = "; ".join(f"{s['candidate']}: {s['why']}" for s in skipped) or (
        "nothing: no candidate of this machine matches (its order: "
        + ", ".join(str(c) for c in candidates(hardware))
        + ")"
    )
    raise NoBackendError(
        f"no backend for backend={backend!r}, precision={precision!r}"
        f"{'' if device is None else f', device={device!r}'} on this machine. Tried: {tried}. "
        f"Backends here: {', '.join(f'{n} ({c.availability()[1]})' for n, c in BACKENDS.items())}"
    )
