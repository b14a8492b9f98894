"""``fastinstructor bench``: every backend x precision on one workload, in one process, as ratios and rooflines.

For each contender (fastinstructor's backends at the requested precisions, the float32 ``reference`` always,
and sentence-transformers' native INSTRUCTOR mode when installed) the run records:

- load time, and warm-up time (the first call on a few texts less the second), apart from the timed passes;
- throughput: full passes over the workload per token budget, repeated and interleaved (A B C, A B C, ...) so
  that drift on a shared machine hits every contender alike; medians with the spread; real tokens/s counts the
  token ids of the inputs (instruction, text, ``</s>``), never padding;
- latency: per-batch wall time of small batches (serving-like), p50 and p99;
- memory: resident memory added by loading, and the peak above it while running (Linux; GPU: torch's peak);
- the roofline: the model's matmul FLOPs at the workload's real lengths (:func:`encoder_flops`), the machine's
  ceilings measured in the same run (a large float32 / bfloat16 / float16 / int8 matmul on the same device), and
  each contender's achieved fraction of the ceiling of its precision;
- parity against the reference (DESIGN section 5's tolerance for the contender's precision).

Output: a Markdown table on stdout, and ``<workload>.json`` (every raw figure and the environment),
``<workload>.md`` and ``<workload>.png`` in ``<out>/<date>-<host>/``.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backends import BACKENDS
from .batching import plan_batches
from .checkpoint import EncoderConfig
from .data import read_jsonl_texts, sample_passages, shared_data_dir
from .parity import TOLERANCES, compare

__all__ = [
    "WORKLOADS",
    "Workload",
    "load_workload",
    "encoder_flops",
    "matmul_ceilings",
    "run_benchmark",
    "load_sentence_transformers",
    "environment",
    "interleaved",
    "markdown_table",
]

CLAIM_INSTRUCTION = "Represent the climate claim for retrieving supporting documents:"
EVIDENCE_INSTRUCTION = "Represent the Wikipedia document for retrieval:"
ARTICLE_INSTRUCTION = "Represent the Wikipedia article for retrieval:"
# name -> (file in the shared data folder, its instruction)
WORKLOADS = {
    "claims": ("climate_fever_claims.jsonl", CLAIM_INSTRUCTION),
    "evidence": ("climate_fever_evidence.jsonl", EVIDENCE_INSTRUCTION),
    "articles": ("climate_fever_articles.jsonl", ARTICLE_INSTRUCTION),
}
REFERENCE = "reference"
SENTENCE_TRANSFORMERS = "sentence-transformers"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
ST_BATCH_SIZE = 32  # sentence-transformers' default
WARMUP_TEXTS = 8  # the first call's texts; called twice, the difference is the warm-up


# ---------------------------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    name: str
    pairs: list[list[str]]  # [instruction, text], in order
    source: str


def load_workload(spec: str, texts: int, tokenizer, instruction: str | None = None) -> Workload:
    """``claims``, ``evidence``, ``articles``, ``mixed`` (the three interleaved), ``synthetic:L`` (every input
    exactly L tokens) or the path of a file (JSON Lines, CSV, TSV, Parquet or text; ``instruction`` for all rows).
    """
    if texts < 1:
        raise ValueError(f"--texts must be at least 1, got {texts}")
    if spec.startswith("synthetic:"):
        return _synthetic(spec, texts, tokenizer, instruction or EVIDENCE_INSTRUCTION)
    if spec in WORKLOADS or spec == "mixed":
        data = shared_data_dir()
        if data is None:
            raise FileNotFoundError(
                f"workload {spec!r} reads the shared climate-fever data, which was not found; set "
                "FASTINSTRUCTOR_DATA to its folder, or use --workload synthetic:L or --workload <your file>"
            )
        names = list(WORKLOADS) if spec == "mixed" else [spec]
        groups = []
        for name in names:
            file, default_instruction = WORKLOADS[name]
            rows = read_jsonl_texts(data / file, texts)
            groups.append([[instruction or default_instruction, text] for _, text in rows])
        pairs = [row for rows in _round_robin(groups) for row in rows][:texts]
        return Workload(spec, pairs, ", ".join(str(data / WORKLOADS[n][0]) for n in names))
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"workload {spec!r} is neither one of {', '.join([*WORKLOADS, 'mixed', 'synthetic:L'])} nor a file"
        )
    from .readers import CorpusReader, InputSpec

    pairs = []
    for row in CorpusReader(InputSpec(str(path))):
        if len(pairs) >= texts:
            break
        if row.error is None:
            pairs.append([row.instruction or instruction or EVIDENCE_INSTRUCTION, row.text])
    if not pairs:
        raise ValueError(f"workload file {path} has no usable rows")
    return Workload(path.stem, pairs, str(path))


def _round_robin(groups: list[list[list[str]]]):
    for i in range(max(len(g) for g in groups)):
        yield [g[i] for g in groups if i < len(g)]


def _synthetic(spec: str, texts: int, tokenizer, instruction: str) -> Workload:
    """Texts of real words whose pairs tokenize to exactly L tokens (each found by bisection on word count)."""
    try:
        length = int(spec.split(":", 1)[1])
    except ValueError:
        raise ValueError(
            f"workload {spec!r}: expected synthetic:L with L a number of tokens, e.g. synthetic:128"
        ) from None
    floor = len(tokenizer([[instruction, ""]]).ids[0])
    if not floor < length <= tokenizer.max_length:
        raise ValueError(
            f"workload {spec!r}: L must be between {floor + 1} (the instruction and </s>) and the model's "
            f"max_seq_length {tokenizer.max_length}"
        )
    passages, source = sample_passages(200)
    words = " ".join(text for _, text in passages).split()
    words *= 1 + 16 * length // len(words)  # enough for every start offset below, even from a short source

    def count(text: str) -> int:
        return len(tokenizer([[instruction, text]]).ids[0])

    def fit(start: int) -> str:
        lo, hi = 0, 4 * length  # words; each word is at least one token
        while lo < hi:  # the most words from ``start`` staying within L tokens
            mid = (lo + hi + 1) // 2
            if count(" ".join(words[start : start + mid])) <= length:
                lo = mid
            else:
                hi = mid - 1
        return " ".join(words[start : start + lo])

    pairs = []
    for i in range(texts):
        start = (i * 37) % max(1, len(words) - 8 * length)
        for shift in range(64):  # a multi-token last word can leave a gap: start one word later
            text = fit(start + shift)
            if count(text) == length:
                break
        pairs.append([instruction, text])
    return Workload(spec.replace(":", "-"), pairs, "synthetic: words of " + source)


# ---------------------------------------------------------------------------------------------- roofline


def encoder_flops(config: EncoderConfig, lengths: Sequence[int], dense_out: int | None) -> int:
    """Matmul FLOPs (2 per multiply-add) to embed sequences of these real lengths, padding excluded.

    Per layer and sequence of n tokens: the q, k, v, o projections 8 n d_model inner, the ReLU feed-forward
    4 n d_model d_ff, and attention's two products (scores, weighted values) 4 n^2 inner, with inner =
    heads x d_kv; then the Dense head 2 d_model dense_out per sequence. Norms, softmax, the bias and pooling
    are elementwise and left out.
    """
    d, inner, ff = config.d_model, config.inner_dim, config.d_ff
    total = 0
    for n in lengths:
        total += config.num_layers * (8 * n * d * inner + 4 * n * d * ff + 4 * n * n * inner)
        total += 2 * d * dense_out if dense_out else 0
    return total


_CEILING_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}


def matmul_ceilings(precisions: Sequence[str], device: str = "cpu", size: int = 2048, repeat: int = 3) -> dict:
    """GFLOP/s of a large ``size``-cube matmul per precision on ``device``: the best library, best of ``repeat``.

    Each library the backends use is measured and the fastest counts, so that no backend can beat its ceiling
    by using a faster GEMM than the one measured: torch (``a @ a``; int8 is ``torch._int_mm``, int8 x int8 ->
    int32, what VNNI / AMX / tensor cores run) and, on the CPU, oneDNN with a prepacked weight (the cpu
    backend's ``PackedLinear``) and ONNX Runtime (``MatMul``; int8 is ``MatMulInteger`` on uint8 x int8, as its
    dynamically quantized graphs run). A precision nothing here can
    multiply in is recorded with the reason instead of a figure.
    """
    out = {}
    for precision in dict.fromkeys(precisions):
        by, errors = {}, []
        runners = {"torch": _torch_matmul(precision, device, size)}
        if not device.startswith("cuda") and precision in ("float32", "bfloat16"):
            runners["onednn"] = _onednn_matmul(precision, size)
        if not device.startswith("cuda") and precision in ("float32", "int8"):
            runners["onnxruntime"] = _onnxruntime_matmul(precision, size)
        for library, make in runners.items():
            try:
                run = make()
                if run is None:
                    continue
                run()  # warm-up
                best = math.inf
                for _ in range(repeat):
                    _sync(device)
                    start = time.perf_counter()
                    run()
                    _sync(device)
                    best = min(best, time.perf_counter() - start)
                by[library] = 2 * size**3 / best / 1e9
            except (RuntimeError, NotImplementedError) as err:
                errors.append(f"{library}: {type(err).__name__}: {err}"[:200])
        out[precision] = {"gflops": max(by.values()) if by else None, "by_library": by, "size": size}
        if errors:
            out[precision]["errors"] = errors
    return out


def _torch_matmul(precision: str, device: str, size: int):
    def make():
        if precision == "int8":
            a, b = (torch.randint(-128, 128, (size, size), dtype=torch.int8, device=device) for _ in range(2))
            # b transposed, as a Linear's [N, K] weight: the layout cuBLAS and oneDNN's int8 GEMMs are fast in.
            return lambda: torch._int_mm(a, b.t())
        a = torch.randn(size, size, device=device).to(_CEILING_DTYPES[precision])
        return lambda: a @ a

    return make


def _onednn_matmul(precision: str, size: int):
    def make():
        from .backends.cpu import PackedLinear

        if not PackedLinear.available():
            return None
        dtype = _CEILING_DTYPES[precision]
        a, linear = torch.randn(size, size).to(dtype), PackedLinear(torch.randn(size, size).to(dtype))
        return lambda: linear(a)

    return make


def _onnxruntime_matmul(precision: str, size: int):
    def make():
        try:
            import onnxruntime as ort
            from onnx import TensorProto, helper
        except ImportError:
            return None
        if precision == "int8":
            node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
            types = (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32)
            feeds = {
                "a": np.random.randint(0, 256, (size, size), dtype=np.uint8),
                "b": np.random.randint(-128, 128, (size, size), dtype=np.int8),
            }
        else:
            node = helper.make_node("MatMul", ["a", "b"], ["y"])
            types = (TensorProto.FLOAT,) * 3
            feeds = {name: np.random.randn(size, size).astype(np.float32) for name in ("a", "b")}
        graph = helper.make_graph(
            [node],
            "matmul",
            [helper.make_tensor_value_info(n, t, [size, size]) for n, t in zip("ab", types[:2], strict=True)],
            [helper.make_tensor_value_info("y", types[2], [size, size])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return lambda: session.run(None, feeds)

    return make


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- memory


def _proc_status_mib(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: set the peak resident set (VmHWM) to the current one, so the next read is this run's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- contenders


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


def _fastinstructor_contender(model_path, backend: str, precision: str, device: str | None) -> Contender:
    from .model import load

    model = load(model_path, backend=backend, precision=precision, device=device)

    def encode(pairs, rows, budget):
        return model.encode(pairs, batch_size=rows, max_batch_tokens=budget)

    name = backend if backend == REFERENCE else f"{backend} {precision}"
    return Contender(name, backend, precision, encode, device=str(getattr(model.backend, "device", "cpu")))


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


def _sentence_transformers_contender(model_path, device: str | None) -> Contender:
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

    return Contender(SENTENCE_TRANSFORMERS, SENTENCE_TRANSFORMERS, "float32", encode, device=str(model.device))


def plan_contenders(
    backends: Sequence[str], precisions: Sequence[str] | None, device: str | None
) -> tuple[list[tuple[str, str]], list[dict]]:
    """(backend, precision) pairs to run, and the ones skipped with why. The reference always runs first."""
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    chosen, skipped = [(REFERENCE, "float32")], []
    for backend in backends:
        if backend == REFERENCE:
            continue
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        cls = BACKENDS[backend]
        ok, why = cls.availability()
        if not ok:
            skipped.append({"backend": backend, "precision": "*", "reason": why})
            continue
        supported = list(cls.precisions)
        if backend == "onnx":  # float16 graphs run on CUDA only, int8 ones on the CPU only
            supported = [p for p in supported if p != ("int8" if cuda else "float16")]
        for precision in precisions or supported:
            if precision in supported:
                chosen.append((backend, precision))
            else:
                reason = f"supports {', '.join(supported)} on this device"
                skipped.append({"backend": backend, "precision": precision, "reason": reason})
    return chosen, skipped


# ---------------------------------------------------------------------------------------------- the run


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def interleaved(runs: dict[str, Callable[[], object]], repeat: int, log=_stderr) -> tuple[dict, dict, dict]:
    """Time each run ``repeat`` times as A B C, A B C, ...; return times, load averages and last results.

    The machines are shared: the 1-minute load average after each pass shows when other work took the CPU.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    loadavg: dict[str, list[float]] = {name: [] for name in runs}
    last: dict[str, object] = {}
    for r in range(repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            last[name] = run()
            times[name].append(time.perf_counter() - start)
            loadavg[name].append(os.getloadavg()[0])
            log(f"repeat {r + 1}/{repeat} {name}: {times[name][-1]:.2f} s")
    return times, loadavg, last


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


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
    log=_stderr,
) -> dict:
    """Run the benchmark and return every figure (what ``<workload>.json`` holds)."""
    from .checkpoint import load_checkpoint
    from .tokenization import PairTokenizer, load_tokenizer

    if repeat < 1 or batch_size < 1 or latency_batches < 1:
        raise ValueError("--repeat, --batch-size and --latency-batches must be at least 1")
    if any(b < 1 for b in [*batch_tokens, *latency_batch_sizes]):
        raise ValueError("--batch-tokens and --latency-batch-sizes must be positive")
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

    chosen, skipped = plan_contenders(backends, precisions, device)
    contenders: list[Contender] = []
    loaders = [
        (f"{b} {p}", lambda b=b, p=p: _fastinstructor_contender(checkpoint.path, b, p, device)) for b, p in chosen
    ]
    if sentence_transformers:
        try:
            import sentence_transformers as _  # noqa: F401

            loaders.append((SENTENCE_TRANSFORMERS, lambda: _sentence_transformers_contender(checkpoint.path, device)))
        except ImportError:
            skipped.append({"backend": SENTENCE_TRANSFORMERS, "precision": "float32", "reason": "not installed"})
    warmup = work.pairs[:WARMUP_TEXTS]
    for label, loader in loaders:
        gc.collect()  # what earlier contenders left behind is not this one's
        rss = _proc_status_mib("VmRSS")
        start = time.perf_counter()
        try:
            contender = loader()
        except Exception as err:  # one backend failing to load (or its parity check) must not sink the run
            if label.startswith(REFERENCE):
                raise
            skipped.append({"backend": label, "precision": "", "reason": f"{type(err).__name__}: {err}"[:300]})
            log(f"skipped {label}: {err}")
            continue
        contender.load_s = time.perf_counter() - start
        after = _proc_status_mib("VmRSS")
        contender.load_mib = None if rss is None or after is None else after - rss
        calls = []
        for _ in range(2):
            start = time.perf_counter()
            contender.encode(warmup, batch_size, batch_tokens[0])
            calls.append(time.perf_counter() - start)
        contender.first_call_s, contender.warmup_s = calls[0], max(0.0, calls[0] - calls[1])  # < 0: noise
        contenders.append(contender)
        log(
            f"loaded {contender.name} in {contender.load_s:.1f} s; first call {calls[0]:.2f} s, second {calls[1]:.2f} s"
        )

    # One "pass" of a contender: the throughput passes (each budget) then the latency batches (each size).
    chunks = {size: _chunks(work.pairs, size, latency_batches) for size in latency_batch_sizes}
    runs, raw = {}, {c.name: {"throughput": {b: [] for b in batch_tokens}, "latency": {}} for c in contenders}
    peaks = {c.name: [] for c in contenders}
    tracks_peak = _reset_peak_rss()
    for c in contenders:

        def one_pass(c=c):
            results = {}
            for budget in batch_tokens:
                before = _start_memory(c.device)
                start = time.perf_counter()
                results[budget] = c.encode(work.pairs, batch_size, budget)
                raw[c.name]["throughput"][budget].append(time.perf_counter() - start)
                peaks[c.name].append(_end_memory(c.device, before, tracks_peak))
            for size, batches in chunks.items():
                for batch in batches:
                    start = time.perf_counter()
                    c.encode(batch, size, None)
                    raw[c.name]["latency"].setdefault(size, []).append(time.perf_counter() - start)
            return results

        runs[c.name] = one_pass
    _, loadavg, last = interleaved(runs, repeat, log)

    ceilings: dict[str, dict] = {}  # device kind -> precision -> figures
    for kind in dict.fromkeys(_kind(c.device) for c in contenders):
        ceilings[kind] = matmul_ceilings(
            sorted({c.precision for c in contenders if _kind(c.device) == kind}),
            kind,
            ceiling_size or (8192 if kind == "cuda" else 2048),
        )
    budget0 = batch_tokens[0]
    medians = {name: {b: statistics.median(t) for b, t in r["throughput"].items()} for name, r in raw.items()}
    rows = []
    for c in contenders:
        times = raw[c.name]["throughput"][budget0]
        med = medians[c.name][budget0]
        report = compare(last[c.name][budget0], last[REFERENCE][budget0])
        tolerance = TOLERANCES[c.precision]
        ceiling = ceilings[_kind(c.device)].get(c.precision, {}).get("gflops")
        achieved = flops / med / 1e9
        mem = [p for p in peaks[c.name] if p is not None]
        rows.append(
            {
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
                        "times_s": raw[c.name]["throughput"][budget],
                        "median_s": medians[c.name][budget],
                        "tokens_per_s": real_tokens / medians[c.name][budget],
                    }
                    for budget in batch_tokens
                },
                "median_s": med,
                "min_s": min(times),
                "max_s": max(times),
                "texts_per_s": len(work.pairs) / med,
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
                        "p50_ms": 1000 * _percentile(values, 50),
                        "p99_ms": 1000 * _percentile(values, 99),
                    }
                    for size, values in raw[c.name]["latency"].items()
                },
                "loadavg_1m_after": loadavg[c.name],
                "min_cos": report.min_cos,
                "mean_cos": report.mean_cos,
                "max_abs": report.max_abs,
                "tolerance": str(tolerance),
                "parity": "baseline" if c.name == REFERENCE else ("FAIL" if report.failures(tolerance) else "PASS"),
            }
        )
    return {
        "command": command,
        "model": str(checkpoint.path),
        "model_config": {
            "d_model": checkpoint.config.d_model,
            "num_layers": checkpoint.config.num_layers,
            "num_heads": checkpoint.config.num_heads,
            "d_kv": checkpoint.config.d_kv,
            "d_ff": checkpoint.config.d_ff,
            "dense_out": dense_out,
        },
        "workload": {
            "name": work.name,
            "source": work.source,
            "texts": len(work.pairs),
            "real_tokens": real_tokens,
            "padded_tokens": {str(b): padded[b] for b in batch_tokens},
            "length_min_median_max": [min(lengths), statistics.median(lengths), max(lengths)],
            "instructions": sorted({instruction for instruction, _ in work.pairs}),
        },
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


def _kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def _chunks(pairs: list, size: int, count: int) -> list[list]:
    """``count`` consecutive batches of ``size`` pairs, wrapping around a short workload."""
    return [[pairs[(i * size + j) % len(pairs)] for j in range(size)] for i in range(count)]


def _start_memory(device: str) -> float | None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    _reset_peak_rss()
    return _proc_status_mib("VmRSS")


def _end_memory(device: str, before: float | None, tracks_peak: bool) -> float | None:
    """The peak above the memory in use when the pass began (MiB): working memory of one pass."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20 - before
    peak = _proc_status_mib("VmHWM")
    return peak - before if tracks_peak and peak is not None and before is not None else None


# ---------------------------------------------------------------------------------------------- environment


def environment() -> dict[str, object]:
    """CPU model and flags, GPU, thread count and library versions."""
    import transformers

    from . import __version__

    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    fields: dict[str, str] = {}  # the last CPU's values; keys are padded with tabs in /proc/cpuinfo
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__}
    for name in ("onnxruntime", "sentence_transformers", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        "cpu_model": fields.get("model name", platform.processor()),
        "cpu_count": os.cpu_count(),
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "fastinstructor": __version__,
        **versions,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
    }


def source_version() -> dict[str, object]:
    """The checkout's commit, and whether the package differs from it (None outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        # --no-optional-locks: read only, never refresh the index of a checkout others are working in.
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=root, capture_output=True, text=True)

    try:
        head = git("rev-parse", "HEAD")
    except OSError:  # no git
        return {"git_commit": None, "package_modified": None}
    if head.returncode != 0:
        return {"git_commit": None, "package_modified": None}
    return {
        "git_commit": head.stdout.strip(),
        "package_modified": git("diff", "--quiet", "HEAD", "--", "fastinstructor").returncode != 0,
    }


# ---------------------------------------------------------------------------------------------- reports


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def report_markdown(result: dict) -> str:
    """The tables: throughput and roofline, latency, ceilings; then the setup and what was skipped."""
    rows = result["rows"]
    budget = str(result["settings"]["batch_tokens"][0])
    throughput = markdown_table(
        [
            "contender",
            "load s",
            "warm-up s",
            "median s",
            "min–max s",
            "texts/s",
            "real tokens/s",
            "× reference",
            "× sent-tr",
            "GFLOP/s",
            "of ceiling",
            "load MiB",
            "run MiB",
            "min cos",
            "parity",
        ],
        [
            [
                r["name"],
                f"{r['load_s']:.1f}",
                f"{r['warmup_s']:.2f}",
                f"{r['median_s']:.2f}",
                f"{r['min_s']:.2f}–{r['max_s']:.2f}",
                f"{r['texts_per_s']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['vs_reference']:.2f}",
                _fmt(r["vs_sentence_transformers"], ".2f"),
                f"{r['achieved_gflops']:.1f}",
                _fmt(r["roofline_fraction"] and 100 * r["roofline_fraction"], ".1f") + " %",
                _fmt(r["load_mib"], ".0f"),
                _fmt(r["run_peak_mib"], ".0f"),
                f"{r['min_cos']:.6f}",
                r["parity"],
            ]
            for r in rows
        ],
    )
    budgets = [str(b) for b in result["settings"]["batch_tokens"]]
    by_budget = ""
    if len(budgets) > 1:
        padded_tokens = result["workload"]["padded_tokens"]
        by_budget = "\n\nReal tokens/s by token budget (padding efficiency of the plan):\n\n" + markdown_table(
            ["contender", *[f"{b} ({result['workload']['real_tokens'] / padded_tokens[b]:.2f})" for b in budgets]],
            [[r["name"], *[f"{r['throughput'][b]['tokens_per_s']:,.0f}" for b in budgets]] for r in rows],
        )
    sizes = [str(s) for s in result["settings"]["latency_batch_sizes"]]
    latency = markdown_table(
        ["contender", *[f"batch {s}: p50 / p99 ms" for s in sizes]],
        [
            [r["name"], *[f"{r['latency'][s]['p50_ms']:.1f} / {r['latency'][s]['p99_ms']:.1f}" for s in sizes]]
            for r in rows
        ],
    )
    ceilings = markdown_table(
        ["device", "precision", "ceiling GFLOP/s", "torch", "oneDNN packed", "onnxruntime", "size"],
        [
            [
                kind,
                p,
                _fmt(c["gflops"], ".0f", "; ".join(c.get("errors", ["n/a"]))),
                _fmt(c["by_library"].get("torch"), ".0f", "–"),
                _fmt(c["by_library"].get("onednn"), ".0f", "–"),
                _fmt(c["by_library"].get("onnxruntime"), ".0f", "–"),
                f"{c['size']}³",
            ]
            for kind, figures in result["ceilings"].items()
            for p, c in figures.items()
        ],
    )
    w, env = result["workload"], result["environment"]
    padded = w["padded_tokens"][budget]
    flags = ", ".join(flag for flag, present in env["cpu_flags"].items() if present) or "none of note"
    skipped = "".join(f"\n- {s['backend']} {s['precision']}: {s['reason']}" for s in result["skipped"])
    settings = result["settings"]
    return (
        f"Workload `{w['name']}`: {w['texts']} texts, {w['real_tokens']:,} real tokens (lengths "
        f"{w['length_min_median_max'][0]}/{w['length_min_median_max'][1]:.0f}/{w['length_min_median_max'][2]} "
        f"min/median/max; {padded:,} padded tokens at a {budget}-token budget, padding efficiency "
        f"{w['real_tokens'] / padded:.2f}), {result['flops_per_token'] / 1e6:.1f} MFLOP per token. Throughput: "
        f"median of {settings['repeat']} interleaved passes, batches of at most {settings['batch_size']} rows and "
        f"{budget} padded tokens (sentence-transformers: its default {ST_BATCH_SIZE} rows in its own length "
        "order). Real tokens/s excludes padding; GFLOP/s counts the matmul FLOPs of the real tokens; "
        "`of ceiling` is that against the matmul ceiling of the contender's precision below. Memory: MiB added "
        "by loading, and the peak above the start of a pass.\n\n"
        f"{throughput}{by_budget}\n\nLatency of {settings['latency_batches']} consecutive batches per size and pass "
        f"(serving-like):\n\n{latency}\n\nMatmul ceilings measured in this run (the fastest library counts):"
        f"\n\n{ceilings}\n\n"
        f"Machine: {env['cpu_model']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads; {flags})"
        f"{'; GPU ' + env['gpu'] if env['gpu'] else ''}. torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
        f"transformers {env['transformers']}, sentence-transformers {env['sentence_transformers']}, "
        f"fastinstructor {env['fastinstructor']} (commit {str(result['source']['git_commit'])[:12]}"
        f"{', package modified' if result['source']['package_modified'] else ''}). Highest 1-minute load average "
        f"after a pass: {max(max(r['loadavg_1m_after']) for r in rows):.1f}."
        + (f"\n\nNot run:{skipped}" if skipped else "")
        + "\n"
    )


def plot(result: dict, path: Path) -> bool:
    """Throughput by contender (median, min–max) and latency against batch size; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    names = [r["name"] for r in rows]
    medians = [r["tokens_per_s"] for r in rows]
    tokens = result["workload"]["real_tokens"]
    low = [m - tokens / r["max_s"] for m, r in zip(medians, rows, strict=True)]
    high = [tokens / r["min_s"] - m for m, r in zip(medians, rows, strict=True)]
    left.barh(names, medians, xerr=[low, high], color="tab:blue", alpha=0.8)
    left.invert_yaxis()
    left.set_xlabel("real tokens/s (median, min–max)")
    left.set_title(f"Throughput, workload {result['workload']['name']}")
    sizes = result["settings"]["latency_batch_sizes"]
    for r in rows:
        right.plot(sizes, [r["latency"][str(s)]["p50_ms"] for s in sizes], marker="o", label=r["name"])
    right.set_xscale("log", base=2)
    right.set_xticks(sizes, [str(size) for size in sizes])
    right.set_yscale("log")
    right.set_xlabel("batch size (texts)")
    right.set_ylabel("p50 latency per batch (ms)")
    right.set_title("Latency against batch size")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(result: dict, out: Path) -> list[Path]:
    """``<workload>.json``, ``.md`` and ``.png`` in ``out/<date>-<host>/``; returns the paths written."""
    import json

    folder = out / f"{datetime.date.today().isoformat()}-{socket.gethostname()}"
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / result["workload"]["name"]
    json_path, md_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    command = result["command"] or "(run from Python)"
    md_path.write_text(
        f"# fastinstructor bench, {folder.name}\n\n{report_markdown(result)}\nReproduce:\n\n```\n{command}\n```\n",
        encoding="utf-8",
    )
    written = [json_path, md_path]
    if plot(result, png_path):
        written.append(png_path)
    return written
