"""SFA, Sequential Fine-tuning with Averaging (arXiv 2501.05559): periodic averaging of the
trainable weights with an earlier checkpoint.

Every ``interval`` optimizer steps the trainable parameters are pulled toward an *anchor*::

    theta <- (1 - beta) * theta + beta * anchor

- ``anchor="start"`` (the paper's rule, the default): the anchor is the adapter training started
  from, fixed for the whole run. Repeated merges act like an L2 pull toward the starting point,
  the paper's link to L2 regularisation, which is what limits forgetting.
- ``anchor="previous"``: the anchor becomes the merged weights after every merge, so each merge
  averages with the weights of ``interval`` steps earlier (a smoothing of the trajectory).

The optimizer state is left as it is.

Under data parallelism every process holds the same parameters, so every process computes the
same merge; under FSDP2 each process merges its own shards with the anchor's matching shards,
which is the same merge cut into pieces; under DeepSpeed ZeRO-1/2 the merge is computed on the
whole fp32 master copy and written back to DeepSpeed's partitions and the module. Parameters are addressed by the *unwrapped* model's
``named_parameters`` names, so a DDP wrapper's ``module.`` prefix never enters the snapshot or
checkpoints, and checkpoints hold whole tensors whatever the sharding.
"""

from __future__ import annotations

import torch
from torch import nn

from nexus.training.sharding import gather_full, shard_like
from nexus.training.zero import is_zero_param, read_full, write_full

ANCHORS = ("start", "previous")


class SFA:
    """Stateful periodic averager over ``named`` parameters.

    :param named: ``name -> parameter`` (the unwrapped model's trainable parameters).
    :param interval: merge every ``interval`` steps; ``0`` disables.
    :param beta: weight of the anchor in a merge, in ``[0, 1]``.
    :param anchor: ``"start"`` (fixed starting weights) or ``"previous"`` (the last merge).
    """

    def __init__(self, named: dict[str, nn.Parameter], interval: int, beta: float, anchor: str = "start"):
        if not 0.0 <= beta <= 1.0:
            from nexus.errors import NexusError

            raise NexusError(f"--sfa-beta must be in [0, 1], got {beta}")
        if anchor not in ANCHORS:
            from nexus.errors import NexusError

            raise NexusError(f"--sfa-anchor must be one of {', '.join(ANCHORS)}, got {anchor!r}")
        self.anchor = anchor
        self.params = dict(named)
        self.interval = int(interval)
        self.beta = float(beta)
        self.merges = 0
        self.merge_steps: list[int] = []
        self.snapshot = {n: read_full(p).clone() for n, p in self.params.items()} if self.enabled else {}

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def maybe_merge(self, step: int) -> bool:
        """Merge when ``step`` (optimizer steps done) is a multiple of the interval.

        :return: whether a merge happened.
        """
        if not self.enabled or step % self.interval != 0:
            return False
        self.merge()
        self.merge_steps.append(step)
        return True

    @torch.no_grad()
    def merge(self) -> None:
        """``theta <- (1-beta) theta + beta anchor``; with ``anchor="previous"`` the anchor becomes ``theta``."""
        for name, p in self.params.items():
            snap = self.snapshot[name]
            current = read_full(p)  # the parameter itself, except under ZeRO (a gathered master copy)
            current.mul_(1.0 - self.beta).add_(snap.to(current.dtype), alpha=self.beta)
            if is_zero_param(p):
                write_full(p, current)
            if self.anchor == "previous":
                snap.copy_(current)
        self.merges += 1

    def state_dict(self) -> dict:
        """The snapshot as whole CPU tensors and the merge counters (for checkpoints). Sharded
        snapshots are gathered: under FSDP2 every process must call it."""
        return {"snapshot": gather_full(self.snapshot), "merges": self.merges, "merge_steps": list(self.merge_steps)}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.merges = int(state["merges"])
        self.merge_steps = list(state.get("merge_steps", []))
        saved = state.get("snapshot", {})
        for name, snap in self.snapshot.items():
            if name in saved:  # a run that had SFA off has no snapshot: keep the current weights
                snap.copy_(shard_like(saved[name], snap))
