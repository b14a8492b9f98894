"""What the scripts in bench/ share beyond ``fastinstructor.benchmark``: where the model and the results live.

Benchmarks are scripts (``python bench/<name>.py``), so this folder is on ``sys.path`` and they import this
module as ``harness``. Timing, the environment record and tables come from ``fastinstructor.benchmark``, the
module behind ``fastinstructor bench``.
"""

from __future__ import annotations

import datetime
import json
import socket
import sys
from pathlib import Path

from fastinstructor.testmodel import make_test_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / ".models" / "instructor-base-random"  # the folder `make demo` builds and uses
DEFAULT_OUT = ROOT / "bench" / "results"


def ensure_model(model_dir: Path, preset: str = "base") -> None:
    if not (model_dir / "modules.json").is_file():
        print(f"building the random-weight {preset} checkpoint in {model_dir}", file=sys.stderr, flush=True)
        make_test_model(preset, model_dir)


def write_results(out: Path, kind: str, result: dict, markdown: str) -> tuple[Path, Path]:
    """``<kind>-<date>-<host>.json`` and ``.md`` in ``out``."""
    stem = f"{kind}-{datetime.date.today().isoformat()}-{socket.gethostname()}"
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown, encoding="utf-8")
    print(f"\nwrote {json_path} and {md_path}", file=sys.stderr)
    return json_path, md_path
