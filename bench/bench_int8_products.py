"""The cpu backend's int8 products, kernel against kernel, at the token counts a forward brings (issue 16).

``backends.cpu.Int8Linear`` on layer 0's four projections of a checkpoint (qkv, o, wi with its ReLU, wo), fed
per-token quantized rows, timed as one layer's products per token count, in up to three ways:

- ``oneDNN s8``: oneDNN's product with an s8 input (zero point 0): what a CPU with AMX runs;
- ``oneDNN u8``: the same with the input as u8 and zero point 128 (``q + 128``): what every other CPU runs (one
  without VNNI from ``Int8Linear.FEW_TOKENS`` rows on);
- ``FBGEMM``: PyTorch's FBGEMM product on its own packing of the same weights: what a CPU without VNNI runs below
  ``FEW_TOKENS`` rows.

Every way must give the same output to the bit (``same`` column). The ways take turns, each token count fresh,
and the figure is the median of ``--repeat`` turns. On a CPU without VNNI the weights are in 7 bits (as the backend
keeps them there), with VNNI in 8; the table says which way the backend takes at each count.

    .venv/bin/python bench/bench_int8_products.py [--model DIR] [--tokens 1,8,...] [--repeat 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from harness import DEFAULT_MODEL, DEFAULT_OUT, command, ensure_model, machine, write_results

from fastinstructor.backends import cpu
from fastinstructor.benchmark import markdown_table, record
from fastinstructor.checkpoint import load_checkpoint
from fastinstructor.encoder import projection_weights
from fastinstructor.t5 import quantize_rows_ref

WAYS = ("oneDNN s8", "oneDNN u8", "FBGEMM")


def layer_products(model: Path) -> tuple[list[tuple[cpu.Int8Linear, int]], bool]:
    """Layer 0's projections as the cpu backend builds them for int8 (float32 outputs, as on a CPU without native
    bfloat16), with their input widths, each given an FBGEMM packing of its weight where the backend keeps none;
    and whether the backend keeps them on this CPU."""
    products, kept = [], True
    for name, weight in projection_weights(load_checkpoint(model), 0).items():
        linear = cpu.Int8Linear(weight, "relu" if name == "wi" else "none", torch.float32)
        if linear.few_tokens_packed is None:
            kept = False
            wq, _ = quantize_rows_ref(weight, torch.int8, reduce_range=linear.reduce_range)
            linear.few_tokens_packed = cpu._fbgemm_prepack(wq, linear.weight_scale)
        products.append((linear, weight.shape[1]))
    return products, kept


def run_layer(products: list[tuple[cpu.Int8Linear, int]], inputs: list, way: str) -> list[torch.Tensor]:
    """One layer's four products the given way: each ``Int8Linear`` called with its kernel choice set for the call
    (its ``input_zero_point`` 0 or 128; FBGEMM its path below ``FEW_TOKENS``)."""
    outputs = []
    for (linear, _), x in zip(products, inputs, strict=True):
        zero_point = linear.input_zero_point
        linear.input_zero_point = 0 if way == "oneDNN s8" else 128
        linear.FEW_TOKENS = 1 << 62 if way == "FBGEMM" else 0
        try:
            outputs.append(linear(x)[0])
        finally:
            linear.input_zero_point = zero_point
            del linear.FEW_TOKENS  # back to the class's
    return outputs


def measure(products: list[tuple[cpu.Int8Linear, int]], tokens: int, repeat: int, ways: tuple[str, ...]) -> dict:
    generator = torch.Generator().manual_seed(tokens)
    inputs = [quantize_rows_ref(torch.randn(tokens, width, generator=generator)) for _, width in products]
    outputs = {way: run_layer(products, inputs, way) for way in ways}  # also the warm-up
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(repeat):
        for way in ways:
            start = time.perf_counter()
            run_layer(products, inputs, way)
            times[way].append(time.perf_counter() - start)
    same = all(torch.equal(a, b) for way in ways[1:] for a, b in zip(outputs[ways[0]], outputs[way], strict=True))
    return {"tokens": tokens, "ms": {way: 1e3 * statistics.median(t) for way, t in times.items()}, "same": same}


def ratio(row: dict, a: str, b: str) -> str:
    return f"{row['ms'][a] / row['ms'][b]:.2f}x" if a in row["ms"] and b in row["ms"] else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tokens", default="1,8,16,32,64,96,128,160,256,512,1024,2048")
    parser.add_argument("--repeat", type=int, default=15, help="turns per token count; the median counts")
    parser.add_argument("--s8-up-to", type=int, default=1 << 62, metavar="TOKENS",
                        help="time the s8 input only up to this many tokens (on an AVX-512 VNNI CPU without AMX "
                        "oneDNN runs it in its reference kernel: minutes a turn at 2048)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not cpu.Int8Linear.available() or not cpu._fbgemm_available():
        sys.exit("bench_int8_products.py: this torch has no oneDNN or no FBGEMM int8 linear")
    ensure_model(args.model)
    products, kept = layer_products(args.model)
    linear = products[0][0]
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        row = measure(products, tokens, args.repeat, WAYS if tokens <= args.s8_up_to else WAYS[1:])
        few = kept and tokens < linear.FEW_TOKENS
        row["backend"] = "FBGEMM" if few else "oneDNN u8" if linear.input_zero_point else "oneDNN s8"
        rows.append(row)
        print(f"{tokens:>5} tokens: " + ", ".join(f"{w} {ms:.3f} ms" for w, ms in row["ms"].items()), file=sys.stderr)
    result = record(command("bench_int8_products.py"), model=args.model.name, reduce_range=linear.reduce_range,
                    input_zero_point=linear.input_zero_point, few_tokens=linear.FEW_TOKENS if kept else None,
                    rows=rows)  # fmt: skip
    table = markdown_table(
        ["tokens", *(f"{w} ms" for w in WAYS), "oneDNN u8 / FBGEMM", "oneDNN s8 / u8", "same output", "backend"],
        [
            [
                str(r["tokens"]),
                *(f"{r['ms'][w]:.3f}" if w in r["ms"] else "not run" for w in WAYS),
                ratio(r, "oneDNN u8", "FBGEMM"),
                ratio(r, "oneDNN s8", "oneDNN u8"),
                str(r["same"]),
                r["backend"],
            ]
            for r in rows
        ],
    )
    bits = 7 if linear.reduce_range else 8
    markdown = (
        f"Model {args.model.name}: layer 0's four int8 products (qkv, o, wi + ReLU, wo), weights in {bits} bits, "
        f"float32 out; one layer's time per token count, median of {args.repeat} turns. `backend`: the way the cpu "
        f"backend takes on this CPU.\n\n{table}\n\n{machine(result)}\n"
    )
    write_results(args.out, "int8-products", result, "The cpu backend's int8 products, kernel against kernel", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
