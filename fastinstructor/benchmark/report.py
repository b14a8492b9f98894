"""Reports: Markdown tables, the plot, and the one result-file layout that ``fastinstructor bench`` and the
scripts in ``bench/`` write.

Every result is a pair ``<stem>.json`` (every figure, with ``command``, ``environment`` and ``source``: see
:func:`record`) and ``<stem>.md`` (``# <title>, <date>-<host>``, the body, whose last paragraph is
:func:`machine_line`, then the command that reproduces it); ``fastinstructor bench`` adds ``<stem>.png``.
The stem is ``<out>/<date>-<host>/<name>`` for ``fastinstructor bench`` and ``<out>/<name>-<date>-<host>``
for the scripts (:func:`result_stem`).
"""

from __future__ import annotations

import datetime
import json
import socket
from pathlib import Path

from .contenders import ST_BATCH_SIZE
from .machine import environment, source_version

__all__ = [
    "markdown_table",
    "machine_line",
    "report_markdown",
    "plot",
    "record",
    "result_stem",
    "write_results",
    "write_report",
]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def machine_line(env: dict, source: dict) -> str:
    """The machine and the code, one sentence each: the last paragraph of every result's Markdown."""
    flags = ", ".join(flag for flag, present in env["cpu_flags"].items() if present) or "none of note"
    return (
        f"Machine: {env['cpu_model']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads; {flags})"
        f"{'; GPU ' + env['gpu'] if env['gpu'] else ''}. torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
        f"transformers {env['transformers']}, sentence-transformers {env['sentence_transformers']}, "
        f"fastinstructor {env['fastinstructor']} (commit {str(source['git_commit'])[:12]}"
        f"{', package modified' if source['package_modified'] else ''})."
    )


_THROUGHPUT = [
    "contender",
    "load s",
    "warm-up s",
    "median s",
    "min–max s",
    "texts/s",
    "real tokens/s",
    "× reference",
    "× sent-tr",
    "GFLOP/s",
    "of ceiling",
    "load MiB",
    "run MiB",
    "min cos",
    "parity",
]


def _throughput_row(r: dict) -> list[str]:
    return [
        r["name"],
        f"{r['load_s']:.1f}",
        f"{r['warmup_s']:.2f}",
        f"{r['median_s']:.2f}",
        f"{r['min_s']:.2f}–{r['max_s']:.2f}",
        f"{r['texts_per_s']:.1f}",
        f"{r['tokens_per_s']:,.0f}",
        f"{r['vs_reference']:.2f}",
        _fmt(r["vs_sentence_transformers"], ".2f"),
        f"{r['achieved_gflops']:.1f}",
        _fmt(r["roofline_fraction"] and 100 * r["roofline_fraction"], ".1f") + " %",
        _fmt(r["load_mib"], ".0f"),
        _fmt(r["run_peak_mib"], ".0f"),
        f"{r['min_cos']:.6f}",
        r["parity"],
    ]


def _by_budget_table(result: dict) -> str:
    """Real tokens/s at each token budget, when there is more than one."""
    budgets = [str(b) for b in result["settings"]["batch_tokens"]]
    if len(budgets) < 2:
        return ""
    padded_tokens = result["workload"]["padded_tokens"]
    return "\n\nReal tokens/s by token budget (padding efficiency of the plan):\n\n" + markdown_table(
        ["contender", *[f"{b} ({result['workload']['real_tokens'] / padded_tokens[b]:.2f})" for b in budgets]],
        [[r["name"], *[f"{r['throughput'][b]['tokens_per_s']:,.0f}" for b in budgets]] for r in result["rows"]],
    )


def _latency_table(result: dict) -> str:
    sizes = [str(s) for s in result["settings"]["latency_batch_sizes"]]
    return markdown_table(
        ["contender", *[f"batch {s}: p50 / p99 ms" for s in sizes]],
        [
            [r["name"], *[f"{r['latency'][s]['p50_ms']:.1f} / {r['latency'][s]['p99_ms']:.1f}" for s in sizes]]
            for r in result["rows"]
        ],
    )


def _ceilings_table(result: dict) -> str:
    return markdown_table(
        ["device", "precision", "ceiling GFLOP/s", "torch", "oneDNN packed", "onnxruntime", "size"],
        [
            [
                kind,
                p,
                _fmt(c["gflops"], ".0f", "; ".join(c.get("errors", ["n/a"]))),
                _fmt(c["by_library"].get("torch"), ".0f", "–"),
                _fmt(c["by_library"].get("onednn"), ".0f", "–"),
                _fmt(c["by_library"].get("onnxruntime"), ".0f", "–"),
                f"{c['size']}³",
            ]
            for kind, figures in result["ceilings"].items()
            for p, c in figures.items()
        ],
    )


def _setup(result: dict) -> str:
    """The paragraph above the tables: the workload, its padding, and how each column was measured."""
    w, settings = result["workload"], result["settings"]
    budget = str(settings["batch_tokens"][0])
    padded = w["padded_tokens"][budget]
    low, median, high = w["length_min_median_max"]
    return (
        f"Workload `{w['name']}`: {w['texts']} texts, {w['real_tokens']:,} real tokens (lengths "
        f"{low}/{median:.0f}/{high} min/median/max; {padded:,} padded tokens at a {budget}-token budget, padding "
        f"efficiency {w['real_tokens'] / padded:.2f}), {result['flops_per_token'] / 1e6:.1f} MFLOP per token. "
        f"Throughput: median of {settings['repeat']} interleaved passes, batches of at most "
        f"{settings['batch_size']} rows and {budget} padded tokens (sentence-transformers: its default "
        f"{ST_BATCH_SIZE} rows in its own length order). Real tokens/s excludes padding; GFLOP/s counts the matmul "
        "FLOPs of the real tokens; `of ceiling` is that against the matmul ceiling of the contender's precision "
        "below. Memory: MiB added by loading, and the peak above the start of a pass. `min cos` and parity: the "
        "shipped calibration set against the float32 reference (`parity.measure`, the dispatcher's check at load)."
    )


def report_markdown(result: dict) -> str:
    """The tables: throughput and roofline, latency, ceilings; then the setup and what was skipped."""
    rows, settings = result["rows"], result["settings"]
    throughput = markdown_table(_THROUGHPUT, [_throughput_row(r) for r in rows])
    skipped = "".join(f"\n- {s['backend']} {s['precision']}: {s['reason']}" for s in result["skipped"])
    load = max(max(r["loadavg_1m_after"]) for r in rows)
    return (
        f"{_setup(result)}\n\n{throughput}{_by_budget_table(result)}\n\nLatency of {settings['latency_batches']} "
        f"consecutive batches per size and pass (serving-like):\n\n{_latency_table(result)}\n\nMatmul ceilings "
        f"measured in this run (the fastest library counts):\n\n{_ceilings_table(result)}\n\n"
        f"{machine_line(result['environment'], result['source'])} Highest 1-minute load average after a pass: "
        f"{load:.1f}." + (f"\n\nNot run:{skipped}" if skipped else "") + "\n"
    )


def plot(result: dict, path: Path) -> bool:
    """Throughput by contender (median, min–max) and latency against batch size; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    names = [r["name"] for r in rows]
    medians = [r["tokens_per_s"] for r in rows]
    tokens = result["workload"]["real_tokens"]
    low = [m - tokens / r["max_s"] for m, r in zip(medians, rows, strict=True)]
    high = [tokens / r["min_s"] - m for m, r in zip(medians, rows, strict=True)]
    left.barh(names, medians, xerr=[low, high], color="tab:blue", alpha=0.8)
    left.invert_yaxis()
    left.set_xlabel("real tokens/s (median, min–max)")
    left.set_title(f"Throughput, workload {result['workload']['name']}")
    sizes = result["settings"]["latency_batch_sizes"]
    for r in rows:
        right.plot(sizes, [r["latency"][str(s)]["p50_ms"] for s in sizes], marker="o", label=r["name"])
    right.set_xscale("log", base=2)
    right.set_xticks(sizes, [str(size) for size in sizes])
    right.set_yscale("log")
    right.set_xlabel("batch size (texts)")
    right.set_ylabel("p50 latency per batch (ms)")
    right.set_title("Latency against batch size")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _run_name() -> str:
    return f"{datetime.date.today().isoformat()}-{socket.gethostname()}"


def result_stem(out: Path, name: str, *, folder: bool = False) -> Path:
    """Where a result goes: ``out/<date>-<host>/<name>`` (``folder``: one folder per run, as
    ``fastinstructor bench`` writes) or ``out/<name>-<date>-<host>`` (the scripts in ``bench/``)."""
    return out / _run_name() / name if folder else out / f"{name}-{_run_name()}"


def record(command: str, **figures) -> dict:
    """A result's head: the command that reproduces it, the date, then ``figures``, the machine
    (:func:`~fastinstructor.benchmark.machine.environment`) and the code (``source_version``)."""
    return {
        "command": command,
        "date": datetime.date.today().isoformat(),
        **figures,
        "environment": environment(),
        "source": source_version(),
    }


def write_results(stem: Path, result: dict, title: str, body: str) -> list[Path]:
    """``<stem>.json`` (``result``) and ``<stem>.md`` (``# <title>, <date>-<host>``, ``body``, and
    ``result["command"]`` to reproduce it); returns the paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    command = result.get("command") or "(run from Python)"
    md_path.write_text(
        f"# {title}, {_run_name()}\n\n{body.rstrip()}\n\nReproduce:\n\n```\n{command}\n```\n", encoding="utf-8"
    )
    return [json_path, md_path]


def write_report(result: dict, out: Path) -> list[Path]:
    """``<workload>.json``, ``.md`` and ``.png`` in ``out/<date>-<host>/``; returns the paths written."""
    stem = result_stem(out, result["workload"]["name"], folder=True)
    written = write_results(stem, result, "fastinstructor bench", report_markdown(result))
    png_path = stem.parent / f"{stem.name}.png"
    if plot(result, png_path):
        written.append(png_path)
    return written
