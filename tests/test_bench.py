"""``fastinstructor bench``: the FLOP count, the workloads, and one end-to-end run on the tiny preset."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import fastinstructor
from fastinstructor.benchmark import (
    encoder_flops,
    environment,
    load_workload,
    plan_contenders,
    record,
    result_stem,
    write_results,
)
from fastinstructor.calibration import calibration_sha256
from fastinstructor.checkpoint import EncoderConfig
from fastinstructor.cli import main
from fastinstructor.dispatch import Candidate, unavailable_reason
from fastinstructor.hardware import CPU_FLAGS, cpu_model, probe
from fastinstructor.testmodel import PRESETS

REPO = Path(__file__).resolve().parent.parent


def _bench_script(name: str, *args) -> subprocess.CompletedProcess:
    """``python bench/<name> <args>`` (each argument as ``str``), its output captured."""
    argv = [sys.executable, str(REPO / "bench" / name), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def _config(preset: str) -> EncoderConfig:
    p = PRESETS[preset]
    return EncoderConfig(
        vocab_size=p.vocab_rows,
        d_model=p.d_model,
        d_kv=p.d_kv,
        d_ff=p.d_ff,
        num_layers=p.num_layers,
        num_heads=p.num_heads,
    )


@pytest.mark.parametrize(
    "preset, length, expected",
    [
        # tiny, n = 10: per layer 8*10*64*64 + 4*10*64*128 + 4*10^2*64 = 327,680 + 327,680 + 25,600 = 680,960;
        # x 2 layers = 1,361,920; + Dense 2*64*48 = 6,144.
        ("tiny", 10, 1_368_064),
        # base, n = 100: 8*100*768^2 + 4*100*768*3072 + 4*100^2*768 = 471,859,200 + 943,718,400 + 30,720,000
        # = 1,446,297,600; x 12 layers = 17,355,571,200; + Dense 2*768*768 = 1,179,648.
        ("base", 100, 17_356_750_848),
        # large, n = 100: 838,860,800 + 1,677,721,600 + 40,960,000 = 2,557,542,400; x 24 = 61,381,017,600;
        # + Dense 2*1024*768 = 1,572,864.
        ("large", 100, 61_382_590_464),
        # xl, n = 10: inner = 32*128 = 4096, not d_model: 8*10*1024*4096 + 4*10*1024*16384 + 4*10^2*4096
        # = 335,544,320 + 671,088,640 + 1,638,400 = 1,008,271,360; x 24 = 24,198,512,640; + 1,572,864.
        ("xl", 10, 24_200_085_504),
    ],
)
def test_flop_count_matches_a_hand_computation(preset, length, expected):
    assert encoder_flops(_config(preset), [length], PRESETS[preset].dense_out) == expected


def test_attention_flops_grow_with_each_sequence_not_the_batch():
    base = _config("base")
    assert encoder_flops(base, [10, 100], 768) == encoder_flops(base, [10], 768) + encoder_flops(base, [100], 768)
    assert encoder_flops(base, [100], None) == encoder_flops(base, [100], 768) - 2 * 768 * 768


@pytest.mark.parametrize("shared_data", [True, False], ids=["shared-data", "own-docs"])
def test_synthetic_workload_has_exactly_l_tokens(tiny_model, shared_data, monkeypatch, tmp_path):
    if not shared_data:  # the words then come from the package's own docs, a much shorter source
        monkeypatch.setenv("FASTINSTRUCTOR_DATA", str(tmp_path))
    model = fastinstructor.load(tiny_model)
    work = load_workload("synthetic:37", 20, model.tokenizer)
    assert work.name == "synthetic-37" and len(work.pairs) == 20
    assert {len(ids) for ids in model.tokenizer(work.pairs).ids} == {37}
    long = load_workload("synthetic:500", 2, model.tokenizer)
    assert {len(ids) for ids in model.tokenizer(long.pairs).ids} == {500}
    assert len({text for _, text in work.pairs}) > 1  # not one text repeated


@pytest.mark.parametrize(
    "spec, message",
    [
        ("synthetic:abc", "expected synthetic:L"),
        ("synthetic:3", "L must be between"),
        ("synthetic:100000", "max_seq_length"),
        ("no-such-workload", "neither one of claims, evidence, articles, mixed, synthetic:L nor a file"),
    ],
)
def test_bad_workloads_say_what_is_accepted(tiny_model, spec, message):
    model = fastinstructor.load(tiny_model)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_workload(spec, 4, model.tokenizer)


def test_shared_data_workloads_need_the_data(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTINSTRUCTOR_DATA", str(tmp_path))  # an empty folder
    model = fastinstructor.load(tiny_model)
    with pytest.raises(FileNotFoundError, match="set FASTINSTRUCTOR_DATA"):
        load_workload("claims", 4, model.tokenizer)


def test_contenders_skip_what_this_machine_cannot_run():
    chosen, skipped = plan_contenders(["reference", "cpu", "onnx", "triton"], None, "cpu")
    assert chosen[0] == ("reference", "float32")
    assert ("cpu", "float32") in chosen and ("onnx", "int8") in chosen
    assert ("onnx", "float16") not in chosen  # float16 graphs are for CUDA
    # What the dispatcher would refuse here is skipped with its reason: cpu bfloat16 without native bfloat16.
    why = {p: unavailable_reason(Candidate("cpu", p, "cpu"), probe()) for p in ("bfloat16", "int8")}
    for precision, reason in why.items():
        assert (("cpu", precision) in chosen) == (reason is None)
        if reason is not None:
            assert {"backend": "cpu", "precision": precision, "reason": reason} in skipped
    if not fastinstructor.backends.TritonBackend.availability()[0]:
        assert any(s["backend"] == "triton" and s["reason"] for s in skipped)
    chosen, skipped = plan_contenders(["cpu"], ["int8", "float16"], "cpu")
    assert chosen == [("reference", "float32")] + ([("cpu", "int8")] if why["int8"] is None else [])
    float16 = {"backend": "cpu", "precision": "float16", "reason": "supports float32, bfloat16, int8 on this device"}
    int8 = [] if why["int8"] is None else [{"backend": "cpu", "precision": "int8", "reason": why["int8"]}]
    assert sorted(skipped, key=str) == sorted([float16, *int8], key=str)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        plan_contenders(["gpu"], None, "cpu")


def test_contenders_take_precision_aliases():
    chosen, skipped = plan_contenders(["cpu", "cpu"], ["fp32", "float32"], "cpu")
    assert chosen == [("reference", "float32"), ("cpu", "float32")] and skipped == []
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        plan_contenders(["cpu"], ["int4"], "cpu")


def test_environment_is_the_shared_hardware_probe():
    env, hardware = environment(), probe()
    assert env["cpu_model"] == cpu_model()
    assert env["cpu_flags"] == {flag: flag in hardware.cpu_flags for flag in CPU_FLAGS}
    assert env["gpu"] == hardware.cuda_device and env["onnx_providers"] == list(hardware.onnx_providers)
    assert env["torch"] == hardware.packages["torch"] and env["torch_threads"] >= 1


def test_one_result_file_layout(tmp_path):
    """``fastinstructor bench`` writes <out>/<date>-<host>/<name>.*, the scripts <out>/<name>-<date>-<host>.*."""
    run = result_stem(tmp_path, "x", folder=True).parent.name  # <date>-<host>
    assert result_stem(tmp_path, "claims", folder=True) == tmp_path / run / "claims"
    assert result_stem(tmp_path, "embed") == tmp_path / f"embed-{run}"
    result = record("python bench/x.py --fast", rows=[1, 2])
    assert list(result) == ["command", "date", "rows", "environment", "source"]
    paths = write_results(tmp_path / "my.data", result, "A title", "Body.\n")  # a dot in the name is kept
    assert [p.name for p in paths] == ["my.data.json", "my.data.md"]
    assert json.loads(paths[0].read_text())["rows"] == [1, 2]
    md = paths[1].read_text()
    assert md == f"# A title, {run}\n\nBody.\n\nReproduce:\n\n```\npython bench/x.py --fast\n```\n"


def test_a_bench_script_writes_the_shared_layout(tiny_model, tmp_path):
    """bench/bench_long_text.py (tokenizer only: quick) through the report module's writer."""
    done = _bench_script("bench_long_text.py", "--model", tiny_model, "--sizes", 3000, "--repeat", 1, "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = tmp_path.glob("long-text-*.json")
    result = json.loads(json_path.read_text())
    assert set(result) >= {"command", "date", "environment", "source", "rows"}
    assert result["command"].startswith(".venv/bin/python bench/bench_long_text.py --model")
    assert result["rows"][0]["chars"] == 3000 and result["rows"][0]["same_ids"]
    md = json_path.with_suffix(".md").read_text()
    assert md.startswith("# One long text through the tokenizer, ") and "\nMachine: " in md
    assert md.endswith(f"```\n{result['command']}\n```\n")


def test_bench_end_to_end_on_tiny(tiny_model, tmp_path, capsys):
    """One repeat of the whole harness: valid JSON, the table on stdout, the PNG; padding excluded from tokens/s."""
    texts = ["Ice.", "Sea level rise threatens coastal cities " * 6, "Warming", "Glaciers retreat in the Alps " * 12]
    workload = tmp_path / "mix.jsonl"
    workload.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 3))
    argv = ["bench", "--model", str(tiny_model), "--backends", "reference,cpu", "--precisions", "fp32"]
    argv += [
        "--workload",
        str(workload),
        "--texts",
        "12",
        "--repeat",
        "1",
        "--batch-size",
        "4",
        "--batch-tokens",
        "128,512",
    ]
    argv += ["--latency-batch-sizes", "1,2", "--latency-batches", "2", "--ceiling-size", "128", "--out", str(tmp_path)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "| contender | load s |" in stdout and "| cpu float32 |" in stdout and "batch 2: p50 / p99 ms" in stdout
    assert "Real tokens/s by token budget" in stdout

    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    result = json.loads((folder / "mix.json").read_text())
    md = (folder / "mix.md").read_text()
    assert md.count("| reference |") == 3  # throughput, by budget, latency
    assert md.startswith(f"# fastinstructor bench, {folder.name}\n") and f"```\n{result['command']}\n```" in md
    assert result["command"].startswith("fastinstructor bench --model")
    names = [r["name"] for r in result["rows"]]
    assert names[:2] == ["reference", "cpu float32"]
    assert names[2:] == ["sentence-transformers"]

    model = fastinstructor.load(tiny_model)
    lengths = [len(ids) for ids in model.tokenizer([[r[0], r[1]] for r in _pairs(result, texts)]).ids]
    work = result["workload"]
    assert work["real_tokens"] == sum(lengths)
    assert work["padded_tokens"]["128"] > work["real_tokens"]  # these batches do pad ...
    assert work["padded_tokens"]["512"] > work["padded_tokens"]["128"]  # (4 rows of up to 128 tokens)
    for row in result["rows"]:
        figures = row["throughput"]["128"]
        assert row["median_s"] == statistics.median(figures["times_s"])
        # ... and tokens/s counts the real tokens only.
        assert row["tokens_per_s"] == pytest.approx(work["real_tokens"] / row["median_s"])
        assert row["achieved_gflops"] == pytest.approx(result["flops_per_pass"] / row["median_s"] / 1e9)
        assert row["roofline_fraction"] == pytest.approx(
            row["achieved_gflops"] / result["ceilings"]["cpu"]["float32"]["gflops"]
        )
        assert len(row["latency"]["2"]["times_s"]) == 2 and row["latency"]["1"]["p50_ms"] > 0
        assert row["parity"] == ("baseline" if row["name"] == "reference" else "PASS")
        if row["name"] != "reference":  # parity.measure on the calibration set, sentence-transformers included
            assert row["parity_result"]["calibration_sha256"] == calibration_sha256()
            assert row["parity_result"]["passed"] and row["min_cos"] == row["parity_result"]["min_cos"]
    assert result["ceilings"]["cpu"]["float32"]["gflops"] > 0
    assert result["environment"]["cpu_model"] and result["environment"]["torch"]
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (pip install '.[bench]')")
    assert (folder / "mix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _pairs(result: dict, texts: list[str]) -> list[list[str]]:
    (instruction,) = result["workload"]["instructions"]
    return [[instruction, t] for t in texts * 3]


def test_bench_refuses_bad_options_with_exit_2(tiny_model, tmp_path, capsys):
    assert main(["bench", "--model", str(tiny_model), "--workload", "nope", "--out", str(tmp_path)]) == 2
    assert "neither one of claims" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_model), "--repeat", "0", "--out", str(tmp_path)]) == 2
    assert "--repeat" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_model), "--precisions", "fp16,int4", "--out", str(tmp_path)]) == 2
    assert "unknown precision 'int4'" in capsys.readouterr().err


def test_the_cpu_profile_script_splits_the_time_of_encode(tiny_model, tmp_path):
    """bench/profile_cpu.py on tiny, a cpu and an onnx contender: every group is there, the products take time
    and have a speed (in encode, and alone for cpu) against a ceiling, and the ops' time fits in the profiled
    call's (none of the warm-up's ops, which once made the onnx ops of a fresh profiling session four times a 3 ms
    call)."""
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"sentence number {i} " * (1 + i % 5)}) + "\n" for i in range(12)))
    done = _bench_script(
        "profile_cpu.py", "--model", tiny_model, "--workloads", texts, "--texts", 12,
        "--contenders", "cpu:int8,onnx:int8", "--out", tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = tmp_path.glob("profile-cpu-*.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert [r["contender"] for r in rows] == ["cpu int8", "onnx int8"]
    for row in rows:
        assert row["matrix products_s"] > 0 and row["attention_s"] > 0
        ops = sum(row[f"{g}_s"] for g in GROUPS[:4])
        assert 0 < ops <= row["profiled_s"], row
        for group in GROUPS:
            assert row[f"{group}_share"] * row["profiled_s"] == pytest.approx(row[f"{group}_s"]), group
        assert row["ceiling_gflops"] > 0 and row["products_gflops"] > 0
    # The products alone are timed for the cpu backend only (its projections are callables to time).
    assert rows[0]["products_alone_gflops"] > 0 and rows[1]["products_alone_gflops"] is None
    markdown = json_path.with_suffix(".md").read_text()
    assert "| texts | cpu int8 |" in markdown and "| products in encode | products alone |" in markdown


def test_the_int8_products_script_compares_the_kernels_to_the_bit(tiny_model, tmp_path):
    """bench/bench_int8_products.py on tiny: every way gives the same output, each has a time, and the way the
    backend takes follows this CPU (FBGEMM below FEW_TOKENS only without VNNI, an s8 input only with AMX)."""
    from fastinstructor.backends.cpu import Int8Linear, _fbgemm_available
    from fastinstructor.hardware import VNNI, cpu_flags

    if not Int8Linear.available() or not _fbgemm_available():
        pytest.skip("this torch has no oneDNN or no FBGEMM int8 linear: nothing to compare")
    done = _bench_script("bench_int8_products.py", "--model", tiny_model, "--tokens", "3,200", "--repeat", 1,
                         "--out", tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = tmp_path.glob("int8-products-*.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [3, 200] and all(r["same"] for r in rows)
    assert all(ms > 0 for r in rows for ms in r["ms"].values())
    flags = cpu_flags()
    with_vnni = ["oneDNN s8" if "amx_int8" in flags else "oneDNN u8"] * 2
    assert [r["backend"] for r in rows] == (with_vnni if VNNI & flags else ["FBGEMM", "oneDNN u8"])


def test_the_callers_script_times_each_way_of_calling_in_each_checkout(tiny_model, tmp_path):
    """bench/bench_callers.py on tiny: every way it was asked for, this checkout and one given as ``--before``
    (here the same code, so that both rows exist), a figure each."""
    from fastinstructor.data import shared_data_dir

    if shared_data_dir() is None:
        pytest.skip("bench_callers.py embeds the shared climate claims: ../shared/data (FASTINSTRUCTOR_DATA) is absent")
    ways = "loading thread,pool at once"
    done = _bench_script("bench_callers.py", "--model", tiny_model, "--contenders", "cpu:float32", "--calls", 4,
                         "--threads", 2, "--ways", ways, "--rounds", 1, "--before", REPO,
                         "--out", tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = tmp_path.glob("callers-*.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert [r["way"] for r in rows] == ways.split(",")  # one package: --before is this checkout
    assert all(r["p50_ms"] > 0 and r["calls_per_s"] > 0 for r in rows)
    bad = _bench_script("bench_callers.py", "--ways", "sideways", "--out", tmp_path)
    assert bad.returncode == 2 and "unknown --ways sideways" in bad.stderr


def test_the_fresh_shapes_script_times_filled_and_unfilled_forwards(tiny_model, tmp_path):
    """bench/bench_fresh_shapes.py on tiny: both modes, both scenarios, each in its own process."""
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"sentence number {i} " * (1 + i % 5)}) + "\n" for i in range(16)))
    common = ("--model", tiny_model, "--workload", texts, "--precisions", "float32", "--repeat", 1, "--out", tmp_path)
    done = _bench_script("bench_fresh_shapes.py", *common, "--chunk", 4, "--chunks", 2, "--singles", 4)
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = tmp_path.glob("fresh-shapes-*.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert [(r["precision"], r["forwards"]) for r in rows] == [("float32", "filled"), ("float32", "unfilled")]
    for row in rows:
        assert all(row[key] > 0 for key in ("corpus_once_s", "corpus_again_s", "singles_s", "single_p50_ms"))
        assert row["single_p50_ms"] <= row["single_p90_ms"]
    too_few = _bench_script("bench_fresh_shapes.py", *common)
    assert too_few.returncode != 0 and "has 16 texts" in too_few.stderr


def test_the_commit_comparison_times_two_checkouts_in_turn(tiny_model, tmp_path):
    """bench/compare_commits.py on tiny: HEAD in a worktree of its own (its native library built there where a
    compiler exists) against this checkout, each process importing its own commit's package; a revision that is not
    a commit is named."""
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"sentence number {i} " * (1 + i % 5)}) + "\n" for i in range(8)))
    work = tmp_path / "worktrees"
    common = ("--model", tiny_model, "--precisions", "float32", "--rounds", 1, "--passes", 1, "--work", work)
    try:
        done = _bench_script("compare_commits.py", "HEAD", *common, "--workloads", f"{texts}:8", "--out", tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        (json_path,) = tmp_path.glob("compare-commits-*.json")
        result = json.loads(json_path.read_text())
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert result["before"] == head[:12] and result["after"] == "this checkout"
        (row,) = result["rows"]
        assert row["workload"] == str(texts) and row["before_s"] > 0 and row["after_s"] > 0
        assert row["ratio"] == pytest.approx(row["before_s"] / row["after_s"])
        assert f"round 1/1 {head[:12]} float32" in done.stderr
        wrong = _bench_script("compare_commits.py", "no-such-revision", *common)
        assert wrong.returncode != 0 and "'no-such-revision' is not a commit of this repository" in wrong.stderr
    finally:
        for folder in work.glob("*"):
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", folder], capture_output=True)


GROUPS = ("matrix products", "attention", "row ops", "other ops", "tokenization", "Python and the rest")
