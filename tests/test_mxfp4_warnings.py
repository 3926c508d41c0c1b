"""Loading an MXFP4 checkpoint through transformers (dequantised on purpose) prints none of its
"install triton / kernels, we will dequantize" warnings; other warnings of the quantizer pass."""

from __future__ import annotations

import logging


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_dequantised_load_prints_no_triton_or_kernels_warning(gpt_oss_mxfp4_dir):
    from transformers.utils import logging as hf_logging

    from nexus.loading import load_model

    hf_logging.warning_once.cache_clear()  # transformers warns once per process: make this the first time
    logger = logging.getLogger("transformers.quantizers.quantizer_mxfp4")
    handler = _Records()
    logger.addHandler(handler)
    try:
        load_model(gpt_oss_mxfp4_dir, dequantize=True)
        logger.warning("another quantizer warning")
    finally:
        logger.removeHandler(handler)
    assert handler.messages == ["another quantizer warning"]
