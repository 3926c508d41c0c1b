"""Every registered family x ``nexus export``: a trained adapter, exported, loaded by stock transformers
in a process that never imports nexus, gives the logits of base + adapter (fp32, max abs diff <= 1e-5).

Families whose example config admits an exact fold are folded (GPT-OSS with ``--dequantize`` in
fp32, so the check is exact; and with its MXFP4 blocks kept, equal to base + the adapter with its
units MXFP4-rounded); the others must be refused, then exported with ``--remote-code``.
"""

from __future__ import annotations

import json

import pytest

from helpers_conformance import registered_family_names
from helpers_export import base_and_adapter, mxfp4_export_error
from nexus.engines.export import export
from nexus.errors import NexusError
from nexus.family import resolve_family

EXACT = 1e-5


def _stock(family_name: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return all(t in CONFIG_MAPPING_NAMES for t in resolve_family(name=family_name).info.model_types)

# Families of installed plugins whose architecture transformers does not ship (the example plugin's
# toymoe) cannot load in a process without their plugin, which is the point of an export.
FAMILIES = [f for f in registered_family_names() if _stock(f)]


def _quant_method(base) -> str | None:
    config = json.loads((base / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method")


def _folds(family_name: str) -> bool:
    from nexus.engines.export import choose_fold

    family = resolve_family(name=family_name)
    config = family.example_config().to_dict()
    try:
        choose_fold(family.export_spec(), config, "scalar", None)
    except NexusError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("family_name", FAMILIES)
def test_export_equals_base_plus_adapter(family_name, tmp_path):
    base, adapter = base_and_adapter(tmp_path, family_name, width=24)
    kw = dict(check=True, check_sequences=2, check_length=12)
    if _folds(family_name):
        info = export(base, adapter, tmp_path / "out", dequantize=True, dtype="float32", **kw)
        assert info["method"] in ("slot", "routed")
        if _quant_method(base) == "mxfp4":  # kept packed too: exact up to the MXFP4 rounding of the units
            packed = export(base, adapter, tmp_path / "packed")
            assert not packed["dequantized"] and packed["fold"]["padding_units"] == 8
            assert mxfp4_export_error(base, adapter, tmp_path / "packed", tmp_path / "rounded") <= EXACT
    else:
        with pytest.raises(NexusError, match="no exact fold.*--remote-code"):
            export(base, adapter, tmp_path / "out")
        info = export(base, adapter, tmp_path / "out", remote_code=True, **kw)
    assert info["check"]["max_abs_logit_diff"] <= EXACT, info["check"]


@pytest.mark.slow
def test_slot_created_when_the_base_has_none(tmp_path):
    """ERNIE with ``moe_num_shared_experts=0``: the slot is created from the shared units alone."""
    config = resolve_family(name="ernie4_5_moe").example_config()
    config.moe_num_shared_experts = 0
    base, adapter = base_and_adapter(tmp_path, "ernie4_5_moe", config=config)
    info = export(base, adapter, tmp_path / "out", check=True, check_sequences=2, check_length=12)
    assert info["fold"]["moe_num_shared_experts"] == [0, 1]
    assert info["check"]["max_abs_logit_diff"] <= EXACT
