"""Compile every Triton kernel for an NVIDIA GPU on a machine without one, with Triton's real compiler.

The kernel tests run in Triton's interpreter on the CPU, which cannot show what only the compiler checks: a
construct it rejects, a dot shape it cannot lower, a tile that needs more shared memory than the GPU has. Here
a stand-in driver reports the target GPU and every launch stops once compiled (Triton's ``warmup``), through
PTX and ptxas. Nothing runs on a GPU, so this says nothing of results or speed. The launches are the kernels'
public entry points over the dtypes, head dims, odd and even sizes and ``TILE_CANDIDATES`` the project uses.
It leans on Triton internals (the active driver, ``JITFunction.run``), checked with triton 3.6 and 3.9.

    .venv/bin/python bench/compile_kernels.py [--arch 90]

Exit status 1 when a variant fails to compile or needs more shared memory than the GPU has.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from fastinstructor.kernels import attention, matmul, pooling, quantize, rms_norm

# Shared memory one block may use (the opt-in maximum), by compute capability: H100/H200, A100, L4/L40/4090.
SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376, 86: 101376}


class StandInDriver:
    """Just enough of a CUDA driver for Triton to compile for ``arch``; it never launches anything."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


def _matmul_launches():
    for tile in matmul.TILE_CANDIDATES:
        for m, n, k in [(4096, 2304, 768), (70, 300, 96)]:
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
                for activation in ("none", "relu"):
                    for out_dtype in (None, torch.float32):
                        yield (
                            f"linear {dtype} {tile}",
                            lambda x=x, w=w, a=activation, o=out_dtype, t=tile: matmul.linear(x, w, a, o, tile=t),
                        )


def _int8_launches():
    for tile in matmul.INT8_TILE_CANDIDATES:
        for m, n, k in [(4096, 2304, 768), (70, 300, 96)]:
            (xq, sx), (wq, sw) = (quantize.quantize_rows_ref(torch.randn(rows, k)) for rows in (m, n))
            for activation in ("none", "relu"):
                for out_dtype in (torch.bfloat16, torch.float32):
                    yield (
                        f"linear_int8 {tile}",
                        lambda xq=xq, sx=sx, wq=wq, sw=sw, a=activation, o=out_dtype, t=tile: matmul.linear_int8(
                            xq, sx, wq, sw, a, o, tile=t
                        ),
                    )


def _quantize_launches(arch: int):
    # float8 runs only where FP8 tensor cores are (compute capability 8.9 on): the triton backend's table says so.
    for quant in [q for q in quantize.QUANT_DTYPES if q == torch.int8 or arch >= 89]:
        for d in (64, 768, 1024, 2048, 4096, 5120):
            x, weight = torch.randn(7, d).bfloat16(), torch.randn(d)
            for relu in (False, True):
                yield (f"quantize_rows {quant} d={d}", lambda x=x, q=quant, r=relu: quantize.quantize_rows(x, q, r))
            yield (
                f"rms_norm_quantized {quant} d={d}",
                lambda x=x, w=weight, q=quant: rms_norm.rms_norm_quantized(x, w, 1e-6, torch.randn(7, x.shape[1]), q),
            )


def _attention_launches():
    for tile in attention.TILE_CANDIDATES:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for head_dim in (16, 32, 64, 128):
                # q, k, v as the backend passes them: views of the fused projection's [T, 3, H, D] output
                q, k, v = torch.randn(130, 3, 2, head_dim).to(dtype).unbind(1)
                cu, table = torch.tensor([0, 64, 130], dtype=torch.int32), torch.randn(32, 2)
                yield (
                    f"t5_attention {dtype} d={head_dim} {tile}",
                    lambda q=q, k=k, v=v, cu=cu, table=table, t=tile: attention.t5_attention(
                        q, k, v, cu, table, tile=t
                    ),
                )


def _norm_and_pool_launches():
    for d in (64, 100, 768, 1024, 2048):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x, weight = torch.randn(7, d).to(dtype), torch.randn(d)
            same = weight.to(dtype)
            yield (f"rms_norm {dtype} d={d}", lambda x=x, w=same: rms_norm.rms_norm(x, w, 1e-6))
            yield (
                f"rms_norm {dtype} -> bfloat16 d={d}",
                lambda x=x, w=weight: rms_norm.rms_norm(x, w, 1e-6, torch.randn(7, x.shape[1]), torch.bfloat16),
            )
            yield (
                f"rms_norm+residual {dtype} d={d}",
                lambda x=x, w=weight: rms_norm.rms_norm(x, w, 1e-6, torch.randn(7, x.shape[1])),
            )
            cu = torch.tensor([0, 3, 7], dtype=torch.int32)
            yield (
                f"masked_mean_pool {dtype} d={d}",
                lambda x=x, cu=cu: pooling.masked_mean_pool(x, cu, torch.tensor([1, 0])),
            )


def compile_everything(arch: int) -> list[dict]:
    """Launch every variant with launches turned into compile-only warm-ups; one row per compiled variant."""
    compiled: dict[tuple, dict] = {}
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        settings = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        key = (self.fn.__name__, tuple(sorted(settings.items())), tuple(str(getattr(a, "dtype", "")) for a in args))
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled[key] = {"kernel": self.fn.__name__, "settings": settings, "shared": kernel.metadata.shared}
        return kernel

    driver.set_active(StandInDriver(arch))
    JITFunction.run = compile_only
    failures = []
    launches = [_matmul_launches(), _int8_launches(), _quantize_launches(arch), _attention_launches()]
    try:
        for label, launch in itertools.chain(*launches, _norm_and_pool_launches()):
            try:
                launch()
            except Exception as err:  # the compiler's errors have several types; report every one
                failures.append({"kernel": label, "error": f"{type(err).__name__}: {err}"[:2000]})
    finally:
        JITFunction.run = run  # the stand-in driver stays: there is no real one to go back to
    return list(compiled.values()) + failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    args = parser.parse_args()
    rows = compile_everything(args.arch)
    limit = SHARED_LIMIT.get(args.arch)
    failed = [r for r in rows if "error" in r]
    oversize = [r for r in rows if limit and r.get("shared", 0) > limit]
    for row in rows:
        if "error" not in row:
            print(f"{row['kernel']:<28} shared {row['shared']:>7,} B  {row['settings']}")
    for row in failed:
        print(f"FAILED {row['kernel']}: {row['error']}")
    for row in oversize:
        print(f"OVER THE {limit:,} B SHARED MEMORY LIMIT: {row['kernel']} {row['settings']}")
    compiled = len(rows) - len(failed)
    print(f"\ntriton {triton.__version__}, sm_{args.arch}: {compiled} variants compiled, {len(failed)} failed, "
          f"{len(oversize)} over the shared memory limit")  # fmt: skip
    sys.exit(1 if failed or oversize else 0)


if __name__ == "__main__":
    main()
