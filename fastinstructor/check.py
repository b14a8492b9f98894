"""``fastinstructor check`` and the parity of an export: every backend x precision measured on this machine.

Both measure through the one parity routine (``parity.measure``, cached by ``dispatch.check_parity``) and
take their candidates from the backends' capability tables (``dispatch.all_candidates``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from .backends import BACKENDS
from .backends.base import why_not
from .backends.onnx import OnnxBackend
from .checkpoint import Checkpoint
from .dispatch import Candidate, Hardware, all_candidates, check_parity, probe, start_backend
from .parity import ParityResult, calibration_batches, measure
from .tokenization import PairTokenizer, load_tokenizer

__all__ = ["CheckRow", "check_backends", "measure_export"]


@dataclass
class CheckRow:
    candidate: Candidate
    why_not: str | None = None  # None: it runs here
    parity: ParityResult | None = None
    tokens_per_s: float | None = None

    def markdown(self) -> str:
        if self.parity is None:
            return f"| {self.candidate} | no: {self.why_not} | | | | | |"
        p = self.parity
        verdict = "PASS" if p.passed else "FAIL: " + "; ".join(p.failures)
        return (
            f"| {self.candidate} | yes | {p.min_cos:.6f} | {p.mean_cos:.6f} | {p.max_abs:.2e} "
            f"| {p.topk_agreement:.2f} | {self.tokens_per_s:,.0f} | {verdict}{' (cached)' if p.cached else ''} |"
        )


HEADER = (
    "| backend/precision/device | available | min cos | mean cos | max abs | top-5 agreement | tokens/s | parity |\n"
    "|---|---|---|---|---|---|---|---|"
)


def check_backends(
    checkpoint: Checkpoint,
    *,
    backend: str | None = None,
    precision: str | None = None,
    use_cache: bool = True,
    hardware: Hardware | None = None,
) -> list[CheckRow]:
    """Each candidate (restricted to ``backend`` / ``precision``): why it cannot run, or its parity and speed."""
    hardware = hardware or probe()
    tokenizer = PairTokenizer(load_tokenizer(checkpoint.path), checkpoint.max_seq_length)
    batches = [batch for _, batch in calibration_batches(tokenizer)]
    tokens = sum(int(mask.sum()) for _, mask, _ in batches)  # real tokens, padding excluded
    rows: list[CheckRow] = []
    references: dict[str, object] = {}
    for candidate in all_candidates(hardware):
        if backend not in (None, candidate.backend) or precision not in (None, candidate.precision):
            continue
        instance, why = start_backend(checkpoint, candidate, hardware)
        if instance is None:
            rows.append(CheckRow(candidate, why))
            continue
        if candidate.device not in references:
            references[candidate.device] = BACKENDS["reference"](checkpoint, device=candidate.device)
        result = check_parity(
            checkpoint, tokenizer, instance, candidate, hardware, reference=references[candidate.device],
            use_cache=use_cache,
        )  # fmt: skip
        instance.embed(*batches[0])  # warm-up
        start = time.perf_counter()
        for batch in batches:
            instance.embed(*batch)
        rows.append(CheckRow(candidate, None, result, tokens / (time.perf_counter() - start)))
    return rows


def measure_export(checkpoint: Checkpoint, folder: str, precision: str) -> dict:
    """The exported graph in ``folder`` against the float32 reference, on a device where the onnx backend runs
    ``precision`` here; ``{"measured": False, "why": ...}`` where it runs nowhere here."""
    hardware = probe()
    reasons = {
        c.device: why_not(OnnxBackend, precision, c.device, hardware)
        for c in OnnxBackend.capabilities
        if c.precision == precision
    }
    device = next((d for d, why in reasons.items() if why is None), None)
    if device is None:
        return {"measured": False, "why": "; ".join(f"{precision} on {d}: {why}" for d, why in reasons.items())}
    tokenizer = PairTokenizer(load_tokenizer(checkpoint.path), checkpoint.max_seq_length)
    graph = OnnxBackend.from_folder(checkpoint, folder, device)
    reference = BACKENDS["reference"](checkpoint, device=device)
    result = measure(graph, reference, tokenizer, precision, label=f"onnx/{precision}/{device}")
    return {"measured": True, **asdict(result)}
