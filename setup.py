"""Builds the native CPU ops (csrc/, by the top-level CMakeLists.txt) into fastinstructor/_native<suffix>.

Everything else about the package is declared in pyproject.toml. The build needs torch importable at build time
(install torch first, then ``pip install --no-build-isolation``: an isolated build environment would pull a
multi-GB torch of its own), CMake (3.18 or later; the ``cmake`` package from PyPI serves) and a C++17 compiler.
When any is missing, or the build fails, the install goes on without the library and says so in one line:
``fastinstructor.native`` then runs the PyTorch fallback. Why setuptools and not scikit-build-core: the package is
pure Python but for one optional library, and scikit-build-core would make CMake and a compiler mandatory for
every install, where this one must succeed without them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _notice(why: str) -> None:
    print(f"fastinstructor: native CPU ops not built ({why}); the PyTorch fallback will run", file=sys.stderr)


def build_native(source: Path, output: Path, build: Path) -> None:
    """The library ``output`` from ``source``'s CMakeLists.txt, configured and built in ``build`` (raises
    ``CalledProcessError`` when CMake or the compiler fails). ``bench/compare_commits.py`` builds other commits'
    libraries with it."""
    import torch

    configure = [
        "cmake", "-S", str(source), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DFASTINSTRUCTOR_OUTPUT={output}", "-DCMAKE_BUILD_TYPE=Release",
    ]  # fmt: skip
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build)], check=True, stdout=subprocess.DEVNULL)


class CMakeBuild(build_ext):
    def run(self) -> None:
        why = self._missing()
        if why:
            _notice(why)
            return
        for ext in self.extensions:
            try:
                self._build(ext)
            except (OSError, subprocess.CalledProcessError) as err:
                _notice(f"the build failed: {err}")

    @staticmethod
    def _missing() -> str | None:
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not importable at build time: install torch first, then pip install --no-build-isolation"
        if shutil.which("cmake") is None:
            return "no cmake: pip install cmake"
        if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            return "no C++ compiler"
        return None

    def _build(self, ext: Extension) -> None:
        build_native(ROOT, Path(self.get_ext_fullpath(ext.name)).resolve(), Path(self.build_temp).resolve() / "native")

    def get_outputs(self) -> list[str]:  # only what was built: a skipped library is not an output to install
        return [path for path in super().get_outputs() if Path(path).is_file()]


if __name__ == "__main__":  # as setuptools runs it; tests import the build command without running setup()
    setup(ext_modules=[CMakeExtension("fastinstructor._native")], cmdclass={"build_ext": CMakeBuild})
