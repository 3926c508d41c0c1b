"""The conformance matrix: every registered family (first-party or installed plugin) x the same checks.

Families are discovered through the real entry points (``registered_families``), so a newly
installed plugin is tested without editing this file. Each family's tiny example model is built
once per session, written with the family's ``write_checkpoint`` and loaded back from disk.
"""

from __future__ import annotations

import pytest
import torch

from helpers_conformance import (
    build_checkpoint,
    double_block,
    input_ids,
    layer_prefix,
    own_expert_forward,
    packed_variants,
    record_outputs,
    registered_family_names,
    swiglu_from_weights,
)
from nexus.adapter import AdapterConfig, load_adapter, save_adapter
from nexus.checkpoint import CheckpointReader
from nexus.constants import SHARED_SCALE_NAME
from nexus.family import resolve_family
from nexus.fingerprint import config_fingerprint
from nexus.loading import load_model
from nexus.shared_expert import attach_shared_experts, freeze_base, is_shared_parameter

# -- start conformance_families --
FAMILIES = registered_family_names()  # every family the installed plugins register
# ... plus "name@fp8" for families whose checkpoints also ship block-scaled FP8 (loaded packed).
CASES = FAMILIES + packed_variants()


@pytest.fixture(params=CASES)
def case(request, family_checkpoint):
    """``(family, checkpoint dir, freshly loaded model)`` for one family."""
    family, path = family_checkpoint(request.param)
    return family, path, load_model(path)
# -- end conformance_families --


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """``name -> (family, checkpoint dir)``, each built once per session."""
    cache = {}

    def get(name):
        if name not in cache:
            family_name, _, fmt = name.partition("@")
            family = resolve_family(name=family_name)
            path = tmp_path_factory.mktemp(f"ckpt_{family_name}_{fmt}")
            cache[name] = (family, build_checkpoint(family, path, fmt=fmt or None))
        return cache[name]

    return get


def test_matrix_covers_every_first_party_family():
    first_party = {
        "gpt_oss", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "granitemoe",
        "phimoe", "minimax", "ernie4_5_moe", "hunyuan_v1_moe", "llama4", "dbrx", "jetmoe",
    }
    assert first_party <= set(FAMILIES)


def test_family_resolves_from_its_own_model_type(case):
    family, path, model = case
    assert resolve_family(model.config).name == family.name
    assert model.config.model_type in family.info.model_types


def test_blocks_and_router_capture_match_output_router_logits(case):
    """(a) The blocks found are exactly the MoE layers, and the hook-captured logits equal
    transformers' own ``output_router_logits`` entries."""
    family, _, model = case
    blocks = family.moe_blocks(model)
    captures = [family.router_capture(b) for b in blocks]
    assert [b.layer for b in blocks] == sorted({b.layer for b in blocks})

    # Every module of a router class, wherever it is (JetMoE's attention routers share the class).
    router_classes = {type(c.module) for c in captures}
    extract_of_class = {type(c.module): c.extract for c in captures}
    all_routers = {n: m for n, m in model.named_modules() if type(m) in router_classes}
    claimed = {id(c.module) for c in captures}
    claimed_names = [n for n, m in all_routers.items() if id(m) in claimed]
    assert len(claimed_names) == len(blocks), "each block's router must be a distinct module"

    ids = input_ids(model.config)
    extract = {n: extract_of_class[type(m)] for n, m in all_routers.items()}
    with torch.no_grad(), record_outputs(all_routers, extract) as calls:
        out = model(ids, output_router_logits=True)
    entries = out.router_logits
    assert entries, "output_router_logits returned nothing"
    # Each entry is the output of some router call (JetMoE also records its attention mixture's
    # logits a second time through JetMoeAttention, hence matching by value, not position).
    entry_sources = []
    for j, entry in enumerate(entries):
        sources = [n for n, t in calls if torch.equal(t, entry)]
        assert sources, f"output_router_logits[{j}] matches no router call"
        entry_sources.append(sources[0])
    assert [n for n in entry_sources if n in claimed_names] == claimed_names, (
        "the captured block logits are not exactly output_router_logits' MoE entries, in layer order"
    )

    # Calls of claimed routers are the blocks' logits, in layer order, shaped [T, E].
    mine = [(n, t) for n, t in calls if n in claimed_names]
    assert len(mine) == len(blocks)
    for (name, logits), block in zip(mine, blocks):
        assert name.startswith(block.path + "."), f"{name} is not inside {block.path}"
        assert logits.shape == (ids.numel(), block.num_experts)
    # A router we did not claim must sit in a layer that has a claimed block (JetMoE's attention
    # mixture); one in a layer without a block would be a missed MoE layer.
    prefixes = {layer_prefix(b.path) + "." for b in blocks}
    for name, _ in calls:
        if name not in claimed_names:
            assert any(name.startswith(p) for p in prefixes), f"router {name} fired in a layer with no MoE block"
    # Dense layers hold no router at all.
    moe_layers = {b.layer for b in blocks}
    layers_path = layer_prefix(layer_prefix(blocks[0].path))
    for i, _ in enumerate(model.get_submodule(layers_path)):
        has_router = any(n.startswith(f"{layers_path}.{i}.") for n in all_routers)
        assert has_router == (i in moe_layers), f"layer {i}: router present={has_router}, claimed MoE={i in moe_layers}"


def test_read_experts_reproduce_family_expert_forward(case):
    """(b) Experts read from disk recompute, in float64, what the family's experts module computes
    for tokens routed to that expert alone."""
    family, path, model = case
    reader = CheckpointReader(path)
    activation = family.activation(model.config)
    hidden = family.moe_blocks(model)[0].hidden_size
    x = torch.randn(5, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for block in family.moe_blocks(model):
        experts = list(range(block.num_experts))[::-1]  # reversed: the result must follow the request order
        weights = family.read_experts(reader, model.config, block.layer, experts)
        assert weights.gate.dtype == torch.float32
        assert tuple(weights.gate.shape) == (len(experts), block.intermediate_size, block.hidden_size)
        assert tuple(weights.down.shape) == (len(experts), block.hidden_size, block.intermediate_size)
        ref_block = double_block(block.module)
        with torch.no_grad():
            for i, e in enumerate(experts):
                ref = own_expert_forward(ref_block, e, x)
                got = swiglu_from_weights(weights, i, x, activation)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"layer {block.layer} expert {e}: {m}")


def test_zero_gate_attach_is_bit_identical(case):
    """(c) Shared experts attached with a zero scalar gate leave the logits bit-identical."""
    family, _, model = case
    ids = input_ids(model.config)
    with torch.no_grad():
        before = model(ids).logits
        blocks = attach_shared_experts(model, family, gate_mode="scalar")
        after = model(ids).logits
    assert len(blocks) == len(family.moe_blocks(model))
    assert torch.equal(before, after)


def test_train_step_changes_only_shared_experts(case):
    """(d) One AdamW step after ``freeze_base``: frozen parameters bit-identical, shared experts changed."""
    family, _, model = case
    attach_shared_experts(model, family, gate_mode="scalar")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(f"{SHARED_SCALE_NAME}.weight"):
                p.fill_(0.5)  # a zero gate would leave the experts without gradient at step 0
    trainable = freeze_base(model)
    assert not model.training
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not is_shared_parameter(n)}
    shared = {n: p.detach().clone() for n, p in model.named_parameters() if is_shared_parameter(n)}
    assert {id(p) for p in trainable} == {id(p) for n, p in model.named_parameters() if is_shared_parameter(n)}

    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    ids = input_ids(model.config)
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()

    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None, f"frozen {name} got a gradient"
            assert torch.equal(p, frozen[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(p, shared[name]), f"shared {name} did not change"


def test_adapter_round_trip_gives_identical_logits(case, tmp_path):
    """(e) save_adapter then load_adapter on a fresh base reproduces the adapted logits exactly."""
    family, path, model = case
    blocks = attach_shared_experts(model, family, intermediate_size=32, gate_mode="scalar")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_shared_parameter(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    ids = input_ids(model.config)
    with torch.no_grad():
        adapted = model(ids).logits
        base = load_model(path)
        base_logits = base(ids).logits
    assert not torch.equal(adapted, base_logits), "the shared experts had no effect"

    config = AdapterConfig(
        family=family.name,
        base_fingerprint=config_fingerprint(model.config),
        shared_intermediate_size=32,
        gate_mode="scalar",
        model_type=model.config.model_type,
    )
    save_adapter(model, tmp_path / "adapter", config)
    load_adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(base(ids).logits, adapted)
    assert len(blocks) == len(family.moe_blocks(base))


def test_collect_select_convert_on_the_family(case, tmp_path):
    """The engines run on every family: router statistics over padded batches equal per-row
    recomputation, select picks K experts per MoE layer, and convert's shared experts are the
    averages of the selected experts read from disk; the converted adapter loads and, with its
    zero gate, leaves the logits unchanged."""
    from nexus.data import TokenData
    from nexus.engines.convert import ConvertConfig, convert
    from nexus.engines.collect import CollectArgs, collect_router_stats
    from nexus.engines.select import select_experts
    from nexus.routing import record_routers

    family, path, model = case
    blocks = family.moe_blocks(model)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (7, 4, 9, 6)]
    stats = collect_router_stats(model, family, TokenData(rows, pad_id=0), CollectArgs(batch_size=2, checkpoint_every=0),
                                 progress=False)
    assert sorted(stats.layers) == [b.layer for b in blocks]
    captures = {b.layer: family.router_capture(b) for b in blocks}
    with torch.no_grad(), record_routers(family, blocks) as rec:
        ref = {b.layer: 0 for b in blocks}
        for r in rows:  # one row at a time: no padding at all
            model(torch.tensor([r]))
            for b in blocks:
                ref[b.layer] = ref[b.layer] + captures[b.layer].probabilities(rec.logits[b.layer]).double().sum(0)
    for b in blocks:
        s = stats.layers[b.layer]
        assert s.tokens == sum(len(r) for r in rows)
        torch.testing.assert_close(s.sum_p, ref[b.layer], rtol=1e-4, atol=1e-4)

    k = min(2, min(b.num_experts for b in blocks))
    selection = select_experts(stats, top_k=k)
    assert [x["layer"] for x in selection["layers"]] == [b.layer for b in blocks]
    assert all(len(set(x["experts"])) == k for x in selection["layers"])

    adapter = convert(ConvertConfig(model=path, output=tmp_path / "adapter", selection=selection, strategy="pca",
                                    gate_mode="scalar"), progress=False)
    base = load_model(path)
    ids = input_ids(model.config)
    with torch.no_grad():
        before = base(ids).logits
    load_adapter(base, adapter)
    with torch.no_grad():
        assert torch.equal(base(ids).logits, before)
    reader = CheckpointReader(path)
    for block, sel in zip(family.moe_blocks(base), selection["layers"]):
        w = family.read_experts(reader, base.config, block.layer, sel["experts"])
        shared = block.module.nexus_shared
        torch.testing.assert_close(shared.gate_proj.weight, w.gate.mean(0))
        torch.testing.assert_close(shared.up_proj.weight, w.up.mean(0))
        torch.testing.assert_close(shared.down_proj.weight, w.down.mean(0))
