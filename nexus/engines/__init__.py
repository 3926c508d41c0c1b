"""The pipeline stages, one module each, each a plain function ``stage(config, ...)`` over a resolved family.

- :mod:`nexus.engines.collect`: ``collect``, streaming moments of router probabilities
  (the artifact: :mod:`nexus.router_stats`).
- :mod:`nexus.engines.select`: ``select``, PCA importance + diversity -> K experts per layer.
- :mod:`nexus.engines.convert`: ``convert``, shared experts initialised from routed experts,
  read one expert at a time from the checkpoint on disk.
- :mod:`nexus.engines.precompute`: ``precompute``, teacher top-k log-probs in Parquet shards
  (the artifact: :mod:`nexus.teacher_cache`).
- :mod:`nexus.engines.train`: ``train``, CE + distillation into the shared experts, on the
  machinery of :mod:`nexus.training`; :mod:`nexus.engines.average`: SFA, applied inside ``train``.
- :mod:`nexus.engines.evaluate`: ``evaluate`` and ``generate``; :mod:`nexus.engines.plots`: ``plot``.
- :mod:`nexus.engines.export`: ``export``, an adapter folded into a stock checkpoint
  (``export_folds``, ``export_files``, ``export_remote``, ``export_check`` its parts).
- :mod:`nexus.engines.run`: ``run``, the stages chained in one directory
  (:mod:`~nexus.engines.run_stages` skips a stage whose artifact matches its inputs).

Only the CLI and other stages import these modules; the core never does. Modules are imported on
use (they pull in torch/transformers); import them directly.
"""
