"""Shared fixtures: tiny random GPT-OSS checkpoints on disk (float and MXFP4) and the family handle."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one intra-op thread is faster than two, and far faster when the cores are shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def gpt_oss():
    """The resolved GPT-OSS :class:`nexus.family.Family`."""
    from nexus.family import resolve_family

    return resolve_family(name="gpt_oss")


@pytest.fixture(scope="session")
def gpt_oss_config(gpt_oss):
    """A tiny GPT-OSS config: 3 layers, 8 experts, top-2, hidden 64 (MXFP4-compatible)."""
    cfg = gpt_oss.example_config()
    cfg.num_hidden_layers = 3
    cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    cfg.num_local_experts = 8
    return cfg


def _build(gpt_oss, config, path, mxfp4: bool):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config)
    # Non-trivial expert biases and router so that tests can tell experts apart.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.weight.normal_(0, 0.5)
            layer.mlp.router.bias.normal_(0, 0.1)
            for name in ("gate_up_proj", "down_proj"):
                getattr(layer.mlp.experts, name).normal_(0, 0.1)
                getattr(layer.mlp.experts, f"{name}_bias").normal_(0, 0.05)
    if mxfp4:
        gpt_oss.write_checkpoint(model, path)
    else:
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt_oss_mxfp4_dir(gpt_oss, gpt_oss_config, tmp_path_factory):
    """A tiny GPT-OSS checkpoint in the released MXFP4 on-disk format."""
    return _build(gpt_oss, gpt_oss_config, tmp_path_factory.mktemp("gpt_oss_mxfp4"), mxfp4=True)


@pytest.fixture(scope="session")
def gpt_oss_float_dir(gpt_oss_mxfp4_dir, tmp_path_factory):
    """The same weights as ``gpt_oss_mxfp4_dir`` (already dequantised), saved as a float checkpoint."""
    from nexus.loading import load_model

    model = load_model(gpt_oss_mxfp4_dir, dequantize=True)
    path = tmp_path_factory.mktemp("gpt_oss_float")
    # A dequantised load must be saved without reverting the MXFP4 conversion (families.md §5).
    model.save_pretrained(path, save_original_format=False)
    return path


@pytest.fixture
def gpt_oss_model(gpt_oss_mxfp4_dir):
    """A fresh base model loaded from the MXFP4 checkpoint (fp32, eval mode)."""
    from nexus.loading import load_model

    return load_model(gpt_oss_mxfp4_dir)


@pytest.fixture
def gpt_oss_dequantized_model(gpt_oss_mxfp4_dir):
    """The same base with its experts dequantised to fp32 parameters (``load_model(..., dequantize=True)``)."""
    from nexus.loading import load_model

    return load_model(gpt_oss_mxfp4_dir, dequantize=True)


@pytest.fixture
def dense_model_dir(tmp_path):
    """A tiny dense Llama checkpoint (no MoE blocks)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    # in a directory of its own: outputs of a test go beside it, never into the model
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


@pytest.fixture
def exact_packed_layout(monkeypatch):
    """Packed experts copy their decoded weights into the family's own layout (GPT-OSS's transpose),
    so that results are bit-identical to the dequantised model's (``PackedExperts.exact_layout``)."""
    from nexus.quant.packed_experts import PackedExperts

    monkeypatch.setattr(PackedExperts, "exact_layout", True)


@pytest.fixture(scope="session")
def packed_dir(tmp_path_factory):
    """``(family name, format) -> (Family, checkpoint dir)``: a tiny checkpoint of the family with its
    routed experts stored in ``format`` (``mxfp4``: GPT-OSS's own writer; ``fp8``: block-scaled
    FP8), each written once."""
    from helpers_conformance import build_checkpoint
    from nexus.family import resolve_family

    cache = {}

    def get(name, fmt):
        if (name, fmt) not in cache:
            family = resolve_family(name=name)
            path = tmp_path_factory.mktemp(f"{name}_{fmt}")
            cache[name, fmt] = family, build_checkpoint(family, path, fmt=None if fmt == "mxfp4" else fmt)
        return cache[name, fmt]

    return get
