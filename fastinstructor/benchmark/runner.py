"""The run: the workload's figures, the contenders loaded and warmed up one by one, their passes interleaved, the
ceilings measured, and one row of figures per contender (what ``<workload>.json`` holds)."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Sequence

from .. import compute_thread
from ..batching import plan_batches
from ..parity import TOLERANCES
from .contenders import (
    REFERENCE,
    SENTENCE_TRANSFORMERS,
    Contender,
    fastinstructor_contender,
    measure_parity,
    plan_contenders,
    sentence_transformers_contender,
)
from .machine import environment, source_version
from .roofline import device_kind, encoder_flops, matmul_ceilings
from .timing import end_memory, interleaved, log_stderr, percentile, reset_peak_rss, rss_mib, start_memory
from .workloads import Workload, load_workload

__all__ = ["run_benchmark"]

WARMUP_TEXTS = 8  # the first call's texts; called twice, the difference is the warm-up


def _check_settings(repeat, batch_size, latency_batches, batch_tokens, latency_batch_sizes) -> None:
    if repeat < 1 or batch_size < 1 or latency_batches < 1:
        raise ValueError("--repeat, --batch-size and --latency-batches must be at least 1")
    if any(b < 1 for b in [*batch_tokens, *latency_batch_sizes]):
        raise ValueError("--batch-tokens and --latency-batch-sizes must be positive")


def _loaders(checkpoint, chosen, device, sentence_transformers: bool, skipped: list) -> list:
    """(label, load) per contender: the backends x precisions, then sentence-transformers when installed."""
    loaders = [
        (f"{b} {p}", lambda b=b, p=p: fastinstructor_contender(checkpoint.path, b, p, device)) for b, p in chosen
    ]
    if sentence_transformers:
        try:
            import sentence_transformers as _  # noqa: F401

            loaders.append((SENTENCE_TRANSFORMERS, lambda: sentence_transformers_contender(checkpoint.path, device)))
        except ImportError:
            skipped.append({"backend": SENTENCE_TRANSFORMERS, "precision": "float32", "reason": "not installed"})
    return loaders


def _load(loader, warmup: list, batch_size: int, budget: int, log) -> Contender:
    """Load one contender, timing the load, the memory it added, and its first call against its second."""
    gc.collect()  # what earlier contenders left behind is not this one's
    rss = rss_mib()
    start = time.perf_counter()
    contender = loader()
    contender.load_s = time.perf_counter() - start
    after = rss_mib()
    contender.load_mib = None if rss is None or after is None else after - rss
    calls = []
    for _ in range(2):
        start = time.perf_counter()
        contender.encode(warmup, batch_size, budget)
        calls.append(time.perf_counter() - start)
    contender.first_call_s, contender.warmup_s = calls[0], max(0.0, calls[0] - calls[1])  # < 0: noise
    log(f"loaded {contender.name} in {contender.load_s:.1f} s; first call {calls[0]:.2f} s, second {calls[1]:.2f} s")
    return contender


def _load_all(loaders, tokenizer, warmup, batch_size: int, budget: int, skipped: list, log) -> list[Contender]:
    contenders: list[Contender] = []
    for label, loader in loaders:
        try:
            contender = _load(loader, warmup, batch_size, budget, log)
            measure_parity(contender, contenders[0] if contenders else contender, tokenizer)
        except Exception as err:  # one backend failing to load (or its parity check) must not sink the run
            if label.startswith(REFERENCE):
                raise
            skipped.append({"backend": label, "precision": "", "reason": f"{type(err).__name__}: {err}"[:300]})
            log(f"skipped {label}: {err}")
            continue
        contenders.append(contender)
    return contenders


def _chunks(pairs: list, size: int, count: int) -> list[list]:
    """``count`` consecutive batches of ``size`` pairs, wrapping around a short workload."""
    return [[pairs[(i * size + j) % len(pairs)] for j in range(size)] for i in range(count)]


def _time_passes(
    contenders, work: Workload, batch_size, batch_tokens, latency_batch_sizes, latency_batches, repeat, log
):
    """Interleaved passes: per contender, the raw times (throughput per budget, latency per size), the peak
    memory of each throughput pass, and the load averages."""
    # One "pass" of a contender: the throughput passes (each budget) then the latency batches (each size).
    chunks = {size: _chunks(work.pairs, size, latency_batches) for size in latency_batch_sizes}
    raw = {c.name: {"throughput": {b: [] for b in batch_tokens}, "latency": {}} for c in contenders}
    peaks = {c.name: [] for c in contenders}
    tracks_peak = reset_peak_rss()

    def one_pass(c: Contender) -> None:
        for budget in batch_tokens:
            before = start_memory(c.device)
            start = time.perf_counter()
            c.encode(work.pairs, batch_size, budget)
            raw[c.name]["throughput"][budget].append(time.perf_counter() - start)
            peaks[c.name].append(end_memory(c.device, before, tracks_peak))
        for size, batches in chunks.items():
            for batch in batches:
                start = time.perf_counter()
                c.encode(batch, size, None)
                raw[c.name]["latency"].setdefault(size, []).append(time.perf_counter() - start)

    _, loadavg, _ = interleaved({c.name: (lambda c=c: one_pass(c)) for c in contenders}, repeat, log)
    return raw, peaks, loadavg


def _ceilings(contenders: list[Contender], ceiling_size: int | None) -> dict[str, dict]:
    """Device kind -> precision -> the matmul ceiling's figures, for the precisions the contenders ran."""
    ceilings = {}
    for kind in dict.fromkeys(device_kind(c.device) for c in contenders):
        ceilings[kind] = matmul_ceilings(
            sorted({c.precision for c in contenders if device_kind(c.device) == kind}),
            kind,
            ceiling_size or (8192 if kind == "cuda" else 2048),
        )
    return ceilings


def _parity(c: Contender) -> dict:
    """The parity columns: the reference is the baseline, every other contender has ``parity.measure``'s figures."""
    if c.parity is None:
        return {
            "min_cos": 1.0,
            "mean_cos": 1.0,
            "max_abs": 0.0,
            "tolerance": str(TOLERANCES["float32"]),
            "parity": "baseline",
        }
    p = c.parity
    return {
        "min_cos": p["min_cos"],
        "mean_cos": p["mean_cos"],
        "max_abs": p["max_abs"],
        "tolerance": p["tolerance"],
        "parity": "PASS" if p["passed"] else "FAIL",
        "parity_result": p,
    }


def _row(c: Contender, raw: dict, peaks: list, loadavg: list, medians: dict, figures: dict) -> dict:
    """Every figure of one contender; ``medians`` holds every contender's, for the ratios."""
    budgets = list(raw["throughput"])
    budget0, real_tokens, ceilings = budgets[0], figures["real_tokens"], figures["ceilings"]
    times, med = raw["throughput"][budget0], medians[c.name][budget0]
    ceiling = ceilings[device_kind(c.device)].get(c.precision, {}).get("gflops")
    achieved = figures["flops"] / med / 1e9
    mem = [p for p in peaks if p is not None]
    return {
        "name": c.name,
        "backend": c.backend,
        "precision": c.precision,
        "device": c.device,
        "load_s": c.load_s,
        "first_call_s": c.first_call_s,
        "warmup_s": c.warmup_s,
        "load_mib": c.load_mib,
        "run_peak_mib": max(mem) if mem else None,
        "throughput": {
            str(budget): {
                "times_s": raw["throughput"][budget],
                "median_s": medians[c.name][budget],
                "tokens_per_s": real_tokens / medians[c.name][budget],
            }
            for budget in budgets
        },
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "texts_per_s": figures["texts"] / med,
        "tokens_per_s": real_tokens / med,
        "vs_reference": medians[REFERENCE][budget0] / med,
        "vs_sentence_transformers": (
            medians[SENTENCE_TRANSFORMERS][budget0] / med if SENTENCE_TRANSFORMERS in medians else None
        ),
        "achieved_gflops": achieved,
        "ceiling_gflops": ceiling,
        "roofline_fraction": achieved / ceiling if ceiling else None,
        "latency": {
            str(size): {
                "times_s": values,
                "p50_ms": 1000 * percentile(values, 50),
                "p99_ms": 1000 * percentile(values, 99),
            }
            for size, values in raw["latency"].items()
        },
        "loadavg_1m_after": loadavg,
        **_parity(c),
    }


def _workload_record(work: Workload, lengths: list[int], padded: dict) -> dict:
    return {
        "name": work.name,
        "source": work.source,
        "texts": len(work.pairs),
        "real_tokens": sum(lengths),
        "padded_tokens": {str(b): tokens for b, tokens in padded.items()},
        "length_min_median_max": [min(lengths), statistics.median(lengths), max(lengths)],
        "instructions": sorted({instruction for instruction, _ in work.pairs}),
    }


def _model_record(checkpoint, dense_out: int | None) -> dict:
    config = checkpoint.config
    return {
        "d_model": config.d_model,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "d_kv": config.d_kv,
        "d_ff": config.d_ff,
        "dense_out": dense_out,
    }


# Every contender (sentence-transformers, the reference, the ceilings' matmuls too) on the thread the cpu backend
# computes on: PyTorch work on a second thread would slow them all (fastinstructor.compute_thread).
@compute_thread.on_compute_thread
def run_benchmark(
    model: str | os.PathLike,
    *,
    backends: Sequence[str] = ("reference", "cpu", "onnx", "triton"),
    precisions: Sequence[str] | None = None,
    workload: str = "evidence",
    texts: int = 256,
    instruction: str | None = None,
    batch_tokens: Sequence[int] = (8192,),
    batch_size: int = 32,
    latency_batch_sizes: Sequence[int] = (1, 8, 32),
    latency_batches: int = 8,
    repeat: int = 3,
    sentence_transformers: bool = True,
    device: str | None = None,
    ceiling_size: int | None = None,
    command: str | None = None,
    log=log_stderr,
) -> dict:
    """Run the benchmark and return every figure (what ``<workload>.json`` holds)."""
    from ..checkpoint import load_checkpoint
    from ..tokenization import PairTokenizer, load_tokenizer

    _check_settings(repeat, batch_size, latency_batches, batch_tokens, latency_batch_sizes)
    chosen, skipped = plan_contenders(backends, precisions, device)  # an unknown backend or precision fails first
    checkpoint = load_checkpoint(model)
    tokenizer = PairTokenizer(load_tokenizer(checkpoint.path), checkpoint.max_seq_length)
    work = load_workload(workload, texts, tokenizer, instruction)
    lengths = [len(row) for row in tokenizer(work.pairs).ids]
    real_tokens = sum(lengths)
    dense_out = checkpoint.out_dim if checkpoint.dense_weight is not None else None
    flops = encoder_flops(checkpoint.config, lengths, dense_out)
    padded = {
        budget: sum(len(rows) * max(lengths[i] for i in rows) for rows in plan_batches(lengths, batch_size, budget))
        for budget in batch_tokens
    }
    log(f"workload {work.name}: {len(work.pairs)} texts, {real_tokens} real tokens, {flops / 1e9:.1f} GFLOP per pass")

    loaders = _loaders(checkpoint, chosen, device, sentence_transformers, skipped)
    contenders = _load_all(loaders, tokenizer, work.pairs[:WARMUP_TEXTS], batch_size, batch_tokens[0], skipped, log)
    raw, peaks, loadavg = _time_passes(
        contenders, work, batch_size, batch_tokens, latency_batch_sizes, latency_batches, repeat, log
    )
    ceilings = _ceilings(contenders, ceiling_size)
    medians = {name: {b: statistics.median(t) for b, t in r["throughput"].items()} for name, r in raw.items()}
    figures = {"real_tokens": real_tokens, "texts": len(work.pairs), "flops": flops, "ceilings": ceilings}
    rows = [_row(c, raw[c.name], peaks[c.name], loadavg[c.name], medians, figures) for c in contenders]
    return {
        "command": command,
        "model": str(checkpoint.path),
        "model_config": _model_record(checkpoint, dense_out),
        "workload": _workload_record(work, lengths, padded),
        "settings": {
            "batch_tokens": list(batch_tokens),
            "batch_size": batch_size,
            "latency_batch_sizes": list(latency_batch_sizes),
            "latency_batches": latency_batches,
            "repeat": repeat,
        },
        "flops_per_pass": flops,
        "flops_per_token": flops / real_tokens,
        "ceilings": ceilings,
        "rows": rows,
        "skipped": skipped,
        "environment": environment(),
        "source": source_version(),
    }
