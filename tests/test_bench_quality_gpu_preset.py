"""The quality benchmark's ``gpu`` preset: its sizes, its refusal without CUDA, the device
plumbing (exercised on the CPU), and the cache keys of the existing presets, which must not move."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nexus.errors import NexusError  # noqa: E402

# Digests of the presets' adaptation settings and their recipes' keys: cached base models and
# runs under ~/.cache/nexus/bench are found by them, so a change here orphans hours of runs.
CACHE_KEYS = {
    "smoke": ("48618361f6e103ec", {"gpt_oss": "dd12d445c69f9a5b", "qwen3_moe": "76746aba676bce11"}),
    "quick": ("f3b0eb64404e3d0d", {"gpt_oss": "a44b713ca19e547d", "qwen3_moe": "e8faa222f9d00057"}),
    "full": ("587e6051cf5a14b5", {"gpt_oss": "8d280c08c07317cf", "qwen3_moe": "887387b33728a509"}),
}


@pytest.mark.parametrize("preset", sorted(CACHE_KEYS))
def test_existing_presets_keep_their_cache_keys(preset):
    from benchmarks.quality.config import PRESETS, digest

    cfg = PRESETS[preset]
    adaptation, recipes = CACHE_KEYS[preset]
    assert digest(cfg.adaptation_dict()) == adaptation
    assert {r.name: r.key() for r in cfg.models} == recipes
    assert cfg.device == "cpu" and "device" not in cfg.adaptation_dict()
    # Running the same preset elsewhere does not change where its runs are cached.
    assert dataclasses.replace(cfg, device="cuda").adaptation_dict() == cfg.adaptation_dict()


def test_gpu_preset_recipes_are_about_100m_parameters():
    from transformers import AutoModelForCausalLM

    from benchmarks.quality.config import PRESETS
    from benchmarks.quality.pretrain import build_config

    cfg = PRESETS["gpu"]
    assert cfg.device == "cuda" and {r.name for r in cfg.models} == {"gpt_oss", "qwen3_moe"}
    counts = {}
    for recipe in cfg.models:
        assert recipe.bf16 and recipe.key() != dataclasses.replace(recipe, bf16=False).key()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(build_config(recipe))
        counts[recipe.name] = sum(p.numel() for p in model.parameters())
    # The figures stated in the preset's comment and the README.
    assert round(counts["gpt_oss"] / 1e6, 1) == 98.9 and round(counts["qwen3_moe"] / 1e6, 1) == 98.7


def test_gpu_preset_without_cuda_fails_at_once(tmp_path, monkeypatch, capsys):
    from benchmarks.bench_quality import main
    from benchmarks.quality.config import PRESETS
    from benchmarks.quality.device import require_device
    from benchmarks.quality.run import run_benchmark

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("NEXUS_CACHE", str(tmp_path / "cache"))
    assert main(["--preset", "gpu", "--methods", "milestone", "--results-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--preset full" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()  # nothing was built
    with pytest.raises(NexusError, match="needs a CUDA GPU"):
        run_benchmark(PRESETS["gpu"], [], cache=tmp_path / "cache")
    assert require_device("cpu", "smoke") == "cpu"
    with pytest.raises(NexusError, match="not a torch device"):
        require_device("gpu0", "x")


def test_evaluation_returns_router_probabilities_on_the_cpu():
    from transformers import AutoModelForCausalLM

    from benchmarks.quality.config import PRESETS
    from benchmarks.quality.evaluate import perplexity, router_probs
    from benchmarks.quality.pretrain import build_config

    recipe = PRESETS["smoke"].models[0]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(recipe)).eval()
    rows = torch.randint(3, recipe.config["vocab_size"], (3, 16))
    probs = router_probs(model, rows, batch_size=2)
    assert probs.device.type == "cpu" and probs.shape == (recipe.config["num_hidden_layers"], 48, 4)
    assert perplexity(model, rows) > 1


def _spy_loads(monkeypatch) -> list:
    """Record the ``device`` of every ``nexus.loading.load_model`` call made by the benchmark's modules."""
    import nexus.loading

    real, calls = nexus.loading.load_model, []

    def spy(*args, **kwargs):
        caller = inspect.stack()[1].frame.f_globals.get("__name__", "")
        if caller.startswith("benchmarks."):
            calls.append((caller, kwargs.get("device")))
        return real(*args, **kwargs)

    monkeypatch.setattr(nexus.loading, "load_model", spy)
    return calls


def test_device_reaches_pretraining_evaluation_and_every_run(tmp_path, monkeypatch):
    """The smoke preset with its device set explicitly: the base is pretrained and every model
    the benchmark loads (context, NEXUS evaluations, baselines) is put on that device."""
    from benchmarks.quality.config import PRESETS
    from benchmarks.quality.methods import METHODS_BY_NAME
    from benchmarks.quality.run import run_benchmark

    calls = _spy_loads(monkeypatch)
    cfg = dataclasses.replace(PRESETS["smoke"], device="cpu")
    methods = [METHODS_BY_NAME[m] for m in ("nexus", "lora-experts")]
    results = run_benchmark(cfg, methods, models=["gpt_oss"], cache=tmp_path / "cache")
    model = results["models"]["gpt_oss"]
    pre = model["context"]["pretrain"]
    assert pre["device"] == "cpu" and pre["bf16_autocast"] is False
    callers = {c for c, _ in calls}
    assert {"benchmarks.quality.pretrain", "benchmarks.quality.run", "benchmarks.quality.nexus_path"} <= callers
    assert all(device == "cpu" for _, device in calls), calls
    assert set(model["methods"]) == {"nexus", "lora-experts"}
    assert all(not r["diverged"] for e in model["methods"].values() for r in e["runs"])
    assert json.loads(Path(model["work_dir"], "context.json").read_text())["config"]["device"] == "cpu"
