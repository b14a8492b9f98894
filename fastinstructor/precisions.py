"""Precision names: the canonical five and their short aliases, accepted everywhere a precision is taken."""

from __future__ import annotations

__all__ = ["PRECISIONS", "ALIASES", "canonical_precision"]

# float8: e4m3 weights and activations, on GPUs with FP8 tensor cores (the triton backend).
PRECISIONS = ("float32", "bfloat16", "float16", "int8", "float8")
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8"}


def canonical_precision(precision: str, allow_auto: bool = False) -> str:
    """``precision`` by its canonical name (``fp16`` -> ``float16``); an unknown name raises with the choices."""
    if allow_auto and precision == "auto":
        return precision
    name = ALIASES.get(precision, precision)
    if name not in PRECISIONS:
        choices = ", ".join([*(["auto"] if allow_auto else []), *PRECISIONS, *ALIASES])
        raise ValueError(f"unknown precision {precision!r}; choose one of: {choices}")
    return name
