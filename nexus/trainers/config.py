"""``NexusConfig``: what :func:`nexus.trainers.get_nexus_model` builds, in PEFT's ``LoraConfig`` habit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nexus.constants import DEFAULT_GATE_MODE, GATE_MODES, INIT_STRATEGIES
from nexus.errors import NexusError


@dataclass
class NexusConfig:
    """How to attach and initialise the shared experts of a wrapped model.

    Attributes:
        selection: an ``expert_selection.json`` (``nexus select``); needed by ``pca`` and ``top1``.
        init_strategy: ``pca``, ``random``, ``top1``, ``mean_all`` or ``zeros`` (as ``nexus convert``);
            default ``pca`` with a selection, else ``zeros`` (the shared expert outputs 0 at step 0).
            Every strategy but ``zeros`` reads the routed experts from the base's checkpoint directory.
        shared_intermediate_size: width of each shared expert; default the routed expert width.
        gate_mode: one of :data:`nexus.constants.GATE_MODES` (default that of ``nexus convert``).
        train_routers: train the routers too (stored in the adapter, restored by ``disable_adapter``).
        weighted: ``pca`` only: weight the averaged experts by importance.
        seed: for ``random`` and the default initialisation of units not copied from experts.
        family: the family name; default resolved from ``config.model_type``.
        experts_on: ``device`` (default), or ``host``: the packed routed experts (MXFP4, FP8) stay in
            host memory, streamed to the compute device one MoE layer at a time
            (:mod:`nexus.quant.streaming`; as ``load_model(..., experts_on="host")``).
        embeddings_on: ``device`` (default), or ``host``: the input embedding table stays in host
            memory, the lookup there, only the looked-up rows sent to the compute device
            (:mod:`nexus.host_embedding`; as ``load_model(..., embeddings_on="host")``).
    """

    selection: str | None = None
    init_strategy: str | None = None
    shared_intermediate_size: int | None = None
    gate_mode: str = DEFAULT_GATE_MODE
    train_routers: bool = False
    weighted: bool = False
    seed: int = 0
    family: str | None = None
    experts_on: str = "device"
    embeddings_on: str = "device"

    # Read by transformers' Trainer and TRL on ``model.peft_config[name]``.
    is_prompt_learning = False
    peft_type = "NEXUS"

    def __post_init__(self):
        if self.init_strategy is None:
            self.init_strategy = "pca" if self.selection else "zeros"
        if self.init_strategy not in INIT_STRATEGIES:
            raise NexusError(f"NexusConfig: unknown init_strategy {self.init_strategy!r}; "
                             f"choose one of {', '.join(INIT_STRATEGIES)}")
        if self.gate_mode not in GATE_MODES:
            raise NexusError(f"NexusConfig: unknown gate_mode {self.gate_mode!r}; "
                             f"choose one of {', '.join(GATE_MODES)}")
        from nexus.quant.streaming import check_experts_on

        check_experts_on(self.experts_on, "NexusConfig: experts_on")
        from nexus.host_embedding import check_embeddings_on

        check_embeddings_on(self.embeddings_on, "NexusConfig: embeddings_on")
        if self.shared_intermediate_size is not None and self.shared_intermediate_size < 1:
            raise NexusError(f"NexusConfig: shared_intermediate_size must be positive, "
                             f"got {self.shared_intermediate_size}")

    def to_dict(self) -> dict:
        """The fields as a JSON-serialisable dict (recorded in the adapter's ``args``)."""
        return dataclasses.asdict(self)
