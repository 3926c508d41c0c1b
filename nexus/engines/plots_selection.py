"""Pictures of an expert selection: importance per layer x expert, and variance explained.

Drawn with matplotlib's object API on the Agg canvas (no display, no global pyplot state), sized
for any number of layers and experts (1 layer, 128 experts, 36 layers...).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nexus.io import atomic_path


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_importance(doc: dict, path: str | Path) -> Path:
    """Heatmap of each layer's importance shares (rows: layers, columns: experts), the picked
    experts marked with dots.

    :param doc: a selection document (:func:`nexus.engines.select.select_experts`).
    :return: ``path`` (a PNG).
    """
    from matplotlib.figure import Figure

    layers = doc["layers"]
    width = max(len(x["importance"]) for x in layers)
    grid = np.full((len(layers), width), np.nan)
    for row, x in enumerate(layers):
        imp = np.asarray(x["importance"], dtype=float)
        grid[row, : imp.size] = imp / imp.sum() if imp.sum() > 0 else imp
    fig = Figure(figsize=(min(24, max(6, 0.12 * width + 2)), min(20, max(2.5, 0.3 * len(layers) + 1.5))))
    ax = fig.add_subplot()
    # Shares are >= 0: the colour scale starts at zero so that a pale cell means "unimportant".
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0)
    for row, x in enumerate(layers):
        ax.scatter(x["experts"], [row] * len(x["experts"]), s=max(2, 60 / max(1, width / 16)), c="white",
                   edgecolors="black", linewidths=0.3)
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("expert id")
    ax.set_ylabel("MoE layer")
    ax.xaxis.set_major_locator(MaxNLocator(min(width, 16), integer=True))
    ax.set_yticks(range(len(layers)), [str(x["layer"]) for x in layers])
    if len(layers) > 24:
        ax.yaxis.set_major_locator(MaxNLocator(12, integer=True))
    k = len(layers[0]["experts"]) if layers else 0
    family = f"{doc['family']}, " if doc.get("family") else ""
    ax.set_title(f"expert importance share per layer ({family}dots: the {k} picked)")
    fig.colorbar(im, ax=ax, label="importance share")
    return _save(fig, Path(path))


def plot_variance(doc: dict, path: str | Path) -> Path:
    """Cumulative explained-variance ratio against the number of components, one line per layer.

    :return: ``path`` (a PNG).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    layers = doc["layers"]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    cmap = colormaps["plasma"]
    for j, x in enumerate(layers):
        cum = np.cumsum(np.asarray(x["explained_variance_ratio"], dtype=float))
        ax.plot(np.arange(1, cum.size + 1), cum, color=cmap(j / max(1, len(layers) - 1) * 0.9),
                lw=1, marker="." if cum.size <= 16 else None, label=f"layer {x['layer']}" if len(layers) <= 8 else None)
    from matplotlib.ticker import MaxNLocator

    ax.axhline(0.9, color="grey", ls="--", lw=0.8, label="90% of the variance")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of principal components")
    ax.set_ylabel("cumulative explained variance ratio")
    ax.set_ylim(0, 1.02)
    ax.set_title("router probability PCA: variance explained per layer")
    if len(layers) <= 8:
        ax.legend(fontsize=8)
    else:
        ax.legend(handles=[ax.lines[-1]], fontsize=8)
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        sm = ScalarMappable(norm=Normalize(layers[0]["layer"], layers[-1]["layer"]), cmap=cmap)
        fig.colorbar(sm, ax=ax, label="MoE layer")
    return _save(fig, Path(path))


def plot_selection(doc: dict, prefix: str | Path) -> list[Path]:
    """Both plots, as ``<prefix>_importance.png`` and ``<prefix>_variance.png``."""
    prefix = Path(prefix)
    return [
        plot_importance(doc, prefix.with_name(prefix.name + "_importance.png")),
        plot_variance(doc, prefix.with_name(prefix.name + "_variance.png")),
    ]
