"""The sentence-transformers-style surface of ``Instructor``: ``encode(texts, prompt=)``, ``encode_query`` /
``encode_document``, ``similarity``, output quantization byte for byte as sentence-transformers'
``quantize_embeddings``; and ``max_seq_length`` from ``load`` and ``fastinstructor embed``."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from sentence_transformers.util import quantize_embeddings as st_quantize

import fastinstructor
from fastinstructor.cli import main
from fastinstructor.model import DEFAULT_DOCUMENT_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION
from fastinstructor.vectors import OUTPUT_PRECISIONS, quantize_embeddings

INSTRUCTION = "Represent the climate sentence for retrieval:"


@pytest.fixture(scope="module")
def model(tiny_model):
    return fastinstructor.load(tiny_model, backend="cpu")


@pytest.fixture(scope="module")
def texts(real_texts):
    return list(dict.fromkeys(real_texts))


def assert_same_bytes(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (
        ours.dtype,
        ours.shape,
        theirs.dtype,
        theirs.shape,
    )
    differ = np.flatnonzero(ours.reshape(-1) != theirs.reshape(-1))
    assert not len(differ), f"{len(differ)} values differ, first at flat index {differ[:5]}"


def test_prompt_is_the_instruction_of_every_text(model, texts):
    np.testing.assert_array_equal(
        model.encode(texts, prompt=INSTRUCTION), model.encode([[INSTRUCTION, t] for t in texts])
    )
    single = model.encode(texts[0], prompt=INSTRUCTION)
    np.testing.assert_allclose(single, model.encode([[INSTRUCTION, texts[0]]])[0], atol=1e-6, rtol=0)


def test_prompt_refuses_pairs_and_non_strings(model):
    with pytest.raises(TypeError, match=r"sentences\[1\] is list; with prompt= every input must be a plain str"):
        model.encode(["a text", [INSTRUCTION, "a pair"]], prompt=INSTRUCTION)
    with pytest.raises(TypeError, match="prompt must be a str"):
        model.encode(["a text"], prompt=["not", "a str"])


def test_encode_query_and_document_use_the_model_instructions(model, tiny_model, texts):
    assert (model.query_instruction, model.document_instruction) == (
        DEFAULT_QUERY_INSTRUCTION,
        DEFAULT_DOCUMENT_INSTRUCTION,
    )
    np.testing.assert_array_equal(model.encode_query(texts), model.encode(texts, prompt=DEFAULT_QUERY_INSTRUCTION))
    np.testing.assert_array_equal(
        model.encode_document(texts), model.encode(texts, prompt=DEFAULT_DOCUMENT_INSTRUCTION)
    )
    np.testing.assert_array_equal(
        model.encode_query(texts, prompt=INSTRUCTION), model.encode(texts, prompt=INSTRUCTION)
    )
    assert not np.array_equal(model.encode_query(texts), model.encode_document(texts))  # the instructions matter
    custom = fastinstructor.load(tiny_model, backend="cpu", query_instruction="Q:", document_instruction="D:")
    assert (custom.query_instruction, custom.document_instruction) == ("Q:", "D:")
    np.testing.assert_array_equal(custom.encode_document(texts[:4]), model.encode(texts[:4], prompt="D:"))


def test_similarity_is_the_cosine_matrix(model, texts):
    queries, docs = model.encode_query(texts[:3]), model.encode_document(texts)
    scores = model.similarity(queries, docs)
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float32 and scores.shape == (3, len(texts))
    scaled = docs * np.arange(1, len(texts) + 1, dtype=np.float32)[:, None]  # cosine ignores the norms
    np.testing.assert_allclose(model.similarity(queries, scaled).numpy(), queries @ docs.T, atol=1e-6, rtol=0)
    assert model.similarity(queries[0], torch.from_numpy(docs)).shape == (1, len(texts))  # a vector is one row
    with pytest.raises(ValueError, match="cannot compare embeddings of 48 and 47 dimensions"):
        model.similarity(queries, docs[:, :-1])


@pytest.mark.parametrize("precision", OUTPUT_PRECISIONS)
def test_quantization_is_byte_equal_to_sentence_transformers(model, texts, precision, caplog):
    caplog.set_level(logging.ERROR, "sentence_transformers")  # its "fewer than 100 embeddings" calibration warning
    floats = model.encode(texts, prompt=INSTRUCTION)
    assert_same_bytes(quantize_embeddings(floats, precision), st_quantize(floats, precision))
    calibration = model.encode(texts[::-1][:20])
    ranges = np.vstack([floats.min(0) - 0.01, floats.max(0) * 0.5])  # values below and above: clipped to 0 and 255
    for options in ({"calibration_embeddings": calibration}, {"ranges": ranges}):
        assert_same_bytes(quantize_embeddings(floats, precision, **options), st_quantize(floats, precision, **options))
    odd = np.random.default_rng(0).normal(size=(9, 13))  # float64, 13 bits: a padded last byte
    odd[:, 3] = 0.25  # a constant dimension: step 1, not a division by 0
    odd[:, 5] = 0.0  # an exact zero is a 0 bit
    assert_same_bytes(quantize_embeddings(odd, precision), st_quantize(odd, precision))
    assert_same_bytes(quantize_embeddings(odd[:0], precision), st_quantize(odd[:0], precision))


@pytest.mark.parametrize("precision", OUTPUT_PRECISIONS)
def test_encode_precision_quantizes_the_output(model, texts, precision):
    floats = model.encode(texts, prompt=INSTRUCTION)
    quantized = model.encode(texts, prompt=INSTRUCTION, precision=precision)
    assert_same_bytes(quantized, st_quantize(floats, precision))
    width = model.dim if precision in ("float32", "int8", "uint8") else model.dim // 8
    assert quantized.shape == (len(texts), width)
    tensor = model.encode(texts, prompt=INSTRUCTION, precision=precision, convert_to_tensor=True)
    np.testing.assert_array_equal(tensor.numpy(), quantized)
    listed = model.encode(texts[:2], prompt=INSTRUCTION, precision=precision, convert_to_numpy=False)
    assert len(listed) == 2 and listed[0].dtype == tensor.dtype


def test_output_quantization_errors(model):
    with pytest.raises(ValueError, match=r"output precision 'bfloat16' is not one of float32, int8, uint8, binary"):
        model.encode(["a text"], precision="bfloat16")
    with pytest.raises(ValueError, match="cannot compute int8 quantization ranges from a single embedding"):
        model.encode("one text", precision="int8")
    assert model.encode("one text", precision="ubinary").shape == (model.dim // 8,)  # bits need no calibration
    with pytest.raises(TypeError, match="embeddings to quantize must be floating point, got int8"):
        quantize_embeddings(np.zeros((2, 8), dtype=np.int8), "binary")


def test_max_seq_length_from_load(model, tiny_model, texts):
    short = fastinstructor.load(tiny_model, backend="cpu", max_seq_length=8)
    assert short.max_seq_length == 8 and "max_seq_length=8" in repr(short)
    pairs = [[INSTRUCTION, t] for t in texts]
    assert max(len(ids) for ids in short.tokenizer(pairs).ids) == 8
    long_text = max(texts, key=len)
    assert not np.allclose(short.encode(long_text), model.encode(long_text), atol=1e-3)
    for value, error, message in [
        (0, ValueError, "max_seq_length must be at least 1"),
        (513, ValueError, r"max_seq_length=513 exceeds the checkpoint's max_seq_length \(512\)"),
        (True, TypeError, "max_seq_length must be an int"),
    ]:
        with pytest.raises(error, match=message):
            fastinstructor.load(tiny_model, backend="cpu", max_seq_length=value)


def test_max_seq_length_from_the_embed_command(tiny_model, texts, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:12]), encoding="utf-8")
    out = tmp_path / "out"
    args = ["embed", "--model", str(tiny_model), "--input", str(corpus), "--output", str(out), "--quiet"]
    assert main([*args, "--instruction", INSTRUCTION, "--max-seq-length", "24"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["max_seq_length"] == 24
    assert manifest["totals"]["truncated"] == 12  # every text is longer than 24 tokens with its instruction
    ids, embeddings = fastinstructor.read_embeddings(out)
    short = fastinstructor.load(tiny_model, backend="cpu", max_seq_length=24)
    np.testing.assert_allclose(embeddings, short.encode(texts[:12], prompt=INSTRUCTION), atol=1e-6, rtol=0)
    assert main([*args, "--instruction", INSTRUCTION]) == 2  # a re-run at the model's length is another job
