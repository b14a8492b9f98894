"""Finding and loading INSTRUCTOR / T5-encoder checkpoints.

A checkpoint is a folder in the sentence-transformers INSTRUCTOR layout::

    modules.json                     the module list (Transformer, Pooling, Dense, Normalize)
    config.json                      the T5 config (every dimension comes from here)
    model.safetensors | pytorch_model.bin   (or a sharded *.index.json)
    spiece.model and/or tokenizer.json      the T5 SentencePiece tokenizer
    sentence_bert_config.json        max_seq_length
    1_Pooling/config.json            must be mean pooling
    2_Dense/config.json + weights    bias-free projection d_model -> out_dim
    3_Normalize/                     L2 normalization

or a plain T5 encoder folder (no ``modules.json``: mean pooling, no Dense, no Normalize), or a Hugging Face
hub id resolved from the local cache first and downloaded otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from .model_sources import WEIGHT_FILES, CheckpointError, find_weights, resolve_model_path

__all__ = ["CheckpointError", "EncoderConfig", "Checkpoint", "resolve_model_path", "load_checkpoint"]

# Besides config, weights and Dense: the files AutoTokenizer reads and the sentence-transformers settings.
_SETTINGS_FILES = (
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "sentence_bert_config.json",
    "modules.json",
)
# The encoder of a full seq2seq T5 checkpoint is usable; its decoder and LM head are not needed.
_IGNORED_PREFIXES = ("decoder.", "lm_head.")


@dataclass(frozen=True)
class EncoderConfig:
    """The T5 encoder dimensions, read from ``config.json``."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "num_buckets", "max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise CheckpointError(f"config.json: {name} must be a positive integer, got {value!r}")

    @property
    def inner_dim(self) -> int:
        """Width of the attention projections: heads * d_kv (4096 for instructor-xl, not d_model)."""
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf_config(cls, cfg: dict, source: Path) -> EncoderConfig:
        if cfg.get("model_type") != "t5":
            raise CheckpointError(
                f"{source}: model_type is {cfg.get('model_type')!r}, expected 't5' "
                "(fastinstructor runs INSTRUCTOR / T5 encoder checkpoints only)"
            )
        projection = cfg.get("feed_forward_proj", "relu")
        if projection != "relu":
            raise CheckpointError(
                f"{source}: feed_forward_proj is {projection!r}; only T5 v1.0 'relu' feed-forward layers "
                "(as in INSTRUCTOR and GTR) are supported"
            )
        try:
            return cls(
                vocab_size=cfg["vocab_size"],
                d_model=cfg["d_model"],
                d_kv=cfg["d_kv"],
                d_ff=cfg["d_ff"],
                num_layers=cfg["num_layers"],
                num_heads=cfg["num_heads"],
                num_buckets=cfg.get("relative_attention_num_buckets", 32),
                max_distance=cfg.get("relative_attention_max_distance", 128),
                layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-6)),
            )
        except KeyError as err:
            raise CheckpointError(f"{source}: missing key {err.args[0]!r} in the T5 config") from None
        except (TypeError, ValueError) as err:  # a layer_norm_epsilon that is no number
            raise CheckpointError(f"{source}: layer_norm_epsilon is not a number ({err})") from None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every encoder tensor by its transformers ``T5EncoderModel`` name, with its shape."""
        d, inner, ff = self.d_model, self.inner_dim, self.d_ff
        shapes: dict[str, tuple[int, ...]] = {
            "shared.weight": (self.vocab_size, d),
            "encoder.final_layer_norm.weight": (d,),
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (self.num_buckets, self.num_heads),
        }
        for i in range(self.num_layers):
            p = f"encoder.block.{i}.layer."
            shapes.update(
                {
                    p + "0.SelfAttention.q.weight": (inner, d),
                    p + "0.SelfAttention.k.weight": (inner, d),
                    p + "0.SelfAttention.v.weight": (inner, d),
                    p + "0.SelfAttention.o.weight": (d, inner),
                    p + "0.layer_norm.weight": (d,),
                    p + "1.DenseReluDense.wi.weight": (ff, d),
                    p + "1.DenseReluDense.wo.weight": (d, ff),
                    p + "1.layer_norm.weight": (d,),
                }
            )
        return shapes


class Checkpoint:
    """Everything a backend needs, loaded once: config, float32 weights, and the head.

    Lifetime: every field describes the checkpoint and never changes, except the float32 ``weights``. They
    are held from ``load_checkpoint`` until ``release_weights()``, which ``load`` calls once the backend holds
    its own form of them (packed, quantized, exported, on a GPU); after that, reading ``weights`` raises.
    """

    def __init__(
        self,
        *,
        path: Path,
        config: EncoderConfig,
        hf_config: dict,
        weights: dict[str, torch.Tensor],  # T5EncoderModel names, float32, shared tied
        dense_weight: torch.Tensor | None,  # [out_dim, d_model] or None
        normalize: bool,
        max_seq_length: int,
        files: tuple[tuple[str, Path], ...] = (),  # every file the embeddings depend on: (name in folder, path)
    ) -> None:
        self.path, self.config, self.hf_config = path, config, hf_config
        self.dense_weight, self.normalize, self.max_seq_length, self.files = (
            dense_weight,
            normalize,
            max_seq_length,
            files,
        )
        self._weights: dict[str, torch.Tensor] | None = weights

    def __repr__(self) -> str:
        held = "released" if self._weights is None else f"{len(self._weights)} tensors"
        return f"Checkpoint(path={str(self.path)!r}, config={self.config}, weights={held})"

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        if self._weights is None:
            raise CheckpointError(
                f"the float32 weights of {self.path} were released once a backend took its own copy "
                "(fastinstructor.load does this); load the checkpoint again with load_checkpoint() to build another"
            )
        return self._weights

    @property
    def weights_released(self) -> bool:
        return self._weights is None

    @property
    def out_dim(self) -> int:
        return self.dense_weight.shape[0] if self.dense_weight is not None else self.config.d_model

    def release_weights(self) -> None:
        """Let the float32 weights go, so that the process does not keep them twice; tensors a backend uses as
        they are stay alive through it."""
        self._weights = None

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of everything that decides the embeddings: the bytes of ``files`` (config, weights, Dense,
        tokenizer, settings) under their names in the checkpoint folder, so that a copy has the same one. Read
        from disk, it needs no weights in memory (``release_weights``)."""
        digest = hashlib.sha256()
        for name, file in self.files:
            digest.update(f"{name}\0".encode())
            with open(file, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
        digest.update(f"normalize={self.normalize} max_seq_length={self.max_seq_length}".encode())
        return digest.hexdigest()


def _read_json(path: Path, kind: type = dict) -> dict | list:
    """The JSON value of ``path``, a ``kind`` (an object unless said otherwise), or a CheckpointError."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is damaged, re-download it") from None
    if not isinstance(value, kind):
        expected = "a JSON list" if kind is list else "a JSON object"
        raise CheckpointError(f"{path} holds {type(value).__name__}, not {expected}; the checkpoint is damaged")
    return value


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"cannot read weights file {path}: {type(err).__name__}: {err}. The file is damaged or truncated; "
        "re-download or re-create the checkpoint."
    )


def _load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and pickle raise several unrelated types for a damaged file
        raise _unreadable(path, err) from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{path} holds a {type(tensors).__name__}, not a mapping of tensor names to tensors")
    return tensors


def _weight_files(path: Path) -> list[Path]:
    """The tensor files behind a weights file: itself, or the shards a ``*.index.json`` names."""
    if not path.name.endswith(".index.json"):
        return [path]
    index = _read_json(path)
    files = sorted(set(index.get("weight_map", {}).values()))
    if not files:
        raise CheckpointError(f"{path} has no weight_map; the checkpoint index is damaged")
    return [path.parent / name for name in files]


def _load_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(_load_tensor_file(file))
    return weights


def _safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors headers alone, without reading any tensor."""
    from safetensors import safe_open

    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        except Exception as err:  # as in _load_tensor_file: several unrelated types for a damaged file
            raise _unreadable(file, err) from None
    return shapes


def _encoder_names(tensors: dict) -> dict:
    """The encoder's entries (tensors or shapes) under T5EncoderModel names: no decoder or LM head, and the token
    embedding, stored as shared.weight, encoder.embed_tokens.weight or both (tied), as shared.weight."""
    encoder = {k: v for k, v in tensors.items() if not k.startswith(_IGNORED_PREFIXES)}
    embed = encoder.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in encoder and embed is not None:
        encoder["shared.weight"] = embed
    return encoder


def _check_dimensions(shapes: dict[str, tuple[int, ...]], config: EncoderConfig, config_path: Path) -> None:
    """Each config.json dimension against the tensor that holds it, before anything is sized by the config (a
    num_layers of 10**9 would otherwise build a billion expected names)."""
    hint = (
        "config.json and the weights come from different models, or config.json was edited: restore the "
        "checkpoint's own config.json"
    )
    blocks = {int(name.split(".")[2]) for name in shapes if re.match(r"encoder\.block\.\d+\.", name)}
    held = len(blocks)
    # More layers than the weights hold is refused outright; fewer, with gaps or extras, is named tensor by tensor.
    if config.num_layers > held or (config.num_layers != held and blocks == set(range(held))):
        raise CheckpointError(
            f"{config_path}: num_layers is {config.num_layers}, but the weights hold {held} encoder blocks. {hint}."
        )
    attention, feed_forward = "encoder.block.0.layer.0.SelfAttention.", "encoder.block.0.layer.1.DenseReluDense."
    for key, value, tensor, axis in (
        ("vocab_size", config.vocab_size, "shared.weight", 0),
        ("d_model", config.d_model, "shared.weight", 1),
        ("relative_attention_num_buckets", config.num_buckets, attention + "relative_attention_bias.weight", 0),
        ("num_heads", config.num_heads, attention + "relative_attention_bias.weight", 1),
        ("num_heads * d_kv", config.inner_dim, attention + "q.weight", 0),
        ("d_ff", config.d_ff, feed_forward + "wi.weight", 0),
    ):
        shape = shapes.get(tensor)
        if shape is not None and len(shape) == 2 and shape[axis] != value:
            raise CheckpointError(
                f"{config_path}: {key} is {value}, but the weights hold {shape[axis]} ({tensor} has shape {shape}). "
                f"{hint}."
            )


def _check_shapes(shapes: dict[str, tuple[int, ...]], config: EncoderConfig, config_path: Path, source: Path) -> None:
    """Validate the encoder's tensor names and shapes (``_encoder_names``) against the config."""
    _check_dimensions(shapes, config, config_path)
    expected = config.expected_shapes()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(
            f"{source}: weights do not match config.json ({'; '.join(parts)}). "
            "The weights file belongs to a different model or config.json was edited."
        )
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {shapes[name]}, config.json implies {shape}")


def _load_encoder_weights(path: Path, config: EncoderConfig, config_path: Path) -> dict[str, torch.Tensor]:
    """The encoder's float32 tensors under T5EncoderModel names, checked against the config first: from the
    headers of safetensors files before any tensor is read; a pickle (pytorch_model.bin) must be loaded first."""
    files = _weight_files(path)
    if all(file.suffix == ".safetensors" for file in files):
        _check_shapes(_encoder_names(_safetensors_shapes(files)), config, config_path, path)
        weights = _encoder_names(_load_weights(files))
    else:
        weights = _encoder_names(_load_weights(files))
        _check_shapes({k: tuple(v.shape) for k, v in weights.items()}, config, config_path, path)
    weights = {name: weights[name].to(torch.float32).contiguous() for name in config.expected_shapes()}
    broken = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
    if broken:
        raise CheckpointError(
            f"{path}: tensors {broken[:8]} hold NaN or infinite values; the checkpoint is damaged (or was saved "
            "after a float16 overflow): re-download or re-create it"
        )
    return weights


def _module_folders(folder: Path) -> dict[str, Path]:
    """Map module kind (Transformer, Pooling, Dense, Normalize) to its folder, from modules.json."""
    modules = _read_json(folder / "modules.json", list)
    found: dict[str, Path] = {}
    order = ("Transformer", "Pooling", "Dense", "Normalize")
    for entry in modules:
        if not isinstance(entry, dict):
            raise CheckpointError(f"{folder / 'modules.json'}: entry {entry!r} is not a module object")
        # sentence_transformers.models.Dense, or the authors' InstructorEmbedding.INSTRUCTOR_Transformer
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1].removeprefix("INSTRUCTOR_")
        if kind not in order:
            raise CheckpointError(
                f"{folder / 'modules.json'}: module type {entry.get('type')!r} is not supported; an INSTRUCTOR "
                "checkpoint has Transformer, Pooling, Dense and Normalize modules"
            )
        # One of each, in this order: a second Dense, or Normalize before Dense, is other arithmetic than ours.
        if kind in found or any(order.index(k) > order.index(kind) for k in found):
            raise CheckpointError(
                f"{folder / 'modules.json'}: modules {[*found, kind]} are not supported; fastinstructor runs "
                "Transformer, Pooling, Dense, Normalize, each at most once and in this order"
            )
        found[kind] = folder / entry.get("path", "")
    if "Transformer" not in found:
        raise CheckpointError(f"{folder / 'modules.json'} lists no Transformer module")
    return found


def _load_dense(folder: Path, d_model: int) -> torch.Tensor:
    cfg = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if cfg.get("bias", False):
        raise CheckpointError(f"{folder}: Dense with bias is not supported (INSTRUCTOR's Dense is bias-free)")
    activation = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
    if not str(activation).endswith("Identity"):
        raise CheckpointError(f"{folder}: Dense activation {activation!r} is not supported (INSTRUCTOR uses Identity)")
    weights_file = find_weights(folder)
    if weights_file is None:
        raise CheckpointError(f"{folder}: no Dense weights (expected model.safetensors or pytorch_model.bin)")
    tensors = _load_weights(_weight_files(weights_file))
    if set(tensors) != {"linear.weight"}:
        raise CheckpointError(f"{weights_file}: expected exactly one tensor 'linear.weight', found {sorted(tensors)}")
    weight = tensors["linear.weight"].to(torch.float32).contiguous()
    expected_in = cfg.get("in_features", d_model)
    expected_out = cfg.get("out_features", weight.shape[0])
    if weight.ndim != 2 or tuple(weight.shape) != (expected_out, expected_in) or expected_in != d_model:
        raise CheckpointError(
            f"{folder}: Dense weight has shape {tuple(weight.shape)}; expected ({expected_out}, {expected_in}) from "
            f"its config.json with in_features equal to the encoder's d_model ({d_model})"
        )
    return weight


def load_checkpoint(
    model: str | os.PathLike, *, cache_dir: str | None = None, revision: str | None = None
) -> Checkpoint:
    """Resolve ``model`` and load it, validating every file against the config."""
    folder = resolve_model_path(model, cache_dir=cache_dir, revision=revision)
    has_modules = (folder / "modules.json").is_file()
    if not has_modules and any((folder / name).is_dir() for name in ("1_Pooling", "2_Dense", "3_Normalize")):
        raise CheckpointError(
            f"{folder} has sentence-transformers module folders (1_Pooling, 2_Dense, 3_Normalize) but no "
            "modules.json: as a plain T5 encoder folder its Dense and Normalize would be left out. Restore "
            "modules.json (re-download the checkpoint)."
        )
    modules = _module_folders(folder) if has_modules else {"Transformer": folder}
    root = modules["Transformer"]
    if not (root / "config.json").is_file():
        raise CheckpointError(
            f"{root}: no config.json, so this is not a checkpoint folder. Expected the sentence-transformers "
            "INSTRUCTOR layout (modules.json, config.json, weights, tokenizer) or a T5 encoder folder."
        )
    hf_config = _read_json(root / "config.json")
    config = EncoderConfig.from_hf_config(hf_config, root / "config.json")
    weights_file = find_weights(root)
    if weights_file is None:
        raise CheckpointError(f"{root}: no weights file; expected one of {', '.join(WEIGHT_FILES)}")
    if not ((root / "spiece.model").is_file() or (root / "tokenizer.json").is_file()):
        raise CheckpointError(f"{root}: no tokenizer; expected spiece.model and/or tokenizer.json")
    weights = _load_encoder_weights(weights_file, config, root / "config.json")

    if "Pooling" in modules and (modules["Pooling"] / "config.json").is_file():
        pooling = _read_json(modules["Pooling"] / "config.json")
        modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
        if modes not in ([], ["pooling_mode_mean_tokens"]):
            raise CheckpointError(
                f"{modules['Pooling']}: pooling modes {modes} are not supported; INSTRUCTOR uses mean"
            )
    dense = _load_dense(modules["Dense"], config.d_model) if "Dense" in modules else None
    files = [root / "config.json", *_weight_files(weights_file)]
    if dense is not None:
        files += [modules["Dense"] / "config.json", *_weight_files(find_weights(modules["Dense"]))]
    files += [base / name for base in (folder, root) for name in _SETTINGS_FILES]  # absent ones drop out below

    max_seq_length = 512
    st_config = root / "sentence_bert_config.json"
    if st_config.is_file():
        settings = _read_json(st_config)
        if settings.get("do_lower_case"):
            raise CheckpointError(
                f"{st_config}: do_lower_case is true; fastinstructor does not lowercase inputs (INSTRUCTOR "
                "checkpoints set it false), so its embeddings would differ from the model's"
            )
        value = settings.get("max_seq_length", max_seq_length)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{st_config}: max_seq_length must be a positive integer, got {value!r}")
            max_seq_length = value
    return Checkpoint(
        path=root,
        config=config,
        hf_config=hf_config,
        weights=weights,
        dense_weight=dense,
        normalize="Normalize" in modules,
        max_seq_length=max_seq_length,
        files=tuple((Path(os.path.relpath(f, folder)).as_posix(), f) for f in dict.fromkeys(files) if f.is_file()),
    )
