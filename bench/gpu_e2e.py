"""GPU check of the whole pipeline (issue 15), per preset (default base and large), in this order (int8 and float8,
which no target reads, after every preset's other steps):

1. **load and batch-1 latency**: ``fastinstructor.load`` of the triton backend, bfloat16, parity cache off (its
   parity check and anything compiled at load included), timed; then one warm-up call and ``--latency-calls``
   single-pair ``encode`` calls, each a different text of 1 to 150 words (about 10 to 200 tokens), so that shape
   specializations not compiled at load show as stalls: p50, p90, p99, max (target: p99 <= 2x p50).
2. **end to end, tokenization included**: ``encode`` (its default batches) of evidence sentences and climate-fever
   articles, 2:1 (articles cut at 512 tokens), by the triton backend in bfloat16, against sentence-transformers in
   float16 at its best of batch sizes 32, 128, 512 (its INSTRUCTOR mode: ``prompt=`` the instruction,
   ``include_prompt=False``, through ``fastinstructor.benchmark.load_sentence_transformers``, cast to float16 as
   ``model_kwargs={"torch_dtype": torch.float16}`` loads it): tokens/s and the ratio (target >= 4x); triton int8
   and float8 where this build and GPU have them (else a skipped row with the reason). Parity: the first
   ``--parity-texts`` embeddings of each against fastinstructor's ``reference`` backend (transformers' T5,
   float32) on the same device, at the precision's tolerance. Also the triton bfloat16 forward pass alone over
   the packed batches ``encode`` plans, built beforehand in pinned memory (their copies to the device included).
3. **host pipeline alone**: tokenizer + ``Instructor.embed_tokens`` (through ``encode``) into a null backend that
   only receives the packed batches (``bench_host_pipeline.NullBackend``), on this machine's cores, beside step
   2's GPU forward rate (target: host >= 2x GPU).

Tokens are real tokens (instruction, text, ``</s>``), for every contender. Writes ``gpu-e2e-<date>-<host>.{json,md}``
after each step; a failed step is recorded and the others run; the exit status is non-zero when a step failed or a
fastinstructor contender missed its parity tolerance. ``--smoke``: every step on the CPU under ``TRITON_INTERPRET=1``,
``tiny`` preset, a few texts cut short, no warm-up passes (``load`` refuses triton without CUDA, so the backend is
built directly, without the parity check; sentence-transformers in float32): it checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

from harness import DEFAULT_OUT, ROOT, SMOKE_NOTE, command, ensure_model, gpu_device, machine, write_results

QUANTIZED = ("int8", "float8")
GPU_LOAD = (
    "fastinstructor.load(backend='triton', precision='bfloat16', parity_cache=False): its parity check and whatever "
    "the backend compiles or measures at load included; Triton's on-disk kernel cache as earlier steps left it"
)
SMOKE_LOAD = "smoke: the backend built directly (load needs CUDA for triton), no parity check"
# (GPU default, --smoke default) of the options that shrink in a smoke run
DEFAULTS = {
    "presets": ("base,large", "tiny"),
    "texts": (3072, 6),
    "parity_texts": (256, 6),
    "latency_calls": (200, 3),
    "st_batch_sizes": ("32,128,512", "2,4"),
    "repeat": (2, 1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", help="test-model presets (default base,large; smoke: tiny)")
    parser.add_argument("--texts", type=int, help="mixed texts per preset (default 3072; smoke: 6)")
    parser.add_argument("--parity-texts", type=int, help="texts checked against the reference (default 256)")
    parser.add_argument("--latency-calls", type=int, help="batch-1 encode calls (default 200; smoke: 3)")
    parser.add_argument("--st-batch-sizes", help="sentence-transformers batch sizes (default 32,128,512)")
    parser.add_argument("--repeat", type=int, help="timed passes per contender, the median counts (default 2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default bench/results)")
    parser.add_argument("--models", type=Path, default=ROOT / ".models" / "gpu", help="where checkpoints are built")
    parser.add_argument("--smoke", action="store_true", help="the CPU under the Triton interpreter, toy sizes")
    args = parser.parse_args(argv)
    for name, (gpu, smoke) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else gpu)
    return args


_START = time.perf_counter()


def log(message) -> None:
    """Progress on stderr with the seconds since the start: the log of a GPU run says where its time went."""
    print(f"[{time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


class Run:
    """What every step reads: the options, the device, the workload, the result being filled, and ``save``."""

    def __init__(self, args, device: str, pairs: list[list[str]], result: dict) -> None:
        self.args, self.device, self.pairs, self.result = args, device, pairs, result

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def timed(self, fn, warm: bool = True) -> tuple[float, object]:
        """(median seconds of ``repeat`` calls of ``fn``, its last result), after one untimed call (compilation)
        unless ``warm`` is False or this is a smoke run; synchronized on CUDA."""
        if warm and not self.args.smoke:
            fn()
        times, out = [], None
        for _ in range(self.args.repeat):
            self.sync()
            start = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    def save(self):
        return write_results(self.args.out, "gpu-e2e", self.result, title(self.result), markdown(self.result), True)

    def step(self, preset: str, name: str, fn) -> None:
        """``fn()``, its failure recorded (one step failing must not sink the others), then the results saved."""
        log(f"{preset}: {name}")
        try:
            fn()
        except Exception as err:
            log(traceback.format_exc())
            self.result["errors"].append({"preset": preset, "step": name, "error": f"{type(err).__name__}: {err}"})
        if self.device == "cuda":  # what the step loaded is gone: give its memory back before the next
            import torch

            torch.cuda.empty_cache()
        self.save()


def mixed_pairs(count: int, max_chars: int | None = None) -> tuple[list[list[str]], str]:
    """Evidence sentences and articles, 2:1, each under its workload's instruction (``fastinstructor bench``'s
    ``evidence`` and ``articles``); the project's docs under the same two instructions without the shared data."""
    from fastinstructor.benchmark import ARTICLE_INSTRUCTION, EVIDENCE_INSTRUCTION, load_workload
    from fastinstructor.data import sample_passages

    try:
        evidence = load_workload("evidence", count - count // 3, None)
        articles = load_workload("articles", max(1, count // 3), None)
        texts = ([t for _, t in evidence.pairs], [t for _, t in articles.pairs])
        source = f"{evidence.source} and {articles.source}, 2:1"
    except FileNotFoundError:
        passages, source = sample_passages()
        texts = ([t for _, t in passages[0::2]], [t for _, t in passages[1::2]])
        source += ", two streams 2:1"
    pairs = [
        [ARTICLE_INSTRUCTION, texts[1][(i // 3) % len(texts[1])]]
        if i % 3 == 2
        else [EVIDENCE_INSTRUCTION, texts[0][(i - i // 3) % len(texts[0])]]
        for i in range(count)
    ]
    return [[instruction, text[:max_chars]] for instruction, text in pairs], source


def latency_pairs(pairs: list[list[str]], calls: int, most: int = 150) -> list[list[str]]:
    """``calls`` different texts of 1 to ``most`` words (150: about 10 to 200 tokens with the instruction), words
    of ``pairs``: a permutation of the counts, then the same counts at other offsets."""
    from fastinstructor.benchmark import EVIDENCE_INSTRUCTION

    words = " ".join(text for _, text in pairs).split()
    words *= 1 + 400 // max(1, len(words))
    out = []
    for i in range(calls):
        n = 1 + (i * 53) % most
        start = (i * 131) % (len(words) - n)
        out.append([EVIDENCE_INSTRUCTION, " ".join(words[start : start + n])])
    return out


def checkpoint_and_tokenizer(model_dir: Path):
    from fastinstructor.checkpoint import load_checkpoint
    from fastinstructor.tokenization import PairTokenizer, load_tokenizer

    checkpoint = load_checkpoint(model_dir)
    return checkpoint, PairTokenizer(load_tokenizer(checkpoint.path), checkpoint.max_seq_length)


def load_triton(run: Run, model_dir: Path, precision: str, parity_cache: bool = True):
    """``fastinstructor.load`` of the triton backend; in a smoke run (no CUDA, which ``load`` requires for it) the
    same pieces built directly, without the parity check."""
    import fastinstructor

    if not run.args.smoke:
        return fastinstructor.load(
            model_dir, backend="triton", precision=precision, device=run.device, parity_cache=parity_cache
        )
    from fastinstructor.backends import TritonBackend
    from fastinstructor.model import Instructor

    checkpoint, tokenizer = checkpoint_and_tokenizer(model_dir)
    return Instructor(checkpoint, TritonBackend(checkpoint, precision, "cpu"), tokenizer, precision, {})


def latency_step(run: Run, preset: str, model_dir: Path, state: dict) -> None:
    from fastinstructor.benchmark import percentile

    start = time.perf_counter()
    model = load_triton(run, model_dir, "bfloat16", parity_cache=False)
    load_s = time.perf_counter() - start
    state["model"] = model
    parity = (model.backend_report or {}).get("parity") or {}
    pairs = latency_pairs(run.pairs, run.args.latency_calls, 12 if run.args.smoke else 150)
    lengths = [len(ids) for ids in model.tokenizer(pairs).ids]

    def call(pair) -> float:
        start = time.perf_counter()
        model.encode([pair])  # returns a numpy array: the device has finished
        return (time.perf_counter() - start) * 1000

    first_ms = call(pairs[0])
    ms = [call(pair) for pair in pairs]
    note = SMOKE_LOAD if run.args.smoke else GPU_LOAD
    row = {"preset": preset, "load_s": load_s, "load_note": note, "load_parity_min_cos": parity.get("min_cos")}
    row |= {"calls": len(ms), "tokens_min": min(lengths), "tokens_max": max(lengths)}
    row["distinct_lengths"] = len(set(lengths))
    row |= {"first_call_ms": first_ms, **{f"p{q}_ms": percentile(ms, q) for q in (50, 90, 99)}, "max_ms": max(ms)}
    row |= {"p99_over_p50": row["p99_ms"] / row["p50_ms"], "ms": ms}
    row |= graph_latency(model, pairs[0], len(ms)) if run.device == "cuda" else {"graph": "needs CUDA"}
    run.result["latency"].append(row)
    log({k: v for k, v in row.items() if k != "ms"})


def graph_latency(model, pair, calls: int) -> dict:
    """Issue 15 keeps CUDA graphs only if they cut batch-1 p50: one pair's forward (``embed_packed`` on a batch
    already on the GPU), eager against the replay of a CUDA graph captured from it, median of ``calls`` each."""
    import dataclasses
    import statistics

    import torch

    from fastinstructor.batching import pack_batch

    tokenized = model.tokenizer([pair])
    batch = pack_batch(tokenized.ids, tokenized.pool_start)
    on_gpu = dataclasses.replace(
        batch, **{n: getattr(batch, n).cuda() for n in ("input_ids", "cu_seqlens", "pool_start")}
    )

    def timed(fn) -> float:
        times = []
        for _ in range(calls):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    try:
        eager = model.backend.embed_packed
        side = torch.cuda.Stream()  # capture needs warmed-up kernels, on a side stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager(on_gpu)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = eager(on_gpu)
        graph.replay()
        same = float((captured - eager(on_gpu)).abs().max())
        return {"graph": "measured", "forward_eager_ms": timed(lambda: eager(on_gpu)),
                "forward_graph_ms": timed(graph.replay), "graph_max_abs_diff": same}  # fmt: skip
    except Exception as err:  # capture fails on an op that syncs with the host: say which
        return {"graph": f"{type(err).__name__}: {err}"[:300]}


def reference_step(run: Run, preset: str, model_dir: Path, state: dict) -> None:
    """The float32 reference's embeddings of the first ``--parity-texts`` texts: every contender's yardstick."""
    import fastinstructor

    reference = fastinstructor.load(model_dir, backend="reference", precision="float32", device=run.device)
    state["expected"] = reference.encode(run.pairs[: run.args.parity_texts])


def e2e_row(run: Run, preset: str, contender: str, precision: str, seconds: float, out, state: dict, **extra) -> dict:
    from fastinstructor.parity import TOLERANCES, compare

    row = {"preset": preset, "contender": contender, "precision": precision, "seconds": seconds}
    row["tokens_per_s"] = state["tokens"] / seconds
    row["texts_per_s"] = len(run.pairs) / seconds
    expected = state.get("expected")
    if expected is not None:
        report = compare(out[: len(expected)], expected)
        row["problems"] = report.failures(TOLERANCES[precision])
        row |= {"min_cos": report.min_cos, "mean_cos": report.mean_cos, "passed": not row["problems"]}
    row |= extra
    run.result["e2e"].append(row)
    log({k: v for k, v in row.items() if k != "problems"})
    return row


def triton_e2e(run: Run, preset: str, model_dir: Path, precision: str, state: dict) -> dict:
    """``encode`` of the whole workload with its default batches: one untimed pass (compilation), then timed."""
    model = state.get("model") if precision == "bfloat16" else None
    model = model or load_triton(run, model_dir, precision)
    seconds, out = run.timed(lambda: model.encode(run.pairs))
    row = e2e_row(run, preset, f"fastinstructor triton {precision}", precision, seconds, out, state)
    if precision == "bfloat16":
        state["e2e"] = row["tokens_per_s"]
        forward_row(run, preset, model, state)
    state.pop("model", None)  # freed when this returns (Run.step then empties CUDA's cache)
    return row


def forward_row(run: Run, preset: str, model, state: dict) -> None:
    """The backend's forward pass alone over the batches ``encode`` plans, built beforehand (pinned on CUDA)."""
    from fastinstructor.backends.base import batch_inputs, embed_inputs, takes_packed
    from fastinstructor.batching import default_policy

    backend = model.backend
    tokenized = model.tokenizer(run.pairs)
    plan = default_policy(takes_packed(backend)).plan([len(ids) for ids in tokenized.ids])
    batches = [batch_inputs(backend, [tokenized.ids[i] for i in r], [tokenized.pool_start[i] for i in r]) for r in plan]

    def forward():
        for batch in batches:
            embed_inputs(backend, batch)

    seconds, _ = run.timed(forward)
    row = {"preset": preset, "contender": "triton bfloat16 forward only", "batches": len(plan), "seconds": seconds}
    row["tokens_per_s"] = state["forward"] = state["tokens"] / seconds
    run.result["forward"].append(row)
    log(row)


def quantized_step(run: Run, preset: str, model_dir: Path, precision: str, state: dict) -> None:
    """int8 or float8 end to end, or a skipped row with why this build or GPU cannot run it."""
    from fastinstructor.backends import TritonBackend
    from fastinstructor.dispatch import probe

    if precision not in TritonBackend.precisions:
        reason = f"not in this build: the triton backend runs {TritonBackend.runs()}"
    else:
        reason = TritonBackend.unavailable(precision, "cuda", probe())
    if reason:
        skip = {"preset": preset, "contender": f"fastinstructor triton {precision}", "reason": reason}
        run.result["skipped"].append(skip)
        log(skip)
        return
    row = triton_e2e(run, preset, model_dir, precision, state)
    if state.get("e2e"):
        row["ratio_to_bfloat16"] = row["tokens_per_s"] / state["e2e"]


def st_step(run: Run, preset: str, model_dir: Path, state: dict) -> None:
    """sentence-transformers at each batch size (a short warm-up call, then timed), one ``encode`` call per
    instruction as a user runs it; then the ratio of the triton bfloat16 row to its best."""
    import numpy as np

    from fastinstructor.benchmark import load_sentence_transformers

    model = load_sentence_transformers(model_dir, run.device)
    dtype = "float32" if run.args.smoke else "float16"
    if dtype == "float16":
        model.half()  # every module: what model_kwargs={"torch_dtype": torch.float16} loads
    note = "smoke: float32 on the CPU" if run.args.smoke else ""
    groups: dict[str, list[int]] = {}
    for i, (instruction, _) in enumerate(run.pairs):
        groups.setdefault(instruction, []).append(i)

    def encode(groups_of, batch_size):  # the rows of every group, in input order
        out = {}
        for instruction, rows in groups_of.items():
            texts = [run.pairs[i][1] for i in rows]
            vectors = model.encode(texts, prompt=instruction, batch_size=batch_size, show_progress_bar=False)
            out.update(zip(rows, vectors, strict=True))
        return np.stack([out[i] for i in sorted(out)]).astype(np.float32)

    best = None
    for batch_size in (int(b) for b in run.args.st_batch_sizes.split(",")):
        encode({k: v[:64] for k, v in groups.items()}, batch_size)  # a short warm-up: torch needs no compiling
        seconds, out = run.timed(lambda batch_size=batch_size: encode(groups, batch_size), warm=False)
        contender = f"sentence-transformers {dtype}, batch {batch_size}"
        row = e2e_row(run, preset, contender, dtype, seconds, out, state, batch_size=batch_size, note=note)
        best = row if best is None or row["tokens_per_s"] > best["tokens_per_s"] else best
    ratio = {"preset": preset, "st_dtype": dtype, "st_best_batch_size": best["batch_size"]}
    ratio |= {"st_best_tokens_per_s": best["tokens_per_s"], "fastinstructor_tokens_per_s": state.get("e2e")}
    ratio["ratio"] = state["e2e"] / best["tokens_per_s"] if state.get("e2e") else None
    run.result["ratios"].append(ratio)
    log(ratio)


def host_step(run: Run, preset: str, model_dir: Path, state: dict) -> None:
    import torch
    from bench_host_pipeline import NullBackend  # only this: that script is not an API

    from fastinstructor.model import Instructor

    checkpoint, tokenizer = checkpoint_and_tokenizer(model_dir)
    null = NullBackend(True, checkpoint.out_dim)
    if run.device == "cuda":
        null.device = torch.device("cuda")  # batches built in pinned memory, as for the triton backend
    model = Instructor(checkpoint, null, tokenizer, "bfloat16", {})
    model.encode(run.pairs[:64])  # the tokenizer's instruction cache, the thread
    tokenize_s = run.timed(lambda: tokenizer(run.pairs), warm=False)[0]
    total_s = run.timed(lambda: model.encode(run.pairs), warm=False)[0]
    tokens = state["tokens"]
    row = {"preset": preset, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    row |= {"texts": len(run.pairs), "tokens": tokens, "tokenize_s": tokenize_s, "total_s": total_s}
    row |= {"tokens_per_s": tokens / total_s, "gpu_forward_tokens_per_s": state.get("forward")}
    row["ratio_to_gpu_forward"] = row["tokens_per_s"] / state["forward"] if state.get("forward") else None
    run.result["host"].append(row)
    log(row)


def run_preset(run: Run, preset: str, model_dir: Path, state: dict) -> None:
    """The steps issue 15's targets read (int8 and float8 run after every preset's: no target reads them,
    gpu_triton.py's forward pass does)."""
    ensure_model(model_dir, preset)
    state["tokens"] = sum(len(ids) for ids in checkpoint_and_tokenizer(model_dir)[1](run.pairs).ids)
    run.step(preset, "load and batch-1 latency", lambda: latency_step(run, preset, model_dir, state))
    run.step(preset, "reference embeddings (parity)", lambda: reference_step(run, preset, model_dir, state))
    run.step(preset, "end to end: triton bfloat16", lambda: triton_e2e(run, preset, model_dir, "bfloat16", state))
    run.step(preset, "end to end: sentence-transformers", lambda: st_step(run, preset, model_dir, state))
    run.step(preset, "host pipeline", lambda: host_step(run, preset, model_dir, state))


def title(result: dict) -> str:
    return f"The whole pipeline on {result['device_name']}"


def _f(value, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def markdown(result: dict) -> str:
    from fastinstructor.benchmark import markdown_table

    lines = [
        f"{result['texts']} texts per preset ({result['text_source']}); real tokens. Parity: against "
        f"{result['parity_against']} on the first {result['parity_texts']} texts.",
        "",
        "## End to end (`encode`, tokenization included)",
        "",
        markdown_table(
            ["preset", "contender", "s", "tokens/s", "texts/s", "min cos", "parity", "note"],
            [
                [r["preset"], r["contender"], f"{r['seconds']:.3f}", f"{r['tokens_per_s']:,.0f}"]
                + [f"{r['texts_per_s']:,.0f}", _f(r.get("min_cos"), ".6f")]
                + ["n/a" if "passed" not in r else "pass" if r["passed"] else "FAIL: " + "; ".join(r["problems"])]
                + [r.get("note", "") or ("" if "ratio_to_bfloat16" not in r else f"{r['ratio_to_bfloat16']:.2f}x bf16")]
                for r in result["e2e"]
            ],
        ),
        "",
        markdown_table(
            ["preset", "fastinstructor tokens/s", "sentence-transformers best", "ratio (target >= 4x)"],
            [
                [r["preset"], _f(r["fastinstructor_tokens_per_s"], ",.0f")]
                + [f"{r['st_best_tokens_per_s']:,.0f} ({r['st_dtype']}, batch {r['st_best_batch_size']})"]
                + [_f(r["ratio"], ".2f")]
                for r in result["ratios"]
            ],
        ),
        "",
        "## Load and batch-1 latency (`encode` of one pair, a different length each call)",
        "",
        markdown_table(
            ["preset", "load s", "calls", "tokens", "first ms", "p50 ms", "p90 ms", "p99 ms", "max ms", "p99/p50"],
            [
                [r["preset"], f"{r['load_s']:.2f}", str(r["calls"]), f"{r['tokens_min']}-{r['tokens_max']}"]
                + [f"{r[k]:.2f}" for k in ("first_call_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "p99_over_p50")]
                for r in result["latency"]
            ],
        ),
        "",
        *sorted({f"Load: {r['load_note']}." for r in result["latency"]}),
        "",
        *(
            f"Batch-1 forward on {r['preset']}: eager {r['forward_eager_ms']:.3f} ms, CUDA graph replay "
            f"{r['forward_graph_ms']:.3f} ms (max abs diff {r['graph_max_abs_diff']:.1e})."
            if r.get("graph") == "measured"
            else f"CUDA graph on {r['preset']}: {r.get('graph')}."
            for r in result["latency"]
        ),
        "",
        "## Host pipeline alone (tokenize + packed batches into a null backend) beside the GPU forward pass",
        "",
        markdown_table(
            ["preset", "CPU cores", "tokenize s", "whole s", "host tokens/s", "GPU forward tokens/s", "host / GPU"],
            [
                [r["preset"], str(r["cpu_count"]), f"{r['tokenize_s']:.3f}", f"{r['total_s']:.3f}"]
                + [f"{r['tokens_per_s']:,.0f}", _f(r["gpu_forward_tokens_per_s"], ",.0f")]
                + [_f(r["ratio_to_gpu_forward"], ".2f")]
                for r in result["host"]
            ],
        ),
    ]
    lines += ["", *(f"Skipped: {s['contender']} on {s['preset']}: {s['reason']}" for s in result["skipped"])]
    lines += [f"Failed: {e['step']} on {e['preset']}: {e['error']}" for e in result["errors"]]
    if result["smoke"]:
        lines += ["", SMOKE_NOTE]
    return "\n".join([*lines, "", machine(result)]) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = gpu_device(args.smoke, "gpu_e2e")
    import torch

    from fastinstructor.benchmark import record

    pairs, source = mixed_pairs(args.texts, 160 if args.smoke else None)  # smoke: short texts, the interpreter is slow
    source += ", cut at 160 characters (smoke)" if args.smoke else ""
    result = record(
        command("gpu_e2e.py", argv, python="python"),
        smoke=args.smoke,
        device_name=torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)",
        cpu_count=os.cpu_count(),
        texts=len(pairs),
        text_source=source,
        parity_texts=min(args.parity_texts, len(pairs)),
        parity_against=f"fastinstructor's reference backend (transformers' T5, float32, on {device})",
        **{k: [] for k in ("latency", "e2e", "forward", "ratios", "host", "skipped", "errors")},
    )
    run = Run(args, device, pairs, result)
    states = {preset: {} for preset in args.presets.split(",")}
    for preset, state in states.items():
        model_dir = args.models / f"instructor-{preset}-random"
        run.step(preset, "checkpoint", functools.partial(run_preset, run, preset, model_dir, state))
    for (preset, state), precision in itertools.product(states.items(), QUANTIZED):
        if "tokens" in state:  # its checkpoint is there
            step = functools.partial(quantized_step, run, preset, args.models / f"instructor-{preset}-random")
            run.step(preset, f"end to end: triton {precision}", functools.partial(step, precision, state))
    json_path, md_path = run.save()
    print(markdown(result))
    log(f"wrote {json_path} and {md_path}")
    failed = [f"{e['preset']} {e['step']}" for e in result["errors"]]
    failed += [  # sentence-transformers' parity is not ours to fail
        f"{r['preset']} {r['contender']} parity"
        for r in result["e2e"]
        if not r.get("passed", True) and r["contender"].startswith("fastinstructor")
    ]
    if failed:
        sys.exit(f"gpu_e2e: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
