"""The engines: one module per pipeline stage, each a plain function over a resolved family.

- :mod:`nexus.engines.router_stats`: ``collect``, streaming moments of router probabilities.
- :mod:`nexus.engines.select`: ``select``, PCA importance + diversity -> K experts per layer.
- :mod:`nexus.engines.convert`: ``convert``, shared experts initialised from routed experts,
  read one expert at a time from the checkpoint on disk.
- :mod:`nexus.engines.teacher_cache`: ``precompute``, teacher top-k log-probs in Parquet shards.
- :mod:`nexus.engines.train`: ``train``, CE + distillation into the shared experts
  (:mod:`~nexus.engines.train_step` the loss, :mod:`~nexus.engines.teachers` the teachers,
  :mod:`~nexus.engines.checkpointing` checkpoints and metrics, :mod:`~nexus.engines.average` SFA).
- :mod:`nexus.engines.evaluate`: ``evaluate`` and ``generate``; :mod:`nexus.engines.plots`: ``plot``.

Modules are imported on use (they pull in torch/transformers); import them directly.
"""
