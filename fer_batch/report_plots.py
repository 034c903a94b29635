"""The report's figures, drawn from report_data's aggregates (never from face rows).

Figures are drawn with matplotlib's Agg canvas on ``Figure`` objects (no pyplot state).
Every name drawn (file, class, label) goes through ``mpl_text``: matplotlib reads text
between two ``$`` as a formula.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fer_batch import sink, tracks
from fer_batch.report_data import CONTACT_PER_LABEL, Timeline

MAX_SOURCES = 40  # sources in the per-source chart, most faces first
DPI = 100  # figure pixels per inch: a 12-inch figure is 1200 px, the page's width
UNCERTAIN_COLOR = "#9e9e9e"
PNG_SOFTWARE = "fer-batch report"  # PNG tEXt Software of our figures: they may be replaced


def label_colors(labels) -> dict[str, str]:
    """label -> "#rrggbb": tab10 (tab20 past 10 labels) in labels order, grey for uncertain."""
    from matplotlib import colormaps
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    colors, k = {}, 0
    for lab in labels:
        if lab == sink.UNCERTAIN:
            colors[lab] = UNCERTAIN_COLOR
        else:
            colors[lab] = "#%02x%02x%02x" % tuple(int(255 * v) for v in cmap(k)[:3])
            k += 1
    return colors


def new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": PNG_SOFTWARE})
    return buf.getvalue()


def mpl_text(text) -> str:
    """text as matplotlib must get it to draw it as written: every $ escaped, so that a file
    named $\\foo$.jpg is a name, not a formula (that fails to parse and kills the report)."""
    return str(text).replace("$", r"\$")


def short(uri: str, n: int = 48) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return name if len(name) <= n else name[:n - 1] + "…"


def plot_distribution(counts: pd.Series, n_faces: int, colors) -> Figure:
    """Bar chart: faces per label over the whole output; counts: label -> faces, int64, in
    the order to draw."""
    labels = list(counts.index)
    fig = new_figure(12, 3.2)
    ax = fig.add_subplot()
    bars = ax.bar([mpl_text(x) for x in labels], counts.values,
                  color=[colors[x] for x in labels])
    ax.bar_label(bars, [f"{v} ({v / max(1, counts.sum()):.0%})" for v in counts.values])
    ax.set_ylabel("faces")
    ax.set_title(f"Label distribution, all sources ({n_faces} faces)")
    ax.margins(y=0.15)
    return fig


def plot_sources(tab: pd.DataFrame, colors) -> Figure:
    """Stacked horizontal bars: share of each label per source (most faces first, the first
    MAX_SOURCES); tab: faces per source (index) and label (columns), int64."""
    labels = list(tab.columns)
    tab = tab.loc[tab.sum(axis=1).sort_values(ascending=False).index[:MAX_SOURCES]]
    share = tab.div(tab.sum(axis=1), axis=0)
    fig = new_figure(12, 1.0 + 0.32 * len(tab))
    ax = fig.add_subplot()
    left = np.zeros(len(tab))
    ylab = [mpl_text(f"{short(s)}  ({n})") for s, n in zip(tab.index, tab.sum(axis=1))]
    for lab in labels:
        ax.barh(ylab, share[lab].values, left=left, color=colors[lab], label=mpl_text(lab))
        left += share[lab].values
    ax.invert_yaxis()
    ax.margins(y=0.01)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the source's faces")
    ax.set_title("Label distribution per source (faces in parentheses)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, frameon=False)
    return fig


def plot_timeline(tl: Timeline, classes, colors, smooth_s: float, title: str) -> Figure:
    """One video: per-class probability over time (mean over the faces of each sampled frame;
    dots raw, lines smoothed) above one lane per track with its labelled segments."""
    per_frame, lanes = tl.per_frame, tl.lanes
    t = per_frame.index.to_numpy(np.float64)
    smoothed = tracks.smooth_probs(t, per_frame[list(classes)].to_numpy(np.float32), smooth_s)
    fig = new_figure(12, 2.6 + 0.32 * max(1, len(lanes)))
    top, bottom = fig.subplots(2, 1, sharex=True,
                               gridspec_kw=dict(height_ratios=[2.2, 0.3 + 0.32 *
                                                               max(1, len(lanes))]))
    for j, c in enumerate(classes):
        top.plot(t, smoothed[:, j], color=colors[c], lw=1.8, label=mpl_text(c))
        top.plot(t, per_frame[c].to_numpy(), "o", color=colors[c], ms=3, alpha=0.6)
    top.set_ylim(0, 1)
    top.set_ylabel("probability")
    if tl.tracks > len(lanes):
        title += f" ({len(lanes)} longest shown)"
    top.set_title(mpl_text(title), loc="left", fontsize=11)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, frameon=False)
    span = max(float(t.max() - t.min()) if len(t) else 1.0, 1.0)
    for lane, (_, tr) in enumerate(lanes.iterrows()):
        for seg in tr["segments"]:
            width = max(seg["end_s"] - seg["start_s"], span / 150)  # a 1-face track stays visible
            bottom.broken_barh([(seg["start_s"], width)], (lane - 0.4, 0.8),
                               color=colors.get(seg["label"], UNCERTAIN_COLOR))
        seen = tl.seen.loc[tl.seen["track_id"] == tr["track_id"], "timestamp_s"]
        bottom.plot(seen, np.full(len(seen), lane), "|", color="black", ms=6)
    bottom.set_yticks(range(len(lanes)),
                      [mpl_text(f"track {int(r.track_id)}: {r.dominant_label}")
                       for r in lanes.itertuples()]
                      if len(lanes) else [])
    bottom.set_ylim(len(lanes) - 0.5 if len(lanes) else 0.5, -0.5)
    pad = span / 40  # a clip with faces in one frame still gets a readable time axis
    bottom.set_xlim(min(0.0, float(t.min(initial=0.0))) - pad,
                    max(float(t.max(initial=0.0)), span) + pad)
    bottom.set_xlabel("time in video, s (ticks: detected faces; bars: smoothed label)")
    return fig


def plot_contact_sheet(picked: pd.DataFrame, crops: list[bytes], labels, colors,
                       totals: dict) -> Figure:
    """One row per label: up to CONTACT_PER_LABEL 48x48 crops with their scores;
    totals: label -> number of faces with that label."""
    import cv2
    rows = [lab for lab in labels if (picked["label"] == lab).any()]
    fig = new_figure(12, 0.3 + 1.05 * max(1, len(rows)))
    axes = np.atleast_1d(fig.subplots(max(1, len(rows)), 1))
    picked = picked.assign(_png=crops)
    for ax, lab in zip(axes, rows):
        sel = picked[picked["label"] == lab]
        tiles = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE) if b else None
                 for b in sel["_png"]]
        size = next((x.shape[0] for x in tiles if x is not None), 48)
        strip = np.full((size, (size + 4) * CONTACT_PER_LABEL), 255, np.uint8)
        for k, (tile, score) in enumerate(zip(tiles, sel["score"])):
            if tile is not None:
                strip[:, k * (size + 4):k * (size + 4) + size] = tile
            ax.text(k * (size + 4) + size / 2, size + 1, f"{score:.2f}", ha="center", va="top",
                    fontsize=7)
        ax.imshow(strip, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_ylabel(mpl_text(f"{lab}\n{totals.get(lab, 0)} faces"), rotation=0, ha="right",
                      va="center", color=colors[lab], fontsize=10, fontweight="bold")
    if not rows:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no faces", ha="center", va="center")
    return fig
