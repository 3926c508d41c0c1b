"""Stage bookkeeping for ``nexus run``: a stage is skipped when its artifact exists and was made
from the same inputs.

Each finished stage writes ``<run>/stages/<name>.json`` holding a hash of its inputs (its
arguments, the content fingerprints of the data it reads, plus the hashes of the stages it
consumed). A rerun recomputes the hash; if it matches and the artifact is still there, the stage
is skipped, otherwise it runs again (and every stage after it, since their input hashes change
too). A stage that starts writes ``<name>.started.json`` with the same hash, so that a stage
interrupted part-way continues its own checkpoints only when its inputs are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

from nexus import __version__
from nexus.io import write_json

log = logging.getLogger(__name__)


def inputs_hash(inputs: dict) -> str:
    """A stable 16-hex hash of a JSON-serialisable dict."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageRunner:
    """Runs stages in order, skipping those whose recorded input hash matches.

    :param run_dir: the run's output directory; stamps go to ``run_dir/stages/``.
    :param force: run every stage even when it could be skipped.
    """

    def __init__(self, run_dir: str | Path, force: bool = False):
        self.run_dir = Path(run_dir)
        self.force = force
        self.hashes: dict[str, str] = {}
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.current: str | None = None  # the stage running now

    def _stamp(self, name: str, suffix: str = "") -> Path:
        return self.run_dir / "stages" / f"{name}{suffix}.json"

    def _recorded(self, name: str, suffix: str = "") -> str | None:
        stamp = self._stamp(name, suffix)
        try:
            return json.loads(stamp.read_text()).get("hash") if stamp.exists() else None
        except (OSError, ValueError, AttributeError):
            log.warning("ignoring unreadable stage stamp %s", stamp)
            return None

    def run(self, name: str, inputs: dict, artifact: Path, fn: Callable[..., object], after: tuple[str, ...] = (),
            resumable: bool = False):
        """Run stage ``name`` unless ``artifact`` exists and was made from the same ``inputs``.

        :param inputs: the stage's own arguments (JSON-serialisable).
        :param artifact: the file or directory the stage produces.
        :param fn: does the work; with ``resumable`` it is called as ``fn(resume)``, ``resume`` True
            when an earlier, unfinished attempt of this stage had the same inputs (so its partial
            state may be continued) and False when any partial state must be discarded.
        :param after: names of earlier stages whose outputs this one consumes.
        :return: ``fn``'s result, or None when skipped.
        """
        full = {"stage": name, "inputs": inputs, "upstream": {u: self.hashes[u] for u in after}}
        h = inputs_hash(full)
        self.hashes[name] = h
        stamp = self._stamp(name)
        if not self.force and Path(artifact).exists() and self._recorded(name) == h:
            log.info("stage %s: up to date (%s), skipped", name, artifact)
            self.skipped.append(name)
            return None
        resume = not self.force and self._recorded(name, ".started") == h
        log.info("stage %s: %s -> %s", name, "resuming" if resume else "running", artifact)
        write_json(self._stamp(name, ".started"), {"stage": name, "hash": h})
        t0 = time.time()
        self.current = name
        result = fn(resume) if resumable else fn()
        self.current = None
        write_json(stamp, {"stage": name, "hash": h, "inputs": full, "seconds": round(time.time() - t0, 2),
                           "nexus_version": __version__})
        self.ran.append(name)
        return result
