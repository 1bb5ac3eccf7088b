"""Pictures on the page, as data: URIs: matplotlib plots (PNG) and sample thumbnails (JPEG).

matplotlib is optional (the `report` extra): without it every plot is None and
the page keeps its tables.  Plots are drawn on the Agg canvas, never a GUI backend.
"""
from __future__ import annotations

import base64
import io
import math
from typing import Mapping, Optional, Sequence

THUMBNAIL_PX = 160
#: Series of the CLIP histogram: colour and legend label.
CLIP_SERIES = {"kept": ("#2b8a3e", "kept (ok)"), "clip_filtered": ("#c92a2a", "clip_filtered"),
               "other": ("#868e96", "other status")}


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def available() -> bool:
    return _matplotlib() is not None


def _png(figure, canvas_cls, tight: bool = True) -> str:
    canvas_cls(figure)
    out = io.BytesIO()
    # A tight bounding box costs an extra layout pass: figures with fixed margins skip it.
    figure.savefig(out, format="png", dpi=100, bbox_inches="tight" if tight else None,
                   metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _tidy(ax) -> None:
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.spines[["top", "right"]].set_visible(False)


def score_histogram_png(edges: Sequence[float], hist: Mapping[str, Sequence[int]],
                        threshold: Optional[float], threshold_label: str) -> Optional[str]:
    """Kept and clip_filtered scores as two overlaid histograms on the same axes.

    A working filter shows two humps either side of the threshold line.  Scored rows
    that another status removed (tags, semantic dedup) are a grey outline."""
    mpl = _matplotlib()
    if mpl is None:
        return None
    Figure, Canvas = mpl
    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    for name in ("kept", "clip_filtered"):
        counts = hist.get(name) or []
        if any(counts):
            colour, label = CLIP_SERIES[name]
            ax.stairs(counts, edges, fill=True, alpha=0.55, color=colour, label=label)
            ax.stairs(counts, edges, color=colour, linewidth=1.0)
    other = hist.get("other") or []
    if any(other):
        colour, label = CLIP_SERIES["other"]
        ax.stairs(other, edges, color=colour, linewidth=1.2, linestyle=":", label=label)
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=threshold_label)
    ax.set_xlabel("CLIP score (image-text cosine similarity)")
    ax.set_ylabel("pairs")
    _tidy(ax)
    ax.legend(fontsize=8, frameon=False)
    return _png(fig, Canvas)


def cluster_sizes_png(sizes: Mapping[int, int]) -> Optional[str]:
    mpl = _matplotlib()
    if mpl is None or not sizes:
        return None
    Figure, Canvas = mpl
    fig = Figure(figsize=(6, 2.6))
    ax = fig.add_subplot()
    xs = sorted(sizes)
    ax.bar([str(x) for x in xs], [sizes[x] for x in xs], color="#1971c2")
    ax.set_xlabel("cluster size (representative + duplicates)")
    ax.set_ylabel("clusters")
    _tidy(ax)
    return _png(fig, Canvas)


def score_columns_png(histograms: Mapping[str, Mapping[str, Sequence[float]]],
                      threshold: Optional[float] = None) -> Optional[str]:
    """One small histogram per tag_/head_ column, three to a row (tags with their threshold line)."""
    mpl = _matplotlib()
    if mpl is None or not histograms:
        return None
    Figure, Canvas = mpl
    columns = min(3, len(histograms))
    rows = math.ceil(len(histograms) / columns)
    fig = Figure(figsize=(3.2 * columns, 2.1 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (name, hist) in zip(axes, histograms.items()):
        tag = name.startswith("tag_")
        ax.stairs(hist["counts"], hist["edges"], fill=True, color="#7048e8" if tag else "#1098ad")
        if tag and threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.get_major_locator().set_params(nbins=5)
        ax.yaxis.get_major_locator().set_params(nbins=4)
        _tidy(ax)
    for ax in axes[len(histograms):]:
        ax.set_visible(False)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.14 / rows, top=1 - 0.12 / rows,
                        wspace=0.3, hspace=0.6)
    return _png(fig, Canvas, tight=False)


def thumbnail(image: Optional[bytes], size: int = THUMBNAIL_PX) -> Optional[str]:
    """A data: URI of a small JPEG of ``image`` (None when it cannot be decoded)."""
    if not image:
        return None
    try:
        from PIL import Image

        with Image.open(io.BytesIO(image)) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=80)
    except Exception:  # a thumbnail is decoration; an odd image must not break the report
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")
