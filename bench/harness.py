"""What the scripts in bench/ share beyond ``fastinstructor.benchmark``: where the model and the results live.

Benchmarks are scripts (``python bench/<name>.py``), so this folder is on ``sys.path`` and they import this
module as ``harness``. Timing, the environment record, tables and the result-file layout come from
``fastinstructor.benchmark``, the package behind ``fastinstructor bench``: every script writes
``<kind>-<date>-<host>.json`` (its figures, with ``command``, ``date``, ``environment`` and ``source``) and
``.md`` (a title, its tables, the machine line, the command to reproduce it) through :func:`write_results`.
``fastinstructor.benchmark`` is imported lazily here: ``gpu_triton.py`` sets ``TRITON_INTERPRET`` first.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / ".models" / "instructor-base-random"  # the folder `make demo` builds and uses
DEFAULT_OUT = ROOT / "bench" / "results"


def ensure_model(model_dir: Path, preset: str = "base") -> None:
    if not (model_dir / "modules.json").is_file():
        from fastinstructor.testmodel import make_test_model

        print(f"building the random-weight {preset} checkpoint in {model_dir}", file=sys.stderr, flush=True)
        make_test_model(preset, model_dir)


def require_shared_data(script: str) -> Path:
    """``../shared/data`` (or ``$FASTINSTRUCTOR_DATA``) for a benchmark that needs real text; exits without it."""
    from fastinstructor.data import shared_data_dir

    data = shared_data_dir()
    if data is None:
        sys.exit(f"{script}: ../shared/data (or $FASTINSTRUCTOR_DATA) was not found; the benchmark needs real text")
    return data


def command(script: str, argv: list[str] | None = None, python: str = ".venv/bin/python") -> str:
    """The command line that reproduces a run of ``bench/<script>`` from the repository root."""
    return shlex.join([python, f"bench/{script}", *(sys.argv[1:] if argv is None else argv)])


def write_results(out: Path, kind: str, result: dict, title: str, body: str, quiet: bool = False) -> list[Path]:
    """``<kind>-<date>-<host>.json`` and ``.md`` in ``out``, in ``fastinstructor.benchmark``'s layout.

    ``result`` comes from ``fastinstructor.benchmark.record`` (command, date, environment, source and the
    figures); ``body`` is the Markdown under the title, its last paragraph :func:`machine`.
    """
    from fastinstructor.benchmark import result_stem
    from fastinstructor.benchmark import write_results as write

    paths = write(result_stem(out, kind), result, title, body)
    if not quiet:
        print(f"\nwrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return paths


def machine(result: dict) -> str:
    """The machine and code line that ends every result's Markdown."""
    from fastinstructor.benchmark import machine_line

    return machine_line(result["environment"], result["source"])


SMOKE_NOTE = "**Smoke run** (CPU, Triton interpreter, toy sizes): checks the script; the timings mean nothing."


def gpu_device(smoke: bool, script: str) -> str:
    """Where a GPU script runs: ``"cpu"`` under Triton's interpreter for ``--smoke`` (set here, before triton is
    imported: kernels are decorated at import), else ``"cuda"``; exits saying why when CUDA or the shared data is
    missing."""
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        return "cpu"
    import torch

    from fastinstructor.data import shared_data_dir

    if not torch.cuda.is_available():
        sys.exit(f"{script}: no CUDA device (--smoke checks the script on the CPU)")
    if shared_data_dir() is None:
        sys.exit(f"{script}: the shared data was not found; point FASTINSTRUCTOR_DATA at its folder")
    return "cuda"
