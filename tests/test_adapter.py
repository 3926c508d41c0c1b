"""Adapters: save/load round trip, base fingerprint check, forward compatibility, atomic saves."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import nexus.adapter
from nexus import __version__
from nexus.adapter import AdapterConfig, load_adapter, read_adapter_config, save_adapter
from nexus.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from nexus.errors import AdapterMismatchError, NexusError
from nexus.fingerprint import config_fingerprint
from nexus.loading import load_model
from nexus.shared_expert import attach_shared_experts, is_shared_parameter


@pytest.fixture
def input_ids():
    return torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(1))


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _adapted(gpt_oss, model, seed=0, gate_mode="scalar", size=32):
    """Attach shared experts to ``model`` with random (non-identity) weights; return its AdapterConfig."""
    attach_shared_experts(model, gpt_oss, intermediate_size=size, gate_mode=gate_mode)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_shared_parameter(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return AdapterConfig(family=gpt_oss.name, base_fingerprint=config_fingerprint(model.config),
                         shared_intermediate_size=size, gate_mode=gate_mode, model_type=model.config.model_type)


def test_round_trip_gives_identical_logits(gpt_oss, gpt_oss_model, gpt_oss_mxfp4_dir, gpt_oss_float_dir, exact_packed_layout,
                                          tmp_path, input_ids):
    base = _logits(gpt_oss_model, input_ids)
    config = _adapted(gpt_oss, gpt_oss_model, gate_mode="token")
    adapted = _logits(gpt_oss_model, input_ids)
    assert not torch.equal(adapted, base)
    out = save_adapter(gpt_oss_model, tmp_path / "adapter", config)
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])

    tensors = load_file(out / ADAPTER_WEIGHTS_NAME)
    expected_keys = {f"model.layers.{i}.mlp.nexus_shared.{proj}.{kind}"
                     for i in range(3) for proj in ("gate_proj", "up_proj", "down_proj") for kind in ("weight", "bias")}
    expected_keys |= {f"model.layers.{i}.mlp.nexus_shared_scale.weight" for i in range(3)}
    assert set(tensors) == expected_keys  # never a copy of the base
    saved = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert saved["family"] == "gpt_oss" and saved["nexus_version"] == __version__
    assert saved["base_fingerprint"] == config_fingerprint(gpt_oss_model.config)
    assert saved["layers"] == [0, 1, 2] and saved["gate_mode"] == "token"

    # Onto a fresh copy of the base, and onto the same weights stored as a float checkpoint.
    for path in (gpt_oss_mxfp4_dir, gpt_oss_float_dir):
        fresh = load_model(path)
        assert torch.equal(_logits(fresh, input_ids), base)
        load_adapter(fresh, out)
        assert torch.equal(_logits(fresh, input_ids), adapted)
        assert fresh._nexus_adapter.shared_intermediate_size == 32


def test_trained_routers_are_saved_and_restored(gpt_oss, gpt_oss_model, gpt_oss_mxfp4_dir, tmp_path, input_ids):
    config = _adapted(gpt_oss, gpt_oss_model)
    router = gpt_oss_model.model.layers[1].mlp.router
    with torch.no_grad():
        router.weight.add_(0.5)
    config.base_keys = ["model.layers.1.mlp.router.weight"]
    save_adapter(gpt_oss_model, tmp_path / "a", config)
    assert "model.layers.1.mlp.router.weight" in load_file(tmp_path / "a" / ADAPTER_WEIGHTS_NAME)
    fresh = load_adapter(load_model(gpt_oss_mxfp4_dir), tmp_path / "a")
    assert torch.equal(fresh.model.layers[1].mlp.router.weight, router.weight)
    assert torch.equal(_logits(fresh, input_ids), _logits(gpt_oss_model, input_ids))


def test_other_base_is_refused_naming_both_fingerprints(gpt_oss, gpt_oss_config, gpt_oss_model, tmp_path):
    from transformers import AutoModelForCausalLM

    config = _adapted(gpt_oss, gpt_oss_model)
    save_adapter(gpt_oss_model, tmp_path / "a", config)
    other_cfg = gpt_oss_config.__class__.from_dict(gpt_oss_config.to_dict())
    other_cfg.num_local_experts = 4
    other = AutoModelForCausalLM.from_config(other_cfg)
    fp_adapter, fp_other = config_fingerprint(gpt_oss_model.config), config_fingerprint(other.config)
    assert fp_adapter != fp_other
    with pytest.raises(AdapterMismatchError) as info:
        load_adapter(other, tmp_path / "a")
    assert fp_adapter in str(info.value) and fp_other in str(info.value)
    assert not any(is_shared_parameter(n) for n, _ in other.named_parameters())  # nothing attached


def test_fingerprint_ignores_storage_but_not_architecture(gpt_oss_config, gpt_oss_model, gpt_oss_float_dir):
    from nexus.loading import load_config

    # MXFP4 (quantization_config in config.json) and float checkpoints of one model match.
    assert config_fingerprint(gpt_oss_model.config) == config_fingerprint(load_config(gpt_oss_float_dir))
    d = gpt_oss_config.to_dict()
    assert config_fingerprint(d) == config_fingerprint({**d, "dtype": "bfloat16", "_name_or_path": "/elsewhere"})
    assert config_fingerprint(d) != config_fingerprint({**d, "num_experts_per_tok": 3})


def test_unknown_config_keys_warn_and_are_ignored(gpt_oss, gpt_oss_model, gpt_oss_mxfp4_dir, tmp_path, input_ids):
    config = _adapted(gpt_oss, gpt_oss_model)
    path = save_adapter(gpt_oss_model, tmp_path / "a", config)
    data = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
    data.update(nexus_version="9.0.0", lora_rank=8, zz_future={"x": 1})
    (path / ADAPTER_CONFIG_NAME).write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"9\.0\.0.*lora_rank, zz_future"):
        read = read_adapter_config(path)
    assert read.family == "gpt_oss" and not hasattr(read, "lora_rank")
    fresh = load_model(gpt_oss_mxfp4_dir)
    with pytest.warns(UserWarning, match="lora_rank"):
        load_adapter(fresh, path)
    assert torch.equal(_logits(fresh, input_ids), _logits(gpt_oss_model, input_ids))


def test_save_is_atomic(gpt_oss, gpt_oss_model, tmp_path, monkeypatch):
    config = _adapted(gpt_oss, gpt_oss_model, seed=1)
    path = save_adapter(gpt_oss_model, tmp_path / "a", config)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    _adapted_again = {n: p for n, p in gpt_oss_model.named_parameters() if is_shared_parameter(n)}
    with torch.no_grad():
        for p in _adapted_again.values():
            p.add_(1.0)

    def failing_write_json(*args, **kwargs):
        raise OSError("disk full")

    # The weights are written, then writing the config fails: the previous adapter must survive.
    monkeypatch.setattr(nexus.adapter, "write_json", failing_write_json)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(gpt_oss_model, path, config)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp dirs left behind

    monkeypatch.undo()
    save_adapter(gpt_oss_model, path, config)
    after = load_file(path / ADAPTER_WEIGHTS_NAME)
    assert torch.equal(after["model.layers.0.mlp.nexus_shared.up_proj.weight"],
                       _adapted_again["model.layers.0.mlp.nexus_shared.up_proj.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_save_and_load_refuse_bad_input(gpt_oss_model, tmp_path):
    config = AdapterConfig(family="gpt_oss", base_fingerprint="0" * 16, shared_intermediate_size=8)
    with pytest.raises(NexusError, match="no shared experts"):
        save_adapter(gpt_oss_model, tmp_path / "a", config)
    assert not (tmp_path / "a").exists()
    with pytest.raises(NexusError, match="not a NEXUS adapter"):
        load_adapter(gpt_oss_model, tmp_path)


# ---------------------------------------------------------------------------------------------
# Weights fingerprint: same architecture, other weights
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned_dir(gpt_oss_float_dir, tmp_path_factory):
    """The tiny GPT-OSS with one router slightly changed (a fine-tune): same config, other weights."""
    model = load_model(gpt_oss_float_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.router.weight[0, 0] += 0.25
    path = tmp_path_factory.mktemp("finetuned")
    model.save_pretrained(path, save_original_format=False)
    return path


def test_adapter_for_other_weights_is_refused_naming_both(gpt_oss, gpt_oss_model, gpt_oss_mxfp4_dir, finetuned_dir,
                                                           tmp_path):
    from nexus.fingerprint import weights_fingerprint

    config = _adapted(gpt_oss, gpt_oss_model)
    path = save_adapter(gpt_oss_model, tmp_path / "a", config)
    saved = read_adapter_config(path)
    assert len(saved.base_weights_fingerprint) == 16
    assert "model.embed_tokens.weight" in saved.base_weights_tensors
    assert "model.layers.0.mlp.router.weight" in saved.base_weights_tensors
    assert not any(".experts." in n for n in saved.base_weights_tensors)  # stored MXFP4 or float alike
    other_fp, _ = weights_fingerprint(finetuned_dir, saved.base_weights_tensors)
    assert other_fp != saved.base_weights_fingerprint

    other = load_model(finetuned_dir)
    assert config_fingerprint(other.config) == saved.base_fingerprint  # the config check alone passes
    with pytest.raises(AdapterMismatchError) as info:
        load_adapter(other, path)
    message = str(info.value)
    for part in (saved.base_weights_fingerprint, other_fp, str(path), str(finetuned_dir)):
        assert part in message
    assert "\n" not in message
    assert not any(is_shared_parameter(n) for n, _ in other.named_parameters())  # nothing attached


def test_adapter_without_weights_fingerprint_loads_with_a_warning(gpt_oss, gpt_oss_model, gpt_oss_mxfp4_dir,
                                                                  tmp_path, input_ids, caplog):
    config = _adapted(gpt_oss, gpt_oss_model)
    path = save_adapter(gpt_oss_model, tmp_path / "a", config)
    data = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
    del data["base_weights_fingerprint"], data["base_weights_tensors"]  # as written before the field existed
    (path / ADAPTER_CONFIG_NAME).write_text(json.dumps(data))
    fresh = load_model(gpt_oss_mxfp4_dir)
    with caplog.at_level("WARNING", logger="nexus.fingerprint"):
        load_adapter(fresh, path)
    assert "no base weights fingerprint" in caplog.text and str(path) in caplog.text
    assert torch.equal(_logits(fresh, input_ids), _logits(gpt_oss_model, input_ids))


def test_model_built_in_memory_skips_the_weights_check(gpt_oss, gpt_oss_config, gpt_oss_model, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    config = _adapted(gpt_oss, gpt_oss_model)
    path = save_adapter(gpt_oss_model, tmp_path / "a", config)
    torch.manual_seed(7)
    in_memory = AutoModelForCausalLM.from_config(gpt_oss_config)  # other weights, but no checkpoint to read
    with caplog.at_level("DEBUG", logger="nexus.fingerprint"):
        load_adapter(in_memory, path)
    assert "built in memory" in caplog.text
    # ... and an adapter saved from it records no weights fingerprint.
    cfg = AdapterConfig(family="gpt_oss", base_fingerprint=config_fingerprint(in_memory.config),
                        shared_intermediate_size=32)
    assert read_adapter_config(save_adapter(in_memory, tmp_path / "b", cfg)).base_weights_fingerprint == ""


# ---------------------------------------------------------------------------------------------
# Damaged adapters: one clear error, the model left as it was
# ---------------------------------------------------------------------------------------------


def _damage(path, how: str):
    weights = path / ADAPTER_WEIGHTS_NAME
    if how == "no weights file":
        weights.unlink()
    elif how == "truncated":
        raw = weights.read_bytes()
        weights.write_bytes(raw[: len(raw) // 2])
    elif how == "not safetensors":
        weights.write_text('{"a": 1}')
    else:
        from safetensors.torch import save_file

        tensors = load_file(weights)
        key = "model.layers.1.mlp.nexus_shared.up_proj.weight"
        if how == "missing tensor":
            del tensors[key]
        elif how == "mis-shaped":
            tensors[key] = tensors[key][:, :-1].contiguous()
        elif how == "nan":
            tensors[key][0, 0] = float("nan")
        save_file(tensors, str(weights))


@pytest.mark.parametrize("how, match", [
    ("no weights file", "has no adapter_model.safetensors"),
    ("truncated", "not a readable safetensors file"),
    ("not safetensors", "not a readable safetensors file"),
    ("missing tensor", r"tensor model\.layers\.1\.mlp\.nexus_shared\.up_proj\.weight is missing"),
    ("mis-shaped", r"up_proj\.weight has shape \(32, 63\) but the model expects \(32, 64\)"),
    ("nan", "NaN or infinite"),
])
def test_damaged_adapter_is_one_clear_error(gpt_oss, gpt_oss_model, gpt_oss_mxfp4_dir, tmp_path, how, match):
    path = save_adapter(gpt_oss_model, tmp_path / "a", _adapted(gpt_oss, gpt_oss_model))
    _damage(path, how)
    fresh = load_model(gpt_oss_mxfp4_dir)
    with pytest.raises(NexusError, match=match) as info:
        load_adapter(fresh, path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not any(is_shared_parameter(n) for n, _ in fresh.named_parameters())


@pytest.mark.parametrize("content, match", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a JSON object"),
    ('{"family": "gpt_oss"}', "lacks base_fingerprint, shared_intermediate_size"),
])
def test_damaged_adapter_config_is_one_clear_error(tmp_path, content, match):
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(content)
    with pytest.raises(NexusError, match=match):
        read_adapter_config(tmp_path)


def test_adapter_of_another_family_names_the_family(gpt_oss, gpt_oss_model, tmp_path):
    from nexus.adapter import adapter_family

    config = _adapted(gpt_oss, gpt_oss_model)
    path = save_adapter(gpt_oss_model, tmp_path / "a", config)
    data = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
    data.update(family="mixtral", model_type="mixtral", base_fingerprint="0123456789abcdef")
    (path / ADAPTER_CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(AdapterMismatchError, match=r"0123456789abcdef \(mixtral .*family mixtral\)"):
        adapter_family(read_adapter_config(path), gpt_oss_model, path)
