"""DESIGN section 2: kernels/ and export/ import as fastinstructor.kernels / fastinstructor.export, from the
editable install and from a built wheel, and no generic top-level name lands in site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECK = (
    "import importlib.util, fastinstructor.kernels as k, fastinstructor.export as e, fastinstructor.backends as b; "
    "print(k.__file__); print(e.__file__); "
    "print(importlib.util.find_spec('kernels'), importlib.util.find_spec('export'))"
)


def _run(args, cwd, **kwargs) -> str:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=True, **kwargs).stdout


def test_editable_install_maps_the_folders(tmp_path):
    out = _run([sys.executable, "-c", CHECK], cwd=tmp_path).splitlines()  # not the repo root: no sys.path help
    assert out[0] == str(REPO / "kernels" / "__init__.py")
    assert out[1] == str(REPO / "export" / "__init__.py")
    assert out[2] == "None None"


def test_wheel_contains_the_mapped_packages_only(tmp_path):
    source = shutil.copytree(
        REPO,
        tmp_path / "src",
        ignore=shutil.ignore_patterns(
            ".venv", ".git", ".models", "demo-output", "build", "dist", "*.egg-info", "__pycache__", ".*cache"
        ),
    )
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        cwd=tmp_path,
    )
    wheel = next((tmp_path / "dist").glob("fastinstructor-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"fastinstructor", wheel.name.split("-py")[0] + ".dist-info"}, tops
    _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"), str(wheel)],
        cwd=tmp_path,
    )
    out = _run([sys.executable, "-c", CHECK], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")}).splitlines()
    assert out[0] == str(tmp_path / "site" / "fastinstructor" / "kernels" / "__init__.py")
    assert out[1] == str(tmp_path / "site" / "fastinstructor" / "export" / "__init__.py")
    assert out[2] == "None None"
