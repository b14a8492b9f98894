"""The backend interface (docs/design.md section 3) and the capability table every backend class declares.

A backend class says, once, which precision runs on which device (``capabilities``), where each stands in
``auto``'s order of preference (``rank``), and why it cannot run on this machine (``availability`` for the
packages, ``unavailable`` for the machine). The dispatcher, ``check``, ``bench`` and ``export`` derive their
candidates from these tables; adding a backend is one file and one entry in ``backends.BACKENDS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from ..batching import PackedBatch, pack_batch, pad_batch
from ..hardware import Hardware
from ..precisions import canonical_precision
from ..t5 import pool_head

__all__ = [
    "Backend",
    "BackendClass",
    "Capability",
    "PackedBackend",
    "batch_inputs",
    "check_precision",
    "embed_inputs",
    "pool_head",
    "takes_packed",
    "takes_large_batches",
    "uses_compute_thread",
]

DEVICE_NAMES = {"cpu": "the CPU", "cuda": "CUDA"}


@dataclass(frozen=True)
class Capability:
    """One precision on one device type that a backend runs."""

    precision: str
    device: str  # "cpu" or "cuda"
    rank: int | None = None  # place in auto's order on this device, lowest first; None: only when asked for


class Backend(Protocol):
    """A forward pass: token ids in, one embedding per row out.

    ``embed`` returns ``[B, out_dim]`` float32: instruction-masked mean pooling, the Dense projection
    when the checkpoint has one, and L2 normalization when it has a Normalize module. A backend whose
    ``packed_input`` is True also has ``embed_packed`` (``PackedBackend``), and the pipeline calls that one.
    """

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    packed_input: ClassVar[bool]
    device: torch.device

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_start: torch.Tensor
    ) -> torch.Tensor: ...


class PackedBackend(Backend, Protocol):
    """A backend that takes a batch without padding (``batching.PackedBatch``: token ids, ``cu_seqlens``,
    ``pool_start`` and ``max_len``), as the pipeline builds it for it: ``embed_packed`` returns what ``embed``
    returns for the same rows padded."""

    def embed_packed(self, batch: PackedBatch) -> torch.Tensor: ...


class BackendClass:
    """What every backend class declares; ``precisions`` is derived from ``capabilities``."""

    name: ClassVar[str]
    capabilities: ClassVar[tuple[Capability, ...]]
    precisions: ClassVar[tuple[str, ...]]  # every precision of the table, in its order
    # True: the class has embed_packed(PackedBatch), and the pipeline packs its batches (no padding).
    packed_input: ClassVar[bool] = False
    # True: when the caller names no policy, encode and the embed job give it batches of up to 1,024 rows and 65,536
    # real tokens (batching.DEFAULT_PACKED_POLICY: what keeps a GPU busy); else their CPU defaults (32 rows).
    large_batches: ClassVar[bool] = False
    # True: on the CPU its arithmetic is PyTorch's (OpenMP threads), so the model's calls run on the one compute
    # thread (fastinstructor.compute_thread); ONNX Runtime has its own thread pool and serves concurrent callers.
    pytorch_cpu: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.precisions = tuple(dict.fromkeys(c.precision for c in cls.capabilities))

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """Whether the packages this backend needs are installed, and what it runs on (or how to install)."""
        return True, ""

    @classmethod
    def unavailable(cls, precision: str, device: str, hardware: Hardware) -> str | None:
        """Why this machine cannot run (or should not be offered) ``precision`` on ``device``; None when it can."""
        return None

    @classmethod
    def rank(cls, capability: Capability, hardware: Hardware) -> int | None:
        """``capability``'s place in ``auto``'s order on this machine (lowest first; None: only when asked for)."""
        return capability.rank

    @classmethod
    def runs(cls) -> str:
        """The table in words: "float32 or int8 on the CPU; float16 on CUDA"."""
        devices = dict.fromkeys(c.device for c in cls.capabilities)
        return "; ".join(
            " or ".join(c.precision for c in cls.capabilities if c.device == d) + f" on {DEVICE_NAMES[d]}"
            for d in devices
        )

    @classmethod
    def check_supported(cls, precision: str, device: str | torch.device) -> str:
        """The canonical precision when the table has ``precision`` on ``device``'s type, else a ValueError."""
        precision = canonical_precision(precision)
        kind = torch.device(device).type
        if not any(c.precision == precision and c.device == kind for c in cls.capabilities):
            raise ValueError(f"backend {cls.name!r} runs {cls.runs()}; not {precision} on device={str(device)!r}")
        return precision


def why_not(cls: type[BackendClass], precision: str, device: str, hardware: Hardware) -> str | None:
    """Why backend ``cls`` cannot run ``precision`` on ``device`` here, or None when it can."""
    if not any(c.precision == precision and c.device == device for c in cls.capabilities):
        return f"backend {cls.name!r} runs {cls.runs()}"
    ok, why = cls.availability()
    if not ok:
        return why
    if device == "cuda" and not hardware.cuda:
        return "no CUDA device"
    return cls.unavailable(precision, device, hardware)


def takes_packed(backend: Backend) -> bool:
    """Whether ``backend`` takes ``PackedBatch`` inputs (``embed_packed``); a stand-in without the flag does not."""
    return bool(getattr(backend, "packed_input", False))


def takes_large_batches(backend: Backend) -> bool:
    """Whether the pipeline's default policy for ``backend`` is ``DEFAULT_PACKED_POLICY`` (``large_batches``); a
    stand-in without the flag gets it when it takes packed batches."""
    return bool(getattr(backend, "large_batches", takes_packed(backend)))


def uses_compute_thread(backend: Backend) -> bool:
    """Whether the model's calls on ``backend`` run on ``compute_thread`` (``pytorch_cpu``, on the CPU)."""
    return bool(getattr(backend, "pytorch_cpu", False)) and backend.device.type == "cpu"


def batch_inputs(backend: Backend, ids: list[list[int]], pool_start: list[int]) -> PackedBatch | tuple:
    """The rows as ``backend`` takes them: packed for a ``packed_input`` backend, else padded; in page-locked memory
    when it runs on CUDA, so that its copies to the device overlap."""
    pin = backend.device.type == "cuda"
    return pack_batch(ids, pool_start, pin) if takes_packed(backend) else pad_batch(ids, pool_start, pin_memory=pin)


def embed_inputs(backend: Backend, inputs: PackedBatch | tuple) -> torch.Tensor:
    """``backend``'s embeddings of what ``batch_inputs`` built for it."""
    return backend.embed_packed(inputs) if takes_packed(backend) else backend.embed(*inputs)


def check_precision(backend: type[BackendClass], precision: str) -> str:
    """The canonical name of ``precision`` when ``backend`` runs it on some device, else a ValueError."""
    name = canonical_precision(precision)
    if name not in backend.precisions:
        raise ValueError(
            f"backend {backend.name!r} does not support precision {precision!r}; "
            f"choose one of {', '.join(backend.precisions)}"
        )
    return name
