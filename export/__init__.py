"""ONNX export, graph optimization, fp16 conversion and int8 quantization, importable as ``fastinstructor.export``.

The exporter and the ONNX Runtime backend are tracked in issue 4; this package is installed and
import-tested already so that the layout of DESIGN section 2 holds for the editable install and the wheel.
"""
