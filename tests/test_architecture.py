"""The package's shape, as docs/architecture.md draws it: layers, who may import whom, no cycles, small modules.

Every import is counted, also those inside functions (they are how a layer reaches a lower one lazily, and a
lazy import of a higher layer is still a dependency on it).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lowest first: a module may import its own layer's modules and those of lower layers, never a higher layer's.
LAYERS = [
    (
        "foundation",
        ["version", "precisions", "locking", "hardware", "data", "batching", "prefetch", "compute_thread", "vectors"],
    ),
    ("model files", ["model_sources", "checkpoint", "tokenization", "calibration", "readers"]),
    ("T5 maths", ["t5", "encoder"]),
    ("kernels and export", ["kernels", "native", "export"]),
    ("backends", ["backends"]),
    ("parity", ["parity"]),
    ("dispatch", ["dispatch"]),
    ("the model API", ["model"]),
    (
        "applications",
        ["corpus", "shards", "resume", "server", "benchmark", "check", "testmodel", "integrations", "ray"],
    ),
    ("entry points", ["cli", "__main__", "__init__"]),
]
MAX_LINES = 500


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "fastinstructor").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, relative imports resolved; ``from pkg import mod`` is ``mod``."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import fastinstructor.backends.cpu.x` -> the module part
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports(name, path, modules()) for name, path in modules().items()}


def layer(module: str) -> int:
    short = module.removeprefix("fastinstructor").lstrip(".") or "__init__"
    for index, (_, prefixes) in enumerate(LAYERS):
        if short.split(".")[0] in prefixes:
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py (and docs/architecture.md): add it")


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module):
    upward = [f"{t} ({LAYERS[layer(t)][0]})" for t in sorted(GRAPH[module]) if layer(t) > layer(module)]
    assert not upward, f"{module} ({LAYERS[layer(module)][0]}) imports a higher layer: {upward}"


def test_kernels_are_leaves():
    """The Triton kernels use the T5 maths, the foundation layer and each other, nothing of the backends that call
    them."""
    allowed = {"fastinstructor.t5", *(f"fastinstructor.{name}" for name in LAYERS[0][1])}
    for module, targets in GRAPH.items():
        if module.startswith("fastinstructor.kernels"):
            outside = [t for t in targets if not t.startswith("fastinstructor.kernels") and t not in allowed]
            assert not outside, f"{module} imports {outside}"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_resolves_relative_imports(tmp_path):
    known = {"fastinstructor.kernels.attention": None, "fastinstructor.t5": None, "fastinstructor.backends": None}
    source = tmp_path / "attention.py"
    source.write_text("from ..t5 import x\nfrom ..backends import cpu\nimport torch\n")
    assert imports("fastinstructor.kernels.attention", source, known) == {
        "fastinstructor.t5",
        "fastinstructor.backends",
    }


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_modules_stay_small(module):
    lines = len(modules()[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it along a seam (at most {MAX_LINES})"


def test_the_package_imports_where_fcntl_does_not_exist(tmp_path):
    """Windows has no fcntl: the package, its locks (filelock) and the embed job must still import and lock."""
    code = (
        "import sys; sys.modules['fcntl'] = None\n"  # an import of fcntl now raises ImportError, as on Windows
        "import warnings; warnings.simplefilter('ignore')\n"  # filelock says it falls back to a soft lock here
        "import fastinstructor, fastinstructor.corpus, fastinstructor.backends.onnx, fastinstructor.server\n"
        "from fastinstructor.locking import hold\n"
        f"with hold({str(tmp_path / 'x.lock')!r}, what='a test'): print('locked')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "locked", done.stderr[-3000:]


def test_no_module_probes_processes_with_os_kill():
    """``os.kill(pid, 0)`` is not portable and pids are reused: liveness is decided by locks, never by pids."""
    calls = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "kill" and ast.unparse(node.value) == "os":
                calls.append(f"{module}:{node.lineno}")
    assert not calls, calls


def test_files_are_replaced_only_by_write_atomic():
    """One way to replace a file that a reader or a crash may catch half-written: ``locking.write_atomic``. Whole
    folders (an ONNX export, a model shipped to a Ray node) are renamed into place by their builders."""
    folder_renames = {"fastinstructor.export.onnx_export", "fastinstructor.ray.shipping"}
    calls = []
    for module, path in modules().items():
        if module == "fastinstructor.locking" or module in folder_renames:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("replace", "rename")
                and ast.unparse(node.value) == "os"
            ):
                calls.append(f"{module}:{node.lineno}")
    assert not calls, f"{calls}: write through fastinstructor.locking.write_atomic"
