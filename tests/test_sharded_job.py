"""Issue 19 without Ray: folder, glob and several-path inputs, a job split over a job array (--num-shards,
--shard-index) whose parts read back as one run, and one --threads setting for every backend and command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import interrupt_at_shard

import fastinstructor
import fastinstructor.shards
from fastinstructor import CorpusError, embed_corpus, hardware, read_embeddings
from fastinstructor.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
INSTRUCTION = "Represent the document for retrieval:"
TEXTS = [f"Report {i}: sea ice extent fell by {i % 7} percent in the {1900 + 3 * i}s." for i in range(23)]
SPLIT = [(TEXTS[:5], "a.jsonl"), (TEXTS[5:12], "b.jsonl"), (TEXTS[12:], "sub/c.jsonl")]  # sorted by path


@pytest.fixture(scope="module")
def model(tiny_model):
    return fastinstructor.load(tiny_model)


def _lines(texts, **extra):
    return "".join(json.dumps({"text": t, **extra}) + "\n" for t in texts)


@pytest.fixture
def corpus(tmp_path):
    """``TEXTS`` in three JSON Lines files (one in a subfolder, no ids: rows are numbered), the files a folder's
    scan leaves out, and the concatenated file."""
    folder = tmp_path / "corpus"
    for texts, name in SPLIT:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(_lines(texts))
    (folder / "_SUCCESS").write_text("")
    (folder / ".partial.jsonl").write_text("not JSON\n")
    (folder / "notes.md").write_text("not an input\n")
    (tmp_path / "all.jsonl").write_text(_lines(TEXTS))
    return folder


def _embed(model, input, out, **options):
    return embed_corpus(model, input, out, instruction=INSTRUCTION, shard_rows=4, quiet=True, **options)


def _assert_same(result, expected):
    (ids, embeddings), (expected_ids, expected_embeddings) = result, expected
    assert ids == expected_ids
    assert embeddings.dtype == expected_embeddings.dtype and np.array_equal(embeddings, expected_embeddings)


@pytest.fixture
def single(model, corpus, tmp_path):
    """read_embeddings of one run on the concatenated file: what every other way must give."""
    _embed(model, tmp_path / "all.jsonl", tmp_path / "single")
    return read_embeddings(tmp_path / "single")


# Inputs: a folder, a glob, several paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["folder", "glob", "paths"])
def test_a_folder_a_glob_or_several_paths_read_as_their_concatenation(model, corpus, single, tmp_path, form):
    given = {
        "folder": corpus,
        "glob": str(corpus / "**" / "*.jsonl"),
        "paths": [corpus / "a.jsonl", str(corpus / "b.jsonl"), corpus / "sub"],
    }[form]
    manifest = _embed(model, given, tmp_path / "out")
    _assert_same(read_embeddings(tmp_path / "out"), single)
    assert single[0][:6] == ["1", "2", "3", "4", "5", "6"]  # rows numbered across the files
    files = [str((corpus / name).resolve()) for _, name in SPLIT]
    assert manifest["identity"]["input"] == files and len(manifest["input_stat"]) == 3
    assert _embed(model, given, tmp_path / "out")["complete"]  # the same input again: nothing to do


def test_a_bad_row_is_named_by_its_file_and_its_row_there(model, corpus, tmp_path):
    (corpus / "b.jsonl").write_text(_lines(TEXTS[5:6]) + "{broken\n" + _lines(TEXTS[7:12]))
    with pytest.raises(CorpusError, match=r"b.jsonl:2: malformed JSON .*--on-error skip.*1 finished shard"):
        _embed(model, corpus, tmp_path / "out")
    manifest = _embed(model, corpus, tmp_path / "skipped", on_error="skip")
    (skip,) = manifest["shards"][1]["skipped_rows"]
    assert skip["row"] == 7 and skip["at"].endswith("b.jsonl:2")


@pytest.mark.parametrize(
    "given, message",
    [
        ("empty", r"input folder .*empty holds no JSON Lines, CSV, TSV, Parquet or text file"),
        ("corpus/*.csv", r"input pattern .*corpus/\*.csv matches no file"),
        ("mixed", r"the input files mix formats: jsonl \(.*a.jsonl\), text \(.*z.txt\).*--input-format"),
        ("twice", r"input file .*a.jsonl is named twice"),
        ("missing.jsonl", r"input file .*missing.jsonl does not exist"),
    ],
)
def test_inputs_that_name_no_usable_file_are_one_line_errors(tiny_model, corpus, tmp_path, capsys, given, message):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.md").write_text("not an input\n")
    (corpus / "z.txt").write_text("a text\n")
    inputs = {
        "empty": [str(tmp_path / "empty")],
        "mixed": [str(corpus)],
        "twice": [str(corpus / "a.jsonl"), str(corpus)],
    }.get(given, [str(tmp_path / given)])
    code = main(["embed", "--model", str(tiny_model), "--input", *inputs, "--output", str(tmp_path / "out")])
    assert code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# A split job --------------------------------------------------------------------------------------------------------


def _embed_cli(tiny_model, corpus, out, *options):
    return [sys.executable, "-m", "fastinstructor", "embed", "--model", str(tiny_model), "--instruction", INSTRUCTION,
            "--input", str(corpus), "--output", str(out), "--shard-rows", "4", "--quiet", *options]  # fmt: skip


def test_two_concurrent_processes_give_exactly_the_single_run_result(tiny_model, corpus, single, tmp_path):
    out = tmp_path / "split"
    runs = [
        subprocess.Popen(
            _embed_cli(tiny_model, corpus, out, "--num-shards", "2", "--shard-index", str(k), "--threads", "1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in (0, 1)
    ]
    for k, run in enumerate(runs):
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
        assert f"in {out / f'part-{k}-of-2'};" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["part-0-of-2", "part-1-of-2"]
    _assert_same(read_embeddings(out), single)
    manifests = [json.loads((out / f"part-{k}-of-2" / "manifest.json").read_text()) for k in (0, 1)]
    assert [[s["block"] for s in m["shards"]] for m in manifests] == [[0, 2, 4], [1, 3, 5]]
    whole = json.loads((tmp_path / "single" / "manifest.json").read_text())
    assert sum(m["totals"]["rows"] for m in manifests) == whole["totals"]["rows"] == len(TEXTS)
    assert manifests[0]["input_read"] == manifests[1]["input_read"] == whole["input_read"]


def test_an_interrupted_part_resumes_to_the_uninterrupted_part(model, corpus, single, tmp_path, monkeypatch):
    for k in (0, 1):
        _embed(model, corpus, tmp_path / "whole", num_shards=2, shard_index=k)
    _embed(model, corpus, tmp_path / "resumed", num_shards=2, shard_index=0)
    with monkeypatch.context() as patch:
        interrupt_at_shard(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            _embed(model, corpus, tmp_path / "resumed", num_shards=2, shard_index=1)
    with pytest.raises(CorpusError, match=r"not every part is done \(part\(s\) unfinished: 1\).*--shard-index K"):
        read_embeddings(tmp_path / "resumed")
    _embed(model, corpus, tmp_path / "resumed", num_shards=2, shard_index=1)
    for name in (p.name for p in (tmp_path / "whole" / "part-1-of-2").glob("part-*")):
        part = Path("part-1-of-2", name)
        assert (tmp_path / "resumed" / part).read_bytes() == (tmp_path / "whole" / part).read_bytes(), name
    _assert_same(read_embeddings(tmp_path / "resumed"), single)


def test_a_part_does_not_resume_over_another_parts_changed_rows(model, corpus, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at_shard(patch, 1)  # part 1 finished block 1 (rows 5-8), having read and hashed block 0 (rows 1-4)
        with pytest.raises(KeyboardInterrupt):
            _embed(model, corpus, tmp_path / "out", num_shards=2, shard_index=1)
    (corpus / "a.jsonl").write_text(_lines(["An edited first row."] + TEXTS[1:5]))  # in part 0's block
    with pytest.raises(
        CorpusError,
        match=r"changed since .*first 8 rows \(through shard 0, which starts at .*a.jsonl:5\) are not the ones",
    ):
        _embed(model, corpus, tmp_path / "out", num_shards=2, shard_index=1)


def test_read_embeddings_names_the_missing_parts_and_how_to_finish_them(model, corpus, tmp_path):
    _embed(model, corpus, tmp_path / "out", num_shards=3, shard_index=1)
    with pytest.raises(
        CorpusError, match=r"split 3 ways .*\(part\(s\) missing: 0, 2\).*--num-shards 3 --shard-index K"
    ):
        read_embeddings(tmp_path / "out")


def test_duplicate_ids_are_counted_across_parts_as_in_one_run(model, tmp_path):
    rows = [{"id": f"doc-{i % 9}", "text": t} for i, t in enumerate(TEXTS)]  # repeats in later blocks
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole = _embed(model, path, tmp_path / "single")
    parts = [_embed(model, path, tmp_path / "split", num_shards=2, shard_index=k) for k in (0, 1)]
    assert sum(p["totals"]["duplicate_ids"] for p in parts) == whole["totals"]["duplicate_ids"] == len(TEXTS) - 9
    with pytest.raises(CorpusError, match=r"in.jsonl:10: id 'doc-0' was already used"):  # row 10 is in block 2
        _embed(model, path, tmp_path / "strict", num_shards=2, shard_index=0, on_duplicate_id="error")


@pytest.mark.parametrize(
    "options, message",
    [
        (["--shard-index", "1"], "--shard-index needs --num-shards"),
        (["--num-shards", "2"], "--num-shards needs --shard-index"),
        (["--num-shards", "2", "--shard-index", "2"], r"--shard-index 2 --num-shards 2: need N >= 1 and 0 <= K < N"),
        (["--num-shards", "3", "--shard-index", "0"], r"holds parts of the job split 2 ways .*--num-shards 2"),
        ([], "holds the parts of a split job .*give --num-shards"),
        (["--overwrite"], "holds the parts of a split job"),
        (["--num-shards", "2", "--shard-index", "0", "--dtype", "int8"], "--dtype int8 cannot be split"),
    ],
)
def test_bad_splits_are_refused_and_lose_nothing(model, tiny_model, corpus, single, tmp_path, capsys, options, message):
    for k in (0, 1):
        _embed(model, corpus, tmp_path / "out", num_shards=2, shard_index=k)
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    command = ["embed", "--model", str(tiny_model), "--input", str(corpus), "--output", str(tmp_path / "out")]
    assert main([*command, "--shard-rows", "4", *options]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    _assert_same(read_embeddings(tmp_path / "out"), single)


def test_num_shards_must_be_at_least_one(tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["embed", "--model", str(tiny_model), "--input", "x", "--output", "y", "--num-shards", "0"])
    assert exit.value.code == 2 and "--num-shards: expected a whole number of at least 1" in capsys.readouterr().err


def test_a_job_that_was_not_split_keeps_its_layout(model, corpus, tmp_path):
    _embed(model, corpus, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [
        "manifest.json",
        *(f"part-{i:05d}.parquet" for i in range(6)),
    ]
    with pytest.raises(CorpusError, match="holds a job that was not split"):
        _embed(model, corpus, tmp_path / "out", num_shards=2, shard_index=0)


def test_a_job_split_one_way_reads_back(model, corpus, single, tmp_path):
    """--num-shards 1 (what embed --engine ray runs on a cluster with room for one actor) is a split job of one part."""
    _embed(model, corpus, tmp_path / "one", num_shards=1, shard_index=0)
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["part-0-of-1"]
    _assert_same(read_embeddings(tmp_path / "one"), single)


# Threads -------------------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_threads(monkeypatch):
    """Undo set_threads: PyTorch's threads, the recorded count and RAYON_NUM_THREADS."""
    threads, rayon = torch.get_num_threads(), os.environ.pop("RAYON_NUM_THREADS", None)
    monkeypatch.setattr(hardware, "_threads", None)
    yield
    torch.set_num_threads(threads)
    os.environ.pop("RAYON_NUM_THREADS", None)
    if rayon is not None:
        os.environ["RAYON_NUM_THREADS"] = rayon


def test_load_threads_reach_torch_onnx_and_the_tokenizer(tiny_model, restore_threads):
    pytest.importorskip("onnxruntime")
    model = fastinstructor.load(tiny_model, backend="onnx", precision="float32", threads=1)
    assert torch.get_num_threads() == 1 and hardware.threads() == 1 and os.environ["RAYON_NUM_THREADS"] == "1"
    assert model.backend.session.get_session_options().intra_op_num_threads == 1
    again = fastinstructor.load(tiny_model, backend="onnx", precision="float32", threads=2)
    assert torch.get_num_threads() == 2 and again.backend.session.get_session_options().intra_op_num_threads == 2
    with pytest.raises(ValueError, match="threads must be a whole number of at least 1, got 0"):
        fastinstructor.load(tiny_model, threads=0)


def test_threads_on_every_command(tiny_model, corpus, tmp_path, restore_threads):
    assert main(["embed", "--model", str(tiny_model), "--input", str(corpus), "--output", str(tmp_path / "o"),
                 "--quiet", "--threads", "1"]) == 0  # fmt: skip
    assert torch.get_num_threads() == 1
    parser = build_parser()
    for command in (["check", "--model", "m"], ["bench", "--model", "m"], ["serve"]):
        assert parser.parse_args([*command, "--threads", "3"]).threads == 3
    from fastinstructor.server.settings import resolve

    assert resolve({}, {"FASTINSTRUCTOR_MODEL": "m", "FASTINSTRUCTOR_THREADS": "3"})["threads"] == 3
    with pytest.raises(ValueError, match="FASTINSTRUCTOR_THREADS='0' is not a valid value for --threads"):
        resolve({}, {"FASTINSTRUCTOR_MODEL": "m", "FASTINSTRUCTOR_THREADS": "0"})


# The README ----------------------------------------------------------------------------------------------------------


def test_readme_job_array_snippet(model, real_texts, tmp_path, monkeypatch):
    """The README's "More than one machine" job script, each array task run at once as SLURM would, then its
    Python read: the single run's result."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## More than one machine", 1)[1]
    script, read = re.search(r"```bash\n(.*?)```\s*```python\n(.*?)```", section.split("\n## ", 1)[0], re.S).groups()
    tasks = range(int(re.search(r"--array=0-(\d+)", script)[1]) + 1)
    assert "--shard-rows 10000" in script
    script = script.replace("hkunlp/instructor-large", str(model.checkpoint.path)).replace("10000", "8")
    (tmp_path / "corpus").mkdir()
    for i in range(0, len(real_texts), 16):
        (tmp_path / "corpus" / f"{i:03d}.jsonl").write_text(_lines(real_texts[i : i + 16]))
    environ = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    runs = [
        subprocess.Popen(
            ["bash", "-c", script],
            cwd=tmp_path,
            env={**environ, "SLURM_ARRAY_TASK_ID": str(k), "SLURM_CPUS_PER_TASK": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in tasks
    ]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(read, "README:read", "exec"), scope)
    (tmp_path / "all.jsonl").write_text(_lines(real_texts))
    instruction = re.search(r'--instruction "([^"]+)"', script)[1]
    embed_corpus(model, tmp_path / "all.jsonl", tmp_path / "single", instruction=instruction, shard_rows=8, quiet=True)
    _assert_same((scope["ids"], scope["embeddings"]), read_embeddings(tmp_path / "single"))
