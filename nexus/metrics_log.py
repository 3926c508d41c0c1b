"""``metrics.jsonl``: the per-step training records a run appends and ``plot`` reads back."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from nexus.constants import METRICS_NAME
from nexus.errors import NexusError

log = logging.getLogger(__name__)


class MetricsLog:
    """``run/metrics.jsonl``: one JSON object per logging step, appended and flushed.

    On resume, lines after the checkpoint's step are dropped, so the file reads as one run.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_NAME
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [json.dumps(r) for r in _parse_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of ``run/metrics.jsonl``."""
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        raise NexusError(f"{run_dir} has no {METRICS_NAME}; is it a nexus train run directory?")
    return _parse_metrics(path)


def _parse_metrics(path: Path) -> list[dict]:
    """The JSON objects of a metrics file; a line that does not parse (the last one, when a run was
    killed mid-write) is skipped with a warning naming the file and line."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            log.warning("%s line %d is not a JSON object (truncated by a killed run?); skipping it", path, number)
            continue
        records.append(record)
    return records
