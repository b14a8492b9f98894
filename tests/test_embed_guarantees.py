"""The embed job's guarantees under hostile conditions (issue 13): nothing silently wrong, nothing lost.

Each test is named after the defect it reproduces: a changed input on resume, a second run into the same
folder, a kill at any write step, bad bytes and bad quoting, duplicate and mistyped ids, SIGTERM, a damaged
manifest.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import interrupt_at_shard

import fastinstructor
import fastinstructor.shards
from fastinstructor import CorpusError, corpus, embed_corpus, read_embeddings

INSTRUCTION = "Represent the Wikipedia document for retrieval:"
TEXTS = [f"Report {i}: sea ice extent fell by {i % 7} percent in the {1980 + i}s." for i in range(24)]


@pytest.fixture(scope="module")
def model(tiny_model):
    return fastinstructor.load(tiny_model)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(texts=TEXTS, prefix="doc"):
    return [{"id": f"{prefix}-{i}", "text": t} for i, t in enumerate(texts)]


def _embed(model, path, out, **options):
    return embed_corpus(model, path, out, instruction=INSTRUCTION, shard_rows=4, quiet=True, **options)


def _expected(model, texts):
    return model.encode([[INSTRUCTION, t] for t in texts])


# 1. Resume must notice a changed input.


@pytest.mark.parametrize(
    "change",
    ["insert-a-line-at-the-top", "edit-a-consumed-line", "remove-a-consumed-line", "truncate-the-input"],
)
def test_resume_refuses_an_input_that_changed_since_the_interruption(model, tmp_path, monkeypatch, change):
    path = _jsonl(tmp_path / "in.jsonl", _rows())
    with monkeypatch.context() as patch:
        interrupt_at_shard(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            _embed(model, path, tmp_path / "out")
    rows = _rows()
    if change == "insert-a-line-at-the-top":
        rows.insert(0, {"id": "new", "text": "A new first row."})
    elif change == "edit-a-consumed-line":
        rows[5]["text"] = "Edited."
    elif change == "remove-a-consumed-line":
        del rows[3]
    else:
        rows = rows[:5]
    _jsonl(path, rows)
    with pytest.raises(CorpusError, match=r"in.jsonl changed since .* not the ones that were embedded.*--overwrite"):
        _embed(model, path, tmp_path / "out")
    # Nothing already done is lost: the finished shards and their manifest are untouched.
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    manifest = _embed(model, path, tmp_path / "out", overwrite=True)
    ids, embeddings = read_embeddings(tmp_path / "out")
    assert ids == [r["id"] for r in rows]
    np.testing.assert_allclose(embeddings, _expected(model, [r["text"] for r in rows]), atol=1e-6, rtol=0)


def test_resume_after_rows_were_appended_equals_a_run_on_the_longer_input(model, tmp_path, monkeypatch):
    """Rows added after the consumed ones change nothing that was embedded: the resume continues."""
    path = _jsonl(tmp_path / "in.jsonl", _rows()[:12])
    with monkeypatch.context() as patch:
        interrupt_at_shard(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            _embed(model, path, tmp_path / "out")
    _jsonl(path, _rows())
    _embed(model, path, tmp_path / "out")
    _embed(model, path, tmp_path / "whole")
    assert read_embeddings(tmp_path / "out")[0] == read_embeddings(tmp_path / "whole")[0]
    np.testing.assert_array_equal(read_embeddings(tmp_path / "out")[1], read_embeddings(tmp_path / "whole")[1])


def test_a_complete_output_is_not_passed_off_as_the_output_of_a_changed_input(model, tmp_path):
    path = _jsonl(tmp_path / "in.jsonl", _rows())
    _embed(model, path, tmp_path / "out")
    time.sleep(0.01)
    path.write_text(path.read_text())  # touched: same rows, new modification time
    manifest = _embed(model, path, tmp_path / "out")  # re-read, found the same: nothing to do
    assert manifest["complete"] and manifest["totals"]["rows"] == len(TEXTS)
    rows = _rows()
    rows[0]["text"] = "Changed."
    _jsonl(path, rows)
    with pytest.raises(CorpusError, match="changed since"):
        _embed(model, path, tmp_path / "out")


def test_rows_appended_after_the_job_completed_are_not_called_embedded(model, tmp_path):
    """The rows after the last shard count too: an output complete for 22 rows is not complete for 24."""
    path = _jsonl(tmp_path / "in.jsonl", _rows()[:22])  # the last shard holds 2 of its 4 rows
    _embed(model, path, tmp_path / "out")
    _jsonl(path, _rows())
    with pytest.raises(CorpusError, match=r"changed since .* was completed: it now has 24 rows where the job read 22"):
        _embed(model, path, tmp_path / "out")
    _jsonl(path, _rows()[:22])  # restored: complete again
    assert _embed(model, path, tmp_path / "out")["totals"]["rows"] == 22
    _jsonl(path, _rows())  # with the job's --limit, the rows past it do not count
    _embed(model, path, tmp_path / "limited", limit=22)
    assert _embed(model, path, tmp_path / "limited", limit=22)["totals"]["rows"] == 22


def _stdin(monkeypatch, rows):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_a_job_reading_stdin_cannot_be_resumed_and_says_so(model, tmp_path, monkeypatch):
    spec = corpus.InputSpec("-", "jsonl")
    _stdin(monkeypatch, _rows())
    with monkeypatch.context() as patch:
        interrupt_at_shard(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            _embed(model, spec, tmp_path / "out")
    _stdin(monkeypatch, _rows(prefix="other"))  # a different stream: must not be mixed in
    with pytest.raises(CorpusError, match="standard input, which cannot be resumed.*--overwrite"):
        _embed(model, spec, tmp_path / "out")
    _stdin(monkeypatch, _rows(prefix="other"))
    _embed(model, spec, tmp_path / "out", overwrite=True)
    assert read_embeddings(tmp_path / "out")[0] == [r["id"] for r in _rows(prefix="other")]
    _stdin(monkeypatch, _rows())  # a complete stdin job is not "nothing to do" for another stream either
    with pytest.raises(CorpusError, match="cannot be resumed"):
        _embed(model, spec, tmp_path / "out")


# 3. One job per output folder.


def test_a_second_run_into_a_busy_output_folder_is_refused_naming_the_holder(tiny_model, tmp_path):
    path = _jsonl(tmp_path / "in.jsonl", _rows(TEXTS * 10))
    out = tmp_path / "out"
    common = ["--model", str(tiny_model), "--input", str(path), "--output", str(out), "--quiet"]
    first = subprocess.Popen(
        [sys.executable, "-m", "fastinstructor", "embed", *common, "--instruction", INSTRUCTION]
        + ["--shard-rows", "4", "--batch-size", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "manifest.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, "the first run ended before the second could start: make its input larger"
    second = subprocess.run(
        [sys.executable, "-m", "fastinstructor", "embed", *common, "--instruction", "Represent the claim:"],
        capture_output=True,
        text=True,
    )
    assert first.poll() is None, "the first run ended while the second ran: the test proves nothing"
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"output folder {out} is in use by process {first.pid}" in second.stderr, second.stderr
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    ids, embeddings = read_embeddings(out)  # the first job's output, whole and verified
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["instructions"] == [INSTRUCTION] and len(ids) == len(TEXTS) * 10


# 4. A kill at any write step: the next run resumes to the uninterrupted output.

_FAULTY = """
import os, signal, sys
import fastinstructor.shards as shards
from fastinstructor.cli import main

kill_at, phase = int(sys.argv[1]), sys.argv[2]
original, calls = shards.write_atomic, [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def faulty(path, write):
    calls[0] += 1
    if calls[0] != kill_at:
        return original(path, write)
    if phase == "temp":  # killed while writing the temporary file: half of it is on disk
        def half(tmp):
            write(tmp)
            data = tmp.read_bytes()
            tmp.write_bytes(data[: len(data) // 2])
            die()
        original(path, half)
    original(path, write)  # "renamed": the file is in place, the step after it never happens
    die()

shards.write_atomic = faulty
sys.exit(main(["embed", *sys.argv[3:]]))
"""

# Writes of a two-shard parquet job: the first manifest, (shard, manifest) twice, the final manifest.
_WRITES = ["first manifest", "shard 0", "manifest after shard 0", "shard 1", "manifest after shard 1", "final"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    path = _jsonl(folder / "in.jsonl", _rows()[:8])
    args = ["--model", str(tiny_model), "--instruction", INSTRUCTION, "--input", str(path), "--shard-rows", "4"]
    whole = folder / "whole"
    result = subprocess.run(
        [sys.executable, "-m", "fastinstructor", "embed", *args, "--output", str(whole), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return args, whole


@pytest.mark.parametrize("phase", ["temp", "renamed"])
@pytest.mark.parametrize("step", range(1, len(_WRITES) + 1), ids=_WRITES)
def test_a_kill_at_any_write_step_resumes_to_the_uninterrupted_output(model, uninterrupted, tmp_path, step, phase):
    """Includes the defect: a kill after the first shard is renamed but before the manifest lists it left a
    folder the job refused to resume ("not empty and has no manifest.json")."""
    args, whole = uninterrupted
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", _FAULTY, str(step), phase, *args, "--output", str(out), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, f"the kill point was not reached: {killed.stderr}"
    resumed = subprocess.run(
        [sys.executable, "-m", "fastinstructor", "embed", *args, "--output", str(out), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    names = sorted(p.name for p in whole.iterdir() if p.name.startswith("part-"))
    assert names == sorted(p.name for p in out.iterdir() if p.name.startswith("part-"))
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    for name in names:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    ids, embeddings = read_embeddings(out)
    assert ids == read_embeddings(whole)[0]
    np.testing.assert_array_equal(embeddings, read_embeddings(whole)[1])


# 5. Bad bytes and bad quoting are bad rows, not the end of the job or silently merged rows.


def test_invalid_utf8_is_a_bad_row_that_skip_skips(model, tmp_path):
    good = [json.dumps(r).encode() for r in _rows()[:3]]
    bad = b'{"id": "x", "text": "caf\xe9 au lait"}'  # Latin-1, not UTF-8
    (tmp_path / "in.jsonl").write_bytes(b"\n".join([good[0], bad, good[1], good[2]]) + b"\n")
    (tmp_path / "in.txt").write_bytes(b"first line\ncaf\xe9\nthird line\n")
    (tmp_path / "in.csv").write_bytes(b'id,text\na,first\nb,"caf\xe9\nmultiline"\nc,third\n')
    for name, expected_ids, bad_row in (
        ("in.jsonl", ["doc-0", "doc-1", "doc-2"], 2),
        ("in.txt", ["1", "3"], 2),
        ("in.csv", ["a", "c"], 4),
    ):
        with pytest.raises(CorpusError, match=rf"{name}:{bad_row}: not UTF-8 text .*--on-error skip"):
            _embed(model, tmp_path / name, tmp_path / f"fail-{name}")
        manifest = _embed(model, tmp_path / name, tmp_path / f"skip-{name}", on_error="skip")
        assert manifest["totals"]["skipped"] == 1, name
        (skipped,) = manifest["shards"][0]["skipped_rows"]
        assert skipped["row"] == bad_row and skipped["reason"].startswith("not UTF-8 text"), skipped
        assert read_embeddings(tmp_path / f"skip-{name}")[0] == expected_ids, name


def test_lone_surrogates_are_bad_rows(model, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": "lone \\ud800 surrogate"}\n')
    manifest = _embed(model, path, tmp_path / "out", on_error="skip")
    assert manifest["shards"][0]["skipped_rows"] == [
        {"row": 2, "reason": "field 'text' holds a lone surrogate, which is not Unicode text"}
    ]


def test_an_unterminated_csv_quote_is_reported_instead_of_merging_rows(model, tmp_path):
    path = tmp_path / "in.csv"
    path.write_text('id,text\na,first\nb,"never closed\nc,third\nd,fourth\n')
    with pytest.raises(CorpusError, match=r"in.csv:3: malformed CSV in lines 3-5 .*check its quotes"):
        _embed(model, path, tmp_path / "fail")
    manifest = _embed(model, path, tmp_path / "skip", on_error="skip")
    assert read_embeddings(tmp_path / "skip")[0] == ["a"] and manifest["totals"]["skipped"] == 1
    # A quote closed on a later line with text after it: also an error, and reading goes on after it.
    path.write_text('id,text\na,first\nb,"opened\nc,"closed" here\nd,fourth\n')
    manifest = _embed(model, path, tmp_path / "skip2", on_error="skip")
    assert read_embeddings(tmp_path / "skip2")[0] == ["a", "d"]
    assert manifest["shards"][0]["skipped_rows"][0]["reason"].startswith("malformed CSV in lines 3-4")


# 6. Duplicate and mistyped ids.


def test_duplicate_ids_are_counted_and_warned_or_refused(model, tiny_model, tmp_path, monkeypatch):
    rows = _rows()
    rows[6]["id"] = rows[1]["id"]  # a repeat across shards (shard_rows=4)
    rows[9]["id"] = rows[8]["id"]  # and within one
    rows[10]["id"] = 7
    rows[11]["id"] = "7"  # 7 and "7" are the same id once written
    path = _jsonl(tmp_path / "in.jsonl", rows)
    manifest = _embed(model, path, tmp_path / "warn")
    assert manifest["totals"]["duplicate_ids"] == 3
    assert [s["duplicate_ids"] for s in manifest["shards"]] == [0, 1, 2, 0, 0, 0]
    with pytest.raises(CorpusError, match=r"in.jsonl:7: id 'doc-1' was already used by an earlier row"):
        _embed(model, path, tmp_path / "error", on_duplicate_id="error")
    assert _embed(model, path, tmp_path / "keep", on_duplicate_id="keep")["totals"]["duplicate_ids"] == 0
    # A resume still knows the ids of the finished shards.
    with monkeypatch.context() as patch:
        interrupt_at_shard(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            _embed(model, path, tmp_path / "resumed")
    assert _embed(model, path, tmp_path / "resumed")["totals"]["duplicate_ids"] == 3
    result = subprocess.run(
        [sys.executable, "-m", "fastinstructor", "embed", "--model", str(tiny_model), "--input", str(path)]
        + ["--output", str(tmp_path / "cli"), "--shard-rows", "4"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "warning: 1 duplicate id(s) in input rows 5-8" in result.stderr
    assert "duplicate ids 3" in result.stdout


@pytest.mark.parametrize("bad_id, what", [(1.0, "float"), (True, "bool"), (None, "null"), ({"a": 1}, "dict")])
def test_ids_that_are_not_strings_or_integers_are_refused(model, tmp_path, bad_id, what):
    path = _jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "fine"}, {"id": bad_id, "text": "also fine"}])
    with pytest.raises(CorpusError, match=rf"in.jsonl:2: id field 'id' is {what}; ids must be strings or integers"):
        _embed(model, path, tmp_path / "out")


# 7. SIGTERM.


def test_sigterm_keeps_the_finished_shards_says_so_and_exits_143(tiny_model, tmp_path):
    path = _jsonl(tmp_path / "in.jsonl", _rows(TEXTS * 10))
    out = tmp_path / "out"
    args = ["--model", str(tiny_model), "--instruction", INSTRUCTION, "--input", str(path), "--quiet"]
    args += ["--shard-rows", "4", "--batch-size", "1", "--output", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "fastinstructor", "embed", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "manifest.json").is_file() and len(json.loads((out / "manifest.json").read_text())["shards"]) >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "terminated (SIGTERM)" in stderr and "re-run the same command to continue" in stderr
    assert "Traceback" not in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) >= 2
    again = subprocess.run([sys.executable, "-m", "fastinstructor", "embed", *args], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert read_embeddings(out)[0] == [r["id"] for r in _rows(TEXTS * 10)]


# 13 (part). A damaged manifest.


@pytest.mark.parametrize("content", ["[]", "{}", '{"identity": {}, "shards": 3}', "{not json"])
def test_a_malformed_manifest_is_a_clear_error(model, tiny_model, tmp_path, content):
    path = _jsonl(tmp_path / "in.jsonl", _rows()[:4])
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(content)
    with pytest.raises(CorpusError, match="manifest.json is (damaged|not a fastinstructor embed manifest)"):
        _embed(model, path, out)
    with pytest.raises(CorpusError, match="manifest.json is (damaged|not a fastinstructor embed manifest)"):
        read_embeddings(out)
    if content != "[]":
        return  # the command line once: its exit code and message
    result = subprocess.run(
        [sys.executable, "-m", "fastinstructor", "embed", "--model", str(tiny_model), "--input", str(path)]
        + ["--output", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--overwrite" in result.stderr
    assert (out / "manifest.json").read_text() == content  # nothing overwritten without --overwrite


def test_a_run_that_fails_before_any_work_leaves_no_output_folder(tiny_model, tmp_path):
    path = _jsonl(tmp_path / "in.jsonl", _rows()[:4])
    with pytest.raises(ImportError, match="backend 'triton' is not available here"):
        embed_corpus(tiny_model, path, tmp_path / "out", backend="triton", precision="bfloat16", quiet=True)
    assert not (tmp_path / "out").exists()


# 7. Inputs that are read wrong or refused for a reason that is not theirs.


def test_a_users_files_that_look_like_shards_survive_overwrite(model, tmp_path):
    out = tmp_path / "out"
    _embed(model, _jsonl(tmp_path / "in.jsonl", _rows()), out)
    (out / "part-00000-c000.snappy.parquet").write_text("Spark's, not ours")  # another tool's part file
    _embed(model, tmp_path / "in.jsonl", out, overwrite=True)
    _embed(model, tmp_path / "in.jsonl", out)  # and a resume's clean-up leaves it too
    assert (out / "part-00000-c000.snappy.parquet").read_text() == "Spark's, not ours"


def test_tsv_quotes_csv_bom_long_csv_fields_and_unreadable_json_lines(model, tmp_path):
    # TSV has no quoting: a text in quotes keeps them, and an unbalanced quote reads as a character (STS-B's rows)
    texts = ['"We need to change," he said.', 'A 12" record, "quoted" mid-text.']
    (tmp_path / "in.tsv").write_text("id\ttext\n" + "".join(f"t{i}\t{t}\n" for i, t in enumerate(texts)))
    _embed(model, tmp_path / "in.tsv", tmp_path / "tsv")
    np.testing.assert_allclose(read_embeddings(tmp_path / "tsv")[1], _expected(model, texts), atol=1e-6, rtol=0)
    # A UTF-8 byte-order mark (Excel) is not part of the first column's name; a CSV text over 128 KiB is truncated
    long = "warming " * 20_000
    (tmp_path / "in.csv").write_bytes(b"\xef\xbb\xbfid,text\nA,hello\nB," + long.encode() + b"\n")
    manifest = _embed(model, tmp_path / "in.csv", tmp_path / "csv")
    assert read_embeddings(tmp_path / "csv")[0] == ["A", "B"] and manifest["totals"]["truncated"] == 1
    # An integer too long for Python or a line nested too deep is a bad row, not the job's end
    lines = ['{"text": "fine"}', '{"text": "x", "n": ' + "9" * 5000 + "}", '{"text": ' + "[" * 100_000 + "]" * 100_000]
    (tmp_path / "odd.jsonl").write_text("\n".join(lines) + "\n")
    manifest = _embed(model, tmp_path / "odd.jsonl", tmp_path / "odd", on_error="skip")
    assert manifest["totals"]["rows"] == 1 and manifest["totals"]["skipped"] == 2


def test_an_instruction_that_leaves_the_text_no_token_is_refused(model, tmp_path):
    """Only </s> would be pooled: every row the same vector (the authors' encode does that silently)."""
    path = _jsonl(tmp_path / "in.jsonl", _rows()[:4])
    long = "Represent " + " ".join(f"w{i}" for i in range(600)) + ":"
    with pytest.raises(CorpusError, match="the instruction takes all 512 tokens"):
        embed_corpus(model, path, tmp_path / "out", instruction=long, quiet=True)
    rows = [{**row, "instruction": long if i == 1 else INSTRUCTION} for i, row in enumerate(_rows()[:4])]
    manifest = embed_corpus(
        model, _jsonl(path, rows), tmp_path / "rows", instruction_field="instruction", on_error="skip", quiet=True
    )
    (skipped,) = manifest["shards"][0]["skipped_rows"]
    assert skipped["row"] == 2 and "its instruction takes all 512 tokens" in skipped["reason"]
    with pytest.warns(UserWarning, match="takes all 511 tokens of max_seq_length"):
        model.encode([[long, "a text"]])


def test_an_output_folder_within_the_input_is_refused(model, tmp_path):
    corpus_folder = tmp_path / "corpus"
    corpus_folder.mkdir()
    _jsonl(corpus_folder / "in.jsonl", _rows())
    with pytest.raises(CorpusError, match="lies within the input .*choose an output folder outside"):
        _embed(model, corpus_folder, corpus_folder / "embeddings")
    assert not (corpus_folder / "embeddings").exists()
    # A split job: part 1's glob must not read part 0's shards, written in the same output folder
    pattern, out = str(tmp_path / "**" / "*.jsonl"), tmp_path / "split"
    _embed(model, pattern, out, num_shards=2, shard_index=0, output_format="npy")  # writes part-*.ids.jsonl there
    with pytest.raises(CorpusError, match="lies within the input"):
        _embed(model, pattern, out, num_shards=2, shard_index=1, output_format="npy")


def test_compressed_files_pipes_and_a_job_that_embedded_nothing_are_named(tiny_model, tmp_path):
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(b"\x1f\x8b")

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "fastinstructor", "embed", "--model", str(tiny_model), *args],
            capture_output=True,
            text=True,
        )

    result = run("--input", str(gz), "--output", str(tmp_path / "a"))
    assert result.returncode == 2 and "is compressed" in result.stderr and "--input -" in result.stderr
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = run("--input", str(fifo), "--input-format", "jsonl", "--output", str(tmp_path / "b"))
    assert result.returncode == 2 and "not a regular file" in result.stderr
    wrong_field = _jsonl(tmp_path / "in.jsonl", [{"body": t} for t in TEXTS[:3]])
    result = run("--input", str(wrong_field), "--output", str(tmp_path / "c"), "--on-error", "skip")
    assert result.returncode == 1 and "every one of the 3 rows was skipped" in result.stderr
    assert "no field 'text'" in result.stderr
    result = run("--input", str(wrong_field), "--output", str(tmp_path / "d"), "--address", "auto")
    assert result.returncode == 2 and "add --engine ray" in result.stderr
