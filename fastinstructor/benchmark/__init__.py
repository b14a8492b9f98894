"""``fastinstructor bench``: every backend x precision on one workload, in one process, as ratios and rooflines.

For each contender (fastinstructor's backends at the requested precisions, the float32 ``reference`` always,
and sentence-transformers' native INSTRUCTOR mode when installed) the run records:

- load time, and warm-up time (the first call on a few texts less the second), apart from the timed passes;
- throughput: full passes over the workload per token budget, repeated and interleaved (A B C, A B C, ...) so
  that drift on a shared machine hits every contender alike; medians with the spread; real tokens/s counts the
  token ids of the inputs (instruction, text, ``</s>``), never padding;
- latency: per-batch wall time of small batches (serving-like), p50 and p99;
- memory: resident memory added by loading, and the peak above it while running (Linux; GPU: torch's peak);
- the roofline: the model's matmul FLOPs at the workload's real lengths (:func:`encoder_flops`), the machine's
  ceilings measured in the same run (a large float32 / bfloat16 / float16 / int8 matmul on the same device), and
  each contender's achieved fraction of the ceiling of its precision;
- parity against the float32 reference on the shipped calibration set (``parity.measure``: docs/design.md section 5's
  tolerance for the contender's precision).

Output: a Markdown table on stdout, and ``<workload>.json`` (every raw figure and the environment),
``<workload>.md`` and ``<workload>.png`` in ``<out>/<date>-<host>/``.

The modules, one concern each: ``workloads`` (the texts), ``roofline`` (FLOPs and matmul ceilings), ``machine``
(the environment, from ``fastinstructor.hardware``'s probe, and the commit), ``contenders`` (what runs, from the
backends' capability tables), ``timing`` (interleaved passes, percentiles, memory), ``report`` (tables, plot,
and the one result-file layout the scripts in ``bench/`` write too) and ``runner`` (``run_benchmark``).
"""

from __future__ import annotations

from ..hardware import CPU_FLAGS
from .contenders import (
    REFERENCE,
    SENTENCE_TRANSFORMERS,
    ST_BATCH_SIZE,
    Contender,
    load_sentence_transformers,
    plan_contenders,
)
from .machine import environment, source_version
from .report import (
    machine_line,
    markdown_table,
    plot,
    record,
    report_markdown,
    result_stem,
    write_report,
    write_results,
)
from .roofline import encoder_flops, matmul_ceilings
from .runner import WARMUP_TEXTS, run_benchmark
from .timing import interleaved, percentile
from .workloads import (
    ARTICLE_INSTRUCTION,
    CLAIM_INSTRUCTION,
    EVIDENCE_INSTRUCTION,
    WORKLOADS,
    Workload,
    load_workload,
)

__all__ = [
    "ARTICLE_INSTRUCTION",
    "CLAIM_INSTRUCTION",
    "CPU_FLAGS",
    "EVIDENCE_INSTRUCTION",
    "REFERENCE",
    "SENTENCE_TRANSFORMERS",
    "ST_BATCH_SIZE",
    "WARMUP_TEXTS",
    "WORKLOADS",
    "Contender",
    "Workload",
    "encoder_flops",
    "environment",
    "interleaved",
    "load_sentence_transformers",
    "load_workload",
    "machine_line",
    "markdown_table",
    "matmul_ceilings",
    "percentile",
    "plan_contenders",
    "plot",
    "record",
    "report_markdown",
    "result_stem",
    "run_benchmark",
    "source_version",
    "write_report",
    "write_results",
]
