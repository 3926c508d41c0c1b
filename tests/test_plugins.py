"""The plugin contract: discovery, the claim pattern, overrides, switches, and one test per hook.

Every hook in ``nexus/hookspecs.py`` has a ``test_hook_<name>`` here (checked by
``tests/test_hooks_documented.py``).
"""

from __future__ import annotations

import importlib.metadata
import logging

import click
import pluggy
import pytest
import torch
from click.testing import CliRunner

import nexus
from nexus.errors import FamilyError, NexusError
from nexus.family import registered_families, resolve_family
from nexus.plugins import build_plugin_manager, check_pending, get_plugin_manager, plugin_distribution
from nexus.shared_expert import SwiGLU, attach_shared_experts
from nexus.types import ExpertWeights

# ---------------------------------------------------------------------------------------------
# Helpers: inline plugins and fake distributions
# ---------------------------------------------------------------------------------------------


class ToyFamilyPlugin:
    """A minimal family plugin: it only registers a family (everything else falls to defaults)."""

    def __init__(self, family: str, model_types=()):
        self.__name__ = f"toy-{family}"
        self.family, self.model_types = family, tuple(model_types)

    @nexus.hookimpl
    def nexus_register_families(self, register):
        register(self.family, model_types=self.model_types, description=f"toy family {self.family}")


class _FakeEntryPoint:
    group = "nexus"

    def __init__(self, name, plugin, dist, group="nexus"):
        self.name, self._plugin, self.dist, self.group = name, plugin, dist, group
        self.value = f"{name}_module:plugin"

    def load(self):
        if isinstance(self._plugin, Exception):
            raise self._plugin
        return self._plugin


class _FakeDistribution:
    """Stands in for an installed package declaring ``[project.entry-points.nexus]``."""

    def __init__(self, name, version="1.0", **entry_points):
        self.name, self.version = name, version
        self.metadata = {"Name": name}
        self.entry_points = [_FakeEntryPoint(ep, plugin, self) for ep, plugin in entry_points.items()]


@pytest.fixture
def fake_distributions(monkeypatch):
    """Replace the installed distributions with fake ones (nothing is installed), as pluggy's tests do."""

    def install(*dists):
        monkeypatch.setattr(importlib.metadata, "distributions", lambda: list(dists))

    monkeypatch.delenv("NEXUS_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("NEXUS_TRACE_PLUGINS", raising=False)
    return install


@pytest.fixture
def registered():
    """Register inline plugins on the process-wide plugin manager; unregistered afterwards."""
    pm = get_plugin_manager()
    names = []

    def register(plugin, name=None):
        names.append(pm.register(plugin, name=name or plugin.__name__))
        return plugin

    try:
        yield register
    finally:
        for name in names:
            pm.unregister(name=name)


def _family_dist(letter: str):
    return _FakeDistribution(f"nexus-family-{letter}", **{letter: ToyFamilyPlugin(f"fam_{letter}")})


# ---------------------------------------------------------------------------------------------
# Discovery through entry points and the environment switches
# ---------------------------------------------------------------------------------------------


def test_entry_point_discovery(fake_distributions):
    other_group = _FakeDistribution("llm-something")
    other_group.entry_points = [_FakeEntryPoint("x", RuntimeError("must not be loaded"), other_group, group="llm")]
    fake_distributions(_family_dist("a"), other_group)
    pm = build_plugin_manager()
    assert pm.has_plugin("a") and not pm.has_plugin("x")
    assert pm.has_plugin("nexus.defaults")
    families = registered_families(pm)
    assert list(families) == ["fam_a"]
    assert families["fam_a"].plugin == "a"
    assert plugin_distribution(pm, "a") == ("nexus-family-a", "1.0")
    assert plugin_distribution(pm, "nexus.defaults")[0] == "nexus-moe"


def test_real_entry_point_provides_gpt_oss():
    pm = get_plugin_manager()
    info = registered_families(pm)["gpt_oss"]
    assert info.plugin == "gpt_oss" and info.model_types == ("gpt_oss",)
    assert plugin_distribution(pm, "gpt_oss")[0] == "nexus-moe"


def test_load_plugins_switch(fake_distributions, monkeypatch):
    c_plugin = RuntimeError("c must not be imported")
    dist_c = _FakeDistribution("nexus-family-c", c=c_plugin)
    fake_distributions(_family_dist("a"), _family_dist("b"), dist_c)
    monkeypatch.setenv("NEXUS_LOAD_PLUGINS", "a, b")
    assert sorted(registered_families(build_plugin_manager())) == ["fam_a", "fam_b"]
    # By distribution name as well as entry-point name.
    monkeypatch.setenv("NEXUS_LOAD_PLUGINS", "nexus-family-b")
    assert sorted(registered_families(build_plugin_manager())) == ["fam_b"]
    monkeypatch.setenv("NEXUS_LOAD_PLUGINS", "")
    pm = build_plugin_manager()
    assert registered_families(pm) == {}
    assert [name for name, _ in pm.list_name_plugin()] == ["nexus.defaults"]
    with pytest.raises(FamilyError, match="registered families: none"):
        resolve_family(name="fam_a", pm=pm)
    # Unfiltered, the broken plugin is reported by name and distribution.
    monkeypatch.delenv("NEXUS_LOAD_PLUGINS")
    with pytest.raises(NexusError, match=r"'c' from distribution 'nexus-family-c'.*c must not be imported"):
        build_plugin_manager()


def test_trace_plugins_logs_hook_calls(fake_distributions, monkeypatch, caplog):
    fake_distributions(_family_dist("a"))
    monkeypatch.setenv("NEXUS_TRACE_PLUGINS", "1")
    pm = build_plugin_manager()
    family = resolve_family(name="fam_a", pm=pm)
    with caplog.at_level(logging.INFO, logger="nexus.plugins"):
        act = family.activation(type("Cfg", (), {"hidden_act": "silu"})())
    messages = [r.getMessage() for r in caplog.records if r.name == "nexus.plugins"]
    assert any(m.startswith("hook nexus_activation(") and "fam_a" in m and "nexus.defaults" in m for m in messages), messages
    assert any(m.startswith("hook nexus_activation returned") and repr(act) in m for m in messages), messages
    # Without the switch nothing is logged.
    monkeypatch.delenv("NEXUS_TRACE_PLUGINS")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nexus.plugins"):
        resolve_family(name="fam_a", pm=build_plugin_manager()).activation(type("Cfg", (), {"hidden_act": "silu"})())
    assert not [r for r in caplog.records if r.name == "nexus.plugins"]


class _Misspelt:
    __name__ = "misspelt"

    @nexus.hookimpl
    def nexus_moe_block(self, family, model):  # the spec is nexus_moe_blocks
        return None


def test_misspelt_hookimpl_is_an_error_naming_it(fake_distributions):
    pm = build_plugin_manager(load_entry_points=False)
    pm.register(_Misspelt(), name="misspelt")
    with pytest.raises(NexusError, match="nexus_moe_block") as info:
        check_pending(pm)
    assert "hookspecs.py" in str(info.value)
    # The same through entry-point discovery.
    fake_distributions(_FakeDistribution("nexus-typo", typo=_Misspelt()))
    with pytest.raises(NexusError, match="nexus_moe_block"):
        build_plugin_manager()


def test_two_plugins_registering_one_family_name():
    pm = build_plugin_manager(load_entry_points=False)
    pm.register(ToyFamilyPlugin("dup"), name="first-plugin")
    pm.register(ToyFamilyPlugin("dup"), name="second-plugin")
    with pytest.raises(FamilyError, match="'dup'") as info:
        registered_families(pm)
    assert "first-plugin" in str(info.value) and "second-plugin" in str(info.value)


def test_two_families_claiming_one_model_type():
    pm = build_plugin_manager(load_entry_points=False)
    pm.register(ToyFamilyPlugin("one", ["shared_type"]), name="p1")
    pm.register(ToyFamilyPlugin("two", ["shared_type"]), name="p2")
    with pytest.raises(FamilyError, match="'shared_type'.*'one'.*'two'"):
        registered_families(pm)


def test_invalid_family_name_is_refused():
    pm = build_plugin_manager(load_entry_points=False)
    pm.register(ToyFamilyPlugin("Bad-Name"), name="bad")
    with pytest.raises(FamilyError, match="'bad'.*'Bad-Name'"):
        registered_families(pm)


def test_resolve_family_errors(gpt_oss_config):
    from transformers import LlamaConfig

    with pytest.raises(FamilyError, match="unknown family 'nosuch'; registered families: .*gpt_oss"):
        resolve_family(name="nosuch")
    with pytest.raises(FamilyError, match="model_type 'llama' has no MoE family.*gpt_oss"):
        resolve_family(LlamaConfig())
    assert resolve_family(gpt_oss_config).name == "gpt_oss"
    assert resolve_family({"model_type": "gpt_oss"}).name == "gpt_oss"
    assert resolve_family(gpt_oss_config, name="gpt_oss").name == "gpt_oss"
    assert resolve_family(name="gpt_oss").name == "gpt_oss"  # no config: nothing to check against


def test_forced_family_must_declare_the_model_type(gpt_oss_config):
    from transformers import LlamaConfig, MixtralConfig

    # Another family's model: refused, naming the family that does handle it.
    with pytest.raises(FamilyError, match=r"family 'gpt_oss' handles model types gpt_oss, not the model's 'mixtral'"
                                          r".*drop --family to use family 'mixtral'"):
        resolve_family(MixtralConfig(), name="gpt_oss")
    # A model type no family declares: refused, saying how to make it work.
    with pytest.raises(FamilyError, match=r"not the model's 'llama'.*install a plugin"):
        resolve_family(LlamaConfig(), name="gpt_oss")
    with pytest.raises(FamilyError, match="not the model's 'gpt_oss'"):
        resolve_family({"model_type": "gpt_oss"}, name="mixtral")


def test_family_without_an_implementation_says_which_hook():
    pm = build_plugin_manager(load_entry_points=False)
    pm.register(ToyFamilyPlugin("bare"), name="bare")
    family = resolve_family(name="bare", pm=pm)
    with pytest.raises(FamilyError, match="'bare'.*nexus_example_config"):
        family.example_config()


# ---------------------------------------------------------------------------------------------
# One test per hook
# ---------------------------------------------------------------------------------------------


def test_hook_nexus_register_families(registered, gpt_oss_config):
    registered(ToyFamilyPlugin("toy_moe_family", ["toy_moe"]), name="toy-plugin")
    families = registered_families()
    assert families["toy_moe_family"].plugin == "toy-plugin"
    assert families["toy_moe_family"].model_types == ("toy_moe",)
    assert families["toy_moe_family"].description == "toy family toy_moe_family"
    assert "gpt_oss" in families
    assert resolve_family({"model_type": "toy_moe"}).name == "toy_moe_family"
    assert resolve_family(gpt_oss_config).name == "gpt_oss"  # the others are untouched
    result = CliRunner().invoke(_cli(), ["families", "--json"])
    assert result.exit_code == 0, result.output
    assert "toy_moe_family" in result.output


def test_hook_nexus_example_config(gpt_oss, registered, tmp_path):
    from transformers import GptOssConfig

    from nexus.demo import build_checkpoint
    from nexus.loading import load_model

    cfg = gpt_oss.example_config()
    assert isinstance(cfg, GptOssConfig)
    model = load_model(build_checkpoint(gpt_oss, tmp_path / "demo", cfg))
    assert len(gpt_oss.moe_blocks(model)) == cfg.num_hidden_layers

    class SmallerExample:
        __name__ = "smaller-example"
        calls = []

        @nexus.hookimpl(tryfirst=True)
        def nexus_example_config(self, family):
            self.calls.append(family)
            if family != "gpt_oss":
                return None
            small = GptOssConfig.from_dict(cfg.to_dict())
            small.num_local_experts = 3
            return small

    plugin = registered(SmallerExample())
    assert gpt_oss.example_config().num_local_experts == 3
    assert plugin.calls == ["gpt_oss"]


def _cli() -> click.Group:
    from nexus.cli import cli

    return cli


def test_hook_nexus_register_commands(registered):
    from nexus.cli import load_plugin_commands

    class HelloPlugin:
        __name__ = "HelloPlugin"

        @nexus.hookimpl
        def nexus_register_commands(self, cli):
            @cli.command(name="hello-nexus")
            @click.option("--name", default="world")
            def hello(name):
                """Say hello."""
                click.echo(f"Hello, {name}!")

    registered(HelloPlugin())
    cli = _cli()
    try:
        load_plugin_commands()
        runner = CliRunner()
        result = runner.invoke(cli, ["hello-nexus", "--name", "MoE"])
        assert result.exit_code == 0, result.output
        assert result.output == "Hello, MoE!\n"
        assert "hello-nexus" in runner.invoke(cli, ["--help"]).output
        listing = runner.invoke(cli, ["plugins"]).output
        assert "HelloPlugin" in listing and "nexus_register_commands" in listing
    finally:
        cli.commands.pop("hello-nexus", None)
    assert "hello-nexus" not in CliRunner().invoke(cli, ["--help"]).output


def test_hook_nexus_moe_blocks(gpt_oss, gpt_oss_config, gpt_oss_model, registered):
    blocks = gpt_oss.moe_blocks(gpt_oss_model)
    assert [b.layer for b in blocks] == list(range(gpt_oss_config.num_hidden_layers))
    for b in blocks:
        assert b.path == f"model.layers.{b.layer}.mlp"
        assert b.module is gpt_oss_model.get_submodule(b.path)
        assert (b.num_experts, b.top_k) == (gpt_oss_config.num_local_experts, gpt_oss_config.num_experts_per_tok)
        assert (b.hidden_size, b.intermediate_size) == (64, gpt_oss_config.intermediate_size)
        assert b.expert_bias

    class OnlyOddLayers:
        """Stands in for a family whose dense and MoE layers alternate."""

        __name__ = "only-odd-layers"

        @nexus.hookimpl(tryfirst=True)
        def nexus_moe_blocks(self, family, model):
            if family != "gpt_oss":
                return None
            return [b for b in blocks if b.layer % 2 == 1]

    registered(OnlyOddLayers())
    attached = attach_shared_experts(gpt_oss_model, gpt_oss)
    assert [b.layer for b in attached] == [1]
    assert [i for i, layer in enumerate(gpt_oss_model.model.layers) if hasattr(layer.mlp, "nexus_shared")] == [1]

    class NoBlocks:
        __name__ = "no-blocks"

        @nexus.hookimpl(tryfirst=True)
        def nexus_moe_blocks(self, family, model):
            return []

    registered(NoBlocks())
    with pytest.raises(FamilyError, match="no MoE blocks.*'gpt_oss'"):
        gpt_oss.moe_blocks(gpt_oss_model)


def test_hook_nexus_router_capture(gpt_oss, gpt_oss_model):
    model = gpt_oss_model
    inputs, logits, routed = {}, {}, {}
    handles = []
    for block in gpt_oss.moe_blocks(model):
        capture = gpt_oss.router_capture(block)
        assert capture.module is block.module.router and capture.scoring == "softmax"

        def grab(module, args, output, layer=block.layer, capture=capture):
            logits[layer] = capture.extract(output)
            routed[layer] = output[2]

        def grab_input(module, args, layer=block.layer):
            inputs[layer] = args[0]

        handles += [capture.module.register_forward_hook(grab), block.module.register_forward_pre_hook(grab_input)]
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
    assert sorted(logits) == [0, 1, 2]
    for layer, lg in logits.items():
        assert lg.shape == (14, 8)  # [T, E], tokens flattened
        router = model.model.layers[layer].mlp.router
        x = inputs[layer].reshape(-1, 64).double()
        ref = x @ router.weight.double().t() + router.bias.double()
        torch.testing.assert_close(lg.double(), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(lg.topk(2, dim=-1).indices, routed[layer])


def test_hook_nexus_build_shared_expert(gpt_oss, gpt_oss_config, gpt_oss_model, registered):
    block = gpt_oss.moe_blocks(gpt_oss_model)[0]
    act = gpt_oss.activation(gpt_oss_config)
    default = gpt_oss.build_shared_expert(gpt_oss_config, block, 32)
    assert isinstance(default, SwiGLU) and default.activation.__class__ is act.__class__
    assert default.up_proj.weight.shape == (32, 64) and default.down_proj.bias.shape == (64,)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    p = {n: t.detach().double() for n, t in default.named_parameters()}
    xd = x.double()
    ref = act(xd @ p["gate_proj.weight"].t() + p["gate_proj.bias"], xd @ p["up_proj.weight"].t() + p["up_proj.bias"])
    ref = ref @ p["down_proj.weight"].t() + p["down_proj.bias"]
    torch.testing.assert_close(default(x).double(), ref, rtol=1e-5, atol=1e-6)

    class NoBiasShared:
        __name__ = "no-bias-shared"
        seen = []

        @nexus.hookimpl(tryfirst=True)
        def nexus_build_shared_expert(self, family, block, intermediate_size, activation):
            self.seen.append((family, block.layer, intermediate_size, activation))
            return SwiGLU(block.hidden_size, intermediate_size, activation, bias=False)

    plugin = registered(NoBiasShared())
    attach_shared_experts(gpt_oss_model, gpt_oss, intermediate_size=16)
    assert [(f, layer, size) for f, layer, size, _ in plugin.seen] == [("gpt_oss", 0, 16), ("gpt_oss", 1, 16), ("gpt_oss", 2, 16)]
    assert all(type(a) is type(act) for *_, a in plugin.seen)
    for layer in gpt_oss_model.model.layers:
        assert layer.mlp.nexus_shared.gate_proj.bias is None
        assert layer.mlp.nexus_shared.gate_proj.weight.shape == (16, 64)


@pytest.fixture
def doubled_activation(registered):
    """An inline plugin overriding only GPT-OSS's activation (tryfirst), as a third party would."""

    class DoubledActivation:
        __name__ = "doubled-activation"

        @staticmethod
        def act(gate, up):
            return 2.0 * torch.tanh(gate) * up

        @nexus.hookimpl(tryfirst=True)
        def nexus_activation(self, family, config):
            return self.act if family == "gpt_oss" else None

    return registered(DoubledActivation())


def test_hook_nexus_activation(gpt_oss, gpt_oss_config, gpt_oss_model, doubled_activation):
    act = gpt_oss.activation(gpt_oss_config)
    assert act is doubled_activation.act
    blocks = attach_shared_experts(gpt_oss_model, gpt_oss, gate_mode="none")
    shared = blocks[0].module.nexus_shared
    assert shared.activation is doubled_activation.act
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = shared.down_proj(2.0 * torch.tanh(shared.gate_proj(x)) * shared.up_proj(x))
        torch.testing.assert_close(shared(x), expected)
    # Other families are not affected: a family without an activation gets the core default
    # act(gate) * up with act from config.hidden_act.
    pm = get_plugin_manager()
    for hidden_act, fn in (("silu", torch.nn.functional.silu), ("gelu", torch.nn.functional.gelu)):
        default = pm.hook.nexus_activation(family="some_other_family", config=type("C", (), {"hidden_act": hidden_act})())
        g, u = torch.randn(2, 10, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(default(g, u), fn(g) * u)


def test_hook_nexus_read_experts(gpt_oss, gpt_oss_config, gpt_oss_mxfp4_dir, gpt_oss_dequantized_model, registered):
    from nexus.checkpoint import CheckpointReader

    reader = CheckpointReader(gpt_oss_mxfp4_dir)
    weights = gpt_oss.read_experts(reader, gpt_oss_config, 2, (6, 1))
    ex = gpt_oss_dequantized_model.model.layers[2].mlp.experts
    assert torch.equal(weights.down, ex.down_proj[[6, 1]].transpose(1, 2))
    assert torch.equal(weights.gate, ex.gate_up_proj[[6, 1]][..., 0::2].transpose(1, 2))

    class Observer:
        """Sees every call (claim pattern) but leaves the answer to the family."""

        __name__ = "observer"
        calls = []

        @nexus.hookimpl(tryfirst=True)
        def nexus_read_experts(self, family, reader, layer, experts):
            self.calls.append((family, layer, experts))
            return None

    observer = registered(Observer())
    again = gpt_oss.read_experts(reader, gpt_oss_config, 2, (6, 1))
    assert observer.calls == [("gpt_oss", 2, [6, 1])]
    assert torch.equal(again.up, weights.up)

    class FasterDecoder:
        """Overrides the dequantiser for gpt_oss only."""

        __name__ = "faster-decoder"

        @nexus.hookimpl(tryfirst=True)
        def nexus_read_experts(self, family, reader, config, layer, experts):
            if family != "gpt_oss":
                return None
            k, i, h = len(experts), config.intermediate_size, config.hidden_size
            return ExpertWeights(gate=torch.ones(k, i, h), up=torch.ones(k, i, h), down=torch.ones(k, h, i))

    registered(FasterDecoder())
    fast = gpt_oss.read_experts(reader, gpt_oss_config, 0, [3])
    assert torch.equal(fast.gate, torch.ones(1, 64, 64)) and not fast.has_bias


def test_hook_nexus_write_checkpoint(gpt_oss, gpt_oss_config, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from nexus.checkpoint import CheckpointReader
    from nexus.loading import load_model
    from nexus.quant.mxfp4 import decode_mxfp4, quantize_mxfp4

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gpt_oss_config)
    gpt_oss.write_checkpoint(model, tmp_path / "q")  # GPT-OSS: the released MXFP4 format
    reader = CheckpointReader(tmp_path / "q")
    assert reader.config["quantization_config"]["quant_method"] == "mxfp4"
    assert reader.is_mxfp4("model.layers.0.mlp.experts.gate_up_proj")
    assert "model.layers.0.mlp.experts.gate_up_proj" not in reader
    loaded = load_model(tmp_path / "q", dequantize=True)
    original = model.state_dict()
    for name, value in loaded.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # [E, in, out] in memory; quantised with rows = output features.
            expected = decode_mxfp4(*quantize_mxfp4(original[name].transpose(1, 2))).transpose(1, 2)
            assert torch.equal(value, expected), name
            assert not torch.equal(value, original[name])
        else:
            assert torch.equal(value, original[name]), name

    # A family without its own writer falls back to the core's save_pretrained.
    dense = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2))
    assert get_plugin_manager().hook.nexus_write_checkpoint(family="another", model=dense, path=str(tmp_path / "d"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, dense.state_dict()[name]), name


def test_plugin_hooks_are_validated_on_register():
    pm = build_plugin_manager(load_entry_points=False)

    class WrongArgs:
        __name__ = "wrong-args"

        @nexus.hookimpl
        def nexus_activation(self, family, config, extra):
            return None

    with pytest.raises(pluggy.PluginValidationError, match="extra"):
        pm.register(WrongArgs(), name="wrong-args")
