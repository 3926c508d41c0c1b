"""The machinery the ``train`` stage runs on, apart from the stage itself.

- :mod:`nexus.training.train_config`: ``TrainConfig``, every knob of a training run.
- :mod:`nexus.training.train_step`: the loss of one micro-batch (CE + distillation + router KL).
- :mod:`nexus.training.step_metrics`: the per-step sums averaged into ``metrics.jsonl`` lines.
- :mod:`nexus.training.teachers`: the teachers (the base itself, another model, a teacher cache).
- :mod:`nexus.training.train_state`: resumable checkpoints (adapter, optimizer, scheduler, RNG, data position).
- :mod:`nexus.training.strategies`: the parallelism strategies (replicated DDP, FSDP2, DeepSpeed ZeRO)
  over accelerate; :mod:`~nexus.training.distributed` the accelerator and process group,
  :mod:`~nexus.training.sharding` and :mod:`~nexus.training.zero` the sharded-parameter helpers.

Modules are imported on use (they pull in torch/accelerate); import them directly.
"""
