"""GPU check for the ONNX path (issue 4): the large preset exported in float16, parity against the float32
reference on the GPU, and ORT CUDA float16 timed against PyTorch float16, in one run.

Run through ``bench/gpu_onnx.sh`` on a CUDA machine with onnxruntime-gpu installed. Writes
``gpu-onnx-<date>-<host>.{json,md}`` to ``--out`` (default bench/results) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from harness import DEFAULT_OUT, ROOT, command, machine, write_results

import fastinstructor
from fastinstructor.benchmark import interleaved, markdown_table, record
from fastinstructor.checkpoint import load_checkpoint
from fastinstructor.data import read_jsonl_texts, shared_data_dir
from fastinstructor.export.onnx_export import export_onnx
from fastinstructor.parity import TOLERANCES, compare
from fastinstructor.testmodel import make_test_model

INSTRUCTION = "Represent the Wikipedia document for retrieval:"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="large")
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--work", type=Path, default=ROOT / ".models" / "gpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default bench/results)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_onnx: no CUDA device")
    model_dir = args.work / f"instructor-{args.preset}-random"
    if not (model_dir / "modules.json").is_file():
        make_test_model(args.preset, model_dir)
    checkpoint = load_checkpoint(model_dir)
    onnx_dir = args.work / f"onnx-{args.preset}-float16"
    start = time.perf_counter()
    metadata = export_onnx(checkpoint, onnx_dir, precision="float16", optimize=True)
    export_s = time.perf_counter() - start

    data = shared_data_dir()
    texts = [t for _, t in read_jsonl_texts(data / "climate_fever_evidence.jsonl", args.texts)] if data else []
    if not texts:
        sys.exit("gpu_onnx: the shared data folder was not found")
    pairs = [[INSTRUCTION, t] for t in texts]
    reference = fastinstructor.load(model_dir, backend="reference", device="cuda")
    ort = fastinstructor.load(
        model_dir, backend="onnx", precision="float16", device="cuda", backend_options={"onnx_dir": onnx_dir}
    )
    torch_fp16 = fastinstructor.load(model_dir, backend="reference", device="cuda")
    torch_fp16.backend.model.half()  # transformers keeps T5's wo in float32 where configured; plain fp16 here

    def run(model):
        def go():
            out = model.encode(pairs, batch_size=64)
            torch.cuda.synchronize()
            return out

        return go

    expected = run(reference)()
    runs = {"reference fp32": run(reference), "onnx cuda fp16": run(ort), "torch fp16": run(torch_fp16)}
    for go in runs.values():
        go()
    times, _, last = interleaved(runs, args.repeat)
    tokens = sum(len(ids) for ids in reference.tokenizer(pairs).ids)
    rows = []
    for name in runs:
        report = compare(last[name], expected)
        rows.append(
            {
                "name": name,
                "median_s": statistics.median(times[name]),
                "tokens_per_s": tokens / statistics.median(times[name]),
                "min_cos": report.min_cos,
                "mean_cos": report.mean_cos,
                "parity": "baseline"
                if name == "reference fp32"
                else ("FAIL" if report.failures(TOLERANCES["float16"]) else "PASS"),
            }
        )
    table = markdown_table(
        ["contender", "median s", "real tokens/s", "min cos", "mean cos", "parity"],
        [
            [
                r["name"],
                f"{r['median_s']:.3f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['min_cos']:.6f}",
                f"{r['mean_cos']:.6f}",
                r["parity"],
            ]
            for r in rows
        ],
    )
    print(table)
    result = record(
        command("gpu_onnx.py", python="python"),
        gpu=torch.cuda.get_device_name(),
        preset=args.preset,
        texts=len(texts),
        real_tokens=tokens,
        export_s=export_s,
        fused_ops=metadata["fused_ops"],
        rows=rows,
        times=times,
    )
    body = (
        f"The {args.preset} preset exported in float16 ({export_s:.1f} s), {len(texts)} evidence texts "
        f"({tokens} real tokens) through `encode` (batches of 64), median of {args.repeat} interleaved passes; "
        f"parity of the last pass against the float32 reference's.\n\n{table}\n\n{machine(result)}\n"
    )
    write_results(args.out, "gpu-onnx", result, f"ONNX Runtime CUDA float16 on {result['gpu']}", body)
    assert np.isfinite(last["onnx cuda fp16"]).all()


if __name__ == "__main__":
    main()
