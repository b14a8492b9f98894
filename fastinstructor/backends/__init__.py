"""Backends: one forward pass each, behind the ``Backend`` interface (docs/design.md section 3)."""

from __future__ import annotations

from .base import Backend, pool_head
from .cpu import CpuBackend
from .onnx import OnnxBackend
from .reference import ReferenceBackend
from .triton_backend import TritonBackend

BACKENDS: dict[str, type] = {cls.name: cls for cls in (ReferenceBackend, CpuBackend, OnnxBackend, TritonBackend)}

__all__ = [
    "BACKENDS",
    "Backend",
    "CpuBackend",
    "OnnxBackend",
    "ReferenceBackend",
    "TritonBackend",
    "get_backend_class",
    "pool_head",
]


def get_backend_class(name: str) -> type:
    """The backend class for ``name``; unknown or unavailable backends raise with the list of choices."""
    if name not in BACKENDS:
        choices = ", ".join(
            f"{n} ({'available' if c.availability()[0] else c.availability()[1]})" for n, c in BACKENDS.items()
        )
        raise ValueError(f"unknown backend {name!r}; choose one of: {choices}")
    cls = BACKENDS[name]
    ok, why = cls.availability()
    if not ok:
        raise ImportError(f"backend {name!r} is not available here: {why}")
    return cls
