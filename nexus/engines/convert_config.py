"""The arguments of ``nexus convert``, apart from the engine so that the CLI builds without torch."""

from __future__ import annotations

from dataclasses import dataclass

from nexus.config_fields import option as _f
from nexus.constants import DEFAULT_GATE_MODE, DEFAULT_STRATEGY, GATE_MODES, INIT_STRATEGIES


@dataclass
class ConvertConfig:
    """Arguments of ``nexus convert``; each field's help is also the CLI's.

    ``selection`` may also be a loaded ``expert_selection.json`` document (a dict) when called from code.
    """

    model: str | None = _f(None, "Base checkpoint directory (MXFP4 or float; never loaded whole). Default with "
                                 "--family: the demo.", path=True)
    selection: str | None = _f(None, "expert_selection.json from `nexus select` (needed by pca and top1).", path=True)
    output: str = _f(None, "Adapter directory to write.", required=True, short="-o", path=True)
    overwrite: bool = _f(False, "Replace --output if it exists (never when it is, or holds, the model or the "
                                "selection).")
    strategy: str = _f(DEFAULT_STRATEGY, "Which experts initialise each shared expert.", choices=INIT_STRATEGIES)
    gate_mode: str = _f(DEFAULT_GATE_MODE, "none: plain add; scalar: learnable per-layer scale from 0; token: "
                                           "sigmoid(w.x) per token; scalar_token: s*2*sigmoid(w.x), s and w from 0. "
                                           "none and scalar fold into a stock checkpoint (nexus export); the "
                                           "per-token gates need --remote-code. Default none: in the quality "
                                           "benchmark, trained with KD on general text (train --kd-data), it had "
                                           "the lowest domain perplexity of the four at the same forgetting on "
                                           "both bases, and it exports (README, 'Quality on real text').",
                        choices=GATE_MODES)
    shared_intermediate_size: int | None = _f(None, "Width of each shared expert (default: the routed expert "
                                                    "width).")
    weighted: bool = _f(False, "pca: weight the selected experts by importance, or average them uniformly.",
                        off_flag="--uniform")
    seed: int = _f(0, "Seed of random picks and of new units.")
