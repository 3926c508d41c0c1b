"""An adapter whose ``nexus_config.json`` disagrees with its tensors is refused by every stage that
reads it (train, evaluate, generate, export without --check, the trainers wrapper), naming the field;
a deleted ``gate_mode`` is named as missing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers_train import make_adapter, make_base, make_data
from nexus.constants import ADAPTER_CONFIG_NAME
from nexus.errors import NexusError

WIDTH = 32


@pytest.fixture(scope="module")
def work(gpt_oss_mxfp4_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_validation")
    base = make_base(gpt_oss_mxfp4_dir, root / "base")
    return {"root": root, "base": base, "data": make_data(root / "data.jsonl", n=6),
            "scalar": make_adapter(base, root / "scalar", gate_mode="scalar", intermediate_size=WIDTH),
            "none": make_adapter(base, root / "none", gate_mode="none", intermediate_size=WIDTH)}


def _edited(work, tmp_path, source: str, edit) -> str:
    """A copy of adapter ``source`` whose nexus_config.json went through ``edit(dict)``."""
    path = tmp_path / f"{source}-edited"
    shutil.copytree(work[source], path)
    cfg = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
    edit(cfg)
    (path / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
    return str(path)


def _load(work, adapter, tmp_path):
    from nexus.adapter import load_adapter
    from nexus.loading import load_model

    load_adapter(load_model(work["base"]), adapter)


def _export(work, adapter, tmp_path):
    from nexus.engines.export import export

    export(work["base"], adapter, tmp_path / "exported")


def _train(work, adapter, tmp_path):
    from nexus.engines.train import train
    from nexus.training.train_config import TrainConfig

    train(TrainConfig(model=str(work["base"]), adapter=adapter, data=str(work["data"]), output=str(tmp_path / "run"),
                      seq_len=16, batch_size=1, max_steps=1))


def _evaluate(work, adapter, tmp_path):
    from nexus.engines.evaluate import evaluate
    from nexus.engines.evaluate_config import EvaluateConfig

    evaluate(EvaluateConfig(model=str(work["base"]), adapter=adapter, data=str(work["data"]), seq_len=16,
                            batch_size=1, max_batches=1))


def _generate(work, adapter, tmp_path):
    from nexus.engines.evaluate import generate
    from nexus.engines.evaluate_config import GenerateConfig

    generate(GenerateConfig(model=str(work["base"]), adapter=adapter, prompt="Hello", max_new_tokens=1))


def _from_pretrained(work, adapter, tmp_path):
    from nexus.loading import load_model
    from nexus.trainers import NexusModel

    NexusModel.from_pretrained(load_model(work["base"]), adapter)


STAGES = {"load_adapter": _load, "export": _export, "train": _train, "evaluate": _evaluate, "generate": _generate,
          "trainers from_pretrained": _from_pretrained}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("width", [WIDTH // 2, WIDTH * 2])
def test_every_stage_refuses_a_width_that_disagrees_with_the_tensors(work, tmp_path, stage, width):
    adapter = _edited(work, tmp_path, "scalar", lambda c: c.update(shared_intermediate_size=width))
    with pytest.raises(NexusError, match=rf"{ADAPTER_CONFIG_NAME} has shared_intermediate_size {width}, but tensor "
                                         rf"\S+nexus_shared\.gate_proj\.weight has width {WIDTH}") as info:
        STAGES[stage](work, adapter, tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("stage", ["load_adapter", "export"])
def test_a_deleted_gate_mode_is_named_as_missing(work, tmp_path, stage):
    adapter = _edited(work, tmp_path, "none", lambda c: c.pop("gate_mode"))
    with pytest.raises(NexusError, match=r"has no gate_mode field \(read as 'scalar'\), but the tensors of "
                                         r"\S+ are those of gate 'none': add \"gate_mode\": \"none\""):
        STAGES[stage](work, adapter, tmp_path)


def test_a_config_without_gate_mode_still_reads_as_the_scalar_gate_of_older_adapters(work, tmp_path):
    from nexus.adapter import load_adapter
    from nexus.loading import load_model

    adapter = _edited(work, tmp_path, "scalar", lambda c: c.pop("gate_mode"))
    model = load_adapter(load_model(work["base"]), adapter)
    assert model._nexus_adapter.gate_mode == "scalar"


@pytest.mark.parametrize("source, edit, match", [
    ("scalar", {"gate_mode": "none"}, r"has gate_mode 'none', but the tensors of \S+ are those of gate 'scalar'"),
    ("none", {"gate_mode": "token"}, r"has gate_mode 'token', but the tensors of \S+ are those of gate 'none'"),
    ("scalar", {"gate_mode": "sigmoid"}, r"has gate_mode 'sigmoid', not one of none, scalar"),
    ("scalar", {"shared_intermediate_size": "32"}, r"has shared_intermediate_size '32', not a positive integer"),
    ("scalar", {"layers": [0, 1]}, r"has layers \[0, 1\], but its tensors hold shared experts for layers \[0, 1, 2\]"),
    ("scalar", {"layers": "0,1,2"}, r"has layers '0,1,2', not a list of ints"),
    ("scalar", {"base_keys": ["model.layers.0.mlp.router.weight"]},
     r"has base_keys that disagree with its tensors \(listed but absent: model\.layers\.0\.mlp\.router\.weight\)"),
])
def test_each_field_is_checked_against_the_tensors(work, tmp_path, source, edit, match):
    adapter = _edited(work, tmp_path, source, lambda c: c.update(edit))
    for stage in ("load_adapter", "export"):
        with pytest.raises(NexusError, match=match):
            STAGES[stage](work, adapter, tmp_path)


def test_a_tensor_no_field_accounts_for_is_refused(work, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = _edited(work, tmp_path, "scalar", lambda c: None)
    weights = f"{adapter}/adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.router.weight"] = torch.zeros(8, 64)
    save_file(tensors, weights)
    with pytest.raises(NexusError, match=r"base_keys that disagree with its tensors \(not listed: "
                                         r"model\.layers\.0\.mlp\.router\.weight\)"):
        STAGES["export"](work, adapter, tmp_path)


def test_the_trainers_wrapper_checks_an_adapter_loaded_in_place(work, tmp_path):
    from nexus.loading import load_model
    from nexus.trainers import NexusModel

    model = NexusModel.from_pretrained(load_model(work["base"]), work["scalar"])
    adapter = _edited(work, tmp_path, "scalar", lambda c: c.update(layers=[0]))
    with pytest.raises(NexusError, match=r"has layers \[0\], but its tensors hold shared experts for layers"):
        model.load_adapter(adapter)


def test_consistent_adapters_pass_every_stage_that_reads_them(work, tmp_path):
    for source in ("scalar", "none"):
        _load(work, str(work[source]), tmp_path)
    _export(work, str(work["scalar"]), tmp_path)
    assert (tmp_path / "exported" / "config.json").exists()
