"""ONNX export, graph optimization, fp16 conversion and int8 quantization, importable as ``fastinstructor.export``.

See ``onnx_export`` for the graph contract and how each step is done.
"""

from .onnx_export import PRECISIONS, canonical_precision, export_onnx, read_metadata

__all__ = ["PRECISIONS", "canonical_precision", "export_onnx", "read_metadata"]
