"""select: PCA from streamed moments against sklearn's PCA on the stored per-token probabilities."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from nexus.data import TokenData
from nexus.engines.collect import CollectArgs, collect_router_stats
from nexus.router_stats import LayerStats, RouterStats
from nexus.engines.select import (SelectConfig, importance_pattern, load_selection, run_select, save_selection,
                                  select_experts)
from nexus.errors import NexusError

from helpers_prepare import random_rows, router_reference

E = 8  # experts of the gpt_oss_config fixture


@pytest.fixture(scope="module")
def collected(gpt_oss_mxfp4_dir, gpt_oss):
    """Streamed statistics of a run and, independently, every counted token's probabilities."""
    from nexus.loading import load_model

    model = load_model(gpt_oss_mxfp4_dir)
    data = TokenData(random_rows(24, 20, 60, seed=11), pad_id=0)
    stats = collect_router_stats(model, gpt_oss, data, CollectArgs(batch_size=6), progress=False)
    ref = router_reference(model, (b for _, b in data.batches(6)))
    return stats, {layer: r["p"].numpy() for layer, r in ref.items()}


def sklearn_importance(probs: np.ndarray):
    from sklearn.decomposition import PCA

    pca = PCA(n_components=probs.shape[1], svd_solver="full").fit(probs)
    importance = (np.abs(pca.components_) * pca.explained_variance_ratio_[:, None]).sum(0)
    return pca, importance


def reference_greedy(importance: np.ndarray, corr: np.ndarray, k: int, lam: float) -> list[int]:
    """The documented rule, written again over numpy: importance/max - lam * max(0, corr) to picked."""
    score = importance / importance.max()
    picked: list[int] = []
    for _ in range(k):
        best, best_value = None, -np.inf
        for e in range(len(score)):
            if e in picked:
                continue
            penalty = max([max(0.0, corr[e, f]) for f in picked], default=0.0)
            value = score[e] - lam * penalty
            if value > best_value + 1e-12:
                best, best_value = e, value
        picked.append(best)
    return picked


def test_streaming_pca_equals_sklearn(collected):
    stats, probs = collected
    doc = select_experts(stats, top_k=3, diversity=0.0)
    for x in doc["layers"]:
        p = probs[x["layer"]]
        assert p.shape[0] == x["tokens"] > 500
        pca, importance = sklearn_importance(p)
        np.testing.assert_allclose(x["explained_variance"], pca.explained_variance_, rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(x["explained_variance_ratio"], pca.explained_variance_ratio_, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(x["importance"], importance, rtol=1e-6, atol=1e-8)
        # |loadings| of the components that carry variance (the last is the null direction of
        # softmax outputs, which sum to 1)
        from nexus.engines.select import pca_from_covariance

        _, _, comps = pca_from_covariance(stats.layers[x["layer"]].covariance())
        np.testing.assert_allclose(np.abs(comps.numpy()[:-1]), np.abs(pca.components_[:-1]), atol=1e-6)
        assert x["experts"] == np.argsort(-importance, kind="stable")[:3].tolist()


@pytest.mark.parametrize("lam", [0.0, 0.3, 2.0])
def test_same_experts_as_the_rule_on_sklearn_and_numpy(collected, lam):
    stats, probs = collected
    doc = select_experts(stats, top_k=5, diversity=lam)
    for x in doc["layers"]:
        p = probs[x["layer"]]
        _, importance = sklearn_importance(p)
        expected = reference_greedy(importance, np.corrcoef(p.T), 5, lam)
        assert x["experts"] == expected
        np.testing.assert_allclose(x["scores"], importance[expected], rtol=1e-6, atol=1e-9)
        share = importance[expected].sum() / importance.sum()
        assert x["importance_share"] == pytest.approx(share, rel=1e-6)


def _stats_from_probs(probs: torch.Tensor, top_k: int = 2) -> RouterStats:
    s = LayerStats.zeros(0, probs.shape[1], top_k, "softmax")
    s.update(probs)
    return RouterStats({0: s}, {"family": "toy", "base_fingerprint": "0" * 16, "complete": True})


def test_diversity_skips_a_duplicate_expert():
    """Experts 0 and 1 always get the same probability and are the most important: pure
    importance takes both, a diversity penalty takes one and moves on."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 6, generator=g) * torch.tensor([0.3, 0.3, 0.3, 0.3, 0.3, 0.3])
    logits[:, 0] = torch.randn(4000, generator=g) * 3
    logits[:, 1] = logits[:, 0]
    stats = _stats_from_probs(torch.softmax(logits, -1))
    pure = select_experts(stats, top_k=2, diversity=0.0)["layers"][0]["experts"]
    diverse = select_experts(stats, top_k=2, diversity=1.0)["layers"][0]["experts"]
    assert sorted(pure) == [0, 1]
    assert diverse[0] in (0, 1) and diverse[1] not in (0, 1)


def test_top_k_default_and_errors(collected, caplog):
    stats, _ = collected
    with caplog.at_level(logging.WARNING, logger="nexus.engines.select"):
        doc = select_experts(stats)  # default: a quarter of E, so that the selection leaves most experts out
    assert all(len(x["experts"]) == E // 4 for x in doc["layers"])
    assert doc["args"]["top_k"] is None
    assert not [r for r in caplog.records if "at least half" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="nexus.engines.select"):
        select_experts(stats, top_k=E // 2)
    warnings = [r.getMessage() for r in caplog.records if "at least half" in r.getMessage()]
    assert len(warnings) == 1 and f"--top-k {E // 2}" in warnings[0], warnings
    with pytest.raises(NexusError, match=f"--top-k {E + 1} is more than the {E} experts"):
        select_experts(stats, top_k=E + 1)
    with pytest.raises(NexusError, match="--top-k must be at least 1"):
        select_experts(stats, top_k=0)
    with pytest.raises(NexusError, match="--diversity"):
        select_experts(stats, top_k=2, diversity=-1)


@pytest.mark.parametrize("num_experts, k", [(1, 1), (2, 1), (4, 1), (8, 2), (16, 4), (32, 8), (60, 15), (64, 16),
                                            (128, 24), (256, 24)])
def test_default_top_k_scales_with_the_experts(num_experts, k):
    from nexus.engines.select import default_top_k

    assert default_top_k(num_experts) == k
    assert k == 1 or 2 * k < num_experts  # the default never picks half of the experts or more


@pytest.mark.parametrize(
    "curve, label",
    [
        ([1.0] * 15 + [1.05], "even"),
        ([1.0, 0.5] + [0.45] * 14, "cliff"),
        ([0.8**i for i in range(16)], "moderate"),
        (np.linspace(1.0, 0.6, 16).tolist(), "gradual"),
    ],
)
def test_pattern_labels(curve, label):
    perm = torch.randperm(len(curve))
    assert importance_pattern(torch.tensor(curve)[perm]) == label


def test_selection_file_plots_and_provenance(collected, tmp_path, caplog):
    stats, _ = collected
    stats.meta.update(complete=True)
    doc = select_experts(stats, top_k=3, source="stats/")
    files = save_selection(doc, tmp_path / "sel.json")
    assert [f.name for f in files] == ["sel.json", "sel_importance.png", "sel_variance.png"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files[1:])
    saved = json.loads(files[0].read_text())
    assert saved["family"] == "gpt_oss" and saved["base_fingerprint"] == stats.meta["base_fingerprint"]
    assert saved["nexus_version"] and saved["args"] == {"top_k": 3, "diversity": doc["args"]["diversity"]}
    assert saved["stats"]["tokens"] == stats.tokens
    for x in saved["layers"]:
        assert set(x) >= {"layer", "experts", "scores", "explained_variance", "importance_share", "pattern"}
        assert x["pattern"] in ("cliff", "moderate", "gradual", "even") and len(x["experts"]) == 3
    # a directory output gets the standard name; the loader finds it and warns about unknown keys
    save_selection(dict(doc, from_the_future=1), tmp_path / "dir", plots=False)
    with caplog.at_level(logging.WARNING, logger="nexus.engines.select"):
        loaded = load_selection(tmp_path / "dir")
    assert loaded["layers"] == saved["layers"] and "from_the_future" in caplog.text
    with pytest.raises(NexusError, match="run `nexus select` first"):
        load_selection(tmp_path / "nowhere")


@pytest.mark.parametrize("layers, experts", [(1, 128), (12, 32)])
def test_plots_for_any_shape(tmp_path, layers, experts):
    from nexus.engines.plots_selection import plot_selection

    g = torch.Generator().manual_seed(1)
    stats = RouterStats({}, {"family": "toy"})
    for i in range(layers):
        s = LayerStats.zeros(i, experts, 4, "softmax")
        s.update(torch.softmax(torch.randn(300, experts, generator=g) * 2, -1))
        stats.layers[i] = s
    doc = select_experts(stats)
    assert all(len(x["experts"]) == min(24, experts // 4) for x in doc["layers"])
    for f in plot_selection(doc, tmp_path / "sel"):
        assert f.stat().st_size > 1000


def test_run_select_warns_on_incomplete_stats(tmp_path, caplog):
    stats = _stats_from_probs(torch.softmax(torch.randn(200, 4), -1))
    stats.meta["complete"] = False
    stats.save(tmp_path)
    with caplog.at_level(logging.WARNING, logger="nexus.engines.select"):
        doc, files = run_select(SelectConfig(stats=tmp_path, output=tmp_path, top_k=2, plots=False))
    assert "incomplete" in caplog.text and files == [tmp_path / "expert_selection.json"]
    assert len(doc["layers"][0]["experts"]) == 2
