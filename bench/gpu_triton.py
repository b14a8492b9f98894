"""GPU check for the Triton path (issue 5), one run: the attention kernel against PyTorch SDPA with a
materialized bias and against FlexAttention with a T5 ``score_mod``, at L = 64, 128, 512; then the whole
``triton`` backend (bfloat16, float16, int8 and, on a GPU with FP8, float8) against transformers' T5 (the
reference) in float32, float16 and bfloat16 and ONNX Runtime's CUDA backend (when onnxruntime-gpu is installed),
for the base and large presets on the shipped evidence text: tokens/s, achieved TFLOP/s, the fraction of the
GPU's bf16 matmul peak measured in the same run, and parity against the float32 reference; last, a sweep of
each projection's implementations (cuBLAS, each Triton tile, int8 and float8) and the attention kernel's tiles
and the pooling head at the first preset's shapes: the measurements ``kernels.tuning``'s table is filled from.
Writes ``gpu-triton-<date>-<host>.{json,md}`` after each step.

Backends are timed on their forward pass over batches tokenized, built and moved to the GPU beforehand, of
65,536 tokens (issue 15's forward targets): padded for transformers' T5 (up to 4,096 rows and 65,536 padded
tokens), packed for the triton backend (``DEFAULT_PACKED_POLICY``: 65,536 real tokens, what ``encode`` gives it),
both sorted by length as ``encode`` plans them. The tokenizer runs on the CPU at the same speed for every
backend and would hide the GPU's work; ``bench/gpu_e2e.py`` (a later step of ``gpu_triton.sh``) gives the
end-to-end ``encode`` figures. A triton contender's ``load_s`` is its load: the tuner's choices (measured where
``kernels.tuning``'s table has none for this GPU) and the warm-up that compiles every kernel specialization.

``--smoke`` runs every step on the CPU under ``TRITON_INTERPRET=1`` at toy sizes, so that a GPU run cannot fail
on the script itself (``tests/test_gpu_triton_script.py``); its timings mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

from harness import DEFAULT_OUT, ROOT, SMOKE_NOTE, command, ensure_model, gpu_device, machine, write_results

INSTRUCTION = "Represent the Wikipedia document for retrieval:"
# 65,536-token batches (issue 15's forward targets): padded tokens for transformers (up to 4,096 rows), real tokens
# for the triton backend, which takes packed batches (DEFAULT_PACKED_POLICY, what encode gives it).
PADDED_ROWS, PADDED_TOKENS = 4096, 65_536
HEAD_ROWS = 64  # sequences in the pooling head's batch
CUBLAS = "cuBLAS (torch)"
FLEX_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 2, "num_warps": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=4096, help="evidence sentences per preset (default 4096)")
    parser.add_argument("--presets", default="base,large", help="test-model presets (default base,large)")
    parser.add_argument("--lengths", default="64,128,512", help="attention sequence lengths (default 64,128,512)")
    parser.add_argument(
        "--attention-tokens", type=int, default=32768, help="tokens per attention call: batch = this / L"
    )
    parser.add_argument(
        "--tile-rows", type=int, default=4096, help="packed tokens (M) of the matmul tile sweep (default 4096)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per backend; the median counts")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default bench/results)")
    parser.add_argument("--models", type=Path, default=ROOT / ".models" / "gpu", help="where checkpoints are built")
    parser.add_argument("--smoke", action="store_true", help="the CPU under the Triton interpreter, toy sizes")
    return parser.parse_args(argv)


_START = time.perf_counter()


def log(message) -> None:
    """Progress on stderr with the seconds since the start: the log of a GPU run says where its time went."""
    print(f"[{time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


def median_ms(fn, device: str, repeat: int) -> tuple[float, object]:
    """(median wall time of ``fn`` in ms after one warm-up call, its last result); synchronized on CUDA."""
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()  # compilation, autotuning, caches
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


def kernel_ms(fn, device: str, repeat: int) -> float:
    """One attention call: CUDA events and an L2 flush (``triton.testing.do_bench``) on a GPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    return median_ms(fn, device, repeat)[0]


def attention_rows(lengths, tokens: int, heads: int, head_dim: int, device: str, repeat: int) -> list[dict]:
    """Each implementation at each length on the same q, k, v, with its largest difference from SDPA."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    table = torch.randn(32, heads, device=device)
    # Compiled on a GPU, as FlexAttention is meant to run, once per length (dynamic shapes have known lowering
    # failures); eager on the CPU (smoke), where it only checks the maths.
    flex = torch.compile(flex_attention, dynamic=False) if device == "cuda" else flex_attention
    rows = []
    for length in lengths:
        batch = max(1, tokens // length)
        impls = _attention_impls(length, batch, table, head_dim, flex, device)
        expected = impls["sdpa_materialized_bias"]().float()
        flops = 4 * batch * heads * length * length * head_dim
        for name, fn in impls.items():
            row = {"L": length, "batch": batch, "impl": name}
            try:
                ms = kernel_ms(fn, device, repeat)
                diff = float((fn().float() - expected).abs().max())
                row |= {"ms": ms, "tflops": flops / ms / 1e9, "max_abs_diff": diff}
            except Exception as err:  # one implementation failing (a compiler error) must not sink the run
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            log(row)
    return rows


def _attention_impls(length: int, batch: int, table, head_dim: int, flex, device: str) -> dict:
    """SDPA with the bias materialized, FlexAttention with a T5 ``score_mod``, and the Triton kernel on packed
    q, k, v: bfloat16 ``[batch, heads, length, head_dim]``, each returned in that layout."""
    import torch

    from fastinstructor.kernels.attention import t5_attention
    from fastinstructor.t5 import relative_position_bucket

    heads = table.shape[1]
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=device).mul(0.3).to(torch.bfloat16) for _ in range(3))
    pos = torch.arange(length, device=device)
    buckets = relative_position_bucket(pos[None, :] - pos[:, None], 32, 128)
    bias = table[buckets].permute(2, 0, 1)[None].to(torch.bfloat16)  # [1, H, L, L], materialized

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[buckets[q_idx, kv_idx], h]

    packed = [t.transpose(1, 2).reshape(batch * length, heads, head_dim).contiguous() for t in (q, k, v)]
    cu = torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32)
    return {
        "sdpa_materialized_bias": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=1.0
        ),
        # Its default tile asked 245,760 B of shared memory on the H200 (limit 232,448) at L >= 128: a smaller one.
        "flex_attention": lambda: flex(q, k, v, score_mod=score_mod, scale=1.0, kernel_options=FLEX_OPTIONS),
        "triton_kernel": lambda: t5_attention(*packed, cu, table).view(batch, length, heads, head_dim).transpose(1, 2),
    }


def tile_rows(preset: str, rows_m: int, attention_tokens: int, lengths, device: str, repeat: int) -> list[dict]:
    """Every candidate tile of the matmul (bfloat16 and int8, at ``preset``'s q/k/v, wi and wo shapes for
    ``rows_m`` packed tokens, beside cuBLAS through torch) and of the attention kernel (bfloat16, ``preset``'s
    heads), each with its largest error relative to the float32 result: the measurements to choose the
    kernels' default tiles from."""
    from fastinstructor.testmodel import PRESETS

    cfg = PRESETS[preset]
    inner = cfg.num_heads * cfg.d_kv
    rows = []
    for name, n, k, activation in [
        ("qkv", 3 * inner, cfg.d_model, "none"),
        ("wi", cfg.d_ff, cfg.d_model, "relu"),
        ("wo", cfg.d_model, cfg.d_ff, "none"),
    ]:
        rows += _matmul_tiles(f"{name} {rows_m}x{n}x{k}", rows_m, n, k, activation, device, repeat)
    for length in lengths:
        rows += _attention_tiles(length, max(1, attention_tokens // length), cfg, device, repeat)
    return rows + _head_rows(rows_m, cfg, device, repeat)


def _tile_row(op, shape, dtype, tile, run, expected, flops, device, repeat, choice=None) -> dict:
    """``run()`` timed, with its largest error relative to the float32 ``expected``. ``tile``: a kernel's tile
    settings, or the name of what runs (cuBLAS, a torch op); ``choice``: what ``kernels.tuning`` calls it
    (``"cublas"`` or the tile), to mark the row its table holds for this GPU (large batches)."""
    from fastinstructor.kernels import tuning

    choice = tile if choice is None else choice
    op_name = {"bfloat16": "linear", "int8": "linear_int8"}.get(dtype, "") if op == "matmul" else op
    table = tuning.TABLE.get(tuning.architecture(), {}).get((op_name, dtype, "large"))
    ms = kernel_ms(run, device, repeat)
    return {
        "op": op,
        "shape": shape,
        "dtype": dtype,
        "tile": tile if isinstance(tile, str) else " ".join(f"{k}={v}" for k, v in tile.items()),
        "chosen": table is not None and table == choice,
        "ms": ms,
        "tflops": flops / ms / 1e9,
        "relative_error": float((run().float() - expected).abs().max() / expected.abs().max()),
    }


def _matmul_tiles(shape: str, m: int, n: int, k: int, activation: str, device: str, repeat: int) -> list[dict]:
    """bfloat16: cuBLAS (the ReLU in cuBLASLt's epilogue) and each tile; int8: cuBLAS (torch._int_mm) and each
    tile; float8: torch._scaled_mm, where the GPU has FP8. Each as the backend runs it (``Projection.run``)."""
    import torch

    from fastinstructor.kernels import matmul, quantize
    from fastinstructor.kernels.projection import CUBLAS as CUBLAS_CHOICE
    from fastinstructor.kernels.projection import Projection

    g = torch.Generator(device=device).manual_seed(m + n + k)
    x, w = torch.randn(m, k, device=device, generator=g), torch.randn(n, k, device=device, generator=g) / k**0.5
    relu = activation == "relu"
    exact = matmul.linear_ref(x, w, activation, torch.float32)
    xb = x.bfloat16()
    plans = {
        "bfloat16": (Projection.prepare(w.bfloat16(), relu, torch.bfloat16, None), xb, matmul.TILE_CANDIDATES),
        "int8": (
            Projection.prepare(w, relu, torch.bfloat16, torch.int8),
            quantize.quantize_rows(xb, torch.int8),
            matmul.INT8_TILE_CANDIDATES,
        ),
    }
    if _has_fp8(device):
        proj = Projection.prepare(w, relu, torch.bfloat16, torch.float8_e4m3fn)
        plans["float8"] = (proj, quantize.quantize_rows(xb, torch.float8_e4m3fn), [])
    rows = []
    for dtype, (proj, inputs, tiles) in plans.items():
        args = (exact, 2 * m * n * k, device, repeat)
        name = CUBLAS if dtype != "float8" else "cuBLASLt (torch._scaled_mm)"
        cublas = functools.partial(proj.run, CUBLAS_CHOICE, inputs)
        rows.append(_tile_row("matmul", shape, dtype, name, cublas, *args, choice=CUBLAS_CHOICE))
        for tile in tiles:
            rows.append(_tile_row("matmul", shape, dtype, tile, functools.partial(proj.run, tile, inputs), *args))
    return rows


def _has_fp8(device: str) -> bool:
    """FP8 tensor cores (compute capability 8.9 on); the CPU's torch._scaled_mm for a smoke run."""
    import torch

    return device == "cpu" or torch.cuda.get_device_capability() >= (8, 9)


def _attention_tiles(length: int, batch: int, cfg, device: str, repeat: int) -> list[dict]:
    import torch

    from fastinstructor.kernels import attention

    g = torch.Generator(device=device).manual_seed(length)
    heads, d = cfg.num_heads, cfg.d_kv
    q, k, v = (torch.randn(batch * length, heads, d, device=device, generator=g).mul(0.3) for _ in range(3))
    table = torch.randn(32, heads, device=device, generator=g)
    cu = torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32)
    expected = attention.t5_attention_ref(q, k, v, cu, table)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()

    def run(tile):
        return attention.t5_attention(qb, kb, vb, cu, table, tile=tile)

    shape, flops = f"L={length} batch={batch} heads={heads}x{d}", 4 * batch * heads * length * length * d
    return [
        _tile_row("attention", shape, "bfloat16", tile, functools.partial(run, tile), expected, flops, device, repeat)
        for tile in attention.TILE_CANDIDATES
    ]


def _head_rows(tokens: int, cfg, device: str, repeat: int) -> list[dict]:
    """The pooling head of one batch (64 sequences, ``tokens`` packed states): the pooling kernel, then Dense and
    L2 normalize in torch. Beside the encoder's time per batch, it says whether fusing them could pay."""
    import torch
    import torch.nn.functional as F

    from fastinstructor.kernels.pooling import masked_mean_pool, masked_mean_pool_ref

    g = torch.Generator(device=device).manual_seed(tokens)
    lengths = torch.full((HEAD_ROWS,), max(2, tokens // HEAD_ROWS), device=device)
    cu = torch.zeros(HEAD_ROWS + 1, dtype=torch.int32, device=device)
    cu[1:] = lengths.cumsum(0)
    hidden = torch.randn(int(cu[-1]), cfg.d_model, device=device, generator=g)
    pool_start = lengths // 3  # an instruction of a third of the tokens
    dense = torch.randn(cfg.dense_out, cfg.d_model, device=device, generator=g) / cfg.d_model**0.5
    pooled = masked_mean_pool_ref(hidden, cu, pool_start)
    hb = hidden.bfloat16()
    shape = f"{HEAD_ROWS} sequences, {int(cu[-1])} tokens, {cfg.d_model} -> {cfg.dense_out}"
    args = (device, repeat)
    return [
        _tile_row(
            "head", shape, "bfloat16", "pool (kernel)", lambda: masked_mean_pool(hb, cu, pool_start), pooled,
            hidden.numel(), *args,
        ),
        _tile_row(
            "head", shape, "float32", "dense + normalize (torch)",
            lambda: F.normalize(pooled @ dense.t(), dim=1), F.normalize(pooled.double() @ dense.double().t(), dim=1),
            2 * HEAD_ROWS * cfg.d_model * cfg.dense_out, *args,
        ),
    ]  # fmt: skip


def _to_device(batch, device: str):
    """A PackedBatch with its tensors on ``device``."""
    import dataclasses

    tensors = ("input_ids", "cu_seqlens", "pool_start")
    return dataclasses.replace(batch, **{name: getattr(batch, name).to(device) for name in tensors})


def backend_rows(preset: str, texts: list[str], peak_tflops: float | None, args, device: str) -> tuple[list, list]:
    """(rows, skipped) for every contender on ``preset``: forward-pass speed and parity against float32."""
    import torch

    import fastinstructor
    from fastinstructor.backends import ReferenceBackend, TritonBackend
    from fastinstructor.batching import DEFAULT_PACKED_POLICY, BatchPolicy, pack_batch, pad_batch
    from fastinstructor.benchmark import encoder_flops
    from fastinstructor.checkpoint import load_checkpoint
    from fastinstructor.dispatch import probe
    from fastinstructor.parity import TOLERANCES, compare
    from fastinstructor.tokenization import PairTokenizer, load_tokenizer

    model_dir = args.models / f"instructor-{preset}-random"
    ensure_model(model_dir, preset)
    checkpoint = load_checkpoint(model_dir)
    tokenizer = PairTokenizer(load_tokenizer(checkpoint.path), checkpoint.max_seq_length)
    tokenized = tokenizer([[INSTRUCTION, t] for t in texts])
    lengths = [len(ids) for ids in tokenized.ids]

    def prepared(policy, build):
        """(the plan, each batch built and on the device): the forward alone is timed."""
        plan = policy.plan(lengths)
        return plan, [build([tokenized.ids[i] for i in rows], [tokenized.pool_start[i] for i in rows]) for rows in plan]

    padded = prepared(
        BatchPolicy(PADDED_ROWS, PADDED_TOKENS), lambda ids, starts: tuple(t.to(device) for t in pad_batch(ids, starts))
    )
    packed = prepared(DEFAULT_PACKED_POLICY, lambda ids, starts: _to_device(pack_batch(ids, starts), device))
    dense_out = checkpoint.out_dim if checkpoint.dense_weight is not None else None
    flops = encoder_flops(checkpoint.config, lengths, dense_out)  # useful work: real tokens, attention included

    def reference(dtype):
        backend = ReferenceBackend(checkpoint, "float32", device)
        backend.model.to(dtype)  # transformers' T5 as users run it in half precision; the pooling head stays float32
        return backend

    triton = ["bfloat16", "float16", "int8"]
    skipped = []
    why = TritonBackend.unavailable("float8", "cuda", probe())
    if why is None:
        triton.append("float8")
    else:
        skipped.append({"preset": preset, "contender": "triton float8", "reason": why})
    contenders = {
        "reference float32": lambda: ReferenceBackend(checkpoint, "float32", device),
        "reference bfloat16": lambda: reference(torch.bfloat16),
        "reference float16": lambda: reference(torch.float16),
        **{f"triton {p}": lambda p=p: TritonBackend(checkpoint, p, device) for p in triton},
    }
    if "CUDAExecutionProvider" in probe().onnx_providers:
        contenders["onnx float16"] = lambda: (
            fastinstructor.load(model_dir, backend="onnx", precision="float16", device=device).backend
        )
    else:
        skipped.append({"preset": preset, "contender": "onnx float16", "reason": "no CUDAExecutionProvider"})

    expected, rows = None, []
    for name, make in contenders.items():
        started = time.perf_counter()
        backend = make()
        load_s = time.perf_counter() - started
        takes_packed = getattr(backend, "packed_input", False)
        plan, batches = packed if takes_packed else padded

        def forward(backend=backend, batches=batches, plan=plan, takes_packed=takes_packed):
            run = backend.embed_packed if takes_packed else (lambda batch: backend.embed(*batch))
            out = torch.cat([run(batch) for batch in batches]).float().cpu()
            in_order = torch.empty_like(out)
            in_order[[i for rows in plan for i in rows]] = out
            return in_order.numpy()

        ms, out = median_ms(forward, device, args.repeat)
        expected = out if expected is None else expected  # the float32 reference runs first
        precision = name.split()[1]
        report = compare(out, expected)
        problems = report.failures(TOLERANCES[precision])
        tflops = flops / (ms / 1000) / 1e12
        rows.append(
            {
                "preset": preset,
                "contender": name,
                "ms": ms,
                "batches": len(batches),
                "layout": "packed" if takes_packed else "padded",
                "load_s": load_s,
                "tokens_per_s": sum(lengths) / (ms / 1000),
                "tflops": tflops,
                "fraction_of_bf16_peak": None if not peak_tflops else tflops / peak_tflops,
                "min_cos": report.min_cos,
                "passed": not problems,
                "problems": problems,
            }
        )
        log(rows[-1])
        del backend, forward  # forward holds the backend too: free it before the next one loads
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, skipped


def proposed_table(tiles: list[dict]) -> dict[str, str]:
    """For each op and dtype of the sweep, the implementation with the least total time over its shapes, written
    as a ``kernels.tuning.TABLE`` entry for this GPU's large shape class."""
    totals: dict[tuple[str, str], dict[str, float]] = {}
    for row in tiles:
        if row["op"] in ("matmul", "attention") and row["dtype"] != "float8":  # float8 has one implementation
            op = {"bfloat16": "linear", "int8": "linear_int8"}[row["dtype"]] if row["op"] == "matmul" else "attention"
            by_tile = totals.setdefault((op, row["dtype"]), {})
            by_tile[row["tile"]] = by_tile.get(row["tile"], 0.0) + row["ms"]
    proposed = {}
    for (op, dtype), by_tile in totals.items():
        best = min(by_tile, key=by_tile.get)
        choice = (
            "CUBLAS"
            if best == CUBLAS
            else "{" + ", ".join(f'"{k}": {v}' for k, v in (item.split("=") for item in best.split())) + "}"
        )
        proposed[f'("{op}", "{dtype}", "large")'] = choice
    return proposed


def markdown(result: dict) -> str:
    from fastinstructor.benchmark import markdown_table

    def fmt(value, spec, scale=1.0, unit=""):
        return "n/a" if value is None else format(value * scale, spec) + unit

    peak = result["bf16_matmul_peak_tflops"]
    lines = [
        f"bf16 matmul peak measured in this run on {result['device_name']}: {fmt(peak, '.0f')} TFLOP/s.",
        "",
        f"## Attention, bfloat16, {result['heads']} heads x {result['head_dim']}, "
        f"{result['attention_tokens']} tokens per call",
        "",
        markdown_table(
            ["L", "batch", "implementation", "ms", "TFLOP/s", "max diff vs SDPA"],
            [
                [str(r["L"]), str(r["batch"]), r["impl"]]
                + (
                    [f"{r['ms']:.3f}", f"{r['tflops']:.1f}", f"{r['max_abs_diff']:.2g}"]
                    if "error" not in r
                    else ["failed: " + r["error"], "", ""]
                )
                for r in result["attention"]
            ],
        ),
        "",
        f"## Backends: forward pass on {result['texts']} texts ({result['text_source']})",
        "",
        markdown_table(
            ["preset", "contender", "ms", "batches", "tokens/s", "TFLOP/s", "of bf16 peak", "min cos", "parity"],
            [
                [r["preset"], r["contender"], f"{r['ms']:.1f}", str(r["batches"]), f"{r['tokens_per_s']:,.0f}"]
                + [f"{r['tflops']:.1f}"]
                + [fmt(r["fraction_of_bf16_peak"], ".1f", 100, " %")]
                + [f"{r['min_cos']:.6f}", "pass" if r["passed"] else "FAIL: " + "; ".join(r["problems"])]
                for r in result["backends"]
            ],
        ),
        "",
        "## Tile sweep and pooling head (* marks what kernels.tuning's table runs on this GPU for large batches; "
        "errors are relative to the float32 product)",
        "",
        markdown_table(
            ["op", "shape", "dtype", "tile", "ms", "TFLOP/s", "relative error"],
            [
                [r["op"], r["shape"], r["dtype"], r["tile"] + (" *" if r["chosen"] else "")]
                + [f"{r['ms']:.3f}", f"{r['tflops']:.1f}", f"{r['relative_error']:.1e}"]
                for r in result["tiles"]
            ],
        ),
    ]
    lines += ["", "## The sweep's choice for kernels.tuning.TABLE (least total time over the shapes swept)", ""]
    lines += [f"    {key}: {choice}," for key, choice in proposed_table(result["tiles"]).items()]
    lines += ["", *(f"Skipped: {s['contender']} on {s['preset']}: {s['reason']}" for s in result["skipped"])]
    if result["smoke"]:
        lines += ["", SMOKE_NOTE]
    return "\n".join([*lines, "", machine(result)]) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = gpu_device(args.smoke, "gpu_triton")
    import torch

    from fastinstructor.benchmark import matmul_ceilings, record
    from fastinstructor.data import sample_passages

    passages, source = sample_passages(args.texts)  # the evidence sentences; the project's docs in a smoke run
    texts = [t for _, t in passages]
    heads, head_dim = (2, 64) if args.smoke else (16, 64)
    peak = matmul_ceilings(["bfloat16"], device, 256 if args.smoke else 8192)["bfloat16"]["gflops"]
    peak_tflops = None if peak is None else peak / 1000
    log(f"bf16 matmul peak: {peak_tflops} TFLOP/s")
    lengths = [int(x) for x in args.lengths.split(",")]
    result = record(
        command("gpu_triton.py", argv, python="python"),
        smoke=args.smoke,
        device_name=torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)",
        bf16_matmul_peak_tflops=peak_tflops,
        heads=heads,
        head_dim=head_dim,
        attention_tokens=args.attention_tokens,
        attention=[],
        texts=len(texts),
        text_source=source,
        tiles=[],
        backends=[],
        skipped=[],
    )
    title = f"Triton path on {result['device_name']}"

    def save():  # after each step: a run cut short by a time limit keeps what it measured
        return write_results(args.out, "gpu-triton", result, title, markdown(result), quiet=True)

    result["attention"] = attention_rows(lengths, args.attention_tokens, heads, head_dim, device, args.repeat)
    save()
    presets = args.presets.split(",")
    for preset in presets:  # what the issue asks for first; the tile sweep, for tuning, after
        rows, skipped = backend_rows(preset, texts, peak_tflops, args, device)
        result["backends"] += rows
        result["skipped"] += skipped
        save()
    result["tiles"] = tile_rows(presets[0], args.tile_rows, args.attention_tokens, lengths, device, args.repeat)
    log(f"tile sweep: {len(result['tiles'])} rows")
    json_path, md_path = save()
    print(markdown(result))
    log(f"wrote {json_path} and {md_path}")
    failed = [r for r in result["backends"] if not r["passed"]]
    if failed:
        sys.exit(f"gpu_triton: parity failed for {', '.join(r['preset'] + ' ' + r['contender'] for r in failed)}")


if __name__ == "__main__":
    main()
