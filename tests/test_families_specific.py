"""Family-specific pitfalls, one targeted test each, plus ``nexus families`` and duplicate names.

The conformance matrix (test_conformance.py) runs the same checks on every family; the tests here
pin what differs: which layers are MoE, routers with selection-only biases, Llama 4's (T, H)
block output, output scaling in GraniteMoE/MiniMax, JetMoE's attention routers, PhiMoE's fixed
top-2, DBRX's flat experts, native shared experts.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import nexus
from helpers_conformance import build_checkpoint, input_ids, perturb_moe_blocks
from nexus.checkpoint import CheckpointReader
from nexus.cli import cli
from nexus.errors import FamilyError, NexusError
from nexus.family import registered_families, resolve_family
from nexus.plugins import get_plugin_manager
from nexus.shared_expert import (
    attach_shared_experts,
    disable_shared_experts,
    freeze_base,
    is_shared_parameter,
    native_shared_modules,
)


def _family(name):
    return resolve_family(name=name)


def _config(name, **overrides):
    """``name``'s example config with ``overrides`` applied through the config class (re-validated)."""
    cfg = _family(name).example_config()
    derived = ("transformers_version", "architectures", "layer_types", "no_rope_layers")  # recomputed per layer count
    data = {k: v for k, v in cfg.to_dict().items() if k not in derived or k in overrides}
    data.update(overrides)
    return type(cfg)(**data)


def _meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _model(config, family, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    perturb_moe_blocks(family, model, seed)
    return model


def _layers_with(model, layers_path, block_attr, cls):
    """Layer indices whose ``block_attr`` module is an instance of ``cls`` (the reference)."""
    return [i for i, layer in enumerate(model.get_submodule(layers_path)) if isinstance(getattr(layer, block_attr), cls)]


# ---------------------------------------------------------------------------------------------
# nexus families, duplicate names
# ---------------------------------------------------------------------------------------------


def test_families_command_lists_every_family_with_model_types_and_package():
    families = registered_families()
    result = CliRunner().invoke(cli, ["families", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert set(rows) == set(families)
    for name, info in families.items():
        assert rows[name]["model_types"] == list(info.model_types)
    for name in ("gpt_oss", "mixtral", "llama4", "dbrx", "jetmoe"):
        assert rows[name]["package"] == "nexus-moe"
    assert rows["llama4"]["model_types"] == ["llama4_text"]
    assert rows["toymoe"]["package"] == "nexus-family-example", "install plugins/nexus-family-example"

    text = CliRunner().invoke(cli, ["families"]).output
    toy_line = next(line for line in text.splitlines() if line.startswith("toymoe"))
    assert "nexus-family-example" in toy_line
    for name in families:
        assert any(line.split()[0] == name for line in text.splitlines()), name


class _DuplicateMixtral:
    __name__ = "dup-mixtral"

    @nexus.hookimpl
    def nexus_register_families(self, register):
        register("mixtral", model_types=("mixtral_copy",), description="a second plugin claiming mixtral")


def test_two_plugins_claiming_one_family_name_is_an_error_naming_both():
    pm = get_plugin_manager()
    pm.register(_DuplicateMixtral(), name="dup-mixtral")
    try:
        with pytest.raises(FamilyError) as err:
            registered_families(pm)
        assert "'mixtral'" in str(err.value) and "'dup-mixtral'" in str(err.value)
        result = CliRunner().invoke(cli, ["families"])
        assert result.exit_code == 1
        assert "dup-mixtral" in result.output and "registered by two plugins" in result.output
    finally:
        pm.unregister(name="dup-mixtral")
    assert "mixtral" in registered_families(pm)


# ---------------------------------------------------------------------------------------------
# Which layers are MoE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": []}, [1, 3]),
        ({"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]}, [1]),
        ({"num_hidden_layers": 3, "decoder_sparse_step": 1, "mlp_only_layers": [0, 2]}, [1]),
    ],
)
def test_qwen_dense_layers_from_mlp_only_layers_and_sparse_step(name, overrides, expected):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cls = Qwen2MoeSparseMoeBlock if name == "qwen2_moe" else Qwen3MoeSparseMoeBlock
    model = _meta_model(_config(name, **overrides))
    assert _layers_with(model, "model.layers", "mlp", cls) == expected
    assert [b.layer for b in _family(name).moe_blocks(model)] == expected


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe"])
@pytest.mark.parametrize("first_k, expected", [(0, [0, 1, 2]), (2, [2])])
def test_first_k_dense_replace(name, first_k, expected):
    model = _meta_model(_config(name, first_k_dense_replace=first_k))
    blocks = _family(name).moe_blocks(model)
    assert [b.layer for b in blocks] == expected
    assert all(hasattr(b.module, "experts") for b in blocks)
    dense = [i for i in range(3) if i not in expected]
    assert all(not hasattr(model.model.layers[i].mlp, "experts") for i in dense)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"num_hidden_layers": 5, "moe_layer_interval": 2, "moe_layer_start_index": 0, "moe_layer_end_index": -1}, [1, 3]),
        ({"num_hidden_layers": 5, "moe_layer_interval": 1, "moe_layer_start_index": 2, "moe_layer_end_index": 3}, [2, 3]),
        ({"num_hidden_layers": 5, "moe_layer_interval": 2, "moe_layer_start_index": 2, "moe_layer_end_index": 2}, []),
    ],
)
def test_ernie_moe_layer_interval_start_end(overrides, expected):
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock

    model = _meta_model(_config("ernie4_5_moe", **overrides))
    assert _layers_with(model, "model.layers", "mlp", Ernie4_5_MoeSparseMoeBlock) == expected
    if expected:
        assert [b.layer for b in _family("ernie4_5_moe").moe_blocks(model)] == expected
    else:
        with pytest.raises(FamilyError, match="no MoE blocks"):
            _family("ernie4_5_moe").moe_blocks(model)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"num_hidden_layers": 4, "interleave_moe_layer_step": 2}, [1, 3]),
        ({"num_hidden_layers": 3, "interleave_moe_layer_step": 1}, [0, 1, 2]),
        ({"num_hidden_layers": 3, "moe_layers": [0, 2]}, [0, 2]),
    ],
)
def test_llama4_moe_layers_and_interleave(overrides, expected):
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    config = _config("llama4", **{"moe_layers": None, **overrides})
    model = _meta_model(config)
    assert _layers_with(model, "model.layers", "feed_forward", Llama4TextMoe) == expected
    assert [b.layer for b in _family("llama4").moe_blocks(model)] == expected


def test_a_rule_that_disagrees_with_the_model_is_a_clear_error():
    model = _meta_model(_config("qwen3_moe"))  # layer 1 is dense
    family = _family("qwen3_moe")
    plugin = get_plugin_manager().get_plugin("qwen3_moe")
    original = plugin.spec
    plugin.spec = dataclasses.replace(original, is_moe_layer=lambda config, i: True)
    try:
        with pytest.raises(FamilyError, match=r"model\.layers\.1\.mlp .*has no router 'gate'"):
            family.moe_blocks(model)
    finally:
        plugin.spec = original


# ---------------------------------------------------------------------------------------------
# Routers: sigmoid with correction bias, softmax with selection-only bias, fixed top-2, JetMoE
# ---------------------------------------------------------------------------------------------


def _router_case(name, bias_expert=5, bias=3.0):
    family = _family(name)
    model = _model(family.example_config(), family)
    block = family.moe_blocks(model)[0]
    capture = family.router_capture(block)
    with torch.no_grad():
        capture.selection_bias.zero_()
        capture.selection_bias.view(-1)[bias_expert] = bias  # expert 5 always chosen, whatever its score
    x = torch.randn(12, block.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, weights, indices = block.module.gate(x)
    return family, block, capture, logits, weights, indices


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe"])
def test_sigmoid_router_with_correction_bias(name):
    family, block, capture, logits, weights, indices = _router_case(name)
    assert capture.scoring == "sigmoid"
    assert capture.selection_bias is block.module.gate.e_score_correction_bias  # live, not a copy
    picked = capture.select(logits, block.top_k)
    assert torch.equal(picked.sort(dim=-1).values, indices.sort(dim=-1).values)
    assert (indices == 5).any(dim=-1).all()
    plain = capture.probabilities(logits).topk(block.top_k, dim=-1).indices
    assert not torch.equal(plain.sort(dim=-1).values, picked.sort(dim=-1).values), "the bias must matter here"
    # The routing weights are the *uncorrected* sigmoid scores (normalised, scaled).
    cfg = block.module.gate
    probs = torch.sigmoid(logits).gather(1, indices)
    expected = probs / (probs.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
    torch.testing.assert_close(weights, expected)


def test_ernie_softmax_router_bias_only_selects():
    family, block, capture, logits, weights, indices = _router_case("ernie4_5_moe", bias=1.0)
    assert capture.scoring == "softmax"
    assert capture.selection_bias is block.module.gate.moe_statics.e_score_correction_bias
    picked = capture.select(logits, block.top_k)
    assert torch.equal(picked.sort(dim=-1).values, indices.sort(dim=-1).values)
    plain = capture.probabilities(logits).topk(block.top_k, dim=-1).indices
    assert not torch.equal(plain.sort(dim=-1).values, picked.sort(dim=-1).values)
    probs = torch.softmax(logits, dim=-1).gather(1, indices)
    torch.testing.assert_close(weights, probs / probs.sum(-1, keepdim=True))


@pytest.mark.parametrize("configured_k", [1, 3])
def test_phimoe_top_k_is_two_whatever_the_config_says(configured_k):
    family = _family("phimoe")
    model = _model(_config("phimoe", num_experts_per_tok=configured_k), family)
    blocks = family.moe_blocks(model)
    assert all(b.top_k == 2 for b in blocks)
    x = torch.randn(6, blocks[0].hidden_size)
    with torch.no_grad():
        _, _, selected = blocks[0].module.router(x)
    assert selected.shape == (6, 2)
    capture = family.router_capture(blocks[0])
    with torch.no_grad():
        logits = capture.extract(blocks[0].module.router(x))
    assert torch.equal(capture.select(logits, 2).sort(-1).values, selected.sort(-1).values)


def test_jetmoe_captures_only_the_mlp_router():
    family = _family("jetmoe")
    model = _model(family.example_config(), family)
    blocks = family.moe_blocks(model)
    for b in blocks:
        capture = family.router_capture(b)
        layer = model.model.layers[b.layer]
        assert capture.module is layer.mlp.router
        assert capture.module is not layer.self_attention.experts.router
    captured = []
    hooks = [family.router_capture(b).module.register_forward_hook(
        lambda m, a, out, c=family.router_capture(b): captured.append(c.extract(out))) for b in blocks]
    ids = input_ids(model.config)
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    for h in hooks:
        h.remove()
    entries = out.router_logits
    assert len(entries) == 3 * len(blocks)  # [attention, attention (again), mlp] per layer
    for i, logits in enumerate(captured):
        assert logits.dtype == torch.float32
        assert torch.equal(logits, entries[3 * i + 2])
        assert not torch.equal(logits, entries[3 * i])


# ---------------------------------------------------------------------------------------------
# Where the shared expert's output lands: Llama 4 (T, H) tuples, GraniteMoE/MiniMax scaling
# ---------------------------------------------------------------------------------------------


def _randomise_shared(model, scale=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_shared_parameter(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                if scale is not None and name.endswith("nexus_shared_scale.weight"):
                    p.fill_(scale)


def test_llama4_shared_expert_added_to_the_flat_block_output():
    family = _family("llama4")
    model = _model(family.example_config(), family)
    block = family.moe_blocks(model)[0]
    x = torch.randn(2, 5, block.hidden_size)
    with torch.no_grad():
        base_out, base_logits = block.module(x)
    assert base_out.shape == (10, block.hidden_size)
    attach_shared_experts(model, family, gate_mode="none")
    _randomise_shared(model)
    with torch.no_grad():
        out, logits = block.module(x)
        expected = base_out + block.module.nexus_shared(x).reshape(10, block.hidden_size)
        with disable_shared_experts(model):
            off, _ = block.module(x)
    assert torch.equal(logits, base_logits), "router logits at out[1] must pass through untouched"
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert torch.equal(off, base_out)


@pytest.mark.parametrize(
    "name, factor_field, factor",
    [("granitemoe", "residual_multiplier", 0.5), ("minimax", "mlp_beta_factor", 0.5)],
)
def test_block_output_scaling_applies_to_the_shared_expert(name, factor_field, factor):
    family = _family(name)
    config = _config(name, **{factor_field: factor})
    model = _model(config, family)
    ids = input_ids(config)
    with torch.no_grad():
        before = model(ids).logits
    blocks = attach_shared_experts(model, family, gate_mode="scalar")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before), "zero-gate attach must be bit-identical"

    _randomise_shared(model, scale=0.7)
    block = blocks[0]  # the first MoE layer: its input is the same with and without shared experts
    layer = model.get_submodule(block.path.rsplit(".", 1)[0])
    seen = {}
    h_in = block.module.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    h_out = layer.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out.detach().clone()))
    try:
        with torch.no_grad():
            model(ids)
            on, x = seen["out"], seen["x"]
            with disable_shared_experts(model):
                model(ids)
            off, x_off = seen["out"], seen["x"]
            shared = 0.7 * block.module.nexus_shared(x)
    finally:
        h_in.remove()
        h_out.remove()
    assert torch.equal(x, x_off)
    torch.testing.assert_close(on - off, factor * shared, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Experts on disk: DBRX flat tensors and activation, GraniteMoE renamed tensors, JetMoE
# ---------------------------------------------------------------------------------------------


def test_dbrx_example_config_works_around_the_construction_defect():
    attn = _family("dbrx").example_config().attn_config
    assert attn.rope_theta and attn.clip_qkv is not None  # transformers 5.23 crashes without them


def test_dbrx_reads_flat_experts(tmp_path):
    family = _family("dbrx")
    path = build_checkpoint(family, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = model.config.ffn_config
    E, I, H = cfg.moe_num_experts, cfg.ffn_hidden_size, model.config.d_model
    weights = family.read_experts(CheckpointReader(path), model.config, 1, [3, 0])
    mlp = model.transformer.blocks[1].ffn.experts.mlp
    for i, e in enumerate([3, 0]):  # families.md recipe, independent of the layout code
        assert torch.equal(weights.gate[i], mlp.w1.view(E, I, H)[e])
        assert torch.equal(weights.up[i], mlp.v1.view(E, I, H)[e])
        assert torch.equal(weights.down[i], mlp.w2.view(E, I, H)[e].T)


def test_dbrx_activation_comes_from_ffn_act_fn():
    config = _config("dbrx")
    config.ffn_config.ffn_act_fn = {"name": "gelu"}
    act = _family("dbrx").activation(config)
    model = AutoModelForCausalLM.from_config(config)
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    glu = model.transformer.blocks[0].ffn.experts.mlp
    torch.testing.assert_close(act(g, u), glu.activation_fn(g) * u)
    assert not torch.allclose(act(g, u), torch.nn.functional.silu(g) * u)


def test_jetmoe_activation_comes_from_activation_function():
    config = _config("jetmoe", activation_function="gelu")
    model = AutoModelForCausalLM.from_config(config)
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(_family("jetmoe").activation(config)(g, u), model.model.layers[0].mlp.activation(g) * u)


def test_granitemoe_reads_renamed_and_unrenamed_checkpoints(tmp_path):
    family = _family("granitemoe")
    original = build_checkpoint(family, tmp_path / "original")
    reader = CheckpointReader(original)
    assert "model.layers.0.block_sparse_moe.input_linear.weight" in reader
    model = AutoModelForCausalLM.from_pretrained(original)
    model.save_pretrained(tmp_path / "memory", save_original_format=False)
    reader2 = CheckpointReader(tmp_path / "memory")
    assert "model.layers.0.block_sparse_moe.experts.gate_up_proj" in reader2
    a = family.read_experts(reader, model.config, 0, [1, 2])
    b = family.read_experts(reader2, model.config, 0, [1, 2])
    for name in ("gate", "up", "down"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_missing_expert_tensors_name_what_was_tried(tmp_path):
    family = _family("mixtral")
    path = build_checkpoint(_family("olmoe"), tmp_path)  # an OLMoE checkpoint read as Mixtral
    with pytest.raises(NexusError, match="block_sparse_moe|mlp.experts.gate_up_proj"):
        family.read_experts(CheckpointReader(path), _family("olmoe").example_config(), 0, [0])


def test_hunyuan_per_layer_top_k():
    model = _meta_model(_config("hunyuan_v1_moe", moe_topk=[1, 2]))
    assert [b.top_k for b in _family("hunyuan_v1_moe").moe_blocks(model)] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Native shared experts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, paths",
    [
        ("qwen2_moe", ("shared_expert", "shared_expert_gate")),
        ("deepseek_v3", ("shared_experts",)),
        ("glm4_moe", ("shared_experts",)),
        ("ernie4_5_moe", ("shared_experts",)),
        ("hunyuan_v1_moe", ("shared_mlp",)),
        ("llama4", ("shared_expert",)),
        ("mixtral", ()),
        ("gpt_oss", ()),
    ],
)
def test_native_shared_paths(name, paths):
    blocks = _family(name).moe_blocks(_meta_model(_config(name)))
    assert all(b.native_shared == paths for b in blocks)


def test_ernie_without_shared_experts_has_no_native_shared():
    blocks = _family("ernie4_5_moe").moe_blocks(_meta_model(_config("ernie4_5_moe", moe_num_shared_experts=0)))
    assert blocks and all(b.native_shared == () for b in blocks)


def test_qwen2_native_shared_expert_trains_beside_nexus_shared():
    family = _family("qwen2_moe")
    model = _model(family.example_config(), family)
    blocks = attach_shared_experts(model, family, gate_mode="none")
    native = native_shared_modules(blocks)
    assert [type(m).__name__ for m in native] == ["Qwen2MoeMLP", "Linear"] * len(blocks)
    native_ids = {id(p) for m in native for p in m.parameters()}
    trainable = freeze_base(model, extra_trainable_modules=native)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
    assert names == {n for n, p in model.named_parameters() if is_shared_parameter(n) or id(p) in native_ids}
    assert any(".mlp.shared_expert.gate_proj" in n for n in names)
    assert any(".mlp.shared_expert_gate." in n for n in names)
    assert not any(".mlp.experts." in n or ".mlp.gate." in n for n in names)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    ids = input_ids(model.config)
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in names), n


def test_freeze_base_without_extra_modules_keeps_native_shared_frozen():
    family = _family("deepseek_v3")
    model = _model(family.example_config(), family)
    attach_shared_experts(model, family)
    freeze_base(model)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".shared_experts." in n)


# ---------------------------------------------------------------------------------------------
# Overriding one concern of a family from another plugin
# ---------------------------------------------------------------------------------------------


# -- start override_one_hook --
class GeluMixtral:
    """A plugin that changes one concern of the ``mixtral`` family: its expert activation."""

    __name__ = "gelu-mixtral"

    @nexus.hookimpl(tryfirst=True)
    def nexus_activation(self, family, config):
        if family != "mixtral":
            return None  # every plugin sees every call: answer only for the family you override
        return lambda gate, up: torch.nn.functional.gelu(gate) * up
# -- end override_one_hook --


def test_a_plugin_can_override_one_hook_of_a_family():
    family = _family("mixtral")
    config = family.example_config()
    g, u = torch.randn(3, 4), torch.randn(3, 4)
    pm = get_plugin_manager()
    pm.register(GeluMixtral(), name="gelu-mixtral")
    try:
        torch.testing.assert_close(family.activation(config)(g, u), torch.nn.functional.gelu(g) * u)
        assert _family("olmoe").activation(config)(g, u).allclose(torch.nn.functional.silu(g) * u)
        assert len(family.moe_blocks(_meta_model(config))) == 2  # the other hooks are untouched
    finally:
        pm.unregister(name="gelu-mixtral")
    torch.testing.assert_close(family.activation(config)(g, u), torch.nn.functional.silu(g) * u)


# ---------------------------------------------------------------------------------------------
# Docs: every code sample is a marked region of a tested file, copied verbatim
# ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "docs" / "adding-a-family.md", ROOT / "plugins" / "nexus-family-example" / "README.md"]
SAMPLE_SOURCES = [
    *sorted((ROOT / "families").glob("*/__init__.py")),
    ROOT / "plugins" / "nexus-family-example" / "nexus_family_example" / "__init__.py",
    ROOT / "plugins" / "nexus-family-example" / "pyproject.toml",
    ROOT / "tests" / "test_conformance.py",
    Path(__file__).resolve(),
]
_REGION = re.compile(r"^# -- start (\w+) --\n(.*?)^# -- end \1 --$", re.S | re.M)


def _regions(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in _REGION.finditer(text)}


def _source_regions() -> dict[str, str]:
    found = {}
    for path in SAMPLE_SOURCES:
        for name, body in _regions(path.read_text()).items():
            assert name not in found, f"region {name!r} is marked twice"
            found[name] = body
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_samples_are_the_tested_regions(doc):
    """Each ``# -- start NAME --`` sample in the docs is exactly region NAME of a tested file."""
    sources = _source_regions()
    samples = _regions(doc.read_text())
    assert samples, f"{doc} has no code samples from tested files"
    for name, body in samples.items():
        assert name in sources, f"{doc.name} shows region {name!r}, which no tested file marks"
        assert body == sources[name], f"{doc.name}: region {name!r} differs from its tested source; copy it again"


def test_every_marked_region_is_shown_in_the_docs():
    shown = set()
    for doc in DOCS:
        shown |= set(_regions(doc.read_text()))
    assert set(_source_regions()) <= shown
