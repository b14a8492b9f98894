"""docs/design.md section 2: the Triton kernels and the ONNX export are subpackages (fastinstructor.kernels,
fastinstructor.export) in the editable install and in a built wheel; no generic top-level name lands in
site-packages, and none sits in the repository's root, where it would shadow an installed package for every
process started there (``python -m pytest``, ``python -m fastinstructor``)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECK = (
    "import importlib.util, fastinstructor.kernels as k, fastinstructor.export as e, fastinstructor.backends as b; "
    "print(k.__file__); print(e.__file__); "
    "print(importlib.util.find_spec('kernels') is None or 'fastinstructor' not in importlib.util.find_spec('kernels')"
    ".origin, importlib.util.find_spec('export'))"
)


def _run(args, cwd, **kwargs) -> str:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=True, **kwargs).stdout


def test_the_editable_install_imports_the_subpackages(tmp_path):
    out = _run([sys.executable, "-c", CHECK], cwd=tmp_path).splitlines()  # not the repo root: no sys.path help
    assert out[0] == str(REPO / "fastinstructor" / "kernels" / "__init__.py")
    assert out[1] == str(REPO / "fastinstructor" / "export" / "__init__.py")
    assert out[2] == "True None"


def test_the_wheel_contains_the_package_only(built_wheel, installed_wheel, tmp_path):
    names = zipfile.ZipFile(built_wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"fastinstructor", "-".join(built_wheel.name.split("-")[:2]) + ".dist-info"}, tops
    # The native CPU op is in the wheel where this machine can build it (setup.py says why not otherwise).
    buildable = shutil.which("cmake") and any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    assert not buildable or any(name.startswith("fastinstructor/_native") for name in names), names
    out = _run([sys.executable, "-c", CHECK], cwd=tmp_path, env={"PYTHONPATH": str(installed_wheel)}).splitlines()
    assert out[0] == str(installed_wheel / "fastinstructor" / "kernels" / "__init__.py")
    assert out[1] == str(installed_wheel / "fastinstructor" / "export" / "__init__.py")
    assert out[2] == "True None"


def test_no_package_but_fastinstructor_sits_in_the_repository_root():
    # A process started in the root has it first on sys.path: a top-level kernels/ there was imported by transformers
    # (>= 5.25, which requires the Hugging Face `kernels` package) in place of that package, and failed.
    packages = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["fastinstructor"], packages


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="the Hugging Face `kernels` package is absent")
def test_transformers_imports_its_kernels_package_from_the_repository_root():
    out = _run([sys.executable, "-c", "import transformers.modeling_utils, kernels; print(kernels.__file__)"], REPO)
    assert Path(out.strip()).parent.parent != REPO, out  # the installed package, not a folder of the root
