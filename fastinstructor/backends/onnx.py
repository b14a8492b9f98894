"""The ONNX Runtime backend: one exported graph (encoder + pooling + Dense + normalize) per model and precision.

The graph comes from an export folder (``onnx_dir=``) or is exported on first use into a cache folder keyed
by the model's fingerprint, the precision and the onnxruntime version (``$FASTINSTRUCTOR_CACHE``, default
``~/.cache/fastinstructor``), under a file lock so that two processes never export the same graph twice.

Before every load, the graph's files are checked against the sha256 and size recorded at export
(``verify_export``), so a graph changed after export is never run. A cache entry that fails (changed,
damaged, or from a version that recorded no checksums) is exported again under the lock, with a warning
that says why; an export folder of the user's is never rewritten: it is refused with a ``ValueError``.
``graph_checksums`` is what the dispatcher keys this graph's parity result on.

Execution providers: CUDA when onnxruntime-gpu sees a GPU (inputs and outputs then stay on the GPU through
I/O binding), the CPU otherwise. float16 graphs are for CUDA; int8 (dynamic quantization) is for the CPU.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..hardware import VNNI, Hardware, cpu_flags
from ..hardware import threads as configured_threads
from ..locking import cache_dir, hold
from .base import BackendClass, Capability

__all__ = ["OnnxBackend", "cuda_available", "onnx_cache_dir"]

log = logging.getLogger(__name__)

_INSTALL = "pip install 'fastinstructor[onnx]' (CPU) or 'fastinstructor[gpu]' (CUDA: onnxruntime-gpu)"


def cuda_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def onnx_cache_dir(checkpoint: Checkpoint, precision: str) -> Path:
    import onnxruntime

    return cache_dir("onnx") / f"{checkpoint.fingerprint[:20]}-{precision}-ort{onnxruntime.__version__}"


def _verified(folder: Path, checkpoint: Checkpoint, precision: str) -> dict:
    """The folder's metadata, once its graph matches its checksums, this model and this precision."""
    from ..export.onnx_export import verify_export

    metadata = verify_export(folder)
    if metadata.get("source_fingerprint") != checkpoint.fingerprint:
        raise ValueError(
            f"{folder} was exported from a different model ({metadata.get('source_model')}); "
            "export this model again or pass its own export folder"
        )
    if metadata.get("precision") != precision:
        raise ValueError(f"{folder} holds a {metadata.get('precision')} graph, not {precision}")
    if precision == "int8" and not metadata.get("int8_reduce_range") and not VNNI & cpu_flags():
        raise ValueError(
            f"{folder} holds int8 weights in 8 bits, exported on a CPU with VNNI: on this one (no VNNI) ONNX Runtime's "
            "int8 products saturate; export it again here (fastinstructor export), which keeps them in 7 bits"
        )
    return metadata


def _cached_export(checkpoint: Checkpoint, precision: str) -> tuple[Path, dict]:
    """The cache's verified graph for this model and precision, exported (again) under the lock if need be."""
    from ..export import onnx_export

    folder = onnx_cache_dir(checkpoint, precision)
    try:
        return folder, _verified(folder, checkpoint, precision)
    except (FileNotFoundError, ValueError):
        pass  # checked again under the lock: another process may be exporting it right now
    with hold(folder.with_name(folder.name + ".lock"), what=f"the ONNX cache entry {folder}"):
        try:
            return folder, _verified(folder, checkpoint, precision)
        except (FileNotFoundError, ValueError) as err:
            task = f"exporting {checkpoint.path} to ONNX ({precision}) into {folder}"
            if folder.exists():  # not a first use: say why the entry is not used
                task = f"the cached ONNX graph {folder} cannot be trusted ({err}); exporting it again"
                log.warning("%s", task)
            else:
                log.info("%s", task)
        try:
            # the cache's own entry: replaced whatever it holds (a user's folder only when it holds an export)
            metadata = onnx_export.export_onnx(checkpoint, folder, precision=precision, optimize=True, replace_any=True)
        except Exception as err:  # whatever failed (torch, onnx, onnxruntime, the disk), it is named here
            raise RuntimeError(f"{task} failed: {type(err).__name__}: {err}") from err
    return folder, metadata


class OnnxBackend(BackendClass):
    name: ClassVar[str] = "onnx"
    # float16 graphs need the CUDA provider; int8 (dynamic quantization) is ONNX Runtime's CPU path.
    capabilities: ClassVar[tuple[Capability, ...]] = (
        Capability("int8", "cpu", 10),
        Capability("float32", "cpu", 50),  # after cpu/float32 (40): as fast or slower on both CPU families
        Capability("float16", "cuda", 30),
        Capability("float32", "cuda"),
    )

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
        if missing:
            return False, f"{' and '.join(missing)} not installed: {_INSTALL}"
        import onnxruntime

        return True, f"onnxruntime {onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"

    @classmethod
    def unavailable(cls, precision: str, device: str, hardware: Hardware) -> str | None:
        if device == "cuda" and "CUDAExecutionProvider" not in hardware.onnx_providers:
            return "onnxruntime has no CUDA provider (install onnxruntime-gpu instead of onnxruntime)"
        return None

    def __init__(
        self,
        checkpoint: Checkpoint,
        precision: str = "float32",
        device: str = "cpu",
        *,
        onnx_dir: str | os.PathLike | None = None,
    ) -> None:
        self.precision = precision = self.check_supported(precision, device)
        ok, why = self.availability()
        if not ok:
            raise ImportError(f"the onnx backend needs {why}")
        import onnxruntime

        from ..export.onnx_export import MODEL_FILE

        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        if on_cuda and not cuda_available():
            raise ValueError(
                f"device='cuda' needs onnxruntime-gpu and a GPU; providers here: "
                f"{onnxruntime.get_available_providers()}"
            )

        if onnx_dir is None:
            folder, metadata = _cached_export(checkpoint, precision)
        else:  # the user's folder: verified, never exported over
            folder = Path(onnx_dir)
            metadata = _verified(folder, checkpoint, precision)
        self.folder, self.metadata, self.out_dim = folder, metadata, checkpoint.out_dim
        # A parity result holds for the graph it measured: the dispatcher keys it on these.
        self.graph_checksums: dict[str, dict] = metadata["files"]
        options = onnxruntime.SessionOptions()
        threads = configured_threads()  # fastinstructor.load(threads=) / --threads: one setting for every backend
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_cuda else ["CPUExecutionProvider"]
        try:
            self.session = onnxruntime.InferenceSession(str(folder / MODEL_FILE), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise ValueError(
                f"cannot load {folder / MODEL_FILE}: {type(err).__name__}: {err}. It is as exported; export "
                f"it again with this onnxruntime ({onnxruntime.__version__})"
            ) from None

    @classmethod
    def from_folder(cls, checkpoint: Checkpoint, folder: str | os.PathLike, device: str = "cpu") -> OnnxBackend:
        """The graph in an export folder, at the precision it was exported with."""
        from ..export.onnx_export import read_metadata

        return cls(checkpoint, read_metadata(folder)["precision"], device, onnx_dir=folder)

    def _check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_start: torch.Tensor) -> None:
        for name, t, ndim in (
            ("input_ids", input_ids, 2),
            ("attention_mask", attention_mask, 2),
            ("pool_start", pool_start, 1),
        ):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.ndim != ndim:
                what = f"{t.dtype} with {t.ndim} dims" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be an int64 tensor with {ndim} dims, got {what}")
        if attention_mask.shape != input_ids.shape or pool_start.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"shapes disagree: input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)}, "
                f"pool_start {tuple(pool_start.shape)}; expected [B, L], [B, L], [B]"
            )

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
        self._check(input_ids, attention_mask, pool_start)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pool_start": pool_start}
        if self.device.type == "cpu":
            feed = {name: t.numpy() for name, t in inputs.items()}
            return torch.from_numpy(self.session.run(["embeddings"], feed)[0])
        # CUDA: bind device memory directly; no copies through the host.
        binding = self.session.io_binding()
        for name, t in inputs.items():
            t = t.to(self.device).contiguous()
            inputs[name] = t  # keep alive until the run ends
            binding.bind_input(name, "cuda", self.device.index or 0, np.int64, tuple(t.shape), t.data_ptr())
        out = torch.empty((input_ids.shape[0], self.out_dim), dtype=torch.float32, device=self.device)
        binding.bind_output("embeddings", "cuda", self.device.index or 0, np.float32, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out
