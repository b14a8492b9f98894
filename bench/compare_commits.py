"""The cpu backend's ``encode`` time at two commits of this repository, in fresh processes taking turns: what a
change gained on this machine, measured the same way before and after it.

Each commit is checked out into a worktree of its own under ``--work`` (``git worktree add --detach``), with (for a
commit from before they moved into the package) its top-level ``kernels/`` and ``export/`` linked in as its install
mapped them, and its native ops built there by CMake as ``setup.py`` builds them; ``AFTER`` left out (or ``.``) is
this checkout as it is, uncommitted changes included, with the library it was installed with. Each round runs one
process per commit and precision, the commits in turn; a process loads the model, encodes each workload once to warm
up, then ``--passes`` times, and reports the median. The table gives each commit's median over the rounds and the
ratio before / after (> 1: faster after). On these shared machines a figure from one run says little against one
from another hour; a ratio taken this way, in one run, is what to quote.

    .venv/bin/python bench/compare_commits.py BEFORE [AFTER] [--precisions int8,bfloat16]
        [--workloads evidence:256,mixed:128] [--rounds 4] [--passes 3] [--name compare-commits]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import DEFAULT_MODEL, DEFAULT_OUT, ROOT, command, ensure_model, machine, write_results


def _child(args: argparse.Namespace) -> dict:
    """One process: one commit's package (first on ``PYTHONPATH``), one precision, every workload."""
    import fastinstructor
    from fastinstructor import native
    from fastinstructor.benchmark import load_workload

    model = fastinstructor.load(args.model, backend="cpu", precision=args.precision)
    figures = {"package": str(Path(fastinstructor.__file__).parent), "native": native.availability()[1]}
    for workload, texts in _workloads(args.workloads):
        pairs = load_workload(workload, texts, model.tokenizer).pairs
        model.encode(pairs)
        times = []
        for _ in range(args.passes):
            start = time.perf_counter()
            model.encode(pairs)
            times.append(time.perf_counter() - start)
        figures[workload] = statistics.median(times)
    return figures


def _workloads(spec: str) -> list[tuple[str, int]]:
    pairs = [item.rsplit(":", 1) for item in spec.split(",")]
    return [(name, int(texts)) for name, texts in pairs]


def _checkout(rev: str, work: Path) -> tuple[str, Path]:
    """``(commit, folder)``: ``rev`` in a worktree of its own with its native library built (``.``: this checkout)."""
    if rev == ".":
        return "this checkout", ROOT
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True
    )
    if commit.returncode != 0:
        sys.exit(f"compare_commits: {rev!r} is not a commit of this repository ({commit.stderr.strip()})")
    sha = commit.stdout.strip()
    folder = work / sha[:12]
    if not folder.is_dir():
        print(f"checking out {rev} ({sha[:12]}) into {folder}", file=sys.stderr, flush=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), sha], check=True,
                       capture_output=True)  # fmt: skip
        for name in ("kernels", "export"):  # a commit from before they moved into the package: as setup mapped them
            if (folder / name).is_dir() and not (folder / "fastinstructor" / name).exists():
                (folder / "fastinstructor" / name).symlink_to(Path("..") / name)
        _build_native(folder)
        # The processes import the package from a folder that holds nothing else: on the worktree's root, such a
        # commit's top-level kernels/ would shadow the Hugging Face `kernels` package that transformers imports.
        (folder / "build" / "path").mkdir(parents=True, exist_ok=True)
        (folder / "build" / "path" / "fastinstructor").symlink_to(folder / "fastinstructor")
    return sha[:12], folder


def _build_native(folder: Path) -> None:
    """The commit's native library beside its package, built as the install builds it (``setup.build_native``), or
    none where that fails: the commit then runs the PyTorch fallback, and the report says so."""
    import importlib.machinery
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastinstructor_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # setup() itself runs only as __main__
    output = folder / "fastinstructor" / f"_native{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    try:
        setup.build_native(folder, output, folder / "build" / "native")
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"{folder.name}: native ops not built ({err}); it runs the PyTorch fallback", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="the commit before the change (any git revision)")
    parser.add_argument("after", nargs="?", default=".", help="the commit after it (default: this checkout, as is)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--precisions", default="int8,bfloat16")
    parser.add_argument("--workloads", default="evidence:256,mixed:128", help="workload:texts, comma-separated")
    parser.add_argument("--rounds", type=int, default=4, help="processes per commit and precision (medians)")
    parser.add_argument("--passes", type=int, default=3, help="timed encodes of each workload per process")
    parser.add_argument("--work", type=Path, default=ROOT / ".worktrees", help="where the worktrees go")
    parser.add_argument("--name", default="compare-commits", help="result file stem")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    ensure_model(args.model)
    workloads = [name for name, _ in _workloads(args.workloads)]
    commits = [_checkout(rev, args.work) for rev in (args.before, args.after)]
    precisions = args.precisions.split(",")
    runs = {(commit, precision): [] for commit, _ in commits for precision in precisions}
    child = [sys.executable, __file__, args.before, "--child", "--model", str(args.model), "--workloads",
             args.workloads, "--passes", str(args.passes)]  # fmt: skip
    for round_ in range(args.rounds):
        for precision in precisions:
            for commit, folder in commits:
                path = folder if folder == ROOT else folder / "build" / "path"
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}
                argv = [*child, "--precision", precision]
                done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
                if done.returncode != 0:
                    sys.exit(f"{commit} {precision}: the measuring process failed:\n{done.stderr[-3000:]}")
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                if Path(figures["package"]).resolve() != (folder / "fastinstructor").resolve():
                    sys.exit(f"{commit}: the process imported {figures['package']}, not {folder}'s package")
                runs[commit, precision].append(figures)
                print(f"round {round_ + 1}/{args.rounds} {commit} {precision}: {figures}", file=sys.stderr)

    from fastinstructor.benchmark import markdown_table, record

    (before, _), (after, _) = commits
    rows = []
    for precision in precisions:
        for workload in workloads:
            first, second = (statistics.median(r[workload] for r in runs[c, precision]) for c in (before, after))
            rows.append({"precision": precision, "workload": workload, "before_s": first, "after_s": second,
                         "ratio": first / second})  # fmt: skip
    natives = {c: runs[c, p][0]["native"] for c, p in runs}
    result = record(command("compare_commits.py"), model=args.model.name, before=before, after=after, rows=rows,
                    native=natives)  # fmt: skip
    table = markdown_table(
        ["precision", "workload", f"{before} s", f"{after} s", "before / after"],
        [[r["precision"], r["workload"], f"{r['before_s']:.3f}", f"{r['after_s']:.3f}", f"{r['ratio']:.2f}x"]
         for r in rows],
    )  # fmt: skip
    markdown = (
        f"Model {args.model.name}, the cpu backend, `encode` of each workload ({args.workloads}; texts per workload "
        f"after the colon). Medians of {args.rounds} fresh processes per commit and precision, the commits taking "
        f"turns, each process the median of {args.passes} passes after a warm-up pass. Native ops: "
        + "; ".join(f"{c}: {n}" for c, n in natives.items())
        + f".\n\n{table}\n\n{machine(result)}\n"
    )
    write_results(args.out, args.name, result, f"encode before and after: {before} against {after}", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
