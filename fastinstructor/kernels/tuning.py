"""Which implementation and tile each of the encoder's projections and its attention run on this GPU: chosen
by measurement, at load, never inside a call.

Candidates, per op:

- ``linear`` (float32, float16, bfloat16): cuBLAS through torch (``CUBLAS``: ``torch.mm``, the ReLU in
  cuBLASLt's epilogue through ``torch._addmm_activation``), eligible where the output dtype is the input's
  (T5's ``wo`` under float16 writes float32, which cuBLAS does not); or ``kernels.matmul.linear`` with one of
  its ``TILE_CANDIDATES`` (the ReLU, and a float32 output, in its epilogue).
- ``linear_int8``: ``kernels.matmul.linear_int8`` with one of its ``INT8_TILE_CANDIDATES`` (the scales and ReLU in
  its epilogue), or cuBLAS's int8 product (``torch._int_mm``, the scales and ReLU after it in torch) on the
  large shape class (it needs more than 16 rows).
- ``linear_float8``: ``torch._scaled_mm`` (cuBLASLt, row-wise scales): the only candidate, no choice.
- ``attention``: ``kernels.attention`` with one of its ``TILE_CANDIDATES``.

Shape class: the batch's packed token count (``projection.shape_class``), ``small`` (up to ``SMALL_TOKENS``:
single requests, where latency counts) or ``large`` (offline batches). A choice is kept per (op, dtypes, ReLU,
N x K, class).

Where a choice comes from, the first that has it:

1. ``TABLE``, committed, by GPU architecture (``sm_90``), from ``bench/gpu_triton.py``'s sweep on that
   architecture, keyed by (op, dtype, class). A cuBLAS entry holds for both classes: cuBLAS picks its own
   kernel per shape, where a Triton tile is fixed. ``FASTINSTRUCTOR_TUNE=1`` skips the table.
2. the tuning file of this machine, ``$FASTINSTRUCTOR_CACHE/tuning/<GPU>-torch<v>-triton<v>.json``: choices
   measured here before.
3. measured now: every eligible candidate timed on the site's own shape (``triton.testing.do_bench``, median),
   the fastest kept and written to the tuning file. A candidate that fails (a tile that needs more shared
   memory than the GPU has) is skipped.

Under the interpreter (``TRITON_INTERPRET=1``, the CPU tests) nothing is measured: timings there mean nothing,
and the first eligible candidate runs (cuBLAS where eligible, else the first tile).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..locking import cache_dir, write_atomic
from . import attention, matmul
from .projection import CUBLAS, Projection
from .quantize import quantize_rows_ref

__all__ = ["CLASSES", "TABLE", "Site", "Tuner", "gpu_tuner"]

CLASSES = ("small", "large")  # projection.shape_class's names
# The H200 (sm_90) sweep of 2026-11-30 (commit aec4421; ../shared/measurements/2026-11-30-h200/, M = 4,096
# packed tokens on base's qkv, wi and wo). bfloat16: cuBLAS 544-640 TFLOP/s against 389-455 for the best tile.
# int8: the 64x128x64 tile 455-661 TOP/s (best or within 1% of it on each shape) against 138-338 for
# torch._int_mm with its scales applied in torch. Attention: 64x32 the fastest at L = 64, 128 and 512. float16
# was not swept: Hopper runs it on the same tensor cores at bfloat16's rate, so bfloat16's entries stand for it.
_H200_INT8_TILE = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
_H200_ATTENTION_TILE = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
TABLE: dict[str, dict[tuple[str, str, str], str | dict]] = {
    "sm_90": {
        ("linear", "bfloat16", "large"): CUBLAS,
        ("linear", "float16", "large"): CUBLAS,
        ("linear_int8", "int8", "large"): _H200_INT8_TILE,
        ("attention", "bfloat16", "large"): _H200_ATTENTION_TILE,
        ("attention", "float16", "large"): _H200_ATTENTION_TILE,
    }
}


@dataclass(frozen=True)
class Site:
    """One place a choice is made: an op on given dtypes and, for a projection, ``[M, k] x [n, k]^T``."""

    op: str  # "linear", "linear_int8" or "attention"
    dtype: str  # the inputs' dtype (torch name without the prefix)
    out_dtype: str = ""
    relu: bool = False
    n: int = 0  # attention: heads
    k: int = 0  # attention: head dim

    def key(self, klass: str) -> str:
        return f"{self.op}/{self.dtype}->{self.out_dtype}/{'relu' if self.relu else 'none'}/{self.n}x{self.k}/{klass}"

    def candidates(self, klass: str) -> list[str | dict]:
        if self.op == "attention":
            return list(attention.TILE_CANDIDATES)
        if self.op == "linear_int8":
            return ([CUBLAS] if klass == "large" else []) + list(matmul.INT8_TILE_CANDIDATES)
        return ([CUBLAS] if self.out_dtype == self.dtype else []) + list(matmul.TILE_CANDIDATES)


def architecture() -> str:
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return "interpreter"
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def tuning_file() -> Path:
    """This machine's tuning file: its GPU and the torch and triton versions that ran the measurements."""
    import triton

    gpu = torch.cuda.get_device_name().replace(" ", "-").replace("/", "-")
    return cache_dir("tuning") / f"{gpu}-torch{torch.__version__}-triton{triton.__version__}.json"


def _do_bench(run: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(run, warmup=5, rep=25, return_mode="median")


class Tuner:
    """Choices for one backend's sites, from the table, the tuning file or a measurement (module docstring).

    ``measure(site, klass, candidate) -> ms`` times one candidate (it may raise: the candidate is skipped);
    None means nothing is measured here (the interpreter). ``choices_made`` records where each came from."""

    def __init__(
        self,
        arch: str,
        measure: Callable[[Site, str, str | dict], float] | None,
        path: Path | None = None,
        use_table: bool = True,
    ) -> None:
        self.arch, self.measure, self.path = arch, measure, path
        self.table = TABLE.get(arch, {}) if use_table else {}
        self.measured: dict[str, str | dict] = {}
        if path is not None and path.is_file():
            try:
                self.measured = json.loads(path.read_text())
            except (OSError, ValueError):
                self.measured = {}  # unreadable: measured again and rewritten
        self.sources: dict[str, str] = {}

    def choose(self, site: Site, klass: str) -> str | dict:
        key, candidates = site.key(klass), site.candidates(klass)
        entry = self.table.get((site.op, site.dtype, klass))
        if entry is None and self.table.get((site.op, site.dtype, "large")) == CUBLAS:
            entry = CUBLAS  # cuBLAS picks its own kernel per shape: a cuBLAS entry holds for every class
        if entry is not None and entry in candidates:
            self.sources[key] = f"table {self.arch}"
            return entry
        if key in self.measured and self.measured[key] in candidates:
            self.sources[key] = f"tuning file {self.path}"
            return self.measured[key]
        if self.measure is None:
            self.sources[key] = "default (nothing measured here)"
            return candidates[0]
        timed = []
        for candidate in candidates:
            try:
                timed.append((self.measure(site, klass, candidate), candidates.index(candidate)))
            except Exception:  # a tile this GPU cannot run (shared memory): not a candidate here
                continue
        if not timed:
            raise RuntimeError(f"no implementation of {key} runs on this GPU")
        best = candidates[min(timed)[1]]
        self.measured[key] = best
        self.sources[key] = "measured at load"
        self._save()
        return best

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        measured = json.dumps(self.measured, indent=1, sort_keys=True)
        write_atomic(self.path, lambda tmp: tmp.write_text(measured))


def gpu_tuner() -> Tuner:
    """The tuner of this process's GPU, or of the interpreter (which measures nothing)."""
    arch = architecture()
    if arch == "interpreter":
        return Tuner(arch, None)
    return Tuner(arch, _measure, tuning_file(), use_table=os.environ.get("FASTINSTRUCTOR_TUNE") != "1")


_TUNE_TOKENS = {"small": 128, "large": 16384}  # the packed tokens each class is timed at


def _measure(site: Site, klass: str, candidate: str | dict) -> float:
    return time_candidate(site, candidate, "cuda", _TUNE_TOKENS[klass], _do_bench)


def time_candidate(
    site: Site, candidate: str | dict, device: str, tokens: int, bench: Callable[[Callable[[], object]], float]
) -> float:
    """``bench`` of one candidate on random inputs of the site's shape, ``tokens`` packed tokens (attention: in
    sequences of up to 512)."""
    g = torch.Generator(device=device).manual_seed(0)
    if site.op == "attention":
        q = torch.randn(tokens, site.n, site.k, device=device, generator=g).to(getattr(torch, site.dtype))
        cu = torch.tensor([*range(0, tokens, 512), tokens], device=device, dtype=torch.int32)
        table = torch.randn(32, site.n, device=device, generator=g)
        return bench(lambda: attention.t5_attention(q, q, q, cu, table, tile=candidate))
    x = torch.randn(tokens, site.k, device=device, generator=g)
    w = torch.randn(site.n, site.k, device=device, generator=g) / site.k**0.5
    out = getattr(torch, site.out_dtype)
    if site.op == "linear_int8":
        proj = Projection.prepare(w, site.relu, out, torch.int8)
        xq = quantize_rows_ref(x, torch.int8)
        return bench(lambda: proj.run(candidate, xq))
    dtype = getattr(torch, site.dtype)
    proj = Projection.prepare(w.to(dtype), site.relu, out, None)
    xd = x.to(dtype)
    return bench(lambda: proj.run(candidate, xd))
