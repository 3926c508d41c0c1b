"""A sharded checkpoint with a truncated shard: every command that loads the model names the shard
in one ``Error:`` line, whether transformers loads it (a float base, ``--dequantize``) or the packed
loader does."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from helpers_prepare import model_with_tokenizer, write_jsonl
from helpers_train import make_adapter
from nexus.checkpoint import INDEX_FILE, SINGLE_FILE
from nexus.cli import cli
from nexus.errors import NexusError


def _sharded_with_a_truncated_shard(src, dst):
    """``src`` (a single-file checkpoint with a tokenizer) split into two shards, the second cut in half."""
    model_with_tokenizer(src, dst)
    tensors = load_file(dst / SINGLE_FILE)
    (dst / SINGLE_FILE).unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, dst / file, metadata={"format": "pt"})
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": {
        k: file for file, keys in shards.items() for k in keys}}))
    shard = dst / "model-00002-of-00002.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    return dst, shard


@pytest.fixture(scope="module")
def damaged(gpt_oss_float_dir, gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("truncated_shard")
    return {"float": _sharded_with_a_truncated_shard(gpt_oss_float_dir, root / "float"),
            "mxfp4": _sharded_with_a_truncated_shard(gpt_oss_mxfp4_dir, root / "mxfp4"),
            "data": write_jsonl(root / "data.jsonl", n=12),
            "adapter": make_adapter(gpt_oss_float_dir, root / "adapter")}


@pytest.mark.parametrize("fmt, dequantize", [("float", False), ("mxfp4", True), ("mxfp4", False)])
def test_load_model_names_the_truncated_shard(damaged, fmt, dequantize):
    from nexus.loading import load_model

    base, shard = damaged[fmt]
    with pytest.raises(NexusError, match=f"{shard} is not a readable safetensors file") as info:
        load_model(base, dequantize=dequantize)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("command", ["train", "run"])
def test_train_and_run_name_the_truncated_shard_in_one_error_line(damaged, tmp_path, command):
    base, shard = damaged["float"]
    args = ["--model", base, "--data", damaged["data"], "--output", tmp_path / "out", "--max-steps", 1,
            "--seq-len", 24, "--batch-size", 2]
    if command == "train":
        args += ["--adapter", damaged["adapter"]]
    else:
        args += ["--eval-data", damaged["data"], "--target-tokens", 100]
    result = CliRunner().invoke(cli, ["-q", command, *map(str, args)])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and f"{shard} is not a readable" in lines[0], lines
