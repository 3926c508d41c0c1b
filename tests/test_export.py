"""``nexus export``: exact folds, the MXFP4 layout, refusals, remote code, and the writing guarantees.

The checks that load an export run it in a fresh process with stock transformers that never
imports nexus (``nexus.engines.export_check``); the full family matrix is in ``test_export_matrix.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from helpers_conformance import build_checkpoint
from helpers_export import base_and_adapter, base_logits, mxfp4_export_error
import nexus
from nexus.engines.export import EXPORT_INFO_NAME, export
from nexus.errors import AdapterMismatchError, NexusError
from nexus.engines.export_check import sample_inputs
from nexus.engines.export_files import read_header
from nexus.family import resolve_family
from nexus.spec import ExportSpec, RoutedFold, SlotFold

EXACT = 1e-5


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _raw_bytes(path, name):
    raw = read_header(path / "model.safetensors")[0][name]
    with open(raw.file, "rb") as f:
        f.seek(raw.start)
        return f.read(raw.end - raw.start)


def test_hook_nexus_export_spec():
    """Every family declares its fold as data; the core reads it through the Family handle."""
    assert isinstance(resolve_family(name="gpt_oss").export_spec().fold, RoutedFold)
    assert isinstance(resolve_family(name="deepseek_v3").export_spec().fold, SlotFold)
    phimoe = resolve_family(name="phimoe").export_spec()
    assert isinstance(phimoe, ExportSpec) and phimoe.fold is None and "sparsemixer" in phimoe.no_fold
    assert resolve_family(name="mixtral").export_spec().layout is not None


@pytest.fixture(scope="module")
def gpt_oss_pair(tmp_path_factory):
    return base_and_adapter(tmp_path_factory.mktemp("export_gpt_oss"), "gpt_oss", width=40)


def test_gpt_oss_mxfp4_keeps_original_blocks_and_reports_kl(gpt_oss_pair, tmp_path):
    base, adapter = gpt_oss_pair
    out = tmp_path / "out"
    info = export(base, adapter, out, check=True, check_sequences=2, check_length=16)
    src, dst = _tensors(base), _tensors(out)
    i = 64  # the example's intermediate_size; 40 trained units are padded to 64 (a multiple of 32)
    assert info["fold"]["padding_units"] == 24
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 128
    for layer in (0, 1):
        p = f"model.layers.{layer}.mlp.experts."
        for kind in ("blocks", "scales"):
            gu, down = dst[f"{p}gate_up_proj_{kind}"], dst[f"{p}down_proj_{kind}"]
            assert gu.shape[1] == 4 * i and down.shape[2] == 2 * i // 32
            assert torch.equal(gu[:, : 2 * i], src[f"{p}gate_up_proj_{kind}"])  # original rows byte-identical
            assert torch.equal(down[:, :, : i // 32], src[f"{p}down_proj_{kind}"])  # original block columns too
    # untouched tensors: the same bytes; the config keeps the MXFP4 quantization_config
    assert _raw_bytes(out, "model.embed_tokens.weight") == _raw_bytes(base, "model.embed_tokens.weight")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    assert (out / "tokenizer_config.json").read_text() == (base / "tokenizer_config.json").read_text()
    assert (out / "generation_config.json").exists()
    recorded = json.loads((out / EXPORT_INFO_NAME).read_text())
    assert recorded["method"] == "routed" and len(recorded["adapter_fingerprint"]) == 16
    assert 0 < recorded["fold"]["mxfp4_relative_error_of_shared_units"] < 0.5
    check = recorded["check"]
    assert check["kl_adapter_to_export"] > 0 and check["max_abs_logit_diff"] > 1e-3  # quantised shared units
    # ... quantised and nothing else: the export computes base + the adapter with its units MXFP4-rounded.
    assert mxfp4_export_error(base, adapter, out, tmp_path / "rounded") <= EXACT
    cost = recorded["cost"]
    # routed fold: the 64 units (padded) run top_k = 2 times per token in each of the 2 layers, 3 matmuls of H x 64
    assert cost["extra_flops_per_token"] == 2 * 2 * (2 * 3 * 64 * 64)
    assert cost["extra_parameters"] == 2 * 4 * (3 * 64 * 64 + 2 * 64)  # 4 experts, gate_up bias grows too


def test_slot_fold_is_exact_in_a_process_without_nexus(tmp_path):
    base, adapter = base_and_adapter(tmp_path, "deepseek_v3", width=20)
    info = export(base, adapter, tmp_path / "out", check=True, check_sequences=2, check_length=16)
    assert info["method"] == "slot" and info["fold"]["n_shared_experts"] == [1, 2]
    assert info["fold"]["padding_units"] == 12  # 20 units padded to one more 32-wide shared expert
    assert info["check"]["max_abs_logit_diff"] <= EXACT
    # the adapter is not a no-op: base + adapter differs from the base
    inputs = sample_inputs(256, 2, 16)
    from nexus.engines.export import _reference_logits

    ref, plain = _reference_logits(base, adapter, inputs, None), base_logits(base, inputs)
    assert max(float((ref[n] - plain[n]).abs().max()) for n in inputs) > 1e-3


class RoutedDeepSeek:
    """Overrides one concern of ``deepseek_v3``: its fold. DeepSeek-V3's normalised routing weights are
    multiplied by ``routed_scaling_factor``, so they sum to that constant ``c`` and the routed fold
    applies with the shared units' down projection scaled by ``1/c`` (the shared slot, as wide as
    one routed expert, is padded with zero units)."""

    __name__ = "routed-deepseek"

    @nexus.hookimpl(tryfirst=True)
    def nexus_export_spec(self, family):
        if family != "deepseek_v3":
            return None
        from families.deepseek_v3 import SPEC

        fold = RoutedFold(width="moe_intermediate_size", normalized_by="norm_topk_prob",
                          weight_sum="routed_scaling_factor", tied=("shared_experts",))
        return ExportSpec(fold, layout=SPEC.experts)


def test_routed_fold_divides_by_the_routing_weight_sum(tmp_path):
    from nexus.plugins import get_plugin_manager

    config = resolve_family(name="deepseek_v3").example_config()
    config.routed_scaling_factor, config.norm_topk_prob = 2.0, True  # every token's weights sum to c = 2
    pm = get_plugin_manager()
    plugin = RoutedDeepSeek()
    pm.register(plugin, name=plugin.__name__)
    try:
        base, adapter = base_and_adapter(tmp_path, "deepseek_v3", width=20, config=config)
        info = export(base, adapter, tmp_path / "out", check=True, check_sequences=2, check_length=16)
    finally:
        pm.unregister(plugin)
    assert info["method"] == "routed" and info["fold"]["weight_sum"] == 2.0
    assert info["fold"]["moe_intermediate_size"] == [32, 52]
    assert info["check"]["max_abs_logit_diff"] <= EXACT
    out = _tensors(tmp_path / "out")
    # the shared slot keeps its trained units and gains 20 zero units
    slot = out["model.layers.1.mlp.shared_experts.gate_proj.weight"]
    assert slot.shape == (52, 64) and not slot[32:].any() and slot[:32].any()


def test_unnormalised_routing_is_refused_and_remote_code_is_exact(tmp_path):
    base, adapter = base_and_adapter(tmp_path, "olmoe")
    with pytest.raises(NexusError, match=r"norm_topk_prob = False.*--remote-code"):
        export(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    info = export(base, adapter, tmp_path / "out", remote_code=True, check=True, check_sequences=2, check_length=16)
    assert info["method"] == "remote_code" and info["check"]["max_abs_logit_diff"] <= EXACT
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "olmoe" and "AutoModelForCausalLM" in cfg["auto_map"]
    assert "import nexus" not in (tmp_path / "out" / "modeling_nexus_shared.py").read_text()


@pytest.mark.parametrize("gate_mode", ["token", "scalar_token"])
def test_token_gate_refusal_says_how_to_get_a_fold_and_remote_code_is_exact(tmp_path, gate_mode):
    base, adapter = base_and_adapter(tmp_path, "mixtral", gate_mode=gate_mode)
    with pytest.raises(NexusError, match=rf"'{gate_mode}'.*--gate-mode scalar.*--remote-code"):
        export(base, adapter, tmp_path / "out")
    info = export(base, adapter, tmp_path / "out", remote_code=True, check=True, check_sequences=2, check_length=16)
    assert info["method"] == "remote_code" and info["check"]["max_abs_logit_diff"] <= EXACT


def test_adapter_for_another_base_is_refused_naming_both(tmp_path, gpt_oss_pair):
    _, adapter = gpt_oss_pair
    other, _ = base_and_adapter(tmp_path, "mixtral")
    with pytest.raises(AdapterMismatchError) as err:
        export(other, adapter, tmp_path / "out")
    from nexus.adapter import read_adapter_config
    from nexus.fingerprint import config_fingerprint
    from nexus.loading import load_config

    message = str(err.value)
    assert read_adapter_config(adapter).base_fingerprint in message
    assert config_fingerprint(load_config(other)) in message


def test_adapter_for_other_weights_of_the_same_config_is_refused(tmp_path, gpt_oss_pair):
    from nexus.adapter import read_adapter_config
    from nexus.fingerprint import weights_fingerprint

    _, adapter = gpt_oss_pair
    recorded = read_adapter_config(adapter)
    assert len(recorded.base_weights_fingerprint) == 16
    # Same config (the config fingerprint check passes), other random weights.
    other = build_checkpoint(resolve_family(name="gpt_oss"), tmp_path / "other", seed=1)
    actual, _ = weights_fingerprint(other, recorded.base_weights_tensors)
    assert actual != recorded.base_weights_fingerprint
    with pytest.raises(AdapterMismatchError) as err:
        export(other, adapter, tmp_path / "out")
    message = str(err.value)
    for part in (recorded.base_weights_fingerprint, actual, str(other), str(adapter)):
        assert part in message
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite_and_a_crash_leaves_nothing(gpt_oss_pair, tmp_path, monkeypatch):
    base, adapter = gpt_oss_pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(NexusError, match="--overwrite"):
        export(base, adapter, out)
    assert (out / "keep.txt").exists()

    from nexus.engines import export_files

    calls = {"n": 0}
    original = export_files.StreamingWriter.add

    def crash(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return original(self, name, tensor)

    monkeypatch.setattr(export_files.StreamingWriter, "add", crash)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="disk full"):
        export(base, adapter, fresh)
    assert not fresh.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fresh")] == []
    with pytest.raises(RuntimeError, match="disk full"):
        calls["n"] = 0
        export(base, adapter, out, overwrite=True)
    assert (out / "keep.txt").exists()  # the old directory survives a failed overwrite
    monkeypatch.setattr(export_files.StreamingWriter, "add", original)
    export(base, adapter, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / EXPORT_INFO_NAME).exists()


def test_cli_refusal_is_one_line(tmp_path):
    from nexus.cli import cli

    base, adapter = base_and_adapter(tmp_path, "phimoe")
    result = CliRunner().invoke(cli, ["export", "--model", str(base), "--adapter", str(adapter),
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "sparsemixer" in result.output and "Traceback" not in result.output
