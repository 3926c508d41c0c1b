"""Shared plumbing of the benchmark scripts: arguments, child processes for peak memory, results JSON.

Every benchmark measures NEXUS and its baseline in the same run, prints the ratios, and writes
``benchmarks/results/<name>-<timestamp>.json`` (machine, versions, commit, arguments, figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes (``--quick``, ``--results-dir``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="Small sizes: seconds instead of minutes.")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="Where the results JSON goes.")
    return p


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    ``VmHWM`` from ``/proc/self/status`` where there is one: ``ru_maxrss`` survives ``execve``,
    so a child started by a big parent would report the parent's peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def thread_env(threads: int) -> dict:
    """Environment variables that hold OpenMP/BLAS pools (numpy, sklearn, torch) to ``threads``."""
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def run_child(code: str, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run ``code`` in a fresh Python process and return the JSON object it prints on its last
    stdout line. A fresh process makes its peak RSS (:func:`peak_rss_mb`) that measurement's alone.

    :raises RuntimeError: the child failed (its stderr tail is in the message).
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """Where the figures were measured."""
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        commit = ""
    try:
        import nexus

        version = nexus.__version__
    except ImportError:
        version = ""
    mem = None
    if Path("/proc/meminfo").exists():
        line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        mem = round(int(line.split()[1]) / 2**20, 1)
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "nexus": version,
        "commit": commit,
    }


def write_results(name: str, payload: dict, results_dir: Path = RESULTS) -> Path:
    """Write ``payload`` (plus machine info and a timestamp) to ``<results_dir>/<name>-<timestamp>.json``
    atomically; return the path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}-{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": name, "timestamp": stamp, "machine": machine(), **payload}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, inf when the denominator is 0."""
    return numerator / denominator if denominator else float("inf")


def print_ratio(label: str, baseline: float, nexus: float, unit: str, higher_is_better: bool = False) -> float:
    """Print ``label: baseline vs NEXUS (ratio)`` and return the ratio, oriented so that above 1
    means NEXUS is better: baseline / NEXUS for costs (memory, time), NEXUS / baseline for rates."""
    r = ratio(nexus, baseline) if higher_is_better else ratio(baseline, nexus)
    print(f"{label:<46} baseline {baseline:>10.1f} {unit:<5} NEXUS {nexus:>10.1f} {unit:<5} ratio {r:>7.2f}x")
    return r


def best_time(fn, repeat: int = 3) -> float:
    """The fastest of ``repeat`` calls of ``fn()``, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
