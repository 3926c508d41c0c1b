"""convert: shared experts from routed experts read off disk, against the loaded model's own parameters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nexus.engines.convert as conv
from nexus.adapter import adapter_state_dict, load_adapter, read_adapter_config
from nexus.constants import ADAPTER_WEIGHTS_NAME
from nexus.router_stats import LayerStats, RouterStats
from nexus.engines.select import select_experts
from nexus.errors import AdapterMismatchError, NexusError
from nexus.fingerprint import config_fingerprint
from nexus.loading import load_config, load_model
from nexus.shared_expert import attach_shared_experts, disable_shared_experts

E, I, K = 8, 64, 3


def _convert(model, output, *, progress=True, **fields):
    """``convert`` with the config's fields as keywords."""
    return conv.convert(conv.ConvertConfig(model=model, output=output, **fields), progress=progress)


@pytest.fixture(scope="module")
def selection(gpt_oss_mxfp4_dir):
    """A selection of K experts per layer for the tiny GPT-OSS, from synthetic router statistics."""
    g = torch.Generator().manual_seed(5)
    meta = {"family": "gpt_oss", "base_fingerprint": config_fingerprint(load_config(gpt_oss_mxfp4_dir)),
            "model_type": "gpt_oss", "complete": True}
    stats = RouterStats({}, meta)
    for layer in range(3):
        s = LayerStats.zeros(layer, E, 2, "softmax")
        s.update(torch.softmax(torch.randn(500, E, generator=g) * torch.linspace(0.5, 3, E), -1))
        stats.layers[layer] = s
    return select_experts(stats, top_k=K, diversity=0.0)


@pytest.fixture(scope="module")
def base(gpt_oss_mxfp4_dir):
    """The loaded (dequantised) base, whose GptOssExperts parameters are the reference."""
    return load_model(gpt_oss_mxfp4_dir, dequantize=True)


def expert_average(model, layer: int, ids: list[int], weights: list[float]) -> dict[str, torch.Tensor]:
    """``sum_j w_j expert_{ids[j]}`` from transformers' ``GptOssExperts`` parameters, in
    ``nn.Linear`` layout: ``gate_up_proj[e]`` is ``[H, 2I]`` interleaved (gate = even columns)."""
    ex = model.model.layers[layer].mlp.experts
    out = {}
    for e, w in zip(ids, weights):
        parts = {
            "gate_proj.weight": ex.gate_up_proj[e][:, 0::2].T,
            "up_proj.weight": ex.gate_up_proj[e][:, 1::2].T,
            "down_proj.weight": ex.down_proj[e].T,
            "gate_proj.bias": ex.gate_up_proj_bias[e][0::2],
            "up_proj.bias": ex.gate_up_proj_bias[e][1::2],
            "down_proj.bias": ex.down_proj_bias[e],
        }
        for k, v in parts.items():
            out[k] = out.get(k, 0) + w * v.detach().double()
    return {k: v.float() for k, v in out.items()}


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / ADAPTER_WEIGHTS_NAME)


def logits_of(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("weighted", [False, True])
def test_mxfp4_and_float_checkpoints_give_the_same_adapter(gpt_oss_mxfp4_dir, gpt_oss_float_dir, selection, tmp_path,
                                                           weighted):
    a = adapter_tensors(_convert(gpt_oss_mxfp4_dir, tmp_path / "a", selection=selection, weighted=weighted,
                                     gate_mode="scalar", progress=False))
    b = adapter_tensors(_convert(gpt_oss_float_dir, tmp_path / "b", selection=selection, weighted=weighted,
                                     gate_mode="scalar", progress=False))
    assert sorted(a) == sorted(b) and len(a) == 3 * 7  # 6 projection tensors + the scalar gate, 3 layers
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("weighted", [False, True])
def test_shared_expert_is_the_average_of_the_selected_experts(gpt_oss_mxfp4_dir, selection, base, tmp_path, weighted):
    out = _convert(gpt_oss_mxfp4_dir, tmp_path / "ad", selection=selection, weighted=weighted, gate_mode="scalar",
                       progress=False)
    tensors = adapter_tensors(out)
    cfg = read_adapter_config(out)
    for x in selection["layers"]:
        ids = x["experts"]
        weights = [s / sum(x["scores"]) for s in x["scores"]] if weighted else [1 / K] * K
        assert cfg.init["experts"][str(x["layer"])] == ids
        assert cfg.init["weights"][str(x["layer"])] == pytest.approx(weights)
        ref = expert_average(base, x["layer"], ids, weights)
        for name, t in ref.items():
            torch.testing.assert_close(tensors[f"model.layers.{x['layer']}.mlp.nexus_shared.{name}"], t)
        assert torch.equal(tensors[f"model.layers.{x['layer']}.mlp.nexus_shared_scale.weight"], torch.zeros(1))
    if weighted:  # the weights matter: the two averages differ
        uniform = expert_average(base, 0, selection["layers"][0]["experts"], [1 / K] * K)
        assert not torch.allclose(tensors["model.layers.0.mlp.nexus_shared.gate_proj.weight"], uniform["gate_proj.weight"])


@pytest.mark.parametrize("gate_mode", ["none", "scalar", "token", "scalar_token"])
def test_adapter_has_save_adapter_keys_and_loads(gpt_oss, gpt_oss_mxfp4_dir, selection, tmp_path, gate_mode):
    out = _convert(gpt_oss_mxfp4_dir, tmp_path / "ad", selection=selection, gate_mode=gate_mode, progress=False)
    # what save_adapter would write for a model with shared experts attached
    expected = load_model(gpt_oss_mxfp4_dir)
    attach_shared_experts(expected, gpt_oss, I, gate_mode)
    reference = adapter_state_dict(expected)
    tensors = adapter_tensors(out)
    assert sorted(tensors) == sorted(reference)
    assert all(tensors[k].shape == reference[k].shape and tensors[k].dtype == torch.float32 for k in tensors)
    cfg = read_adapter_config(out)
    assert (cfg.family, cfg.gate_mode, cfg.shared_intermediate_size, cfg.layers) == ("gpt_oss", gate_mode, I, [0, 1, 2])
    assert cfg.base_fingerprint == config_fingerprint(expected.config) and cfg.init["strategy"] == "pca"
    model = load_adapter(load_model(gpt_oss_mxfp4_dir), out)
    params = dict(model.named_parameters())
    for k, t in tensors.items():
        assert torch.equal(params[k], t)
    assert not (tmp_path / ".ad.partial").exists()


def test_zeros_outputs_zero_but_can_learn(gpt_oss_mxfp4_dir, base, exact_packed_layout, tmp_path):
    out = _convert(gpt_oss_mxfp4_dir, tmp_path / "z", strategy="zeros", gate_mode="none", progress=False)
    model = load_adapter(load_model(gpt_oss_mxfp4_dir), out)
    assert torch.equal(logits_of(model), logits_of(base))
    tensors = adapter_tensors(out)
    assert not tensors["model.layers.0.mlp.nexus_shared.down_proj.weight"].any()
    assert tensors["model.layers.0.mlp.nexus_shared.gate_proj.weight"].abs().sum() > 0
    assert read_adapter_config(out).init["experts"] == {"0": [], "1": [], "2": []}


def test_random_top1_mean_all(gpt_oss_mxfp4_dir, selection, base, tmp_path):
    def init(path):
        return read_adapter_config(path).init

    r1 = init(_convert(gpt_oss_mxfp4_dir, tmp_path / "r1", selection=selection, strategy="random", seed=1, progress=False))
    r1b = init(_convert(gpt_oss_mxfp4_dir, tmp_path / "r1b", selection=selection, strategy="random", seed=1, progress=False))
    r2 = init(_convert(gpt_oss_mxfp4_dir, tmp_path / "r2", strategy="random", seed=2, progress=False))
    assert r1["experts"] == r1b["experts"] and r1["experts"] != r2["experts"]
    assert all(len(ids) == K == len(set(ids)) for ids in r1["experts"].values())
    from nexus.engines.select import default_top_k

    assert all(len(ids) == default_top_k(E) for ids in r2["experts"].values())  # no selection: the default K

    top1 = _convert(gpt_oss_mxfp4_dir, tmp_path / "t", selection=selection, strategy="top1", progress=False)
    for x in selection["layers"]:
        best = max(range(E), key=lambda e: x["importance"][e])
        assert init(top1)["experts"][str(x["layer"])] == [best]
    t = adapter_tensors(top1)
    torch.testing.assert_close(t["model.layers.2.mlp.nexus_shared.down_proj.weight"],
                               expert_average(base, 2, [init(top1)["experts"]["2"][0]], [1.0])["down_proj.weight"])

    mean_all = adapter_tensors(_convert(gpt_oss_mxfp4_dir, tmp_path / "m", strategy="mean_all", progress=False))
    ref = expert_average(base, 1, list(range(E)), [1 / E] * E)
    for name, v in ref.items():
        torch.testing.assert_close(mean_all[f"model.layers.1.mlp.nexus_shared.{name}"], v)


def test_width_rules(gpt_oss_mxfp4_dir, selection, base, tmp_path):
    full = _convert(gpt_oss_mxfp4_dir, tmp_path / "full", selection=selection, gate_mode="none", progress=False)
    wide = _convert(gpt_oss_mxfp4_dir, tmp_path / "wide", selection=selection, gate_mode="none",
                        shared_intermediate_size=96, progress=False)
    narrow = _convert(gpt_oss_mxfp4_dir, tmp_path / "narrow", selection=selection, gate_mode="none",
                          shared_intermediate_size=32, progress=False)
    # wider: the same function, and the new units are alive (non-zero gate/up rows)
    w = adapter_tensors(wide)
    prefix = "model.layers.0.mlp.nexus_shared."
    assert w[prefix + "gate_proj.weight"].shape == (96, 64) and w[prefix + "down_proj.weight"].shape == (64, 96)
    assert not w[prefix + "down_proj.weight"][:, I:].any() and w[prefix + "gate_proj.weight"][I:].abs().sum() > 0
    a = logits_of(load_adapter(load_model(gpt_oss_mxfp4_dir), full))
    b = logits_of(load_adapter(load_model(gpt_oss_mxfp4_dir), wide))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # narrower: the 32 units with the largest |gate|^2 + |up|^2 + |down|^2, in order
    avg = expert_average(base, 0, selection["layers"][0]["experts"], [1 / K] * K)
    score = avg["gate_proj.weight"].pow(2).sum(1) + avg["up_proj.weight"].pow(2).sum(1) + avg["down_proj.weight"].pow(2).sum(0)
    keep = torch.sort(torch.topk(score, 32).indices).values
    n = adapter_tensors(narrow)
    torch.testing.assert_close(n[prefix + "gate_proj.weight"], avg["gate_proj.weight"][keep])
    torch.testing.assert_close(n[prefix + "up_proj.bias"], avg["up_proj.bias"][keep])
    torch.testing.assert_close(n[prefix + "down_proj.weight"], avg["down_proj.weight"][:, keep])
    torch.testing.assert_close(n[prefix + "down_proj.bias"], avg["down_proj.bias"])
    model = load_adapter(load_model(gpt_oss_mxfp4_dir), narrow)
    with disable_shared_experts(model):
        torch.testing.assert_close(logits_of(model), logits_of(base))


def test_reads_one_expert_at_a_time(gpt_oss_mxfp4_dir, selection, tmp_path, monkeypatch):
    from nexus.family import Family

    calls = []
    original = Family.read_experts

    def spy(self, reader, config, layer, experts):
        calls.append((layer, list(experts)))
        return original(self, reader, config, layer, experts)

    monkeypatch.setattr(Family, "read_experts", spy)
    _convert(gpt_oss_mxfp4_dir, tmp_path / "ad", selection=selection, progress=False)
    assert calls == [(x["layer"], [e]) for x in selection["layers"] for e in x["experts"]]


def test_interrupted_conversion_resumes_at_the_next_layer(gpt_oss_mxfp4_dir, selection, tmp_path, monkeypatch):
    straight = adapter_tensors(_convert(gpt_oss_mxfp4_dir, tmp_path / "straight", selection=selection, progress=False))
    original = conv.layer_tensors
    done = []

    def failing(family, reader, config, block, *args):
        if block.layer == 1:
            raise KeyboardInterrupt
        done.append(block.layer)
        return original(family, reader, config, block, *args)

    monkeypatch.setattr(conv, "layer_tensors", failing)
    with pytest.raises(KeyboardInterrupt):
        _convert(gpt_oss_mxfp4_dir, tmp_path / "ad", selection=selection, progress=False)
    assert not (tmp_path / "ad").exists()
    assert sorted(p.name for p in (tmp_path / ".ad.partial").glob("layer-*")) == ["layer-0.safetensors"]

    done.clear()
    monkeypatch.setattr(conv, "layer_tensors", lambda family, reader, config, block, *a: done.append(block.layer)
                        or original(family, reader, config, block, *a))
    resumed = adapter_tensors(_convert(gpt_oss_mxfp4_dir, tmp_path / "ad", selection=selection, progress=False))
    assert done == [1, 2]
    assert sorted(resumed) == sorted(straight) and all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not (tmp_path / ".ad.partial").exists()
    # other arguments never reuse a stale partial layer
    (tmp_path / ".ad.partial").mkdir()
    (tmp_path / ".ad.partial" / "manifest.json").write_text(json.dumps({"other": 1}))
    done.clear()
    _convert(gpt_oss_mxfp4_dir, tmp_path / "ad", selection=selection, progress=False, overwrite=True)
    assert done == [0, 1, 2]


def test_selection_for_another_model_is_refused(gpt_oss_mxfp4_dir, selection, tmp_path):
    other = dict(selection, base_fingerprint="0123456789abcdef")
    with pytest.raises(AdapterMismatchError, match="0123456789abcdef.*" + selection["base_fingerprint"]):
        _convert(gpt_oss_mxfp4_dir, tmp_path / "ad", selection=other, progress=False)
    fewer = dict(selection, layers=selection["layers"][:2])
    with pytest.raises(AdapterMismatchError, match="MoE layers"):
        _convert(gpt_oss_mxfp4_dir, tmp_path / "ad", selection=fewer, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(gpt_oss_mxfp4_dir, dense_model_dir, selection, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad")
    with pytest.raises(NexusError, match="needs --selection"):
        _convert(gpt_oss_mxfp4_dir, out / "ad", strategy="pca", progress=False)
    with pytest.raises(NexusError, match="unknown strategy"):
        _convert(gpt_oss_mxfp4_dir, out / "ad", selection=selection, strategy="best", progress=False)
    with pytest.raises(NexusError, match="no MoE family"):
        _convert(dense_model_dir, out / "ad", strategy="mean_all", progress=False)
    blocker = out / "a_file"
    blocker.write_text("")
    with pytest.raises(NexusError, match="cannot write"):
        _convert(gpt_oss_mxfp4_dir, blocker / "ad", selection=selection, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a_file"]


def test_streaming_safetensors_writer(tmp_path):
    a = {"x": torch.randn(3, 5), "y": torch.arange(7, dtype=torch.int64)}
    b = {"z": torch.randn(2, 2, 2).to(torch.bfloat16), "w": torch.ones(1, dtype=torch.uint8)}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    sources = [("z", tmp_path / "b.safetensors"), ("x", tmp_path / "a.safetensors"),
               ("w", tmp_path / "b.safetensors"), ("y", tmp_path / "a.safetensors")]
    conv.write_safetensors_streaming(tmp_path / "out.safetensors", sources, {"format": "pt"})
    out = load_file(tmp_path / "out.safetensors")
    assert sorted(out) == ["w", "x", "y", "z"]
    for k, v in {**a, **b}.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_convert_memory.py", "bench_mxfp4_decode.py"])
def test_benchmark_quick(script, tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--quick", "--results-dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ratio" in out.stdout and list(tmp_path.glob("*.json"))


# ---------------------------------------------------------------------------------------------
# Selections checked against the model and its weights
# ---------------------------------------------------------------------------------------------


def _edited(selection, **changes) -> dict:
    """A copy of ``selection`` with ``changes`` applied to the entry of layer 1."""
    doc = json.loads(json.dumps({k: v for k, v in selection.items() if not k.startswith("_")}))
    doc["layers"][1].update(changes)
    return doc


@pytest.mark.parametrize("edit, match", [
    (dict(experts=[2, 5, 2]), r"layer 1 lists experts \[2\] more than once"),
    (dict(experts=[]), "layer 1 lists no experts; give at least one expert id in 0..7"),
    (dict(experts=[3, 8, -1]), r"layer 1 lists expert ids \[8, -1\] outside the valid range 0..7 \(8 experts\)"),
    (dict(experts=[1, "4"]), r"layer 1 lists expert ids \['4'\] outside the valid range"),
    (dict(layer=7), r"layers \[7\] are not MoE layers of this model and MoE layers \[1\] have no entry"),
    (dict(layer=0), "layer 0 appears twice"),
    (dict(num_experts=16), "layer 1 was selected among 16 experts, but the model's layer 1 has 8"),
])
def test_hand_edited_selection_is_refused_saying_what_is_wrong(gpt_oss_mxfp4_dir, selection, tmp_path, edit, match):
    path = tmp_path / "expert_selection.json"
    path.write_text(json.dumps(_edited(selection, **edit)))
    with pytest.raises(NexusError, match=match) as info:
        _convert(gpt_oss_mxfp4_dir, tmp_path / "ad", selection=path, progress=False)
    assert str(path) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert_selection.json"]


def test_selection_fields_a_strategy_needs(gpt_oss_mxfp4_dir, selection, tmp_path):
    with pytest.raises(NexusError, match="layer 1: --weighted needs one numeric score per expert"):
        _convert(gpt_oss_mxfp4_dir, tmp_path / "ad", selection=_edited(selection, scores=[1.0]),
                     weighted=True, progress=False)
    with pytest.raises(NexusError, match="layer 1: strategy top1 needs 'importance', one number per expert"):
        _convert(gpt_oss_mxfp4_dir, tmp_path / "ad", selection=_edited(selection, importance=[0.5] * 3),
                     strategy="top1", progress=False)
    assert not (tmp_path / "ad").exists()


def test_adapter_records_weights_fingerprint_and_selection_for_other_weights_is_refused(
        gpt_oss_mxfp4_dir, selection, tmp_path):
    from nexus.fingerprint import weights_fingerprint

    out = _convert(gpt_oss_mxfp4_dir, tmp_path / "ad", selection=selection, progress=False)
    cfg = read_adapter_config(out)
    assert (cfg.base_weights_fingerprint, cfg.base_weights_tensors) == weights_fingerprint(
        gpt_oss_mxfp4_dir, cfg.base_weights_tensors)
    assert len(cfg.base_weights_fingerprint) == 16 and "model.embed_tokens.weight" in cfg.base_weights_tensors

    other = dict(selection, base_weights_fingerprint="fedcba9876543210", base_weights_tensors=cfg.base_weights_tensors)
    expected = f"fedcba9876543210.*{gpt_oss_mxfp4_dir}.*{cfg.base_weights_fingerprint}"
    with pytest.raises(AdapterMismatchError, match=expected):
        _convert(gpt_oss_mxfp4_dir, tmp_path / "ad2", selection=other, progress=False)
    assert not (tmp_path / "ad2").exists()


def test_statistics_given_as_selection_say_to_run_select(gpt_oss_mxfp4_dir, tmp_path):
    stats = RouterStats({0: LayerStats.zeros(0, E, 2, "softmax")}, {"family": "gpt_oss", "identity": {}})
    stats.layers[0].update(torch.softmax(torch.randn(20, E), -1))
    stats.save(tmp_path / "stats")
    for given in (tmp_path / "stats", tmp_path / "stats" / "router_stats.json",
                  tmp_path / "stats" / "router_stats.safetensors"):
        with pytest.raises(NexusError, match="holds router statistics, not an expert selection.*nexus select --stats"):
            _convert(gpt_oss_mxfp4_dir, tmp_path / "ad", selection=given, progress=False)
    assert not (tmp_path / "ad").exists()
