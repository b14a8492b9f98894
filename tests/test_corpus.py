"""The offline embedding job: formats, resumability after a real kill, bad rows, bounded memory."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastinstructor
from fastinstructor import CorpusError, embed_corpus, read_embeddings
from fastinstructor.data import read_jsonl_texts, shared_data_dir

INSTRUCTION = "Represent the Wikipedia document for retrieval:"


@pytest.fixture(scope="module")
def model(tiny_model):
    return fastinstructor.load(tiny_model)


@pytest.fixture(scope="module")
def evidence(tmp_path_factory, real_texts):
    """A slice of the real evidence file (or the project's own text where ../shared/data is absent)."""
    data = shared_data_dir()
    rows = (
        read_jsonl_texts(data / "climate_fever_evidence.jsonl", 400)
        if data
        else [(f"doc-{i}", t) for i, t in enumerate(real_texts)]
    )
    path = tmp_path_factory.mktemp("input") / "evidence.jsonl"
    path.write_text("".join(json.dumps({"id": i, "title": "t", "text": t}) + "\n" for i, t in rows))
    return path, rows


def expected_embeddings(model, texts, instruction=INSTRUCTION):
    return model.encode([[instruction, t] for t in texts])


def embed_cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "fastinstructor", "embed", *args], capture_output=True, text=True, **kwargs
    )


def test_end_to_end_equals_encode(model, tiny_model, evidence, tmp_path):
    path, rows = evidence
    result = embed_cli(
        "--model",
        str(tiny_model),
        "--instruction",
        INSTRUCTION,
        "--input",
        str(path),
        "--output",
        str(tmp_path / "out"),
        "--shard-rows",
        "150",
    )
    assert result.returncode == 0, result.stderr
    ids, embeddings = read_embeddings(tmp_path / "out")
    assert ids == [i for i, _ in rows]
    np.testing.assert_allclose(embeddings, expected_embeddings(model, [t for _, t in rows]), atol=1e-6, rtol=0)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["dim"] == 48 and manifest["instructions"] == [INSTRUCTION]
    assert manifest["identity"]["backend"] == "cpu" and manifest["identity"]["precision"] == "float32"
    assert manifest["totals"]["rows"] == len(rows) and len(manifest["shards"]) == -(-len(rows) // 150)
    assert "embedded" in result.stdout and "RANDOM weights" in result.stdout
    assert "embed:" in result.stderr  # line-based progress when stderr is not a terminal


def test_npy_float16_output(model, evidence, tmp_path):
    path, rows = evidence
    manifest = embed_corpus(
        model,
        path,
        tmp_path / "out",
        instruction=INSTRUCTION,
        output_format="npy",
        dtype="float16",
        limit=50,
        shard_rows=20,
        quiet=True,
    )
    files = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))  # the lock is hidden
    assert files[:2] == ["manifest.json", "part-00000.ids.jsonl"]
    ids, embeddings = read_embeddings(tmp_path / "out")
    assert embeddings.dtype == np.float16 and ids == [i for i, _ in rows[:50]]
    assert manifest["totals"]["rows"] == len(rows[:50])  # 50, or fewer where the fallback text is shorter
    expected = expected_embeddings(model, [t for _, t in rows[:50]])
    np.testing.assert_allclose(embeddings.astype(np.float32), expected, atol=1e-3, rtol=0)


TEXTS = ["Sea ice is melting.", 'CO2, methane and "water vapour" trap heat.', "Glaciers\tretreat."]


def _write_inputs(folder):
    """The same three rows in every input format."""
    (folder / "in.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS))
    )
    with open(folder / "in.csv", "w", newline="") as f:  # quoted where a text holds a quote or a comma
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([f"r{i}", t] for i, t in enumerate(TEXTS))
    # TSV has no quoting (IANA's text/tab-separated-values, MS MARCO, STS-B): a quote is a character, a tab splits
    (folder / "in.tsv").write_text(
        "id\ttext\n" + "".join(f"r{i}\t{t.replace(chr(9), ' ')}\n" for i, t in enumerate(TEXTS))
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"r{i}" for i in range(3)], "text": TEXTS}), folder / "in.parquet")
    (folder / "in.txt").write_text("".join(t.replace("\t", " ") + "\n" for t in TEXTS))


@pytest.mark.parametrize("name", ["in.jsonl", "in.csv", "in.tsv", "in.parquet", "in.txt"])
def test_input_formats(model, tmp_path, name):
    _write_inputs(tmp_path)
    embed_corpus(model, tmp_path / name, tmp_path / "out", instruction=INSTRUCTION, quiet=True)
    ids, embeddings = read_embeddings(tmp_path / "out")
    texts = [t.replace("\t", " ") for t in TEXTS] if name in ("in.txt", "in.tsv") else TEXTS
    assert ids == (["1", "2", "3"] if name == "in.txt" else ["r0", "r1", "r2"])
    np.testing.assert_allclose(embeddings, expected_embeddings(model, texts), atol=1e-6, rtol=0)


def test_stdin_and_per_row_instructions(model, tiny_model, tmp_path):
    rows = [
        {"id": i, "instruction": f"Represent the {kind}:", "body": t}
        for i, (kind, t) in enumerate(zip(["claim", "title", "claim"], TEXTS, strict=True))
    ]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    result = embed_cli(
        "--model",
        str(tiny_model),
        "--instruction-field",
        "instruction",
        "--text-field",
        "body",
        "--input",
        "-",
        "--input-format",
        "jsonl",
        "--output",
        str(tmp_path / "out"),
        "--quiet",
        input=lines,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # --quiet
    ids, embeddings = read_embeddings(tmp_path / "out")
    assert ids == ["0", "1", "2"]
    expected = model.encode([[r["instruction"], r["body"]] for r in rows])
    np.testing.assert_allclose(embeddings, expected, atol=1e-6, rtol=0)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["instructions"] == ["Represent the claim:", "Represent the title:"]


BAD_LINES = [
    json.dumps({"id": "a", "text": "fine"}),
    "{not json",
    json.dumps({"id": "b"}),
    json.dumps({"id": "c", "text": 7}),
    json.dumps({"id": "d", "text": "   "}),
    json.dumps({"id": "e", "text": "also fine"}),
]


def test_bad_rows_fail_keeps_finished_shards(model, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_LINES[:1] * 3 + BAD_LINES) + "\n")  # 3 good rows, then the mix
    with pytest.raises(CorpusError, match=r"bad.jsonl:5: malformed JSON .*--on-error skip.*1 finished shard"):
        embed_corpus(model, path, tmp_path / "out", instruction=INSTRUCTION, shard_rows=3, quiet=True)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 1 and not manifest["complete"]
    # Continuing with --on-error skip keeps the finished shard and skips the bad rows.
    manifest = embed_corpus(
        model, path, tmp_path / "out", instruction=INSTRUCTION, shard_rows=3, quiet=True, on_error="skip"
    )
    assert manifest["complete"] and manifest["totals"]["skipped"] == 4 and manifest["totals"]["rows"] == 5
    skipped = [s for shard in manifest["shards"] for s in shard["skipped_rows"]]
    assert [s["row"] for s in skipped] == [5, 6, 7, 8]
    assert [s["reason"] for s in skipped] == [
        "malformed JSON (Expecting property name enclosed in double quotes at column 2)",
        "no field 'text' (set --text-field)",
        "field 'text' is int, not a string",
        "empty text",
    ]
    ids, _ = read_embeddings(tmp_path / "out")
    assert ids == ["a", "a", "a", "a", "e"]


def test_cli_bad_row_exit_code_and_message(tiny_model, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    result = embed_cli("--model", str(tiny_model), "--input", str(path), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "bad.jsonl:2: malformed JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_overlong_texts_are_truncated_and_counted(model, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "warming " * 2000}) + "\n" + json.dumps({"text": "short"}) + "\n")
    manifest = embed_corpus(model, path, tmp_path / "out", instruction=INSTRUCTION, quiet=True)
    assert manifest["totals"]["truncated"] == 1 and manifest["totals"]["rows"] == 2


def test_mismatched_rerun_is_refused_unless_overwrite(model, evidence, tmp_path):
    path, _ = evidence
    embed_corpus(model, path, tmp_path / "out", instruction=INSTRUCTION, limit=10, quiet=True)
    with pytest.raises(CorpusError, match=r"different job \(differs in: instruction\).*--overwrite"):
        embed_corpus(model, path, tmp_path / "out", instruction="Represent the claim:", limit=10, quiet=True)
    with pytest.raises(CorpusError, match=r"differs in: dtype"):
        embed_corpus(model, path, tmp_path / "out", instruction=INSTRUCTION, limit=10, dtype="float16", quiet=True)
    manifest = embed_corpus(
        model, path, tmp_path / "out", instruction="Represent the claim:", limit=10, quiet=True, overwrite=True
    )
    assert manifest["identity"]["instruction"] == "Represent the claim:" and manifest["totals"]["rows"] == 10
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(CorpusError, match="not empty and has no manifest.json"):
        embed_corpus(model, path, tmp_path / "other", instruction=INSTRUCTION, quiet=True)


def test_tampered_shard_is_detected(model, evidence, tmp_path):
    path, _ = evidence
    embed_corpus(model, path, tmp_path / "out", instruction=INSTRUCTION, limit=20, shard_rows=10, quiet=True)
    shard = tmp_path / "out" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match="does not match its checksum"):
        read_embeddings(tmp_path / "out")
    shard.write_bytes(bytes(data[:-10]))  # a resume notices a truncated shard
    with pytest.raises(CorpusError, match="not the size recorded"):
        embed_corpus(model, path, tmp_path / "out", instruction=INSTRUCTION, limit=20, shard_rows=10, quiet=True)


def _run_and_interrupt(command, manifest_path, sig, shards_before_kill=2):
    """Start the job, wait until it has finished some shards (but not all), then send ``sig``."""
    # A shell starting a background job (as CI runners may) ignores SIGINT in it, and children inherit that:
    # give the job the default disposition, as a terminal's Ctrl-C would find it.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if len(manifest["shards"]) >= shards_before_kill:
                break
        time.sleep(0.01)
    assert process.poll() is None, "the job ended before it could be interrupted: make the input larger"
    process.send_signal(sig)
    process.communicate(timeout=60)
    manifest = json.loads(manifest_path.read_text())
    assert not manifest["complete"], "the job was not interrupted mid-run"
    return process.returncode, manifest


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_identical_output(tiny_model, evidence, tmp_path, sig):
    path, rows = evidence
    # Many tiny shards (each one a file, an fsync and a manifest rewrite) and batches of one row, so that the
    # job outlasts the signal's delivery by far and the kill lands mid-run.
    shard_rows = 4
    common = [
        "--model",
        str(tiny_model),
        "--instruction",
        INSTRUCTION,
        "--input",
        str(path),
        "--shard-rows",
        str(shard_rows),
        "--batch-size",
        "1",
        "--quiet",
    ]
    reference = embed_cli(*common, "--output", str(tmp_path / "whole"))
    assert reference.returncode == 0, reference.stderr
    command = [sys.executable, "-m", "fastinstructor", "embed", *common, "--output", str(tmp_path / "resumed")]
    returncode, manifest = _run_and_interrupt(command, tmp_path / "resumed" / "manifest.json", sig)
    assert returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    finished = len(manifest["shards"])
    assert 2 <= finished < -(-len(rows) // shard_rows)
    again = embed_cli(*common, "--output", str(tmp_path / "resumed"))
    assert again.returncode == 0, again.stderr
    whole = sorted(p.name for p in (tmp_path / "whole").glob("part-*"))
    assert whole == sorted(p.name for p in (tmp_path / "resumed").glob("part-*"))
    assert not list((tmp_path / "resumed").glob(".*tmp*")), "temporary files left behind"
    for name in whole:  # byte-identical shards
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    ids, _ = read_embeddings(tmp_path / "resumed")
    assert ids == [i for i, _ in rows] and len(set(ids)) == len(ids)


def _peak_rss_mib(code: str) -> float:
    """Peak resident memory of a fresh Python process running ``code``."""
    process = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return usage.ru_maxrss / 1024  # KiB on Linux


def test_memory_stays_bounded_on_a_large_input(tiny_model, tmp_path):
    """300 MB of JSON Lines (short texts, large extra fields): a streaming run stays within 100 MiB of the
    same run on a tiny file; loading the file whole would cost more than 300 MiB."""
    payload = "x" * 10_000
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    with open(large, "w") as f:
        for i in range(30_000):
            f.write(json.dumps({"id": i, "text": f"Sea ice report number {i % 97}.", "payload": payload}) + "\n")
    with open(small, "w") as f:
        for i in range(1_000):
            f.write(json.dumps({"id": i, "text": f"Sea ice report number {i % 97}.", "payload": payload}) + "\n")
    assert large.stat().st_size > 300e6
    job = (
        "import fastinstructor; fastinstructor.embed_corpus({model!r}, {path!r}, {out!r}, instruction='Represent:', "
        "shard_rows=2000, batch_size=256, quiet=True)"
    )
    baseline = _peak_rss_mib(job.format(model=str(tiny_model), path=str(small), out=str(tmp_path / "o1")))
    peak = _peak_rss_mib(job.format(model=str(tiny_model), path=str(large), out=str(tmp_path / "o2")))
    print(f"peak RSS {peak:.0f} MiB on 300 MB vs {baseline:.0f} MiB on the small file")
    assert peak - baseline < 100, f"peak RSS {peak:.0f} MiB vs {baseline:.0f} MiB on the small file"
    ids, _ = read_embeddings(tmp_path / "o2")
    assert len(ids) == 30_000


def test_resume_removes_temporaries_of_a_killed_writer(model, evidence, tmp_path):
    """A writer killed mid-write leaves `.part-*.tmp-<pid>`. The next run holds the folder's lock, so no other
    writer can be at work in it: it removes every temporary, whichever process (alive or not: pids are reused)
    the name gives."""
    path, _ = evidence
    out = tmp_path / "out"
    embed_corpus(model, path, out, instruction=INSTRUCTION, limit=20, shard_rows=10, quiet=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".part-00002.parquet.tmp-{dead.pid}"
    reused = out / f".part-00003.parquet.tmp-{os.getpid()}"  # the pid of a live process: still garbage
    manifest = out / f".manifest.json.tmp-{os.getpid()}"
    for tmp in (stale, reused, manifest):
        tmp.write_bytes(b"half a file")
    embed_corpus(model, path, out, instruction=INSTRUCTION, limit=20, shard_rows=10, quiet=True)
    assert not stale.exists() and not reused.exists() and not manifest.exists()
    assert read_embeddings(out)[1].shape[0] == 20  # the finished shards are untouched
