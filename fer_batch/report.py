"""write_report(OUT): one self-contained HTML page a person can look at.

    read_files / read_faces (no crops) / read_tracks   the latest committed run per source
      -> label distribution, overall and per source    bar charts + a table
      -> a timeline per video                          class probabilities over time + tracks
      -> a contact sheet of face crops per label       crop_png of the faces table, no media read
      -> the files table's errors
      -> index.html with every PNG embedded as a base64 data URI; the PNGs are also written
         next to it (never over a file that the report did not write)

Figures are drawn with matplotlib's Agg canvas on ``Figure`` objects (no pyplot state).
Every name drawn (file, class, label) goes through ``mpl_text``, as every name in the page
goes through ``html.escape``: matplotlib reads text between two ``$`` as a formula.
Works on local and s3:// outputs alike (pyarrow filesystems).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fer_batch import runs, sources, tracks

MAX_SOURCES = 40  # sources in the per-source chart and table, most faces first
MAX_TIMELINES = 12  # videos with a timeline, most faces first
MAX_LANES = 16  # track lanes per timeline, most faces first
CONTACT_PER_LABEL = 12  # crops per label on the contact sheet
MAX_TABLE_ROWS = 200  # rows of the tracks and errors tables
DPI = 100  # figure pixels per inch: a 12-inch figure is 1200 px, the page's width
UNCERTAIN_COLOR = "#9e9e9e"
PNG_SOFTWARE = "fer-batch report"  # PNG tEXt Software of our figures: they may be replaced


class FigureClashError(ValueError):
    """A figure would replace a file next to the page that the report did not write
    (a ValueError: the CLI ends it in exit 2 with one line)."""


def load(out_uri: str, endpoint_url: str | None = None) -> dict:
    """The report's data: files, faces (pandas, without crops), tracks, manifests, classes,
    all read from one listing of the committed runs."""
    out = runs.Output(out_uri, endpoint_url)
    manifests = out.committed_runs()
    files = runs.read_files(out, runs=manifests).to_pandas()
    classes: list[str] = []
    for m in manifests.values():
        classes += [c for c in m.get("classes", []) if c not in classes]
    faces, trk = pd.DataFrame(), pd.DataFrame()
    if out.exists(out.path("faces")) and manifests:
        names = pds.dataset(out.path("faces"), filesystem=out.fs, format="parquet",
                            partitioning="hive").schema.names
        cols = [c for c in names if c != "crop_png"]  # crops: only those shown, later
        faces = runs.read_faces(out, columns=cols, as_pandas=True, runs=manifests)
        classes = [c for c in classes if c in faces.columns]
        if out.exists(out.path("tracks")):
            trk = runs.read_tracks(out, as_pandas=True, runs=manifests)
    smooth = [m.get("config", {}).get("track_smooth_s") for m in manifests.values()]
    return dict(out=out, manifests=manifests, files=files, faces=faces, tracks=trk,
                classes=classes, smooth_s=next((s for s in smooth if s is not None),
                                               tracks.SMOOTH_S))


def label_order(classes, labels) -> list[str]:
    """The model's classes in logit order, then any other label present (uncertain)."""
    return list(classes) + sorted({str(x) for x in labels} - set(classes))


def label_colors(labels) -> dict[str, str]:
    from matplotlib import colormaps
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    colors, k = {}, 0
    for lab in labels:
        if lab == tracks.UNCERTAIN:
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


def plot_distribution(faces: pd.DataFrame, labels, colors) -> Figure:
    """Bar chart: faces per label over the whole output."""
    counts = faces["label"].value_counts().reindex(labels, fill_value=0)
    fig = new_figure(12, 3.2)
    ax = fig.add_subplot()
    bars = ax.bar([mpl_text(x) for x in labels], counts.values,
                  color=[colors[x] for x in labels])
    ax.bar_label(bars, [f"{v} ({v / max(1, counts.sum()):.0%})" for v in counts.values])
    ax.set_ylabel("faces")
    ax.set_title(f"Label distribution, all sources ({len(faces)} faces)")
    ax.margins(y=0.15)
    return fig


def plot_sources(faces: pd.DataFrame, labels, colors) -> Figure:
    """Stacked horizontal bars: share of each label per source (most faces first)."""
    tab = pd.crosstab(faces["source"], faces["label"]).reindex(columns=labels, fill_value=0)
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


def plot_timeline(vf: pd.DataFrame, vt: pd.DataFrame, classes, colors, smooth_s: float,
                  title: str) -> Figure:
    """One video: per-class probability over time (mean over the faces of each sampled frame;
    dots raw, lines smoothed) above one lane per track with its labelled segments."""
    per_frame = vf.groupby("timestamp_s")[list(classes)].mean().sort_index()
    t = per_frame.index.to_numpy(np.float64)
    smoothed = tracks.smooth_probs(t, per_frame.to_numpy(np.float32), smooth_s)
    lanes = vt.sort_values("faces", ascending=False).head(MAX_LANES).sort_values("track_id") \
        if len(vt) else vt
    fig = new_figure(12, 2.6 + 0.32 * max(1, len(lanes)))
    top, bottom = fig.subplots(2, 1, sharex=True,
                               gridspec_kw=dict(height_ratios=[2.2, 0.3 + 0.32 *
                                                               max(1, len(lanes))]))
    for j, c in enumerate(classes):
        top.plot(t, smoothed[:, j], color=colors[c], lw=1.8, label=mpl_text(c))
        top.plot(t, per_frame[c].to_numpy(), "o", color=colors[c], ms=3, alpha=0.6)
    top.set_ylim(0, 1)
    top.set_ylabel("probability")
    if len(vt) > len(lanes):
        title += f" ({len(lanes)} longest shown)"
    top.set_title(mpl_text(title), loc="left", fontsize=11)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, frameon=False)
    span = max(float(t.max() - t.min()) if len(t) else 1.0, 1.0)
    for lane, (_, tr) in enumerate(lanes.iterrows()):
        for seg in tr["segments"]:
            width = max(seg["end_s"] - seg["start_s"], span / 150)  # a 1-face track stays visible
            bottom.broken_barh([(seg["start_s"], width)], (lane - 0.4, 0.8),
                               color=colors.get(seg["label"], UNCERTAIN_COLOR))
        seen = vf.loc[vf["track_id"] == tr["track_id"], "timestamp_s"]
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


def pick_crops(faces: pd.DataFrame, labels, per_label: int = CONTACT_PER_LABEL) -> pd.DataFrame:
    """Per label, the highest-scoring faces, one per track (or image face) before repeats."""
    f = faces.copy()
    face = f["source"] + "@" + f["frame_index"].astype(str) + "." + f["face_index"].astype(str)
    track = f["source"] + "#" + f["track_id"].astype("string") if "track_id" in f else face
    f["_who"] = track.fillna(face)  # a track, or a face without one (images)
    f = f.sort_values("score", ascending=False)
    f["_rank"] = f.groupby(["label", "_who"]).cumcount()  # 0 = best face of its track
    f = f.sort_values(["_rank", "score"], ascending=[True, False])
    return pd.concat([f[f["label"] == lab].head(per_label) for lab in labels])


def read_crops(out: runs.Output, picked: pd.DataFrame) -> list[bytes]:
    """crop_png of the picked faces, reading only their partitions and frames."""
    if picked.empty:
        return []
    ds = pds.dataset(out.path("faces"), filesystem=out.fs, format="parquet", partitioning="hive")
    flt = (pc.field("run_id").isin(sorted(set(picked["run_id"])))
           & pc.field("source").isin(sorted(set(picked["source"])))
           & pc.field("frame_index").isin(sorted({int(x) for x in picked["frame_index"]})))
    tbl = ds.to_table(columns=["source", "run_id", "frame_index", "face_index", "crop_png"],
                      filter=flt)
    png = {(s, str(r), int(f), int(i)): b for s, r, f, i, b in zip(
        *(tbl[c].to_pylist() for c in tbl.column_names))}
    return [png.get((r.source, str(r.run_id), int(r.frame_index), int(r.face_index)), b"")
            for r in picked.itertuples()]


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


def table_html(df: pd.DataFrame, limit: int = MAX_TABLE_ROWS) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>"
                   for row in df.head(limit).itertuples(index=False))
    more = f"<p class=note>{len(df) - limit} more rows not shown.</p>" if len(df) > limit else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def fmt(v) -> str:
    if isinstance(v, float):
        return "" if np.isnan(v) else f"{v:.2f}"
    return "" if v is None or v is pd.NA else str(v)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def segments_text(segs) -> str:
    return ", ".join(f"{s['label']} {s['start_s']:.1f}–{s['end_s']:.1f}s" for s in segs)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fer-batch report: {title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1220px;
       padding: 0 12px; color: #222; }}
h1 {{ font-size: 22px; margin-bottom: 4px; }} h2 {{ margin-top: 32px; font-size: 18px;
       border-bottom: 1px solid #ddd; }}
img {{ max-width: 100%; display: block; margin: 8px 0; }}
table {{ border-collapse: collapse; margin: 8px 0; font-size: 13px; }}
td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }} .note {{ color: #666; }} .kpi b {{ font-size: 18px; }}
.kpi span {{ margin-right: 28px; }} td.err {{ font-family: monospace; white-space: pre-wrap; }}
</style></head><body>
<h1>fer-batch report</h1>
<p class=note>{out} &middot; generated {now} &middot; latest committed run per source</p>
{body}
</body></html>
"""


def check_figures_free(fs, folder: str, names) -> None:
    """Raise FigureClashError (one line naming the files and the fix) when a figure would
    replace a file that no report wrote: a user's labels.png next to a --html page. Our
    figures carry PNG_SOFTWARE in their PNG header and are replaced silently."""
    foreign = []
    for name in names:
        path = f"{folder}/{name}"
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            continue
        try:
            with fs.open_input_stream(path) as f:
                head = f.read(4096)  # tEXt chunks come before the image data
        except OSError:  # a folder or unreadable file of that name: not ours either
            head = b""
        if f"Software\x00{PNG_SOFTWARE}".encode() not in head:
            foreign.append(path)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise FigureClashError(
            f"{shown}: exists and was not written by fer-batch report; the report writes its "
            "figures next to the page and refuses to replace other files. Pass --html in a "
            "folder of its own (e.g. DIR/report/index.html) or move those files.")


def write_report(out_uri: str, html_path: str | None = None,
                 endpoint_url: str | None = None) -> str:
    """Write the HTML report of an output folder.

    Parameters
    ----------
    out_uri: the OUT folder of ``fer-batch annotate`` (local or s3://).
    html_path: where to write the page (default OUT/report/index.html); the PNG figures
        are written next to it and embedded in it as data URIs. A file next to it with a
        figure's name that no report wrote is never replaced: FigureClashError, nothing
        written.

    Returns
    -------
    The path of the page.
    """
    d = load(out_uri, endpoint_url)
    faces, files, trk, classes = d["faces"], d["files"], d["tracks"], d["classes"]
    chosen = html_path is not None
    html_path = html_path or f"{out_uri.rstrip('/')}/report/index.html"
    fs, path = sources.resolve(html_path, endpoint_url)
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    fs.create_dir(folder, recursive=True)
    pngs: dict[str, bytes] = {}

    def img(name: str, fig: Figure, alt: str) -> str:
        pngs[name] = png_bytes(fig)
        b64 = base64.b64encode(pngs[name]).decode()
        return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'

    labels = label_order(classes, faces["label"] if len(faces) else [])
    colors = label_colors(labels)
    status = files["status"].value_counts() if len(files) else pd.Series(dtype=int)
    videos = faces.loc[faces["media_type"] == "video", "source"].unique() if len(faces) else []
    parts = [
        "<p class=kpi>" + "".join(f"<span>{k} <b>{v}</b></span>" for k, v in (
            ("files", len(files)), ("ok", status.get("ok", 0)),
            ("errors", status.get("error", 0)), ("skipped", status.get("skipped", 0)),
            ("faces", len(faces)), ("videos with faces", len(videos)), ("tracks", len(trk))))
        + "</p>",
        "<p class=note>Models: " + html.escape("; ".join(sorted({
            f"{m.get('model_id')} ({', '.join(m.get('classes', []))})"
            for m in d["manifests"].values()}))) + "</p>",
    ]
    if len(faces):
        parts.append("<h2>Labels</h2>" + img("labels.png", plot_distribution(faces, labels,
                                                                               colors),
                                               "label distribution"))
        parts.append(img("sources.png", plot_sources(faces, labels, colors),
                         "label distribution per source"))
        tab = pd.crosstab(faces["source"], faces["label"]).reindex(columns=labels, fill_value=0)
        tab.insert(0, "faces", tab.sum(axis=1))
        tab = tab.sort_values("faces", ascending=False).reset_index()
        parts.append(f"<details><summary>Faces per source and label ({len(tab)} sources)"
                     f"</summary>{table_html(tab, MAX_TABLE_ROWS)}</details>")

        parts.append("<h2>Timelines</h2><p class=note>Per video: class probabilities over time "
                     "(mean over the faces in each sampled frame; dots per frame, lines a "
                     f"centred {d['smooth_s']:g} s moving average), and one lane per face "
                     "track with its smoothed label segments.</p>")
        counts = faces[faces["media_type"] == "video"]["source"].value_counts()
        for k, src in enumerate(counts.index[:MAX_TIMELINES]):
            vf = faces[faces["source"] == src]
            vt = trk[trk["source"] == src] if len(trk) else trk
            fig = plot_timeline(vf, vt, classes, colors, d["smooth_s"],
                                f"{short(src, 80)}: {plural(len(vf), 'face')}, "
                                f"{plural(len(vt), 'track')}")
            parts.append(img(f"timeline-{k:02d}.png", fig, f"timeline of {src}"))
        if len(counts) > MAX_TIMELINES:
            parts.append(f"<p class=note>{len(counts) - MAX_TIMELINES} more videos not "
                         "shown.</p>")
        if not len(counts):
            parts.append("<p class=note>No faces in videos.</p>")

        picked = pick_crops(faces, labels)
        parts.append("<h2>Faces per label</h2><p class=note>Highest-scoring crops per label "
                     "(48x48, equalized, as the model saw them), one per track first; "
                     "numbers are scores.</p>")
        parts.append(img("contact_sheet.png", plot_contact_sheet(
            picked, read_crops(d["out"], picked), labels, colors,
            faces["label"].value_counts().to_dict()), "face crops per label"))
    else:
        parts.append("<h2>Labels</h2><p class=note>No faces found.</p>")

    if len(trk):
        t = trk.sort_values(["source", "track_id"])
        parts.append("<h2>Tracks</h2>" + table_html(pd.DataFrame({
            "source": t["source"].map(short), "track": t["track_id"],
            "start s": t["start_s"], "end s": t["end_s"], "faces": t["faces"],
            "dominant": t["dominant_label"], "segments": t["segments"].map(segments_text)})))

    errors = files[files["status"] == "error"] if len(files) else files
    parts.append(f"<h2>Errors ({plural(len(errors), 'file')})</h2>")
    if len(errors):
        esc = lambda v: html.escape(str(v or "")[:1000])  # noqa: E731
        rows = "".join(f"<tr><td>{esc(r.source)}</td><td>{esc(r.media_type)}</td>"
                       f"<td class=err>{esc(r.error)}</td></tr>"
                       for r in errors.head(MAX_TABLE_ROWS).itertuples())
        parts.append(f"<table><tr><th>source</th><th>type</th><th>error</th></tr>{rows}</table>")
    else:
        parts.append("<p class=note>No file failed.</p>")

    page = PAGE.format(title=html.escape(short(out_uri)), out=html.escape(out_uri),
                       now=dt.datetime.now().isoformat(timespec="seconds"),
                       body="\n".join(parts))
    if chosen:  # OUT/report is ours (older reports' figures carry no PNG_SOFTWARE)
        check_figures_free(fs, folder, pngs)  # before anything is written
    for name, data in pngs.items():
        with fs.open_output_stream(f"{folder}/{name}") as f:
            f.write(data)
    with fs.open_output_stream(path) as f:
        f.write(page.encode())
    return html_path
