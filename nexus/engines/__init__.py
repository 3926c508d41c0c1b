"""The engines: one module per pipeline stage, each a plain function over a resolved family.

- :mod:`nexus.engines.router_stats`: ``collect``, streaming moments of router probabilities.
- :mod:`nexus.engines.select`: ``select``, PCA importance + diversity -> K experts per layer.
- :mod:`nexus.engines.convert`: ``convert``, shared experts initialised from routed experts,
  read one expert at a time from the checkpoint on disk.

Modules are imported on use (they pull in torch/transformers); import them directly.
"""
