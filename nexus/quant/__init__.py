"""Quantized expert formats: decoders (MXFP4, block-scaled FP8) and frozen experts kept packed in them.

- :mod:`nexus.quant.mxfp4` and :mod:`nexus.quant.fp8`: decode (and encode) the on-disk formats.
- :mod:`nexus.quant.packed_experts`: ``PackedExperts``, expert matrices held as stored and decoded per step.
- :mod:`nexus.quant.packed_loading`: loading a model whose quantized experts stay packed.
- :mod:`nexus.quant.fp8_checkpoint`: writing a block-scaled FP8 checkpoint (tests, benchmarks).
"""
