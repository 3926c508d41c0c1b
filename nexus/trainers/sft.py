"""TRL's ``SFTTrainer`` with NEXUS distillation (needs ``pip install 'nexus-moe[trainers]'``)."""

from __future__ import annotations

from trl import SFTTrainer

from nexus.trainers.kd import NexusDistillationMixin


class NexusKDSFTTrainer(NexusDistillationMixin, SFTTrainer):
    """``SFTTrainer`` whose loss is CE + KD against the same model with the adapter disabled.

    Takes ``kd_weight``, ``ce_weight``, ``temperature`` besides ``SFTTrainer``'s arguments.
    """
