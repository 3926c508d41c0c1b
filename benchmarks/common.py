"""Shared plumbing of the benchmark scripts: one set of flags, child processes for peak memory, one results writer.

Every benchmark measures NEXUS and its baseline in the same run, prints the ratios, and writes
``<results-dir>/<name>-<timestamp>.json``: the environment (machine, versions, commit), the
arguments it ran with, and its figures. Every script takes ``--quick``, ``--results-dir`` and
``--threads`` (:func:`bench_parser`), and checks its flags before the run starts
(:func:`parse_bench_args`).
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


def bench_parser(description: str, threads: int | None = 1, threads_help: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes.

    ``--quick`` (small sizes: a smoke run), ``--results-dir`` (where the results
    go, default ``benchmarks/results``) and ``--threads`` (torch/BLAS threads per measuring
    process, default ``threads``; ``None`` lets the script choose). Parse with
    :func:`parse_bench_args`, which checks them before the run starts.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="Small sizes: a smoke run, not the measurement.")
    p.add_argument("--results-dir", type=Path, default=RESULTS, metavar="DIR",
                   help="Folder the results go to (created if missing; default benchmarks/results).")
    p.add_argument("--threads", type=int, default=threads, metavar="N",
                   help=threads_help or f"Torch/BLAS threads per measuring process (default {threads}: stable "
                                        "timings on a shared machine).")
    return p


def parse_bench_args(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) and check the common flags before anything runs.

    ``--results-dir`` must be a folder that exists or can be created, and writable; ``--threads``
    at least 1. A bad flag ends the process with argparse's usage line and a one-line message
    (exit status 2), never a traceback after a long run.
    """
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: give 1 or more threads")
    results_dir = Path(args.results_dir)
    if results_dir.exists() and not results_dir.is_dir():
        p.error(f"--results-dir {results_dir} is a file; give a folder for the results")
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"--results-dir {results_dir}: cannot create it ({exc.strerror}); give a writable folder")
    if not os.access(results_dir, os.W_OK | os.X_OK):
        p.error(f"--results-dir {results_dir} is not writable; give a writable folder")
    return args


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


def rss_mb() -> float:
    """This process's resident set size now (``VmRSS``), in MiB; nan where ``/proc`` is missing."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


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
    """Where the figures were measured: platform, CPUs, memory, versions, the commit (``+dirty`` when the
    work tree has uncommitted changes) and the load average at the time."""
    import torch
    import transformers

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
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
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "nexus": version,
        "commit": commit,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def arguments(args: argparse.Namespace | None) -> dict:
    """``args`` as a JSON-ready dict (paths as strings), for the results document."""
    def ready(v):
        if isinstance(v, Path):
            return str(v)
        return [ready(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {} if args is None else {k: ready(v) for k, v in vars(args).items()}


def results_document(name: str, figures: dict, args: argparse.Namespace | None = None) -> dict:
    """The results document of one run: ``benchmark``, ``timestamp``, ``machine`` (environment,
    versions, commit: :func:`machine`), ``arguments`` (the parsed flags) and ``figures``' keys."""
    doc = {"benchmark": name, "timestamp": time.strftime("%Y%m%d-%H%M%S"), "machine": machine()}
    if args is not None:
        doc["arguments"] = arguments(args)
    return {**doc, **figures}


def write_results(name: str, figures: dict, results_dir: Path = RESULTS,
                  args: argparse.Namespace | None = None) -> Path:
    """Write :func:`results_document` to ``<results_dir>/<name>-<timestamp>.json`` atomically; return the path."""
    from nexus.io import write_json

    doc = results_document(name, figures, args)
    path = Path(results_dir) / f"{name}-{doc['timestamp']}.json"
    write_json(path, doc)
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
