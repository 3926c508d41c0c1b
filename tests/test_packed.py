"""Packed experts: a quantised checkpoint loads with its experts as stored (MXFP4, block-scaled FP8)
and computes, differentiates and trains exactly like the dequantised model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_conformance import build_checkpoint, input_ids
from helpers_fp8 import decode_fp8_reference
from helpers_train import make_adapter, make_base, make_data
from nexus.checkpoint import CheckpointReader
from nexus.errors import NexusError
from nexus.family import resolve_family
from nexus.fingerprint import config_fingerprint
from nexus.loading import load_model
from nexus.quant.packed_experts import PackedExperts
from nexus.quant.packed_loading import packed_modules

# (family, format): the formats a first-party family declares.
CASES = [("gpt_oss", "mxfp4"), ("deepseek_v3", "fp8"), ("qwen3_moe", "fp8")]


def _forward_backward(model, ids):
    """Logits and the gradient w.r.t. the input embeddings (through every expert and router)."""
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), emb.grad


@pytest.mark.parametrize("name,fmt", CASES)
def test_packed_model_equals_dequantised_model_fp32(packed_dir, exact_packed_layout, name, fmt):
    family, path = packed_dir(name, fmt)
    packed, deq = load_model(path), load_model(path, dequantize=True)
    blocks = family.moe_blocks(packed)
    assert all(isinstance(b.module.experts, PackedExperts) and b.module.experts.fmt == fmt for b in blocks)
    assert not any(isinstance(m, PackedExperts) for m in deq.modules())
    # No float copy of an expert anywhere in the packed model.
    assert not any(".experts." in n for n, _ in packed.named_parameters())
    assert config_fingerprint(packed.config) == config_fingerprint(deq.config)
    ids = input_ids(packed.config, batch=2, seq=9)
    (lp, gp), (ld, gd) = _forward_backward(packed, ids), _forward_backward(deq, ids)
    # Bit-identical: same decoded values, same operation order as the family's own experts module.
    assert torch.equal(lp, ld)
    assert torch.equal(gp, gd)


@pytest.mark.parametrize("name,fmt", CASES)
def test_packed_model_equals_dequantised_model_bf16(packed_dir, exact_packed_layout, name, fmt):
    _, path = packed_dir(name, fmt)
    packed, deq = load_model(path, dtype=torch.bfloat16), load_model(path, dtype=torch.bfloat16, dequantize=True)
    # Against the family's own loop: in bf16, transformers' default grouped_mm and its eager loop
    # disagree on DeepSeek-V3 (logits 0.9%, gradients 2.4% of their max apart); packed equals eager.
    deq.set_experts_implementation("eager")
    ids = input_ids(packed.config, batch=2, seq=9)
    (lp, gp), (ld, gd) = _forward_backward(packed, ids), _forward_backward(deq, ids)
    assert torch.equal(lp, ld)
    assert torch.equal(gp, gd)


# ---------------------------------------------------------------------------------------------
# FP8 experts of several 128x128 blocks, non-square, not multiples of 128
# ---------------------------------------------------------------------------------------------


def _float_copy(src, dst):
    """``src`` (block-scaled FP8) written as a float32 checkpoint, every FP8 tensor decoded block by
    block by the float64 reference decoder (not the one under test). Not ``load_model(dequantize=True)``:
    transformers' load-time dequantisation takes the block size from the scale grid
    (``rows // grid_rows``), which mis-decodes the partial blocks this fixture is about."""
    from nexus.quant.fp8 import SCALE_SUFFIX

    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    tensors = load_file(file)
    out = {k: (decode_fp8_reference(t, tensors[k + SCALE_SUFFIX]) if k + SCALE_SUFFIX in tensors else t)
           for k, t in tensors.items() if not k.endswith(SCALE_SUFFIX)}
    assert len(out) < len(tensors)
    save_file(out, file, metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def multiblock_fp8(tmp_path_factory):
    """A Qwen3-MoE with H = 200, I = 300, written FP8: gate/up ``[300, 200]`` hold 3 x 2 scale blocks and
    down ``[200, 300]`` 2 x 3, the last row and column of blocks partial. :return: (FP8 dir, float copy)."""
    family = resolve_family(name="qwen3_moe")
    config = family.example_config()
    config.hidden_size, config.moe_intermediate_size = 200, 300
    root = tmp_path_factory.mktemp("multiblock_fp8")
    path = build_checkpoint(family, root / "fp8", config=config, fmt="fp8")
    return path, _float_copy(path, root / "float")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_multiblock_fp8_equals_the_dequantised_model(multiblock_fp8, dtype):
    path, float_copy = multiblock_fp8
    packed, deq = load_model(path, dtype=dtype), load_model(float_copy, dtype=dtype)
    deq.set_experts_implementation("eager")  # packed computes as the family's own loop does
    modules = packed_modules(packed)
    assert modules and all(m.fmt == "fp8" for m in modules.values())
    m = next(iter(modules.values()))
    assert m.gate.scale_bits.shape[1:] == (3, 2) and m.down.scale_bits.shape[1:] == (2, 3)
    ids = input_ids(packed.config, batch=2, seq=9)
    (lp, gp), (ld, gd) = _forward_backward(packed, ids), _forward_backward(deq, ids)
    assert torch.equal(lp, ld)
    assert torch.equal(gp, gd)


def _expert_bytes_on_disk(reader: CheckpointReader) -> int:
    total = 0
    for key in reader.keys():
        if ".experts." in key and not key.endswith("_bias"):
            t = reader.read(key)
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("name,fmt", CASES)
def test_expert_memory_is_the_on_disk_expert_bytes(packed_dir, name, fmt):
    _, path = packed_dir(name, fmt)
    model = load_model(path)
    held = sum(m.stored_bytes() for m in packed_modules(model).values())
    on_disk = _expert_bytes_on_disk(CheckpointReader(path))
    assert abs(held - on_disk) <= 0.05 * on_disk
    # ... and nothing else of expert size is resident: every other tensor is a non-expert weight.
    deq = load_model(path, dequantize=True)

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])

    experts_fp32 = sum(p.numel() * 4 for n, p in deq.named_parameters() if ".experts." in n and "bias" not in n)
    assert abs(nbytes(model) - (nbytes(deq) - experts_fp32 + held)) <= 0.05 * nbytes(model)


@pytest.mark.parametrize("name,fmt", CASES)
def test_packed_load_never_decodes_experts_nor_calls_from_pretrained(packed_dir, monkeypatch, name, fmt):
    import nexus.quant.packed_experts as pe
    from transformers import AutoModelForCausalLM

    _, path = packed_dir(name, fmt)

    def refuse(*a, **k):
        raise AssertionError("experts decoded or transformers' dequantising load used while loading")

    for fn in ("decode_mxfp4", "decode_fp8"):
        monkeypatch.setattr(pe, fn, refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    model = load_model(path)
    assert packed_modules(model) and all(not m.decoded for m in packed_modules(model).values())


def test_ddp_does_not_broadcast_the_packed_bytes(packed_dir):
    _, path = packed_dir("gpt_oss", "mxfp4")
    model = load_model(path)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert ignored and ignored == {n for n, _ in model.named_buffers() if ".experts." in n}


@pytest.mark.parametrize("name,fmt", CASES)
def test_only_experts_that_received_tokens_are_decoded(packed_dir, name, fmt):
    family, path = packed_dir(name, fmt)
    model = load_model(path)
    routed = {}
    def record(name):
        return lambda mod, args: routed.__setitem__(name, set(args[1].flatten().tolist()))

    handles = [m.register_forward_pre_hook(record(n)) for n, m in packed_modules(model).items()]
    ids = input_ids(model.config, batch=1, seq=1)
    _forward_backward(model, ids)
    for h in handles:
        h.remove()
    for n, m in packed_modules(model).items():
        k = family.moe_blocks(model)[0].top_k
        assert len(routed[n]) == k < m.num_experts
        # Each routed expert decoded once in forward and once in backward; no other expert at all.
        assert dict(m.decoded) == {e: 2 for e in routed[n]}


def _float_saved_tensors(model, ids):
    """Shapes of the floating-point tensors, other than the model's own weights, that the autograd
    graph of one forward saves."""
    saved = []
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(t):
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in own:
            saved.append(tuple(t.shape))
        return t

    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(inputs_embeds=emb).logits.sum()
    loss.backward()  # what backward decodes lives only while one expert's gradient is computed
    return saved


@pytest.mark.parametrize("name,fmt", CASES)
def test_autograd_graph_keeps_no_decoded_expert_weights(packed_dir, name, fmt):
    family, path = packed_dir(name, fmt)
    packed, deq = load_model(path), load_model(path, dequantize=True)
    block = family.moe_blocks(packed)[0]
    E, H, I = block.num_experts, block.hidden_size, block.intermediate_size
    expert_shapes = {(2 * I, H), (H, 2 * I), (I, H), (H, I)}

    def offending(shapes):
        return [s for s in shapes if (len(s) == 3 and s[0] == E and s[1:] in expert_shapes) or s[-2:] in expert_shapes]

    ids = input_ids(packed.config, batch=1, seq=5)  # 5 tokens: no activation has E or expert-sized rows
    # Dequantised, the graph saves slices of the expert parameters; packed, nothing decoded survives.
    deq_saved = []
    own = {t.untyped_storage().data_ptr() for n, t in deq.named_parameters() if ".experts." not in n}

    def pack(t):
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in own:
            deq_saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        deq(ids).logits.sum()
    assert offending(deq_saved), "the check must see the dequantised model's expert weights"
    assert offending(_float_saved_tensors(packed, ids)) == []


def test_decoding_is_chunked_under_the_byte_budget(packed_dir):
    _, path = packed_dir("gpt_oss", "mxfp4")
    model = load_model(path)
    ids = input_ids(model.config, batch=2, seq=9)
    want = model(ids).logits
    sizes = []
    for m in packed_modules(model).values():
        m.decode_bytes = 1  # one expert at a time
        original = m._decode
        m._decode = lambda experts, *a, _o=original: sizes.append(len(experts)) or _o(experts, *a)
    assert torch.equal(model(ids).logits, want)
    assert sizes and set(sizes) == {1}


def _train(work, out, **kw):
    from nexus.engines.train import train
    from nexus.training.train_config import TrainConfig

    args = dict(model=str(work["base"]), adapter=str(work["adapter"]), data=str(work["data"]), output=str(out),
                seq_len=32, batch_size=2, max_steps=5, lr=3e-3, log_every=1, save_every=0, seed=3, router_kl_weight=0.2)
    args.update(kw)
    return train(TrainConfig(**args))


@pytest.fixture(scope="module")
def train_work(packed_dir, tmp_path_factory):
    """``(family, format) -> base (with tokenizer), adapter and data`` for training."""
    cache = {}

    def get(name, fmt):
        if (name, fmt) not in cache:
            root = tmp_path_factory.mktemp(f"train_{name}")
            base = make_base(packed_dir(name, fmt)[1], root / "base")
            cache[name, fmt] = {"base": base, "adapter": make_adapter(base, root / "adapter"),
                                "data": make_data(root / "data.jsonl", n=12)}
        return cache[name, fmt]

    return get


@pytest.mark.parametrize("name,fmt", CASES)
def test_five_training_steps_packed_equal_dequantised(train_work, exact_packed_layout, tmp_path, name, fmt):
    from nexus.constants import ADAPTER_WEIGHTS_NAME

    work = train_work(name, fmt)
    packed = _train(work, tmp_path / "packed", train_routers=True)
    deq = _train(work, tmp_path / "deq", train_routers=True, dequantize=True)
    assert packed_modules(packed.model) and not packed_modules(deq.model)
    losses = [[json.loads(line)["loss"] for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
              for r in (packed, deq)]
    assert len(losses[0]) == 5 and losses[0] == losses[1]
    a, b = (load_file(str(r.final / ADAPTER_WEIGHTS_NAME)) for r in (packed, deq))
    start = load_file(str(work["adapter"] / ADAPTER_WEIGHTS_NAME))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], start[k]) for k in start)  # it did train
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=0)
    # The frozen packed bytes are exactly the checkpoint's after training.
    reader = CheckpointReader(work["base"])
    for n, m in packed_modules(packed.model).items():
        layer = int(n.split(".")[2])
        for proj, stored in (("gate_up", m.gate_up), ("down", m.down)):
            if stored is not None and fmt == "mxfp4":
                disk = f"model.layers.{layer}.mlp.experts.{proj}_proj"
                assert torch.equal(stored.blocks, reader.read(disk + "_blocks"))
                assert torch.equal(stored.scales, reader.read(disk + "_scales"))
        if fmt == "fp8":
            for e in (0, m.num_experts - 1):
                disk = f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"
                assert torch.equal(m.down.weight[e], reader.read(disk).view(torch.uint8))
                assert torch.equal(m.down.scale_bits[e].view(torch.float32), reader.read(disk + "_scale_inv"))


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_moe"])
def test_convert_reads_fp8_experts_one_by_one(packed_dir, name):
    family, path = packed_dir(name, "fp8")
    reader = CheckpointReader(path)
    deq = load_model(path, dequantize=True)
    block = family.moe_blocks(deq)[-1]
    I = block.intermediate_size
    got = family.read_experts(reader, deq.config, block.layer, [5, 1])
    gate_up, down = block.module.experts.gate_up_proj, block.module.experts.down_proj
    assert torch.equal(got.gate, gate_up[[5, 1], :I]) and torch.equal(got.up, gate_up[[5, 1], I:])
    assert torch.equal(got.down, down[[5, 1]])


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        file = dst / "model.safetensors"
        tensors = load_file(file)
        edit_tensors(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_malformed_scale_tensor_is_refused_by_name(packed_dir, tmp_path):
    _, path = packed_dir("qwen3_moe", "fp8")
    key = "model.layers.2.mlp.experts.3.up_proj.weight_scale_inv"
    bad = _rewrite(path, tmp_path / "bad", edit_tensors=lambda t: t.__setitem__(key, torch.ones(2, 2)))
    for dequantize in (False,):
        with pytest.raises(NexusError, match=r"experts\.3\.up_proj\.weight.*have shape \[2, 2\], expected \[1, 1\]"):
            load_model(bad, dequantize=dequantize)
    with pytest.raises(NexusError, match=r"experts\.3\.up_proj\.weight.*have shape \[2, 2\]"):
        resolve_family(name="qwen3_moe").read_experts(CheckpointReader(bad), None, 2, [3])


def test_unsupported_block_size_is_refused_by_name(packed_dir, tmp_path):
    _, path = packed_dir("deepseek_v3", "fp8")
    bad = _rewrite(path, tmp_path / "bad",
                   edit_config=lambda c: c["quantization_config"].__setitem__("weight_block_size", [64, 64]))
    with pytest.raises(NexusError, match=r"weight_block_size \[64, 64\] is not supported"):
        load_model(bad)
    with pytest.raises(NexusError, match=r"weight_block_size \[64, 64\] is not supported"):
        resolve_family(name="deepseek_v3").read_experts(CheckpointReader(bad), None, 1, [0])


def test_hook_nexus_pack_experts(packed_dir):
    """A family's ``nexus_pack_experts`` decides per block; declining (False) loads the model dequantised."""
    import nexus
    from nexus.plugins import get_plugin_manager

    _, path = packed_dir("qwen3_moe", "fp8")
    calls = []

    class Decline:
        __name__ = "decline-packing"

        @nexus.hookimpl(tryfirst=True)
        def nexus_pack_experts(self, family, block):
            calls.append((family, block.layer))
            return False

    pm = get_plugin_manager()
    plugin = Decline()
    pm.register(plugin)
    try:
        model = load_model(path)
    finally:
        pm.unregister(plugin)
    assert calls == [("qwen3_moe", 0)]  # the first refusal stops packing
    assert not packed_modules(model) and hasattr(model.model.layers[0].mlp.experts, "gate_up_proj")
    assert packed_modules(load_model(path))


def test_default_layout_stays_within_fp32_rounding(packed_dir):
    """By default GPT-OSS experts multiply by the transposed view (no layout copy, faster on CPU):
    fp32 results stay within 1e-5 relative of the dequantised model's; the copy is opt-in."""
    _, path = packed_dir("gpt_oss", "mxfp4")
    packed, deq = load_model(path), load_model(path, dequantize=True)
    modules = packed_modules(packed).values()
    assert modules and all(m.transposed and not m.exact_layout for m in modules)
    copies = []
    original = torch.Tensor.contiguous
    ids = input_ids(packed.config, batch=2, seq=9)
    with pytest.MonkeyPatch.context() as mp:  # the layout copy is a .contiguous() of the decoded weights
        mp.setattr(torch.Tensor, "contiguous", lambda t, *a, **k: copies.append(t.shape) or original(t, *a, **k))
        lp, gp = _forward_backward(packed, ids)
    m = next(iter(modules))
    assert not [s for s in copies if s[-2:] in {(m.hidden_size, 2 * m.intermediate_size),
                                                 (m.intermediate_size, m.hidden_size)}]
    ld, gd = _forward_backward(deq, ids)
    for a, b in ((lp, ld), (gp, gd)):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


def test_quantised_checkpoint_of_a_dense_model_loads_the_ordinary_way(dense_model_dir):
    """A quantised model no MoE family claims (a dense FP8 teacher) is not an error: it loads dequantised."""
    from nexus.quant.fp8 import quantize_fp8

    file = dense_model_dir / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(tensors[name])
    save_file(tensors, file, metadata={"format": "pt"})
    cfg = json.loads((dense_model_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                  "activation_scheme": "dynamic"}
    (dense_model_dir / "config.json").write_text(json.dumps(cfg))
    model = load_model(dense_model_dir)
    assert not packed_modules(model)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32


def test_saving_a_packed_model_is_refused(packed_dir, tmp_path):
    _, path = packed_dir("gpt_oss", "mxfp4")
    with pytest.raises(NexusError, match="save_pretrained would drop them"):
        load_model(path).save_pretrained(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_bf16_load_keeps_the_modules_transformers_keeps_in_fp32(packed_dir):
    """DeepSeek-V3's ``e_score_correction_bias`` stays float32 in a bf16 model, packed as dequantised
    (``_keep_in_fp32_modules_strict``): rounding it to bf16 changes which experts are chosen."""
    _, path = packed_dir("deepseek_v3", "fp8")
    dtypes = []
    for dequantize in (False, True):
        model = load_model(path, dtype=torch.bfloat16, dequantize=dequantize)
        dtypes.append({n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]
                       if "e_score_correction_bias" in n})
    assert dtypes[0] and set(dtypes[0].values()) == {torch.float32}
    assert dtypes[0] == dtypes[1]
