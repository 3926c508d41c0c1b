"""NEXUS where LoRA users work: a PEFT-style wrapper, distillation for transformers' ``Trainer`` and TRL.

- :func:`get_nexus_model`, :class:`NexusConfig`, :class:`NexusModel` (``nexus.trainers.model``)
- :class:`NexusDistillationMixin`, :class:`NexusKDTrainer`, :func:`nexus_kd_loss` (``nexus.trainers.kd``)
- :class:`NexusKDSFTTrainer` (``nexus.trainers.sft``, needs ``trl``)
"""

from nexus.trainers.config import NexusConfig
from nexus.trainers.kd import NexusDistillationMixin, NexusKDTrainer, nexus_kd_loss
from nexus.trainers.model import NexusModel, get_nexus_model

__all__ = ["NexusConfig", "NexusModel", "get_nexus_model", "NexusDistillationMixin", "NexusKDTrainer", "nexus_kd_loss"]
