"""Timing and memory: interleaved passes (A B C, A B C, ...) with the load average after each, percentiles, and
the resident memory (Linux ``/proc``) or torch's CUDA peak around a pass."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

__all__ = ["interleaved", "percentile", "rss_mib", "reset_peak_rss", "start_memory", "end_memory"]


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def interleaved(runs: dict[str, Callable[[], object]], repeat: int, log=log_stderr) -> tuple[dict, dict, dict]:
    """Time each run ``repeat`` times as A B C, A B C, ...; return times, load averages and last results.

    The machines are shared: the 1-minute load average after each pass shows when other work took the CPU.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    loadavg: dict[str, list[float]] = {name: [] for name in runs}
    last: dict[str, object] = {}
    for r in range(repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            last[name] = run()
            times[name].append(time.perf_counter() - start)
            loadavg[name].append(os.getloadavg()[0])
            log(f"repeat {r + 1}/{repeat} {name}: {times[name][-1]:.2f} s")
    return times, loadavg, last


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _proc_status_mib(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    """This process's resident set in MiB (Linux; None elsewhere)."""
    return _proc_status_mib("VmRSS")


def reset_peak_rss() -> bool:
    """Linux: set the peak resident set (VmHWM) to the current one, so the next read is this run's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def start_memory(device: str) -> float | None:
    """The memory in use as a pass begins (MiB), its peak reset: CUDA's allocation, else the resident set."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    reset_peak_rss()
    return rss_mib()


def end_memory(device: str, before: float | None, tracks_peak: bool) -> float | None:
    """The peak above the memory in use when the pass began (MiB): working memory of one pass."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20 - before
    peak = _proc_status_mib("VmHWM")
    return peak - before if tracks_peak and peak is not None and before is not None else None
