"""docs/design.md section 2: kernels/ and export/ import as fastinstructor.kernels / fastinstructor.export, from the
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


def test_wheel_contains_the_mapped_packages_only(built_wheel, installed_wheel, tmp_path):
    names = zipfile.ZipFile(built_wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"fastinstructor", "-".join(built_wheel.name.split("-")[:2]) + ".dist-info"}, tops
    # The native CPU op is in the wheel where this machine can build it (setup.py says why not otherwise).
    buildable = shutil.which("cmake") and any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    assert not buildable or any(name.startswith("fastinstructor/_native") for name in names), names
    out = _run([sys.executable, "-c", CHECK], cwd=tmp_path, env={"PYTHONPATH": str(installed_wheel)}).splitlines()
    assert out[0] == str(installed_wheel / "fastinstructor" / "kernels" / "__init__.py")
    assert out[1] == str(installed_wheel / "fastinstructor" / "export" / "__init__.py")
    assert out[2] == "None None"
