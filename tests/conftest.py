"""Shared fixtures: random-weight checkpoints built once per session, and real text."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from fastinstructor.backends.base import Backend
from fastinstructor.data import read_jsonl_texts, sample_passages, shared_data_dir
from fastinstructor.hardware import cpu_flags, cpu_model
from fastinstructor.model import Instructor
from fastinstructor.parity import TOLERANCES, compare
from fastinstructor.testmodel import make_test_model


def _import_triton_for_the_interpreter() -> None:
    """Without CUDA, Triton runs in its interpreter only if TRITON_INTERPRET is set when triton is first imported and
    when each kernel is decorated; any test module may import it first, indirectly (sentence-transformers does). So
    it and the kernels are imported here, before any test module, with the flag, which is then restored so that it
    does not leak into other tests (the triton tests set it while they run: their ``interpreter`` fixtures)."""
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import fastinstructor.kernels

        for module in pkgutil.iter_modules(fastinstructor.kernels.__path__):  # every kernel module, triton with them
            importlib.import_module(f"fastinstructor.kernels.{module.name}")
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def interrupt_at_shard(monkeypatch, index: int) -> None:
    """Make the next embed job stop as on Ctrl-C when it starts writing its shard number ``index`` (0-based)."""
    import fastinstructor.shards

    original = fastinstructor.shards.write_shard

    def write_shard(folder, at, *args):
        if at == index:
            raise KeyboardInterrupt
        return original(folder, at, *args)

    monkeypatch.setattr(fastinstructor.shards, "write_shard", write_shard)


_import_triton_for_the_interpreter()


INSTRUCTIONS = [
    "Represent the Wikipedia document for retrieval:",
    "Represent the climate claim for retrieving supporting documents:",
    "Represent the sentence for clustering: ",
    "Represent the Science title:",
]


REPO = Path(__file__).resolve().parent.parent


def run_checked(args: list[str], cwd: Path, **kwargs) -> str:
    """A subprocess's stdout; on a non-zero exit, an assertion error that shows its stderr."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args[:4]} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout


def made_once(tmp_path_factory, name: str, make) -> Path:
    """``make(folder)``'s result, made once per test run: under pytest-xdist the workers share it (the first to ask
    makes it while the others wait on a lock, as pytest-xdist's docs advise for a costly session fixture)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return make(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent  # every worker's basetemp is a folder in it
    with FileLock(str(shared / f"{name}.lock")):
        done = shared / f"{name}.made"
        if not done.is_file():
            folder = shared / name
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed left
            folder.mkdir()
            done.write_text(str(make(folder)))
        return Path(done.read_text())


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the working tree (no build/ or egg-info lands in the checkout), built once per
    run without build isolation (setuptools and wheel come from the dev extra)."""

    def build(root: Path) -> Path:
        source = shutil.copytree(
            REPO,
            root / "src",
            ignore=shutil.ignore_patterns(
                ".venv",
                ".git",
                ".models",
                "demo-output",
                "build",
                "dist",
                "*.egg-info",
                "__pycache__",
                ".*cache",
                "_native*",
            ),
        )
        pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w"]
        run_checked([*pip_wheel, str(root / "dist"), str(source)], cwd=root)
        return next((root / "dist").glob("fastinstructor-*.whl"))

    return made_once(tmp_path_factory, "wheel", build)


@pytest.fixture(scope="session")
def installed_wheel(built_wheel, tmp_path_factory) -> Path:
    """A folder holding ``built_wheel`` installed with ``pip install --target``: put it first on sys.path
    (PYTHONPATH) and run from another folder to import the wheel's copy instead of the checkout."""

    def install(site: Path) -> Path:
        pip_install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site)]
        run_checked([*pip_install, str(built_wheel)], cwd=site.parent)
        return site

    return made_once(tmp_path_factory, "site", install)


@pytest.fixture(scope="session")
def make_model(tmp_path_factory):
    """``make_model(preset)``: the path of a checkpoint of that preset, built once per session."""
    built = {}

    def get(preset: str):
        if preset not in built:
            built[preset] = make_test_model(preset, tmp_path_factory.mktemp("models") / preset)
        return built[preset]

    return get


@pytest.fixture(scope="session")
def tiny_model(make_model):
    return make_model("tiny")


@pytest.fixture(scope="session")
def real_texts() -> list[str]:
    """Real claims and evidence sentences (../shared/data), or the project's own doc passages without it."""
    data = shared_data_dir()
    if data is None:
        return [text for _, text in sample_passages(48)[0]]
    claims = read_jsonl_texts(data / "climate_fever_claims.jsonl", 24)
    evidence = read_jsonl_texts(data / "climate_fever_evidence.jsonl", 24)
    return [text for _, text in claims + evidence]


@pytest.fixture(scope="session")
def real_pairs(real_texts) -> list[list[str]]:
    """Real text under several instructions, plus plain strings."""
    pairs = [[INSTRUCTIONS[i % len(INSTRUCTIONS)], text] for i, text in enumerate(real_texts)]
    return pairs + real_texts[:4]


# What the cpu backend offers depends on the CPU (backends/cpu.py: CpuBackend.unavailable); tests of bfloat16 skip,
# saying why, on a CPU without native bfloat16 (an AVX2-only AMD EPYC).
needs_cpu_bfloat16 = pytest.mark.skipif(
    not {"avx512_bf16", "amx_bf16"} & cpu_flags(),
    reason=f"the cpu backend offers bfloat16 only with native bfloat16 (avx512_bf16 or AMX); {cpu_model()} has none",
)

# The cpu backend's precisions as parameters, each skipped where this CPU lacks it.
PRECISIONS_HERE = [
    "float32",
    pytest.param("bfloat16", marks=needs_cpu_bfloat16),
    "int8",
]


def ungated(reference: Instructor, backend: Backend) -> Instructor:
    """``backend`` (an instance) behind ``reference``'s checkpoint and tokenizer, without the dispatcher's parity gate
    (tested on tiny, in test_dispatch.py): a test that compares it with the reference on real text need not pay the
    gate's calibration run, most of such a test's time on base."""
    return Instructor(reference.checkpoint, backend, reference.tokenizer, backend.precision, {})


def assert_parity(actual: np.ndarray, expected: np.ndarray, precision: str) -> None:
    """docs/design.md section 5's tolerance for ``precision``, per embedding; on failure name the worst rows."""
    problems = compare(actual, expected).failures(TOLERANCES[precision])
    assert not problems, f"{precision} parity: " + "; ".join(problems)


@pytest.fixture(scope="session", autouse=True)
def _isolated_settings(tmp_path_factory):
    """Caches (ONNX exports, parity results) in a temporary folder, and the exact cpu/float32 path wherever a
    test does not name a backend: the dispatcher's own tests (test_dispatch.py) lift this."""
    patch = pytest.MonkeyPatch()
    patch.setenv("FASTINSTRUCTOR_CACHE", str(tmp_path_factory.mktemp("cache")))
    patch.setenv("FASTINSTRUCTOR_BACKEND", "cpu")
    patch.setenv("FASTINSTRUCTOR_PRECISION", "float32")
    yield
    patch.undo()
