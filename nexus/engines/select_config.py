"""The arguments of ``nexus select``, apart from the engine so that the CLI builds without torch."""

from __future__ import annotations

from dataclasses import dataclass

from nexus.config_fields import option as _f
from nexus.constants import DEFAULT_DIVERSITY, DEFAULT_TOP_K


@dataclass
class SelectConfig:
    """Arguments of ``nexus select``; each field's help is also the CLI's."""

    stats: str = _f(None, "Directory (or .safetensors file) written by `nexus collect`.", required=True, path=True)
    output: str | None = _f(None, "Selection file (.json) or directory for expert_selection.json (default: beside "
                                  "the stats).", short="-o", path=True)
    top_k: int | None = _f(None, f"Experts per layer (default: ceil(E/4), at most {DEFAULT_TOP_K}); more than E is "
                                 "an error.", min=1)
    diversity: float = _f(DEFAULT_DIVERSITY, "Weight of the redundancy penalty in the greedy pick (0: pure "
                                             "importance).", min=0.0, metavar="LAMBDA")
    plots: bool = _f(True, "Also write <output>_importance.png (heatmap) and <output>_variance.png.",
                     off_flag="--no-plots")
