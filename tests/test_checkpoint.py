"""CheckpointReader: lazy, per-expert reads from single-file and sharded safetensors checkpoints."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from nexus.checkpoint import INDEX_FILE, CheckpointReader
from nexus.errors import NexusError
from nexus.loading import load_model


class _SpyHandle:
    """Wraps a ``safe_open`` handle and records every tensor and slice read through it."""

    def __init__(self, handle, log):
        self._handle, self._log = handle, log

    def get_tensor(self, name):
        self._log.append(("tensor", name, None))
        return self._handle.get_tensor(name)

    def get_slice(self, name):
        inner, log = self._handle.get_slice(name), self._log

        class _Slice:
            def get_shape(self):
                return inner.get_shape()

            def __getitem__(self, key):
                log.append(("slice", name, key))
                return inner[key]

        return _Slice()


def _spy(reader: CheckpointReader) -> list:
    log: list = []
    real_open = reader._open
    reader._open = lambda name: _SpyHandle(real_open(name), log)
    return log


def _expert_params(model, layer: int) -> dict[str, torch.Tensor]:
    experts = model.model.layers[layer].mlp.experts
    return {n: p.detach() for n, p in experts.named_parameters()}


@pytest.mark.parametrize("which", ["mxfp4", "float"])
def test_read_experts_in_requested_order_touching_only_their_rows(which, gpt_oss_mxfp4_dir, gpt_oss_float_dir, gpt_oss_dequantized_model):
    path = gpt_oss_mxfp4_dir if which == "mxfp4" else gpt_oss_float_dir
    reader = CheckpointReader(path)
    log = _spy(reader)
    name = "model.layers.1.mlp.experts.down_proj"
    got = reader.read_expert_matrices(name, [3, 1], transposed=True)
    params = _expert_params(gpt_oss_dequantized_model, 1)
    # In memory down_proj is [E, I, H] (x @ W); nn.Linear layout is [k, H, I].
    assert got.shape == (2, 64, 64)
    assert torch.equal(got[0], params["down_proj"][3].t())
    assert torch.equal(got[1], params["down_proj"][1].t())
    assert not torch.equal(got[0], got[1])
    # Nothing read whole; only rows 3 and 1 of each stored tensor, in that order.
    assert all(kind == "slice" for kind, _, _ in log), log
    stored = [f"{name}_blocks", f"{name}_scales"] if which == "mxfp4" else [name]
    assert sorted({n for _, n, _ in log}) == sorted(stored)
    for tensor in stored:
        keys = [key for _, n, key in log if n == tensor]
        assert keys == [slice(3, 4), slice(1, 2)]

    bias = reader.read_rows("model.layers.1.mlp.experts.down_proj_bias", [3, 1])
    assert torch.equal(bias, params["down_proj_bias"][[3, 1]])


def test_reader_metadata(gpt_oss_mxfp4_dir, gpt_oss_float_dir):
    q = CheckpointReader(gpt_oss_mxfp4_dir)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert q.is_mxfp4(name) and q.has(name) and name not in q
    assert q.shape(f"{name}_blocks") == [8, 128, 2, 16]
    assert q.config["quantization_config"]["quant_method"] == "mxfp4"
    f = CheckpointReader(gpt_oss_float_dir)
    assert not f.is_mxfp4(name) and f.has(name) and name in f
    assert f.shape(name) == [8, 64, 128]
    assert not f.has("model.layers.9.mlp.experts.gate_up_proj")
    assert f.read_rows(name, []).shape == (0, 64, 128)


def test_reader_errors_name_the_problem(tmp_path, gpt_oss_float_dir):
    with pytest.raises(NexusError, match="is not a directory"):
        CheckpointReader(tmp_path / "missing")
    with pytest.raises(NexusError, match="no model.safetensors"):
        CheckpointReader(tmp_path)
    reader = CheckpointReader(gpt_oss_float_dir)
    with pytest.raises(NexusError, match="nosuch.weight"):
        reader.read("nosuch.weight")


@pytest.fixture(scope="module")
def sharded_mxfp4_dir(gpt_oss, gpt_oss_float_dir, tmp_path_factory):
    """The fixture model written by the family's MXFP4 writer in ~100 KB shards."""
    model = load_model(gpt_oss_float_dir)
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, max_shard_size="100KB")
    path = tmp_path_factory.mktemp("gpt_oss_sharded")
    gpt_oss.write_checkpoint(model, path)
    return path


def test_sharded_mxfp4_checkpoint(sharded_mxfp4_dir, gpt_oss_mxfp4_dir, gpt_oss_dequantized_model):
    index = json.loads((sharded_mxfp4_dir / INDEX_FILE).read_text())["weight_map"]
    assert not (sharded_mxfp4_dir / "model.safetensors").exists()
    assert len(set(index.values())) >= 3
    sharded, single = CheckpointReader(sharded_mxfp4_dir), CheckpointReader(gpt_oss_mxfp4_dir)
    assert sorted(sharded.keys()) == sorted(single.keys()) == sorted(index)
    # Expert tensors of different layers live in different shards.
    files = {index[f"model.layers.{i}.mlp.experts.gate_up_proj_blocks"] for i in range(3)}
    assert len(files) >= 2
    for layer in range(3):
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            got = sharded.read_expert_matrices(name, [6, 2], transposed=True)
            assert torch.equal(got, single.read_expert_matrices(name, [6, 2], transposed=True))
            assert torch.equal(got, getattr(gpt_oss_dequantized_model.model.layers[layer].mlp.experts, proj)[[6, 2]].transpose(1, 2))
    # transformers loads the sharded MXFP4 checkpoint to the same model.
    reloaded = load_model(sharded_mxfp4_dir)
    ref = gpt_oss_dequantized_model.state_dict()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_sharded_float_checkpoint(gpt_oss_dequantized_model, tmp_path):
    gpt_oss_dequantized_model.save_pretrained(tmp_path, max_shard_size="100KB", save_original_format=False)
    assert (tmp_path / INDEX_FILE).exists()
    reader = CheckpointReader(tmp_path)
    for layer in range(3):
        name = f"model.layers.{layer}.mlp.experts.gate_up_proj"
        got = reader.read_expert_matrices(name, [0, 7, 4], transposed=True)
        assert torch.equal(got, gpt_oss_dequantized_model.model.layers[layer].mlp.experts.gate_up_proj[[0, 7, 4]].transpose(1, 2))
        assert torch.equal(reader.read("model.embed_tokens.weight"), gpt_oss_dequantized_model.model.embed_tokens.weight)
