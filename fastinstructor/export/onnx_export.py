"""Export an INSTRUCTOR checkpoint to one ONNX graph: token ids in, the normalized embedding out.

Graph contract (opset 17, dynamic batch ``B`` and sequence ``L``)::

    input_ids       int64 [B, L]    right-padded token ids (pad id 0)
    attention_mask  int64 [B, L]    1 for tokens, 0 for padding
    pool_start      int64 [B]       first pooled position: the instruction's token count (0 = pool everything)
    embeddings      float32 [B, out_dim]   encoder + instruction-masked mean pooling + Dense + L2 normalize

How it is built, and why:

- ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``) on transformers' ``T5EncoderModel``
  in **eager** attention, wrapped with the project's pooling head. The dynamo exporter fails on transformers'
  SDPA T5 attention, and the eager graph is the pattern ONNX Runtime's T5 fusions recognize.
- ``--optimize``: ONNX Runtime's own transformer optimizer (``onnxruntime.transformers.optimizer``, model type
  ``t5``): RMSNorm becomes ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` and the
  relative position bias and attention are fused where its patterns match. The op counts before and after
  are recorded, so what actually fused is visible.
- ``float16``: ONNX Runtime's float16 converter with inputs/outputs kept int64/float32 and the numerically
  fragile ops kept float32 (RMSNorm, softmax, the FFN output projection ``wo``, pooling, normalize): T5
  overflows float16 in the FFN output on trained weights (docs/design.md section 5). For the CUDA provider.
- ``int8``: ``onnxruntime.quantization.quantize_dynamic`` on the MatMuls with constant weights: int8 weights
  per output channel, uint8 activations quantized at run time. For the CPU: the weights use the whole int8 range
  on a CPU with VNNI and 7 bits (``reduce_range``) on one without, where 8-bit ones saturate ONNX Runtime's U8S8
  products (``hardware.VNNI``); the metadata records which, and the onnx backend refuses an 8-bit graph there.
- Models over 2 GB (instructor-xl in float32) are saved with their weights in ``model.onnx.data``.
- ``optimum`` is not used: optimum 2.x no longer contains the ONNX exporter, ``optimum-onnx`` pins
  transformers < 4.58 (this project runs on 5.x), and its T5 export builds the seq2seq encoder/decoder graphs,
  not an encoder with our pooling head. Everything it would do here is the two ONNX Runtime tools above.

Each export folder holds ``model.onnx`` and ``fastinstructor_onnx.json``: the source model's fingerprint,
opset, precision, optimization, op counts, the parity against the float32 reference (measured by the caller,
``fastinstructor export``, and recorded with ``record_parity``), and
the sha256 and size of every file of the graph (``model.onnx``, and ``model.onnx.data`` when there is one).
``verify_export`` checks those files against their record; the backend calls it before every load, so a graph
changed or damaged after export is never run (a cache entry is exported again, a user's folder refused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..hardware import VNNI, cpu_flags
from ..locking import write_atomic
from ..precisions import canonical_precision as _canonical
from ..t5 import hf_encoder, pool_head

__all__ = [
    "PRECISIONS",
    "OPSET",
    "METADATA",
    "canonical_precision",
    "export_onnx",
    "graph_checksums",
    "read_metadata",
    "record_parity",
    "verify_export",
]

PRECISIONS = ("float32", "float16", "int8")  # the graphs this exporter writes (where each runs: OnnxBackend)
OPSET = 17
METADATA = "fastinstructor_onnx.json"
MODEL_FILE = "model.onnx"
GRAPH_FILES = (MODEL_FILE, MODEL_FILE + ".data")  # the graph, and its weights when saved as external data
_FIX = "export it again with `fastinstructor export --model M --out DIR`"
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf's hard limit is 2 GiB; stay clear of it
# Kept float32 in float16 graphs: normalization, softmax, reductions of the pooling head, and the division
# and power of the L2 normalize (docs/design.md section 5).
FP16_KEEP_FLOAT32_OPS = [
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "Pow",
    "Sqrt",
    "Div",
    "ReduceL2",
    "Einsum",
    "Clip",
    "Max",
]


def canonical_precision(precision: str) -> str:
    """``precision`` by its canonical name when the exporter writes it (``fp16`` -> ``float16``), else ValueError."""
    name = _canonical(precision)
    if name not in PRECISIONS:
        raise ValueError(f"ONNX precision {precision!r} is not one of {', '.join(PRECISIONS)} (or fp32, fp16)")
    return name


class _EmbeddingGraph(nn.Module):
    """transformers' eager T5 encoder + the pooling head, as one module to trace."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        self.encoder = hf_encoder(checkpoint)
        self.register_buffer("dense", checkpoint.dense_weight)
        self.normalize = checkpoint.normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_start: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_head(hidden, attention_mask, pool_start, self.dense, self.normalize)


def _op_counts(model) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def _save(model, path: Path) -> None:
    import onnx

    large = model.ByteSize() > _EXTERNAL_DATA_THRESHOLD
    if large:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def _trace(checkpoint: Checkpoint, path: Path) -> None:
    graph = _EmbeddingGraph(checkpoint).eval()
    ids = torch.tensor([[100, 200, 300, 1], [100, 200, 1, 0]], dtype=torch.long)
    mask = (ids != 0).long()
    # The tracer warns that transformers' mask code branches on a shape (`padding_length > 0`): with
    # attention_mask as long as input_ids that branch is always false, and the tests check lengths 1 to 512.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", module="torch.onnx")
        torch.onnx.export(
            graph,
            (ids, mask, torch.tensor([1, 0], dtype=torch.long)),
            str(path),
            input_names=["input_ids", "attention_mask", "pool_start"],
            output_names=["embeddings"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "pool_start": {0: "batch"},
                "embeddings": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )


def _optimize(path: Path, checkpoint: Checkpoint) -> dict[str, int]:
    """ONNX Runtime's transformer optimizer for T5, in place; returns its fused-op statistics."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = checkpoint.config
    optimized = optimize_model(
        str(path), model_type="t5", num_heads=cfg.num_heads, hidden_size=cfg.d_model, opt_level=0, use_gpu=False
    )
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    model = optimized.model
    # The fused ops live in the com.microsoft domain; declare it, or onnx's shape inference (run by the
    # quantizer) rejects the graph.
    if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
        o.domain == "com.microsoft" for o in model.opset_import
    ):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    _save(model, path)
    return fused


def _to_float16(path: Path) -> list[str]:
    """Convert to float16 keeping the fragile ops and the FFN output projections in float32."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(path)))
    # The FFN output projection (wo) is the one that overflows float16 on trained T5 weights.
    keep_nodes = [n.name for n in model.model.graph.node if "DenseReluDense/wo" in n.name or ".wo/" in n.name]
    model.convert_float_to_float16(keep_io_types=True, op_block_list=FP16_KEEP_FLOAT32_OPS, node_block_list=keep_nodes)
    _save(model.model, path)
    return keep_nodes


def _quantize_int8(path: Path, reduce_range: bool) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_name("quantized.onnx")
    logging.disable(logging.WARNING)  # it warns, per tensor, that it cannot type ORT's fused ops
    try:
        quantize_dynamic(
            str(path),
            str(quantized),
            per_channel=True,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            # Shape inference cannot type the outputs of ORT's fused ops; they are float32.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
            use_external_data_format=path.with_name(path.name + ".data").exists(),
        )
    finally:
        logging.disable(logging.NOTSET)
    # Re-save under our file names (the quantizer's external data file is named after its output).
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    _save(onnx.load(str(quantized)), path)
    quantized.unlink()
    quantized.with_name(quantized.name + ".data").unlink(missing_ok=True)


def export_onnx(
    checkpoint: Checkpoint,
    out: str | os.PathLike,
    *,
    precision: str = "float32",
    optimize: bool = True,
    replace_any: bool = False,
) -> dict:
    """Write ``model.onnx`` and its metadata to ``out`` (created; replaced atomically); returns the metadata.

    An existing ``out`` is replaced only when it is empty or holds an export's files alone (a ValueError otherwise,
    before any work), unless ``replace_any`` (the onnx backend's own cache entry).

    The graph's parity is not measured here: the caller measures it with ``parity.measure`` where the
    backend runs this precision, and records it with ``record_parity``.
    """
    import onnx
    import onnxruntime

    precision = canonical_precision(precision)
    out = Path(out).expanduser().resolve()  # "." has no name: the temporary folder and the rename need one
    if not replace_any:
        _check_replaceable(out)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))  # same filesystem: atomic rename
    try:
        path = work / MODEL_FILE
        _trace(checkpoint, path)
        before = _op_counts(onnx.load(str(path), load_external_data=False))
        fused = _optimize(path, checkpoint) if optimize else {}
        kept_float32 = _to_float16(path) if precision == "float16" else []
        # int8 weights in 7 bits on a CPU without VNNI, where ONNX Runtime's U8S8 products saturate in 16 bits
        # otherwise (the tiny test model on an AVX2-only AMD EPYC: min cosine 0.9887 in 8 bits, 0.9994 in 7).
        reduce_range = precision == "int8" and not VNNI & cpu_flags()
        if precision == "int8":
            _quantize_int8(path, reduce_range)
        after = _op_counts(onnx.load(str(path), load_external_data=False))
        # Validity: ONNX Runtime must load it (onnx.checker does not know ORT's fused contrib ops).
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        metadata = {
            "format_version": 2,  # 2: records the graph's checksums in "files"
            "source_model": str(checkpoint.path),
            "source_fingerprint": checkpoint.fingerprint,
            "precision": precision,
            "optimized": optimize,
            "opset": OPSET,
            "inputs": {"input_ids": "int64 [B, L]", "attention_mask": "int64 [B, L]", "pool_start": "int64 [B]"},
            "output": f"embeddings float32 [B, {checkpoint.out_dim}]",
            "out_dim": checkpoint.out_dim,
            "max_seq_length": checkpoint.max_seq_length,
            "op_counts_before": before,
            "op_counts_after": after,
            "fused_ops": fused,
            "float16_kept_float32_nodes": len(kept_float32),
            "int8_reduce_range": reduce_range,  # OnnxBackend refuses an 8-bit graph on a CPU without VNNI
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
            "export_seconds": None,
            "parity": None,
            "files": graph_checksums(work),
        }
        metadata["export_seconds"] = round(time.perf_counter() - start, 1)
        _write_metadata(work, metadata)
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        os.replace(work, out)
        return metadata
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_replaceable(out: Path) -> None:
    """A ValueError unless ``out`` is absent, an empty folder, or a folder holding only an export's files: the
    export replaces the folder whole, and must never delete what else a user keeps there."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} is a file; pass a folder for the export (it is created)")
    others = sorted(p.name for p in out.iterdir() if p.name not in (*GRAPH_FILES, METADATA))
    if others:
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        raise ValueError(
            f"{out} holds files that are not an ONNX export ({shown}); the export replaces its folder whole, so "
            "pass an empty or new folder"
        )


def _write_metadata(folder: Path, metadata: dict) -> None:
    write_atomic(folder / METADATA, lambda tmp: tmp.write_text(json.dumps(metadata, indent=1) + "\n", encoding="utf-8"))


def record_parity(folder: str | os.PathLike, parity: dict) -> dict:
    """Record the caller's parity measurement of the graph in ``folder`` in its metadata; returns the metadata.

    The checksums cover the graph's files only, so recording parity leaves the export verifiable.
    """
    metadata = read_metadata(folder)
    metadata["parity"] = parity
    _write_metadata(Path(folder), metadata)
    return metadata


def read_metadata(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    if not (folder / METADATA).is_file() or not (folder / MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} is not a fastinstructor ONNX export (expected {MODEL_FILE} and {METADATA}); "
            "create one with `fastinstructor export --model M --out DIR`"
        )
    try:
        metadata = json.loads((folder / METADATA).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / METADATA} is damaged ({err}); {_FIX}") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{folder / METADATA} is damaged (not a JSON object); {_FIX}")
    return metadata


def _checksum(path: Path) -> dict:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
        return {"sha256": digest.hexdigest(), "bytes": f.tell()}


def graph_checksums(folder: str | os.PathLike) -> dict[str, dict]:
    """sha256 and size in bytes of each file of the graph in ``folder``, by file name."""
    folder = Path(folder)
    return {name: _checksum(folder / name) for name in GRAPH_FILES if (folder / name).is_file()}


def verify_export(folder: str | os.PathLike) -> dict:
    """The folder's metadata, once every file of its graph matches the checksum recorded at export.

    Raises ``FileNotFoundError`` for a folder that is not an export and ``ValueError`` naming the file, the
    recorded and the actual checksum for a graph changed or damaged since (or never recorded: older exports).
    """
    folder = Path(folder)
    metadata = read_metadata(folder)
    recorded = metadata.get("files")
    if not isinstance(recorded, dict) or MODEL_FILE not in recorded:
        raise ValueError(
            f"{folder / METADATA} records no checksums of the graph (an export by an older fastinstructor), "
            f"so {folder / MODEL_FILE} cannot be verified; {_FIX}"
        )
    actual = graph_checksums(folder)
    for name in sorted(recorded.keys() | actual.keys()):  # an extra or a missing file fails too
        want, got = recorded.get(name), actual.get(name)
        if want != got:
            raise ValueError(
                f"{folder / name} does not match the checksum recorded at export: sha256 {_show(want)} expected, "
                f"{_show(got)} found. The file was changed or damaged after export; {_FIX}"
            )
    return metadata


def _show(checksum) -> str:
    if not isinstance(checksum, dict):  # no such file, or a damaged record
        return "no file" if checksum is None else repr(checksum)
    return f"{checksum.get('sha256')} ({checksum.get('bytes')} bytes)"
