"""Instructor.encode: a drop-in for InstructorEmbedding's encode, with clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastinstructor


@pytest.fixture(scope="module")
def model(tiny_model):
    return fastinstructor.load(tiny_model, backend="cpu")


def test_return_types(model, real_pairs):
    pairs = real_pairs[:5]
    array = model.encode(pairs)
    assert isinstance(array, np.ndarray) and array.dtype == np.float32 and array.shape == (5, model.dim)
    tensor = model.encode(pairs, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (5, model.dim)
    listed = model.encode(pairs, convert_to_numpy=False)
    assert isinstance(listed, list) and len(listed) == 5 and all(t.shape == (model.dim,) for t in listed)
    np.testing.assert_array_equal(tensor.numpy(), array)
    single = model.encode("Sea ice is melting.")
    assert single.shape == (model.dim,)
    np.testing.assert_array_equal(single, model.encode(["Sea ice is melting."])[0])
    assert model.encode([]).shape == (0, model.dim)


def test_unit_norm_and_input_order(model, real_pairs):
    out = model.encode(real_pairs)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    reversed_out = model.encode(real_pairs[::-1])
    np.testing.assert_allclose(reversed_out[::-1], out, atol=1e-6, rtol=0)


def test_progress_bar(model, real_pairs, capsys):
    model.encode(real_pairs[:4], show_progress_bar=True)
    assert "Embedding" in capsys.readouterr().err


@pytest.mark.parametrize(
    "sentences, error, message",
    [
        ([["Represent:", 42]], TypeError, r"sentences\[0\]\[1\] \(text\) is int; expected str"),
        ([["Represent:", "a", "b"]], ValueError, r"sentences\[0\] has 3 items; expected exactly 2"),
        (["fine", ["only one"]], ValueError, r"sentences\[1\] has 1 items"),
        ([[None, "text"]], TypeError, r"sentences\[0\]\[0\] \(instruction\) is NoneType"),
        ([b"bytes"], TypeError, r"sentences\[0\] is bytes"),
        (["a", ["Represent:", "a lone \udc80 surrogate"]], ValueError, r"sentences\[1\]\[1\] holds a lone surrogate"),
        (42, TypeError, "sentences must be a list"),
    ],
)
def test_bad_sentences(model, sentences, error, message):
    with pytest.raises(error, match=message):
        model.encode(sentences)


def test_bad_arguments(model, tiny_model):
    with pytest.raises(ValueError, match="output_value 'token_embeddings' is not supported"):
        model.encode(["a"], output_value="token_embeddings")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        model.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="pass device= to fastinstructor.load"):
        model.encode(["a"], device="cuda")
    np.testing.assert_array_equal(model.encode(["a"], device="cpu:0"), model.encode(["a"]))  # the same device
    with pytest.raises(ValueError, match="first visible GPU .* CUDA_VISIBLE_DEVICES=1"):  # not GPU 0 instead
        fastinstructor.load(tiny_model, device="cuda:1")
    with pytest.raises(ValueError, match="device 'gpu0' is not a device; pass 'cpu' or 'cuda'"):
        fastinstructor.load(tiny_model, device="gpu0")
    with pytest.raises(ValueError, match="unknown backend 'gpu'; choose one of: reference .*cpu"):
        fastinstructor.load(tiny_model, backend="gpu")
    with pytest.raises(ValueError, match="does not support precision 'float16'; choose one of float32, bfloat16, int8"):
        fastinstructor.load(tiny_model, backend="cpu", precision="float16")
    with pytest.raises(ValueError, match="exceeds the checkpoint's max_seq_length"):
        fastinstructor.load(tiny_model, max_seq_length=4096)


def test_a_bad_backend_or_precision_from_the_environment_names_the_variable(tiny_model, monkeypatch):
    monkeypatch.setenv("FASTINSTRUCTOR_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"unknown backend 'bogus'.*\(from the environment: FASTINSTRUCTOR_BACKEND="):
        fastinstructor.load(tiny_model)
    monkeypatch.setenv("FASTINSTRUCTOR_BACKEND", "cpu")
    monkeypatch.setenv("FASTINSTRUCTOR_PRECISION", "fp7")
    with pytest.raises(ValueError, match=r"unknown precision 'fp7'.*FASTINSTRUCTOR_BACKEND=cpu, FASTINSTRUCTOR_PREC"):
        fastinstructor.load(tiny_model)


@pytest.mark.parametrize(
    "ids, pool_start, message",
    [
        ([[5, 1], [7, 1]], [0], r"ids has 2 rows and pool_start 1"),
        ([[5, 1], []], [0, 0], r"ids\[1\] is empty"),
        ([[5, -3, 1]], [0], r"ids\[0\] holds token id -3, outside the model's vocabulary \(0 to \d+\)"),
        ([[5, 10**6, 1]], [0], r"ids\[0\] holds token id 1000000"),
        ([[5, 1]], [2], r"pool_start\[0\] is 2: it must fall within its row of 2 tokens"),
    ],
)
def test_embed_tokens_names_ids_no_backend_embeds_right(model, ids, pool_start, message):
    """The onnx backend's Gather would take a negative id silently (as the id counted from the vocabulary's end)."""
    with pytest.raises(ValueError, match=message):
        model.embed_tokens(ids, pool_start)
    assert model.embed_tokens([[5, 1]], [1]).shape == (1, model.dim)  # the last token alone is a valid pool


def test_shorter_max_seq_length_truncates(tiny_model):
    model = fastinstructor.load(tiny_model, max_seq_length=16)
    ids, _, truncated = model.tokenizer([["Represent the document:", "word " * 100], "Sea ice"])
    assert len(ids[0]) == 16 and ids[0][-1] == 1 and truncated == [True, False]
    untruncated = model.tokenizer.tokenizer("word " * 100)["input_ids"]
    assert ids[1] == model.tokenizer.tokenizer("Sea ice")["input_ids"] and len(untruncated) > 16
