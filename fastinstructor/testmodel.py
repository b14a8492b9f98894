"""Random-weight checkpoints in the exact INSTRUCTOR folder layout, for tests, demos and benchmarks.

The machines this project is built on cannot reach a model hub, so every test builds its checkpoint: the
dimensions of the real presets (docs/design.md section 1), T5's own random initialization, and a SentencePiece
unigram tokenizer trained on real text. The embeddings mean nothing; the shapes, the files and the
arithmetic are those of the real models, so speed and parity measured on them carry over.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import tokenizer_training_text

__all__ = ["PRESETS", "Preset", "make_test_model"]

EXTRA_IDS = 100  # T5's <extra_id_*> sentinels


@dataclass(frozen=True)
class Preset:
    d_model: int
    num_layers: int
    num_heads: int
    d_kv: int
    d_ff: int
    dense_out: int
    vocab_rows: int  # embedding rows; the real models have 32128 (32000 pieces + 100 sentinels, padded)
    spm_pieces: int  # pieces of the trained SentencePiece model (fewer than the real 32000: small corpus)


PRESETS: dict[str, Preset] = {
    # Small enough for fast tests, with every structural feature of the real ones.
    "tiny": Preset(
        d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128, dense_out=48, vocab_rows=2176, spm_pieces=2000
    ),
    # instructor-xl's shape in miniature: heads * d_kv (128) != d_model (64), d_ff = 16 * d_model.
    "tiny-xl": Preset(
        d_model=64, num_layers=2, num_heads=4, d_kv=32, d_ff=1024, dense_out=48, vocab_rows=2176, spm_pieces=2000
    ),
    "base": Preset(
        d_model=768, num_layers=12, num_heads=12, d_kv=64, d_ff=3072, dense_out=768, vocab_rows=32128, spm_pieces=8000
    ),
    "large": Preset(
        d_model=1024, num_layers=24, num_heads=16, d_kv=64, d_ff=4096, dense_out=768, vocab_rows=32128, spm_pieces=8000
    ),
    "xl": Preset(
        d_model=1024,
        num_layers=24,
        num_heads=32,
        d_kv=128,
        d_ff=16384,
        dense_out=768,
        vocab_rows=32128,
        spm_pieces=8000,
    ),
}

_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"},
]

_README = """# RANDOM WEIGHTS: a fastinstructor test checkpoint ({preset})

This folder was written by `fastinstructor make-test-model --preset {preset}` (seed {seed}). It has the
folder layout and dimensions of an INSTRUCTOR checkpoint, but **its weights are random**: the embeddings it
produces carry no meaning. Use it for tests, demos and speed measurements only. For real embeddings use
`hkunlp/instructor-base`, `hkunlp/instructor-large` or `hkunlp/instructor-xl`.

Tokenizer: a SentencePiece unigram model with {pieces} pieces trained on {source}.
"""


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _train_sentencepiece(pieces: int) -> tuple[bytes, int, str]:
    """The serialized model, its actual piece count, and where the training text came from."""
    import sentencepiece as spm

    texts, source = tokenizer_training_text()
    model = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            model_type="unigram",
            vocab_size=pieces,
            hard_vocab_limit=False,  # a small corpus (the docs fallback) may support fewer pieces
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,  # T5's ids: <pad> 0, </s> 1, <unk> 2, no BOS
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            normalization_rule_name="nmt_nfkc",
            num_threads=os.cpu_count() or 1,
            logstream=quiet,
        )
    trained = model.getvalue()
    return trained, spm.SentencePieceProcessor(model_proto=trained).get_piece_size(), source


def _save_tokenizer(out: Path, spm_bytes: bytes, max_length: int) -> None:
    """Write spiece.model, then let transformers build and save tokenizer.json from it, and check the result."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    (out / "spiece.model").write_bytes(spm_bytes)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "T5Tokenizer",
            "extra_ids": EXTRA_IDS,
            "model_max_length": max_length,
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
        },
    )
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    # transformers can silently build a tokenizer that maps everything to <unk>: compare with SentencePiece.
    sp = spm.SentencePieceProcessor(model_proto=spm_bytes)
    reloaded = AutoTokenizer.from_pretrained(str(out))
    probe = "Represent the Wikipedia document for retrieval: Global warming is the long-term rise in temperature."
    expected = sp.encode(probe) + [sp.eos_id()]
    if len(reloaded) != sp.get_piece_size() + EXTRA_IDS or reloaded(probe)["input_ids"] != expected:
        raise RuntimeError(
            f"the saved tokenizer disagrees with its SentencePiece model (size {len(reloaded)} vs "
            f"{sp.get_piece_size()} + {EXTRA_IDS}); transformers built it wrongly"
        )


def make_test_model(preset: str, out: str | os.PathLike, *, seed: int = 0, max_seq_length: int = 512) -> Path:
    """Write a random-weight checkpoint of ``preset`` to ``out`` (created; must be empty or absent)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    from transformers import T5Config, T5EncoderModel

    p = PRESETS[preset]
    final = Path(out)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{final} exists and is not empty; choose a new folder or delete it")
    # Written beside the target and renamed at the end: an interrupted run leaves no half checkpoint behind.
    out = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=p.vocab_rows,
        d_model=p.d_model,
        d_kv=p.d_kv,
        d_ff=p.d_ff,
        num_layers=p.num_layers,
        num_heads=p.num_heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="relu",
        dropout_rate=0.1,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        architectures=["T5EncoderModel"],
    )
    T5EncoderModel(config).save_pretrained(str(out))  # T5's own initialization and file format

    spm_bytes, pieces, source = _train_sentencepiece(p.spm_pieces)
    _save_tokenizer(out, spm_bytes, max_seq_length)

    _write_json(out / "modules.json", _MODULES)
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    (out / "1_Pooling").mkdir()
    _write_json(
        out / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": p.d_model,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    (out / "2_Dense").mkdir()
    _write_json(
        out / "2_Dense" / "config.json",
        {
            "in_features": p.d_model,
            "out_features": p.dense_out,
            "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity",
        },
    )
    from safetensors.torch import save_file

    dense = torch.randn(p.dense_out, p.d_model) / p.d_model**0.5
    save_file({"linear.weight": dense}, str(out / "2_Dense" / "model.safetensors"))
    (out / "3_Normalize").mkdir()

    (out / "README.md").write_text(
        _README.format(preset=preset, seed=seed, pieces=pieces, source=source), encoding="utf-8"
    )
    _write_json(
        out / "fastinstructor_test_model.json",
        {
            "random_weights": True,
            "preset": preset,
            "seed": seed,
            "tokenizer_pieces": pieces,
            "tokenizer_trained_on": source,
            "note": "random weights: the embeddings are meaningless; for tests, demos and speed measurements only",
        },
    )
    if final.exists():
        final.rmdir()  # empty, checked above
    out.rename(final)
    return final
