"""Stage bookkeeping for ``nexus run``: a stage is skipped when its artifact exists and was made
from the same inputs, and a stage made from other inputs is replaced only when the user asked.

Each finished stage writes ``<run>/stages/<name>.json`` holding a hash of its inputs (its
arguments with every path resolved, the content fingerprints of the data it reads, plus the
hashes of the stages it consumed) and the inputs themselves. A stage that starts writes
``<name>.started.json`` with the same, so that a stage interrupted part-way continues its own
checkpoints only when its inputs are unchanged.

Before any stage runs, every stage is planned (:meth:`StageRunner.plan`): up to date (skipped),
interrupted with the same inputs (resumed), new (run), or holding what another set of inputs made
(a finished or started stamp with another hash, or an artifact no stamp accounts for). The last
is refused before anything runs, naming what differs, unless the run was given ``overwrite`` (or
``force``, which reruns every stage): a rerun never deletes what the user did not ask it to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nexus import __version__
from nexus.errors import NexusError
from nexus.io import write_json

log = logging.getLogger(__name__)

MAX_DIFFERENCES = 4  # named in a refusal; the rest are counted


def inputs_hash(inputs: dict) -> str:
    """A stable 16-hex hash of a JSON-serialisable dict."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    """One stage of a run.

    :param name: the stage's name (its stamps are ``stages/<name>.json``).
    :param inputs: the stage's own arguments (JSON-serialisable; paths resolved).
    :param artifact: the file or directory the stage produces.
    :param fn: does the work, called as ``fn(resume, replace)``: ``resume`` True when an earlier,
        unfinished attempt had the same inputs (only for ``resumable`` stages), ``replace`` True
        when what an earlier attempt left may be deleted (the user passed ``overwrite``/``force``).
    :param after: names of earlier stages whose outputs this one consumes.
    :param resumable: whether the stage checkpoints as it goes and can continue.
    """

    name: str
    inputs: dict
    artifact: Path
    fn: Callable[[bool, bool], object]
    after: tuple[str, ...] = ()
    resumable: bool = False


class StageRunner:
    """Plans and runs stages in order, skipping those whose recorded input hash matches.

    :param run_dir: the run's output directory; stamps go to ``run_dir/stages/``.
    :param force: run every stage even when it could be skipped (replacing what it made before).
    :param overwrite: replace stages made from other inputs instead of refusing the run.
    """

    def __init__(self, run_dir: str | Path, force: bool = False, overwrite: bool = False):
        self.run_dir = Path(run_dir)
        self.force = force
        self.overwrite = overwrite
        self.hashes: dict[str, str] = {}
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.current: str | None = None  # the stage running now

    def _stamp(self, name: str, suffix: str = "") -> Path:
        return self.run_dir / "stages" / f"{name}{suffix}.json"

    def _read(self, name: str, suffix: str = "") -> dict | None:
        stamp = self._stamp(name, suffix)
        if not stamp.exists():
            return None
        try:
            record = json.loads(stamp.read_text())
            return record if isinstance(record, dict) else {}
        except (OSError, ValueError):
            log.warning("unreadable stage stamp %s: treated as made from other inputs", stamp)
            return {}

    def _full(self, stage: Stage) -> dict:
        return {"stage": stage.name, "inputs": stage.inputs, "upstream": {u: self.hashes[u] for u in stage.after}}

    def _decide(self, stage: Stage) -> tuple[dict, str, str, str | None]:
        """``(full inputs, hash, action, why)``. Actions: ``skip``; ``resume`` (an unfinished attempt
        with these inputs); ``run`` (nothing there yet); ``redo`` (what an unfinished attempt with
        these inputs left); ``replace`` or ``refuse`` (what other inputs made: ``why`` says what
        differs)."""
        full = self._full(stage)
        h = inputs_hash(full)
        self.hashes[stage.name] = h
        finished, started = self._read(stage.name), self._read(stage.name, ".started")
        exists = Path(stage.artifact).exists()
        if self.force:
            made = exists or finished is not None or started is not None
            return full, h, "replace" if made else "run", "--force" if made else None
        if exists and finished is not None and finished.get("hash") == h:
            return full, h, "skip", None
        if started is not None and started.get("hash") == h:  # the user already let these inputs start here
            return full, h, "resume" if stage.resumable else "redo", None
        stale = [r for r in (finished, started) if r is not None and r.get("hash") != h]
        if not stale and not exists:
            return full, h, "run", None
        why = _differences(stale[0].get("inputs"), full) if stale else (
            f"{stage.artifact} exists but no stamp in {self.run_dir / 'stages'} records how it was made")
        return full, h, "replace" if self.overwrite else "refuse", why

    def _refusal(self, stage: Stage, why: str) -> NexusError:
        return NexusError(f"{self.run_dir}: stage {stage.name} was made from other inputs ({why}); rerunning it "
                          f"would replace {stage.artifact} and the stages after it. Pass --overwrite to replace "
                          "them, or choose another --output")

    def plan(self, stages: list[Stage]) -> dict[str, str]:
        """Decide every stage before any runs; ``{name: action}``.

        :raises NexusError: a stage holds what other inputs made and neither ``overwrite`` nor
            ``force`` was given (naming the first such stage and what differs).
        """
        actions = {}
        for stage in stages:
            _, _, action, why = self._decide(stage)
            if action == "refuse":
                raise self._refusal(stage, why)
            actions[stage.name] = action
        self.hashes.clear()
        return actions

    def run_all(self, stages: list[Stage]) -> None:
        """:meth:`plan` every stage, then :meth:`run` them in order."""
        self.plan(stages)
        for stage in stages:
            self.run(stage)

    def run(self, stage: Stage):
        """Run ``stage`` unless its artifact exists and was made from the same inputs.

        :return: the stage's result, or None when skipped.
        :raises NexusError: the stage holds what other inputs made, and the run may not replace it.
        """
        full, h, action, why = self._decide(stage)
        if action == "skip":
            log.info("stage %s: up to date (%s), skipped", stage.name, stage.artifact)
            self.skipped.append(stage.name)
            return None
        if action == "refuse":
            raise self._refusal(stage, why)
        if action == "replace":
            log.warning("stage %s: replacing %s (%s)", stage.name, stage.artifact, why)
        log.info("stage %s: %s -> %s", stage.name, "resuming" if action == "resume" else "running", stage.artifact)
        write_json(self._stamp(stage.name, ".started"), {"stage": stage.name, "hash": h, "inputs": full})
        t0 = time.time()
        self.current = stage.name
        result = stage.fn(action == "resume", action in ("redo", "replace"))
        self.current = None
        write_json(self._stamp(stage.name), {"stage": stage.name, "hash": h, "inputs": full,
                                             "seconds": round(time.time() - t0, 2), "nexus_version": __version__})
        self.ran.append(stage.name)
        return result


def _differences(recorded: dict | None, current: dict) -> str:
    """What differs between a stamp's recorded inputs and the current ones, e.g.
    ``lr 0.001 -> 0.01, data_fingerprint 1a2b.. -> 3c4d..``."""
    if not isinstance(recorded, dict):
        return "its stamp does not record its inputs"
    old, new = _flatten(recorded.get("inputs", {})), _flatten(current["inputs"])
    changed = [f"{k} {old.get(k, '(none)')} -> {new.get(k, '(none)')}" for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)]
    upstream = sorted(u for u, h in current["upstream"].items() if recorded.get("upstream", {}).get(u) != h)
    if upstream:
        changed.append(f"the inputs of stage {', '.join(upstream)}")
    if not changed:
        return "its stamp records other inputs"
    more = len(changed) - MAX_DIFFERENCES
    return ", ".join(changed[:MAX_DIFFERENCES]) + (f" and {more} more" if more > 0 else "")


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (values as JSON, so that 1 and "1" differ)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, default=str)
    return out
