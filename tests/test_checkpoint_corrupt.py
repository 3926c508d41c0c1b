"""Damaged base checkpoints: one clear error naming the file, never a traceback from safetensors."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

from nexus.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointReader
from nexus.errors import NexusError


@pytest.fixture
def copy_of_base(gpt_oss_mxfp4_dir, tmp_path):
    path = tmp_path / "base"
    shutil.copytree(gpt_oss_mxfp4_dir, path)
    return path


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_single_file_checkpoint(copy_of_base, tmp_path, how):
    import nexus.engines.convert as conv

    file = copy_of_base / SINGLE_FILE
    raw = file.read_bytes()
    file.write_bytes(raw[: len(raw) // 3] if how == "truncated" else b"\x00garbage" * 50)
    with pytest.raises(NexusError, match=f"{file} is not a readable safetensors file.*download or save it again"):
        CheckpointReader(copy_of_base)
    with pytest.raises(NexusError, match="not a readable safetensors file") as info:
        conv.convert(conv.ConvertConfig(model=copy_of_base, output=tmp_path / "ad", strategy="mean_all"),
                     progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "ad").exists()


def test_damaged_shard_and_index(copy_of_base):
    file = copy_of_base / SINGLE_FILE
    shard = copy_of_base / "model-00001-of-00001.safetensors"
    file.rename(shard)
    index = copy_of_base / INDEX_FILE
    with safe_open(str(shard), framework="pt") as f:
        index.write_text(json.dumps({"weight_map": {k: shard.name for k in f.keys()}}))
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) - 100])
    reader = CheckpointReader(copy_of_base)  # the index alone is read up front
    with pytest.raises(NexusError, match=f"{shard} is not a readable safetensors file"):
        reader.read("model.embed_tokens.weight")
    index.write_text("{ not json")
    with pytest.raises(NexusError, match=f"{index} is not a valid safetensors index"):
        CheckpointReader(copy_of_base)

