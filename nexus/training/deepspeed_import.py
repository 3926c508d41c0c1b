"""DeepSpeed quiet on a machine without an accelerator, from its first import on, whoever imports it.

accelerate and transformers import DeepSpeed lazily whenever it is installed (``save_pretrained``
unwrapping a model, ``Accelerator.prepare``), and DeepSpeed's import prints "Setting accelerator
to CPU" to stdout when it finds no GPU, which corrupts machine-readable output (``--json``). This
module imports neither torch nor DeepSpeed: :func:`install` (called by ``import nexus``) adds an
import hook that runs :func:`nexus.training.distributed.quiet_deepspeed_on_cpu` just before
DeepSpeed's first import, then removes itself.
"""

from __future__ import annotations

import importlib.abc
import sys


class _BeforeDeepSpeed(importlib.abc.MetaPathFinder):
    """Finds nothing; sees the first ``import deepspeed`` go by and sets the environment first."""

    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed" and self in sys.meta_path:
            sys.meta_path.remove(self)
            from nexus.training.distributed import quiet_deepspeed_on_cpu

            quiet_deepspeed_on_cpu()
        return None


def install() -> None:
    """Run :func:`~nexus.training.distributed.quiet_deepspeed_on_cpu` before DeepSpeed is first
    imported (a no-op when it already is, or the hook is in place)."""
    if "deepspeed" not in sys.modules and not any(isinstance(f, _BeforeDeepSpeed) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeDeepSpeed())
