"""Quantized output of the embed job (issue 18): int8, uint8, binary and ubinary shards hold exactly the bytes of
sentence-transformers' ``quantize_embeddings`` on the job's float embeddings, calibrated on the first shard, and a
resume quantizes with the ranges the manifest recorded."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import interrupt_at_shard
from sentence_transformers.util import quantize_embeddings as st_quantize

import fastinstructor
import fastinstructor.shards
from fastinstructor import CorpusError, embed_corpus, read_embeddings
from fastinstructor.cli import main as cli_main
from fastinstructor.shards import store_as, stored_type

INSTRUCTION = "Represent the Wikipedia document for retrieval:"
TEXTS = [f"Report {i}: sea ice extent fell by {i % 7} percent in the {1980 + i}s." for i in range(20)]
SHARD_ROWS = 8  # three shards: 8, 8 and 4 rows
QUANTIZED = ("int8", "uint8", "binary", "ubinary")


@pytest.fixture(scope="module")
def model(tiny_model):
    return fastinstructor.load(tiny_model)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def _embed(model, path, out, **options):
    return embed_corpus(model, path, out, instruction=INSTRUCTION, shard_rows=SHARD_ROWS, quiet=True, **options)


@pytest.fixture(scope="module")
def floats(model, corpus, tmp_path_factory):
    """The job's own float32 embeddings of the corpus: what its quantized outputs quantize."""
    out = tmp_path_factory.mktemp("float") / "out"
    _embed(model, corpus, out)
    return read_embeddings(out)[1]


@pytest.mark.parametrize("output_format", ["parquet", "npy"])
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_stored_bytes_are_sentence_transformers_quantize_embeddings(
    model, corpus, floats, tmp_path, dtype, output_format
):
    manifest = _embed(model, corpus, tmp_path / "out", dtype=dtype, output_format=output_format)
    expected = st_quantize(floats, dtype, calibration_embeddings=floats[:SHARD_ROWS])
    ids, stored = read_embeddings(tmp_path / "out")
    assert ids == [f"doc-{i}" for i in range(len(TEXTS))]
    assert stored.dtype == expected.dtype and stored.shape == expected.shape == (len(TEXTS), stored_type(dtype, 48)[1])
    assert stored.tobytes() == expected.tobytes()
    for shard in manifest["shards"]:  # and each file holds its rows, in the schema the format gives the dtype
        rows = slice(shard["first_input_row"] - 1, shard["first_input_row"] - 1 + shard["rows"])
        stem = tmp_path / "out" / f"part-{shard['index']:05d}"
        if output_format == "npy":
            assert np.load(f"{stem}.npy").tobytes() == expected[rows].tobytes()
        else:
            field = pq.read_schema(f"{stem}.parquet").field("embedding")
            assert field.type.value_type == pa.from_numpy_dtype(expected.dtype)
            assert field.type.list_size == expected.shape[1]
    if dtype in ("int8", "uint8"):
        ranges = np.asarray(manifest["quantization"]["ranges"], dtype=np.float32)
        np.testing.assert_array_equal(ranges, np.vstack((floats[:SHARD_ROWS].min(0), floats[:SHARD_ROWS].max(0))))
        assert manifest["quantization"]["precision"] == dtype and manifest["quantization"]["calibration_shard"] == 0
        on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())["quantization"]
        assert on_disk == manifest["quantization"]
        # What read_embeddings' docstring promises: the manifest's ranges quantize a query as the corpus was.
        query = fastinstructor.quantize_embeddings(floats[:1], dtype, ranges=np.array(on_disk["ranges"]))
        assert query.tobytes() == expected[:1].tobytes()
    else:
        assert "quantization" not in manifest


@pytest.mark.parametrize(
    ("dtype", "output_format", "stop_at"),
    [("int8", "parquet", 0), ("int8", "parquet", 1), ("uint8", "npy", 2), ("binary", "npy", 1)],
)
def test_an_interrupted_quantized_job_resumes_to_identical_bytes(
    model, corpus, tmp_path, monkeypatch, dtype, output_format, stop_at
):
    options = {"dtype": dtype, "output_format": output_format}
    _embed(model, corpus, tmp_path / "whole", **options)
    with monkeypatch.context() as patch:
        interrupt_at_shard(patch, stop_at)
        with pytest.raises(KeyboardInterrupt):
            _embed(model, corpus, tmp_path / "resumed", **options)
    recorded = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert len(recorded["shards"]) == stop_at and ("quantization" in recorded) == (
        stop_at > 0 and dtype in ("int8", "uint8")
    )
    _embed(model, corpus, tmp_path / "resumed", **options)
    whole = sorted(p.name for p in (tmp_path / "whole").glob("part-*"))
    assert whole == sorted(p.name for p in (tmp_path / "resumed").glob("part-*"))
    for name in whole:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("whole", "resumed")]
    assert manifests[0].get("quantization") == manifests[1].get("quantization")


def test_a_resume_quantizes_with_the_recorded_ranges(model, corpus, floats, tmp_path, monkeypatch):
    """The ranges are the manifest's, never recomputed: edited ranges reach every shard written after the edit."""
    with monkeypatch.context() as patch:
        interrupt_at_shard(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            _embed(model, corpus, tmp_path / "out", dtype="int8", limit=16)
    path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(path.read_text())
    wider = [[-1.0] * 48, [1.0] * 48]
    manifest["quantization"]["ranges"] = wider
    path.write_text(json.dumps(manifest))
    _embed(model, corpus, tmp_path / "out", dtype="int8", limit=16)
    stored = read_embeddings(tmp_path / "out")[1]
    first = st_quantize(floats[:SHARD_ROWS], "int8", calibration_embeddings=floats[:SHARD_ROWS])
    second = st_quantize(floats[SHARD_ROWS:16], "int8", ranges=np.array(wider, dtype=np.float32))
    assert stored.tobytes() == np.concatenate([first, second]).tobytes()


def test_calibration_skips_shards_without_rows_and_an_empty_output_reads_back(model, tmp_path):
    path = tmp_path / "in.jsonl"
    bad = [json.dumps({"id": f"bad-{i}", "text": ""}) for i in range(SHARD_ROWS)]  # the first shard: all skipped
    good = [json.dumps({"id": f"doc-{i}", "text": t}) for i, t in enumerate(TEXTS[:SHARD_ROWS])]
    path.write_text("\n".join(bad + good) + "\n")
    manifest = _embed(model, path, tmp_path / "out", dtype="uint8", on_error="skip")
    assert manifest["quantization"]["calibration_shard"] == 1
    _embed(model, path, tmp_path / "float", on_error="skip")
    floats = read_embeddings(tmp_path / "float")[1]
    assert read_embeddings(tmp_path / "out")[1].tobytes() == st_quantize(floats, "uint8").tobytes()
    _embed(model, path, tmp_path / "empty", dtype="binary", on_error="skip", limit=SHARD_ROWS)
    ids, stored = read_embeddings(tmp_path / "empty")
    assert ids == [] and stored.shape == (0, 6) and stored.dtype == np.int8


def test_one_row_cannot_calibrate_and_a_resume_with_another_dtype_is_refused(model, corpus, tmp_path):
    with pytest.raises(CorpusError, match=r"int8 output calibrates .* only one row.*--shard-rows"):
        embed_corpus(model, corpus, tmp_path / "one", instruction=INSTRUCTION, shard_rows=1, dtype="int8", quiet=True)
    _embed(model, corpus, tmp_path / "out", dtype="int8", limit=SHARD_ROWS)
    with pytest.raises(CorpusError, match=r"differs in: dtype"):
        _embed(model, corpus, tmp_path / "out", dtype="uint8", limit=SHARD_ROWS)
    with pytest.raises(ValueError, match="dtype 'int4' is not one of float32, float16, int8, uint8, binary, ubinary"):
        _embed(model, corpus, tmp_path / "bad", dtype="int4")


def test_the_cli_refuses_an_unknown_dtype_naming_the_choices(tiny_model, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["embed", "--model", str(tiny_model), "--dtype", "int4", "--input", "x", "--output", "y"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'int4'" in err and all(d in err for d in QUANTIZED)


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_a_dim_that_is_not_a_multiple_of_8_is_padded_as_sentence_transformers_pads(dtype):
    floats = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    stored = store_as(floats, dtype, {"shards": []})
    assert stored.tobytes() == st_quantize(floats, dtype, calibration_embeddings=floats).tobytes()
    assert (stored.dtype, stored.shape[1]) == stored_type(dtype, 12)  # 2 bytes for 12 bits
