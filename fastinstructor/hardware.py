"""What this machine has: a CUDA device, CPU features, and the packages the backends need.

One probe, shared by the dispatcher (which backends can run here) and the benchmark (the machine it
describes in its report).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from . import compute_thread

__all__ = ["VNNI", "Hardware", "probe", "cpu_flags", "cpu_model", "device_type", "set_threads", "threads"]

# The packages that decide which backends run here; their versions key cached parity results.
PACKAGES = ("fastinstructor", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "triton")
# The CPU features the backends' speed depends on, as /proc/cpuinfo names them.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
# Int8 dot products accumulated in 32 bits. Without them, x86 int8 kernels (oneDNN's, ONNX Runtime's U8S8) multiply
# u8 x s8 pairs into 16 bits (vpmaddubsw), which saturates when the weights use the whole int8 range: there the cpu
# and onnx backends keep their int8 weights in 7 bits (t5.quantize_rows_ref's reduce_range, the ONNX export's).
VNNI = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@dataclass(frozen=True)
class Hardware:
    cuda_device: str | None  # name of GPU 0, or None
    cuda_capability: tuple[int, int] | None
    cpu_flags: frozenset[str]
    packages: dict[str, str | None]  # installed versions of PACKAGES
    onnx_providers: tuple[str, ...]

    @property
    def cuda(self) -> bool:
        return self.cuda_device is not None

    @property
    def devices(self) -> tuple[str, ...]:
        return ("cuda", "cpu") if self.cuda else ("cpu",)

    def describe(self) -> dict:
        return {
            "cuda_device": self.cuda_device,
            "cuda_capability": self.cuda_capability,
            "cpu_flags": {f: f in self.cpu_flags for f in CPU_FLAGS},
            "packages": self.packages,
            "onnx_providers": list(self.onnx_providers),
        }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache  # the CPU does not change under a process; the cpu backend asks once per int8 projection
def _cpuinfo(field: str) -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return ""
    line = next((x for x in cpuinfo.read_text().splitlines() if x.startswith(field)), "")
    return line.partition(":")[2].strip()


def cpu_model() -> str:
    """The CPU's model name (every figure is recorded with it)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, as /proc/cpuinfo names them (empty where it does not exist)."""
    return frozenset(_cpuinfo("flags").split())


_threads: int | None = None  # set_threads' value; None: each library's own default (every core)


def set_threads(count: int) -> None:
    """Compute on at most ``count`` CPU threads in this process, so that several workers on one machine do not
    oversubscribe its cores: PyTorch's intra-op threads (its matmuls, the native ops' ``at::parallel_for``) now,
    ONNX Runtime sessions created from now on (the onnx backend reads ``threads()``), and the fast tokenizer's
    thread pool through ``RAYON_NUM_THREADS`` unless that is set (it takes effect only if this process has not
    tokenized yet: the pool starts once). Process-wide, as PyTorch's setting is; ``fastinstructor.load(threads=)``
    and every command's ``--threads`` call this."""
    global _threads
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"threads must be a whole number of at least 1, got {count!r}")
    torch.set_num_threads(count)  # this thread's and those that start PyTorch's threads from now on ...
    compute_thread.run(torch.set_num_threads, count)  # ... but a thread that already has keeps its count
    os.environ.setdefault("RAYON_NUM_THREADS", str(count))
    _threads = count


def threads() -> int | None:
    """The thread count ``set_threads`` set in this process, or None."""
    return _threads


def device_type(device: str | torch.device) -> str:
    """``"cpu"`` or ``"cuda"``, the device a model runs on; a ValueError naming the fix for any other. A model runs on
    the first visible GPU (the one ``probe`` describes), so ``"cuda:1"`` is refused rather than run on GPU 0."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a device; pass 'cpu' or 'cuda'") from err
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; fastinstructor runs on 'cpu' or 'cuda'")
    if parsed.type == "cuda" and parsed.index not in (None, 0):
        raise ValueError(
            f"device {device!r}: fastinstructor runs on the first visible GPU (cuda:0); to run on GPU {parsed.index}, "
            f"start the process with CUDA_VISIBLE_DEVICES={parsed.index}"
        )
    return parsed.type


def probe() -> Hardware:
    """This machine's CUDA device, CPU flags, backend packages and ONNX Runtime providers."""
    cuda_device = capability = None
    if torch.cuda.is_available():
        cuda_device = torch.cuda.get_device_name(0)
        capability = torch.cuda.get_device_capability(0)
    providers: tuple[str, ...] = ()
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    return Hardware(cuda_device, capability, cpu_flags(), {p: _version(p) for p in PACKAGES}, providers)
