"""write_report(OUT): one self-contained HTML page a person can look at.

    report_data.load: streaming passes over the latest committed run per source
      -> label distribution, overall and per source    bar charts + a table
      -> a timeline per video                          class probabilities over time + tracks
      -> a contact sheet of face crops per label       crop_png of the picked faces only
      -> the tracks table and the files table's errors
      -> index.html with every PNG embedded as a base64 data URI; the PNGs are also written
         next to it (never over a file that the report did not write)

Memory is bounded by the number of files and of faces shown, not of faces (report_data).
Figures are drawn by report_plots; every name in the page goes through ``html.escape``, as
every name drawn goes through ``mpl_text``. Works on local and s3:// outputs alike
(pyarrow filesystems).
"""

from __future__ import annotations

import base64
import datetime as dt
import html

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from fer_batch import report_data, runs, storage
from fer_batch.report_data import MAX_TABLE_ROWS, MAX_TIMELINES, ReportData
from fer_batch.report_plots import (PNG_SOFTWARE, label_colors, mpl_text, plot_contact_sheet,
                                    plot_distribution, plot_sources, plot_timeline, png_bytes,
                                    short)

__all__ = ["write_report", "FigureClashError", "mpl_text"]


class FigureClashError(ValueError):
    """A figure would replace a file next to the page that the report did not write
    (a ValueError: the CLI ends it in exit 2 with one line)."""


def table_html(df: pd.DataFrame, limit: int = MAX_TABLE_ROWS, total: int | None = None) -> str:
    """The first limit rows of df as an HTML table; total: rows of the whole table when df
    holds only its first rows (default len(df))."""
    total = len(df) if total is None else total
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>"
                   for row in df.head(limit).itertuples(index=False))
    more = f"<p class=note>{total - limit} more rows not shown.</p>" if total > limit else ""
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
    runs.Output(out_uri, endpoint_url).require_ours("report")  # before anything is written
    d = report_data.load(out_uri, endpoint_url)
    chosen = html_path is not None
    html_path = html_path or f"{out_uri.rstrip('/')}/report/index.html"
    fs, path = storage.resolve(html_path, endpoint_url)
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    fs.create_dir(folder, recursive=True)
    pngs: dict[str, bytes] = {}  # figure file name -> PNG, filled by the sections
    parts = [summary_html(d)]
    if d.faces:
        colors = label_colors(d.labels)
        parts += [labels_html(d, colors, pngs), timelines_html(d, colors, pngs),
                  contact_sheet_html(d, colors, pngs)]
    else:
        parts.append("<h2>Labels</h2><p class=note>No faces found.</p>")
    parts += [tracks_html(d), errors_html(d.files)]
    page = PAGE.format(title=html.escape(short(out_uri)), out=html.escape(out_uri),
                       now=dt.datetime.now().isoformat(timespec="seconds"),
                       body="\n".join(p for p in parts if p))
    if chosen:  # OUT/report is ours (older reports' figures carry no PNG_SOFTWARE)
        check_figures_free(fs, folder, pngs)  # before anything is written
    write_files(fs, folder, pngs, path, page)
    return html_path


def embed(pngs: dict[str, bytes], name: str, fig, alt: str) -> str:
    """An <img> of fig as a data URI; its PNG is kept in pngs[name] to write next to it."""
    pngs[name] = png_bytes(fig)
    b64 = base64.b64encode(pngs[name]).decode()
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def summary_html(d: ReportData) -> str:
    """The key numbers and the models of the runs."""
    status = d.files["status"].value_counts() if len(d.files) else pd.Series(dtype=int)
    kpis = (("files", len(d.files)), ("ok", status.get("ok", 0)),
            ("errors", status.get("error", 0)), ("skipped", status.get("skipped", 0)),
            ("faces", d.faces), ("videos with faces", d.videos), ("tracks", d.tracks))
    ok = d.files[d.files["status"] == "ok"] if len(d.files) else d.files
    labelled = ok["model_id"].value_counts() if len(ok) else pd.Series(dtype=int)
    classes = {m.get("model_id"): m.get("classes", []) for m in d.manifests.values()}
    models = [f"{mid} ({', '.join(classes.get(mid, []))}): labelled "
              f"{plural(int(labelled.get(mid, 0)), 'file')}"
              for mid in sorted(set(classes) | set(labelled.index), key=str)]
    return ("<p class=kpi>" + "".join(f"<span>{k} <b>{v}</b></span>" for k, v in kpis)
            + "</p>\n<p class=note>Models (which labelled the latest row of each file): "
            + html.escape("; ".join(models)) + "</p>")


def labels_html(d: ReportData, colors, pngs) -> str:
    """Label distribution overall and per source, and the faces per source and label."""
    totals = d.counts.groupby(level="label").sum().reindex(d.labels, fill_value=0)
    tab = report_data.source_label_table(d.counts, d.labels)
    out = ["<h2>Labels</h2>" + embed(pngs, "labels.png",
                                     plot_distribution(totals, d.faces, colors),
                                     "label distribution"),
           embed(pngs, "sources.png", plot_sources(tab, colors), "label distribution per source")]
    tab.insert(0, "faces", tab.sum(axis=1))
    tab = tab.sort_values("faces", ascending=False).reset_index()
    out.append(f"<details><summary>Faces per source and label ({len(tab)} sources)"
               f"</summary>{table_html(tab, MAX_TABLE_ROWS)}</details>")
    return "\n".join(out)


def timelines_html(d: ReportData, colors, pngs) -> str:
    """One timeline per drawn video (the MAX_TIMELINES with most faces)."""
    out = ["<h2>Timelines</h2><p class=note>Per video: class probabilities over time "
           "(mean over the faces in each sampled frame; dots per frame, lines a "
           f"centred {d.smooth_s:g} s moving average), and one lane per face "
           "track with its smoothed label segments.</p>"]
    for k, tl in enumerate(d.timelines):
        fig = plot_timeline(tl, d.classes, colors, d.smooth_s,
                            f"{short(tl.source, 80)}: {plural(tl.faces, 'face')}, "
                            f"{plural(tl.tracks, 'track')}")
        out.append(embed(pngs, f"timeline-{k:02d}.png", fig, f"timeline of {tl.source}"))
    if d.videos > MAX_TIMELINES:
        out.append(f"<p class=note>{d.videos - MAX_TIMELINES} more videos not shown.</p>")
    if not d.videos:
        out.append("<p class=note>No faces in videos.</p>")
    return "\n".join(out)


def contact_sheet_html(d: ReportData, colors, pngs) -> str:
    """The highest-scoring crops per label, read for the picked faces only."""
    totals = d.counts.groupby(level="label").sum().to_dict()
    crops = report_data.read_crops(d.out, d.picked)
    return ("<h2>Faces per label</h2><p class=note>Highest-scoring crops per label "
            "(48x48, equalized, as the model saw them), one per track first; "
            "numbers are scores.</p>\n"
            + embed(pngs, "contact_sheet.png",
                    plot_contact_sheet(d.picked, crops, d.labels, colors, totals),
                    "face crops per label"))


def tracks_html(d: ReportData) -> str:
    """The first MAX_TABLE_ROWS tracks by source and track id ("" without tracks)."""
    if not d.tracks:
        return ""
    t = d.track_rows
    return "<h2>Tracks</h2>" + table_html(pd.DataFrame({
        "source": t["source"].map(short), "track": t["track_id"],
        "start s": t["start_s"], "end s": t["end_s"], "faces": t["faces"],
        "dominant": t["dominant_label"], "segments": t["segments"].map(segments_text)}),
        total=d.tracks)


def errors_html(files: pd.DataFrame) -> str:
    """The files that failed, with their errors."""
    errors = files[files["status"] == "error"] if len(files) else files
    out = f"<h2>Errors ({plural(len(errors), 'file')})</h2>\n"
    if not len(errors):
        return out + "<p class=note>No file failed.</p>"
    esc = lambda v: html.escape(str(v or "")[:1000])  # noqa: E731
    rows = "".join(f"<tr><td>{esc(r.source)}</td><td>{esc(r.media_type)}</td>"
                   f"<td class=err>{esc(r.error)}</td></tr>"
                   for r in errors.head(MAX_TABLE_ROWS).itertuples())
    return out + f"<table><tr><th>source</th><th>type</th><th>error</th></tr>{rows}</table>"


def write_files(fs, folder: str, pngs: dict[str, bytes], path: str, page: str) -> None:
    """The figures next to the page, then the page."""
    for name, data in pngs.items():
        with fs.open_output_stream(f"{folder}/{name}") as f:
            f.write(data)
    with fs.open_output_stream(path) as f:
        f.write(page.encode())
