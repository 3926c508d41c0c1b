"""``select``: pick K experts per MoE layer from router statistics, by PCA importance and diversity.

Per layer, from the streamed sums of :mod:`nexus.engines.collect` (N tokens, probabilities
``p_t`` in ``R^E``):

1. **PCA from the moments.** ``cov = (sum p p^T - N mu mu^T) / (N - 1)`` with ``mu = sum p / N``
   (the unbiased normalisation sklearn's ``PCA`` uses), then ``eigh``. Eigenvalues sorted in
   decreasing order are the explained variances ``lambda_i`` (negatives from round-off clipped
   to 0), ``r_i = lambda_i / sum lambda`` the explained-variance ratios, and the eigenvectors
   the components: ``V[e, i]`` is expert e's loading on component i, exactly sklearn's
   ``components_[i, e]`` up to sign. Nothing of size N is ever stored.
2. **Importance.** ``importance_e = sum_i |V[e, i]| * r_i``: how much of the variance of the
   routing distribution expert e takes part in.
3. **Diversity-aware greedy pick** (``diversity`` = lambda >= 0). Each expert's loading vector
   is ``a_e = V[e, :] * sqrt(lambda)``; the cosine of two loading vectors is the Pearson
   correlation of the two experts' probabilities (``cov = A A^T``). With importance scaled to
   a maximum of 1, repeat K times: pick the unpicked expert maximising
   ``importance_e / max(importance) - lambda * max_{f picked} max(0, cos(a_e, a_f))``
   (ties to the lower id). Experts routed to the same tokens (positively correlated) are
   redundant; anti-correlated ones are not penalised. lambda = 0 is the plain top-K by
   importance. The first pick is always the most important expert.
4. **Pattern** of the sorted importance curve ``v_1 >= ... >= v_E`` (a label for people):
   ``even`` when its coefficient of variation (std / mean) is below 0.1; else ``cliff`` when
   one step ``v_j - v_{j+1}`` is at least 0.3 * v_1 (a few experts stand far above the rest);
   else ``moderate`` when the coefficient of variation is at least 0.3; else ``gradual``.

K defaults to :func:`default_top_k` (a quarter of E, at least 1, at most 24; the rationale is in
:mod:`nexus.constants`); an explicit K above any layer's E is an error, and K >= E/2 warns (the
average of half the experts or more is close to ``mean_all``: the selection hardly matters).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from nexus import __version__
from nexus.constants import DEFAULT_DIVERSITY, SELECTION_NAME, default_top_k
from nexus.errors import NexusError
from nexus.engines.select_config import SelectConfig
from nexus.io import output_lock, refuse_output_over_inputs, write_json

log = logging.getLogger(__name__)

PATTERNS = ("cliff", "moderate", "gradual", "even")
EVEN_CV, CLIFF_STEP, MODERATE_CV = 0.1, 0.3, 0.3


def warn_if_top_k_large(top_k: int, num_experts: int) -> bool:
    """Log a warning when ``top_k >= E / 2``: the selection then barely differs from averaging every
    expert. :return: whether it warned."""
    if num_experts > 1 and 2 * top_k >= num_experts:
        log.warning("--top-k %d averages at least half of the %d experts per layer: the shared expert starts close "
                    "to the mean of all experts and the PCA selection hardly matters; the default is %d",
                    top_k, num_experts, default_top_k(num_experts))
        return True
    return False


def pca_from_covariance(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal components of a covariance matrix.

    :param cov: ``Tensor[E, E]`` (symmetric).
    :return: ``(explained_variance[E], explained_variance_ratio[E], components[E, E])`` in float64,
        sorted by decreasing variance; ``components[i]`` is component i over the experts (sklearn's
        ``components_`` layout, sign arbitrary).
    """
    cov = cov.to(torch.float64)
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    order = torch.argsort(evals, descending=True)
    var = evals[order].clamp_min(0)
    total = var.sum()
    ratio = var / total if total > 0 else torch.zeros_like(var)
    return var, ratio, evecs[:, order].T.contiguous()


def expert_importance(components: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``importance_e = sum_i |components[i, e]| * ratio[i]``, ``Tensor[E]``."""
    return (components.abs() * ratio.unsqueeze(1)).sum(0)


def loading_similarity(components: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the experts' loading vectors ``a_e = components[:, e] * sqrt(variance)``.

    :return: ``Tensor[E, E]``: the correlation matrix of the experts' probabilities (0 where an
        expert has no variance).
    """
    a = components.T * variance.sqrt().unsqueeze(0)
    norm = a.norm(dim=1)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    unit = a / safe.unsqueeze(1)
    sim = unit @ unit.T
    sim[norm == 0] = 0
    sim[:, norm == 0] = 0
    return sim


def greedy_pick(importance: torch.Tensor, similarity: torch.Tensor, k: int, diversity: float) -> list[int]:
    """The diversity-aware greedy pick of the module docstring.

    :param importance: ``Tensor[E]``.
    :param similarity: ``Tensor[E, E]`` (cosine of loading vectors).
    :param k: experts to pick (<= E).
    :param diversity: lambda; 0 gives the top-k by importance.
    :return: k expert ids in pick order.
    """
    imp = importance.to(torch.float64)
    top = imp.max()
    score = imp / top if top > 0 else imp.clone()
    redundancy = torch.zeros_like(score)
    picked: list[int] = []
    available = torch.ones_like(score, dtype=torch.bool)
    for _ in range(k):
        value = torch.where(available, score - diversity * redundancy, torch.full_like(score, -float("inf")))
        best = int(torch.nonzero(value == value.max())[0])  # ties to the lower id
        picked.append(best)
        available[best] = False
        redundancy = torch.maximum(redundancy, similarity[best].to(torch.float64).clamp_min(0))
    return picked


def importance_pattern(importance: torch.Tensor) -> str:
    """``cliff``, ``moderate``, ``gradual`` or ``even`` (thresholds in the module docstring)."""
    v = torch.sort(importance.to(torch.float64), descending=True).values
    if v.numel() < 2 or v[0] <= 0:
        return "even"
    cv = float(v.std(unbiased=False) / v.mean())
    if cv < EVEN_CV:
        return "even"
    if float((v[:-1] - v[1:]).max() / v[0]) >= CLIFF_STEP:
        return "cliff"
    return "moderate" if cv >= MODERATE_CV else "gradual"


def select_experts(stats, top_k: int | None = None, diversity: float = DEFAULT_DIVERSITY, source: str = "") -> dict:
    """Pick experts for every layer of ``stats``.

    :param stats: a :class:`nexus.router_stats.RouterStats`.
    :param top_k: experts per layer; None: :func:`default_top_k` of each layer's E.
    :param diversity: the redundancy weight lambda (>= 0).
    :param source: where the statistics came from (recorded).
    :return: the selection document written to ``expert_selection.json``: provenance plus
        ``layers``, a list of ``{layer, num_experts, tokens, experts, scores, importance,
        explained_variance, explained_variance_ratio, importance_share, pattern}`` where
        ``experts`` are the picked ids in pick order and ``scores`` their importance.
    :raises NexusError: ``top_k`` < 1 or above a layer's expert count, ``diversity`` < 0.
    """
    if diversity < 0:
        raise NexusError(f"--diversity must be >= 0, got {diversity}")
    if top_k is not None:
        if top_k < 1:
            raise NexusError(f"--top-k must be at least 1, got {top_k}")
        smallest = min(s.num_experts for s in stats.layers.values())
        if top_k > smallest:
            raise NexusError(f"--top-k {top_k} is more than the {smallest} experts per layer of this model; "
                             f"pass at most {smallest}")
    layers = []
    warned = set()
    for s in stats.layers.values():
        k = top_k if top_k is not None else default_top_k(s.num_experts)
        if (k, s.num_experts) not in warned and warn_if_top_k_large(k, s.num_experts):
            warned.add((k, s.num_experts))
        var, ratio, comps = pca_from_covariance(s.covariance(ddof=1))
        imp = expert_importance(comps, ratio)
        ids = greedy_pick(imp, loading_similarity(comps, var), k, diversity)
        total = float(imp.sum())
        layers.append({
            "layer": s.layer,
            "num_experts": s.num_experts,
            "tokens": s.tokens,
            "experts": ids,
            "scores": [float(imp[i]) for i in ids],
            "importance": imp.tolist(),
            "explained_variance": var.tolist(),
            "explained_variance_ratio": ratio.tolist(),
            "importance_share": float(imp[ids].sum()) / total if total > 0 else 0.0,
            "pattern": importance_pattern(imp),
            "selection_frequency": (s.topk_count / s.count).tolist(),
        })
        log.debug("layer %d: picked %s (importance share %.3f, %s)", s.layer, ids, layers[-1]["importance_share"],
                 layers[-1]["pattern"])
    meta = stats.meta
    return {
        "nexus_version": __version__,
        "family": meta.get("family", ""),
        "base_fingerprint": meta.get("base_fingerprint", ""),
        "model_type": meta.get("model_type", ""),
        "base_weights_fingerprint": meta.get("base_weights_fingerprint", ""),
        "base_weights_tensors": meta.get("base_weights_tensors", []),
        "stats": {"path": source, "tokens": stats.tokens, "complete": meta.get("complete"),
                  "data": meta.get("source", {}).get("data")},
        "args": {"top_k": top_k, "diversity": diversity},
        "rule": "importance_e = sum_i |loading_ie| * explained_ratio_i; greedy: importance/max - "
                "diversity * max over picked of max(0, cos(loading_e, loading_f))",
        "layers": layers,
    }


def selection_path(output: str | Path) -> Path:
    """``output`` itself when it names a ``.json`` file, else ``output/expert_selection.json``."""
    output = Path(output)
    return output if output.suffix == ".json" else output / SELECTION_NAME


def save_selection(doc: dict, output: str | Path, plots: bool = True) -> list[Path]:
    """Write the selection JSON (atomically) and, with ``plots``, its two PNGs beside it.

    :return: the files written, the JSON first.
    """
    path = selection_path(output)
    write_json(path, doc)
    written = [path]
    if plots:
        from nexus.engines.plots_selection import plot_selection

        written += plot_selection(doc, path.with_suffix(""))
    return written


def load_selection(path: str | Path) -> dict:
    """Read a selection written by :func:`save_selection` (a file or the directory holding it).

    Unknown top-level keys (a newer NEXUS) are kept, with a warning naming them.
    """
    from nexus.constants import ROUTER_STATS_NAME

    path = Path(path)
    file = selection_path(path) if path.is_dir() or path.suffix != ".json" else path
    stats_dir = path if path.is_dir() else path.parent
    stats_hint = (f"it holds router statistics, not an expert selection: make one with "
                  f"`nexus select --stats {stats_dir} --output DIR` and pass DIR/{SELECTION_NAME}")
    if not file.exists():
        if path.name == ROUTER_STATS_NAME or (path.is_dir() and (path / ROUTER_STATS_NAME).exists()):
            raise NexusError(f"{path}: {stats_hint}")
        raise NexusError(f"no expert selection at {path}; run `nexus select` first")
    try:
        doc = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise NexusError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list):
        raise NexusError(f"{file} is not an expert selection (no 'layers' list); run `nexus select` to make one")
    if "identity" in doc or any(isinstance(x, dict) and "experts" not in x for x in doc["layers"]):
        raise NexusError(f"{file}: {stats_hint}" if "identity" in doc else
                         f"{file} is not an expert selection (a layer without 'experts'); run `nexus select` again")
    known = {"nexus_version", "family", "base_fingerprint", "model_type", "base_weights_fingerprint",
             "base_weights_tensors", "stats", "args", "rule", "layers"}
    unknown = sorted(set(doc) - known)
    if unknown:
        log.warning("%s was written by nexus %s (this is %s); ignoring unknown keys: %s",
                    file, doc.get("nexus_version", "?"), __version__, ", ".join(unknown))
    doc["_path"] = str(file)
    doc["_sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    return doc


def _base_model(stats_path: str | Path) -> str | None:
    """The base model directory the statistics were collected on, as they record it (read from the
    file's header only); None when it is not recorded or no longer exists."""
    from safetensors import SafetensorError, safe_open

    from nexus.constants import ROUTER_STATS_NAME

    file = Path(stats_path) / ROUTER_STATS_NAME if Path(stats_path).is_dir() else Path(stats_path)
    try:
        with safe_open(file, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("nexus_meta", "{}"))
        base_model = meta["source"]["base_model"]
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):  # RouterStats.load says what is wrong
        return None
    return base_model if isinstance(base_model, str) and Path(base_model).is_dir() else None


def run_select(config: SelectConfig) -> tuple[dict, list[Path]]:
    """Load the statistics in ``config.stats``, :func:`select_experts`, :func:`save_selection` to
    ``config.output`` (default: beside the statistics).

    :return: ``(selection document, files written)``.
    :raises NexusError: the selection file would be a file of the statistics, or lie inside the base
        model they were collected on.
    """
    from nexus.constants import ROUTER_STATS_META_NAME, ROUTER_STATS_NAME
    from nexus.router_stats import RouterStats

    stats_path = config.stats
    output = config.output
    given_dir = Path(stats_path).is_dir()
    stats_dir = Path(stats_path) if given_dir else Path(stats_path).parent
    if output is None:
        output = str(stats_dir)
    # The files of the statistics, not their directory: the selection goes beside them by default.
    stats_files = [stats_dir / ROUTER_STATS_NAME, stats_dir / ROUTER_STATS_META_NAME] + ([] if given_dir else [stats_path])
    refuse_output_over_inputs(selection_path(output), {"--stats": stats_files,
                                                       f"the base model of --stats {stats_path}": _base_model(stats_path)})
    with output_lock(output):
        stats = RouterStats.load(stats_path)
        if not stats.meta.get("complete", False):
            log.warning("the statistics in %s are incomplete (%d tokens): rerun `nexus collect` to finish them",
                        stats_path, stats.tokens)
        doc = select_experts(stats, config.top_k, config.diversity, source=str(stats_path))
        return doc, save_selection(doc, output, config.plots)
