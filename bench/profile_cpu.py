"""Where the time of ``encode`` goes on the CPU (issue 16): the cpu and onnx backends, end to end, by group of ops.

For each contender (backend x precision) and workload: ``encode`` of the workload's texts as a user calls it
(tokenization, batching, the forward passes, the pooling head), timed whole, then again (warmed) under the backend's
own profiler, whose op times are summed into groups, as shares of that profiled call's wall time:

- cpu backend (``torch.profiler``, self CPU time per op on the calling thread, the compute thread): matrix products
  (oneDNN float, bfloat16 and int8 linears), attention (the native varlen op and ATen's fused attention under it),
  row ops (residual add + RMSNorm, quantization, scaling: the native ops, or the PyTorch ops of their fallbacks),
  other torch ops (embedding, pooling head, packing);
- onnx backend (ONNX Runtime's profiler, per node): matrix products (the projections' MatMul / MatMulInteger /
  DynamicQuantizeMatMul nodes), attention (the SelfAttention MatMuls between activations, Softmax, the bias),
  row ops (the RMSNorms and their fused residual adds, DynamicQuantizeLinear), other nodes;

and the rest of the profiled call's wall time, outside any op: tokenization (timed alone on the same texts), and Python
(batching, packing, the pipeline, launching ops). Thread settings: the process's torch threads, and ONNX
Runtime's default (one per core); both are reported with the machine.

The products' own speed, against the matmul ceiling of the precision (``fastinstructor.benchmark.matmul_ceilings``,
the one ``make bench`` measures): their FLOPs at the workload's real lengths over the profiled products' time (in
encode), and, for the cpu backend, over the time of the same products alone (every layer's four projections in a
row at the token count of each forward the backend runs, on inputs made once: what the products reach with
nothing between them). The share of the ceiling that encode can reach is at most the
products' share in encode.

    .venv/bin/python bench/profile_cpu.py [--model DIR] [--workloads evidence,mixed] [--texts 256]
        [--contenders cpu:float32,cpu:bfloat16,cpu:int8,onnx:int8] [--name profile-cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from harness import DEFAULT_MODEL, DEFAULT_OUT, command, ensure_model, machine, write_results

import fastinstructor
from fastinstructor import compute_thread
from fastinstructor.batching import default_policy, pack_batch
from fastinstructor.benchmark import encoder_flops, load_workload, markdown_table, matmul_ceilings, record

GROUPS = ("matrix products", "attention", "row ops", "other ops", "tokenization", "Python and the rest")

_TORCH_GROUPS = {
    "matrix products": ("linear_pointwise", "qlinear_pointwise", "quantized::linear", "aten::mm", "aten::addmm"),
    "attention": ("varlen_attention", "scaled_dot_product", "aten::bmm", "aten::_softmax"),
    "row ops": ("rms_norm", "quantize_rows", "aten::pow", "aten::mean", "aten::rsqrt"),
}
_ONNX_GROUPS = {
    "matrix products": ("MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "Gemm"),
    "row ops": ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "DynamicQuantizeLinear"),
}


def _torch_group(name: str) -> str:
    for group, needles in _TORCH_GROUPS.items():
        if any(n in name for n in needles):
            return group
    return "other ops"


def _onnx_group(op_type: str, node: str) -> str:
    # Attention's MatMuls multiply two activations; a projection's has a weight and a name like .../q/MatMul.
    if "SelfAttention/MatMul" in node or op_type in ("Softmax",) or "relative_attention" in node:
        return "attention"
    for group, types in _ONNX_GROUPS.items():
        if op_type in types:
            return group
    return "other ops"


def _profile_cpu(model, pairs) -> tuple[dict[str, float], float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model.encode(pairs)
        wall = time.perf_counter() - start
    # The calling thread's ops only: it runs every op of the call, and the native ops' tasks that other torch
    # threads run at the same time would count twice (it is the thread with the most op time).
    busy = defaultdict(float)
    for event in prof.events():
        busy[event.thread] += event.self_cpu_time_total
    caller = max(busy, key=busy.get)
    seconds = defaultdict(float)
    for event in prof.events():
        if event.thread == caller:
            seconds[_torch_group(event.name)] += event.self_cpu_time_total / 1e6
    return seconds, wall


def _profile_onnx(model, pairs) -> tuple[dict[str, float], float]:
    import onnxruntime

    from fastinstructor.export.onnx_export import MODEL_FILE

    backend = model.backend
    options = onnxruntime.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    plain, backend.session = (
        backend.session,
        onnxruntime.InferenceSession(str(backend.folder / MODEL_FILE), options, providers=["CPUExecutionProvider"]),
    )
    try:
        # A fresh session's first runs allocate its arenas: warm it, and keep only the nodes of the timed call.
        # Its profiling start is stamped with the system clock (time.time_ns), its docstring's monotonic aside.
        model.encode(pairs[:64])
        start = time.time_ns()
        model.encode(pairs)
        wall = (time.time_ns() - start) / 1e9
        since_us = (start - backend.session.get_profiling_start_time_ns()) / 1e3
        trace = json.loads(Path(backend.session.end_profiling()).read_text())
    finally:
        backend.session = plain
    seconds = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= since_us:
            args = event.get("args", {})
            seconds[_onnx_group(args.get("op_name", ""), event["name"])] += event["dur"] / 1e6
    if not seconds:
        raise SystemExit(f"no ONNX Runtime node after {since_us:.0f} us of profiling: its clock is not time.time_ns")
    return seconds, wall


def _products_alone_s(backend, batch_tokens: list[int], repeat: int = 3) -> float:
    """Seconds of the encoder's products alone at these batch sizes: every layer's four projections in a row, as
    the encoder runs them (each layer's weights read in turn), on inputs made once per batch as the op set makes
    them; best of ``repeat``."""
    encoder = backend.encoder
    ops, cfg = encoder.ops, encoder.config
    total = 0.0
    with torch.inference_mode():
        for tokens in batch_tokens:
            h, _ = ops.norm(torch.randn(tokens, cfg.d_model), encoder.layers[0].ln_attn)  # what qkv, o, wi take
            f = ops.product_input(torch.randn(tokens, cfg.d_ff).to(ops.dtype))

            def products(h, f):
                for layer in encoder.layers:
                    layer.qkv(h), layer.o(h), layer.wi(h), layer.wo(f)

            products(h, f)  # warm-up: oneDNN's primitive for this size
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                products(h, f)
                best = min(best, time.perf_counter() - start)
            total += best
    return total


def measure(model_dir: Path, backend: str, precision: str, workload: str, texts: int) -> dict:
    model = fastinstructor.load(model_dir, backend=backend, precision=precision)
    loaded = load_workload(workload, texts, model.tokenizer)
    pairs = loaded.pairs
    model.encode(pairs[:64])  # warm-up: oneDNN's first calls, the allocator
    start = time.perf_counter()
    model.encode(pairs)
    wall = time.perf_counter() - start
    start = time.perf_counter()
    model.tokenizer(pairs)
    tokenization = time.perf_counter() - start
    seconds, profiled = (_profile_cpu if backend == "cpu" else _profile_onnx)(model, pairs)
    ops = sum(seconds.values())
    seconds["tokenization"] = tokenization
    seconds["Python and the rest"] = max(0.0, profiled - ops - tokenization)
    row = {"workload": loaded.name, "contender": f"{backend} {precision}", "texts": len(pairs), "wall_s": wall}
    row["profiled_s"] = profiled
    for group in GROUPS:
        row[f"{group}_s"] = seconds.get(group, 0.0)
        row[f"{group}_share"] = seconds.get(group, 0.0) / profiled
    row["native_ops"] = model.backend_report.get("native_ops")
    # The products' FLOPs: the encoder's, less attention's two products (the Dense head is an aten::mm, a product).
    checkpoint, ids = model.checkpoint, model.tokenizer(pairs).ids
    cfg, lengths = checkpoint.config, [len(row) for row in ids]
    flops = encoder_flops(cfg, lengths, checkpoint.out_dim if checkpoint.dense_weight is not None else None)
    flops -= cfg.num_layers * 4 * cfg.inner_dim * sum(n * n for n in lengths)
    row["products_gflops"] = flops / 1e9 / seconds["matrix products"] if seconds.get("matrix products") else None
    row["products_alone_gflops"] = None
    if backend == "cpu":
        # encode's batches on the cpu backend, as the forwards it runs them in (CpuBackend.forward_tokens)
        batches = [pack_batch([ids[i] for i in rows], [0] * len(rows)) for rows in default_policy(False).plan(lengths)]
        tokens = [part.tokens for batch in batches for part in batch.split(model.backend.forward_tokens)]
        projection_flops = sum(tokens) * cfg.num_layers * (8 * cfg.d_model * cfg.inner_dim + 4 * cfg.d_model * cfg.d_ff)
        row["products_alone_gflops"] = projection_flops / 1e9 / _products_alone_s(model.backend, tokens)
    return row


def _gflops(value: float | None, ceiling: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" + (f" ({value / ceiling:.0%})" if ceiling else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--workloads", default="evidence,mixed")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--contenders", default="cpu:float32,cpu:bfloat16,cpu:int8,onnx:int8")
    parser.add_argument("--name", default="profile-cpu", help="result file stem")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    ensure_model(args.model)
    contenders = [contender.split(":") for contender in args.contenders.split(",")]
    # Measured first, in a process that has run nothing else yet, as `make bench` measures them.
    ceilings = matmul_ceilings(sorted({precision for _, precision in contenders}))
    rows = []
    for workload in args.workloads.split(","):
        for backend, precision in contenders:
            rows.append(measure(args.model, backend, precision, workload, args.texts))
            rows[-1]["ceiling_gflops"] = ceilings[precision]["gflops"]
            print(f"{workload} {backend}:{precision}: {rows[-1]['wall_s']:.2f} s", file=sys.stderr)
    result = record(command("profile_cpu.py"), model=args.model.name, torch_threads=torch.get_num_threads(), rows=rows)
    table = markdown_table(
        ["workload", "contender", "encode s", "profiled s", *GROUPS],
        [
            [r["workload"], r["contender"], f"{r['wall_s']:.2f}", f"{r['profiled_s']:.2f}"]
            + [f"{r[f'{g}_s']:.2f} s ({r[f'{g}_share']:.0%})" for g in GROUPS]
            for r in rows
        ],
    )
    products = markdown_table(
        ["workload", "contender", "ceiling GFLOP/s", "products in encode", "products alone"],
        [
            [r["workload"], r["contender"], _gflops(r["ceiling_gflops"])]
            + [_gflops(r[key], r["ceiling_gflops"]) for key in ("products_gflops", "products_alone_gflops")]
            for r in rows
        ],
    )
    markdown = (
        f"Model {args.model.name}, {args.texts} texts per workload, `encode` with its defaults (32-row batches "
        f"sorted by length). The encode time is one call after a warm-up; the groups are shares of a second, "
        f"warmed call under the backend's profiler (its wall time is the profiled column; torch.profiler's self "
        f"time per op on the calling thread for cpu, ONNX Runtime's per-node kernel time for onnx), tokenization "
        f"from timing the tokenizer alone, and the rest is the profiled call's time left over. "
        f"torch threads: {torch.get_num_threads()}; ONNX Runtime: its default. Native ops: "
        f"{rows[0]['native_ops']}.\n\n{table}\n\nThe products' GFLOP/s (projections and the Dense head at the "
        f"real lengths), in encode (the profiled products' time) and alone (cpu: the same products with nothing "
        f"between them), against the large-matmul ceiling of the precision measured in this run:\n\n{products}\n\n"
        f"{machine(result)}\n"
    )
    write_results(args.out, args.name, result, "Where the time of encode goes on the CPU", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    # The ceilings, the model and the profiler (which records its calling thread) on the thread the cpu backend
    # computes on: PyTorch work on a second thread would slow every op (fastinstructor.compute_thread).
    raise SystemExit(compute_thread.run(main))
