"""What to do with embeddings once they are computed: cosine similarity, and quantization of the output.

``quantize_embeddings`` follows sentence-transformers' function of the same name (``sentence_transformers.util.
quantize_embeddings``) rule for rule and byte for byte, so that vectors from either library go into the same index:

- ``float32``: the embeddings as float32;
- ``int8`` / ``uint8``: per dimension, 256 equal buckets between a minimum and a maximum: ``ranges`` (``[2, dim]``,
  row 0 the minima, row 1 the maxima) when given, else those of ``calibration_embeddings``, else those of the
  embeddings themselves (which needs at least two of them; prefer a representative calibration set, and keep its
  ranges: vectors quantized with other ranges are not comparable). The bucket is ``floor((x - min) / step)``
  clipped to 0..255 with ``step = (max - min) / 255`` (1 where max equals min); ``int8`` subtracts 128;
- ``binary`` / ``ubinary``: one bit per dimension, ``x > 0``, packed 8 to a byte, most significant bit first
  (``numpy.packbits``); ``ubinary`` as uint8, ``binary`` as int8 (the byte minus 128). ``dim / 8`` bytes per vector
  (rounded up, the last byte padded with zero bits).

Compare binary vectors by Hamming distance; int8 and uint8 ones by dot product against a float query or each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["OUTPUT_PRECISIONS", "check_output_precision", "cos_sim", "quantize_embeddings"]

OUTPUT_PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
_DTYPES = {"float32": np.float32, "int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}


def check_output_precision(precision: str) -> str:
    if precision not in OUTPUT_PRECISIONS:
        raise ValueError(
            f"output precision {precision!r} is not one of {', '.join(OUTPUT_PRECISIONS)} (this quantizes the "
            "returned embeddings; the precision the model computes in is fastinstructor.load's precision=)"
        )
    return precision


def _as_float_array(embeddings) -> np.ndarray:
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().float().numpy()
    elif isinstance(embeddings, Sequence) and len(embeddings) and isinstance(embeddings[0], torch.Tensor):
        embeddings = torch.stack([e.detach().cpu().float() for e in embeddings]).numpy()
    array = np.asarray(embeddings)
    if array.dtype in (np.int8, np.uint8) or not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"embeddings to quantize must be floating point, got {array.dtype}")
    return array


def _ranges(embeddings: np.ndarray, precision: str, calibration_embeddings) -> np.ndarray:
    if calibration_embeddings is None:
        if embeddings.ndim == 1 or embeddings.shape[0] == 1:
            raise ValueError(
                f"cannot compute {precision} quantization ranges from a single embedding: pass ranges= or "
                "calibration_embeddings= (a representative set of embeddings), or quantize many at once"
            )
        calibration_embeddings = embeddings
    calibration = _as_float_array(calibration_embeddings)
    return np.vstack((np.min(calibration, axis=0), np.max(calibration, axis=0)))


def quantize_embeddings(
    embeddings: np.ndarray | torch.Tensor | Sequence,
    precision: str,
    ranges: np.ndarray | None = None,
    calibration_embeddings: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """``embeddings`` (``[N, dim]`` or ``[dim]``, float) quantized to ``precision`` as the module docstring says:
    float32 ``[N, dim]``, int8 or uint8 ``[N, dim]``, binary (int8) or ubinary (uint8) ``[N, ceil(dim / 8)]``."""
    check_output_precision(precision)
    embeddings = _as_float_array(embeddings)
    if embeddings.ndim == 2 and embeddings.shape[0] == 0 and precision != "float32":  # nothing to calibrate
        dim = embeddings.shape[1]
        return np.zeros((0, dim if precision.endswith("int8") else (dim + 7) // 8), dtype=_DTYPES[precision])
    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision in ("int8", "uint8"):
        if ranges is None:
            ranges = _ranges(embeddings, precision, calibration_embeddings)
        ranges = np.asarray(ranges).astype(np.float32, copy=False)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)
    packed = np.packbits(embeddings > 0, axis=-1)
    return packed if precision == "ubinary" else (packed - 128).astype(np.int8)


def cos_sim(a, b) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` with every row of ``b``: a float32 tensor ``[len(a), len(b)]``. A single
    vector counts as one row; numpy arrays, tensors and lists of either are accepted (sentence-transformers'
    ``cos_sim``)."""
    a, b = (_as_matrix(x) for x in (a, b))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"cannot compare embeddings of {a.shape[1]} and {b.shape[1]} dimensions")
    return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T


def _as_matrix(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        tensor = x.detach().cpu()
    elif isinstance(x, Sequence) and len(x) and isinstance(x[0], torch.Tensor):
        tensor = torch.stack([row.detach().cpu() for row in x])
    else:
        tensor = torch.as_tensor(np.asarray(x))
    tensor = tensor.float()
    return tensor.unsqueeze(0) if tensor.ndim == 1 else tensor
