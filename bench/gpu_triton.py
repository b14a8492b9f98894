"""GPU check for the Triton path (issue 5), one run: the attention kernel against PyTorch SDPA with a
materialized bias and against FlexAttention with a T5 ``score_mod``, at L = 64, 128, 512; then the whole
``triton`` backend against ``reference`` in float16/bfloat16 and the ONNX Runtime CUDA backend (when
onnxruntime-gpu is present) for the base and large presets on the shipped text; tokens/s, achieved TFLOP/s
and the fraction of the GPU's measured bf16 matmul peak. Writes ``bench/results/gpu-triton-<date>-<host>.json``.

Run through ``bench/gpu_triton.sh`` on a CUDA machine (it runs the kernel parity tests first).
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys

import torch
import triton.testing
from fastinstructor.kernels.attention import t5_attention
from harness import DEFAULT_OUT, ROOT

import fastinstructor
from fastinstructor.backends.cpu import relative_position_bucket
from fastinstructor.benchmark import encoder_flops, matmul_ceilings
from fastinstructor.data import read_jsonl_texts, shared_data_dir
from fastinstructor.dispatch import probe
from fastinstructor.parity import TOLERANCES, compare
from fastinstructor.testmodel import make_test_model

INSTRUCTION = "Represent the Wikipedia document for retrieval:"


def attention_timings(length: int, table: torch.Tensor, heads: int, head_dim: int, batch: int) -> list[dict]:
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pos = torch.arange(length, device="cuda")
    buckets = relative_position_bucket(pos[None, :] - pos[:, None], 32, 128)
    bias = table[buckets].permute(2, 0, 1)[None].to(torch.bfloat16)  # [1, H, L, L] materialized

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[buckets[q_idx, kv_idx], h]

    packed = [t.transpose(1, 2).reshape(batch * length, heads, head_dim).contiguous() for t in (q, k, v)]
    cu = torch.arange(0, (batch + 1) * length, length, device="cuda", dtype=torch.int32)
    flex = torch.compile(flex_attention)
    timings = {
        "sdpa_materialized_bias": triton.testing.do_bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        ),
        "flex_attention": triton.testing.do_bench(lambda: flex(q, k, v, score_mod=score_mod, scale=1.0)),
        "triton_kernel": triton.testing.do_bench(lambda: t5_attention(*packed, cu, length, table)),
    }
    flops = 4 * batch * heads * length * length * head_dim
    return [{"L": length, "impl": name, "ms": ms, "tflops": flops / ms / 1e9} for name, ms in timings.items()]


def attention_rows(heads: int = 16, head_dim: int = 64, batch: int = 32) -> list[dict]:
    table = torch.randn(32, heads, device="cuda")
    return [row for length in (64, 128, 512) for row in attention_timings(length, table, heads, head_dim, batch)]


def time_encode(model, pairs: list, expected, precision: str) -> tuple[float, float, bool]:
    """(ms per pass, min cosine vs the float32 reference, parity passed)."""

    def run():
        out = model.encode(pairs, batch_size=64, max_batch_tokens=32768)
        torch.cuda.synchronize()
        return out

    ms = triton.testing.do_bench(run, warmup=1, rep=3)
    report = compare(run(), expected)
    return ms, report.min_cos, not report.failures(TOLERANCES[precision])


def backend_rows(preset: str, texts: list[str], peak: float, work) -> list[dict]:
    model_dir = work / f"instructor-{preset}-random"
    if not (model_dir / "modules.json").is_file():
        make_test_model(preset, model_dir)
    pairs = [[INSTRUCTION, t] for t in texts]
    reference = fastinstructor.load(model_dir, backend="reference", precision="float32", device="cuda")
    expected = reference.encode(pairs, batch_size=64)
    lengths = [len(ids) for ids in reference.tokenizer(pairs).ids]
    tokens = sum(lengths)
    checkpoint = reference.checkpoint
    # Matmul FLOPs at the real lengths, attention included: the same count as fastinstructor bench.
    flops = encoder_flops(
        checkpoint.config, lengths, checkpoint.out_dim if checkpoint.dense_weight is not None else None
    )
    contenders = {f"triton {p}": ("triton", p) for p in ("bfloat16", "float16", "int8")}
    contenders["reference float32"] = ("reference", "float32")
    if "CUDAExecutionProvider" in probe().onnx_providers:
        contenders["onnx float16"] = ("onnx", "float16")
    rows = []
    for name, (backend, precision) in contenders.items():
        model = fastinstructor.load(model_dir, backend=backend, precision=precision, device="cuda")
        model.encode(pairs[:64])
        ms, min_cos, passed = time_encode(model, pairs, expected, precision)
        tps = tokens / (ms / 1000)
        tflops = flops / (ms / 1000) / 1e12
        rows.append(
            {
                "preset": preset,
                "contender": name,
                "tokens_per_s": tps,
                "tflops": tflops,
                "fraction_of_bf16_peak": tflops / peak,
                "min_cos": min_cos,
                "passed": passed,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_triton: no CUDA device")
    data = shared_data_dir()
    if data is None:
        sys.exit("gpu_triton: the shared data folder was not found")
    texts = [t for _, t in read_jsonl_texts(data / "climate_fever_evidence.jsonl", args.texts)]
    peak = matmul_ceilings(["bfloat16"], "cuda", 8192)["bfloat16"]["gflops"] / 1000
    result = {
        "gpu": torch.cuda.get_device_name(),
        "bf16_matmul_peak_tflops": peak,
        "attention": attention_rows(),
        "backends": [
            r for preset in ("base", "large") for r in backend_rows(preset, texts, peak, ROOT / ".models" / "gpu")
        ],
    }
    for row in result["attention"] + result["backends"]:
        print(row)
    out = DEFAULT_OUT / f"gpu-triton-{datetime.date.today().isoformat()}-{socket.gethostname()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
