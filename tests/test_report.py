"""Annotate a real video (plus a photo and a broken file) through the real pipeline with a
7-class JAFFE-style model that has a `neutral` class, then track, report, and open the page
in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from conftest import shared
from fer_batch import cli, finish, readers, report, runs, sink

JAFFE = ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise")
VIDEO = ("videos", "intel_head-pose-face-detection-male.mp4")  # 5 s, one man, 13/13 frames
PHOTO = ("photos", "fr_obama_small.jpg")
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1280,2000")
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const r = [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight,
                                           i.src.slice(0, 22)]);
  const pre = document.createElement("pre");
  pre.id = "imgcheck";
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def neutral_checkpoint(tmp_path_factory) -> str:
    """Random ResNet-50 weights with JAFFE's classes, written by the real save function; the
    classifier's `neutral` bias is raised so that faces are labelled neutral, as a model
    trained on such a label set labels calm faces."""
    import torch
    from fer_batch import model as M
    torch.manual_seed(0)
    net = M.build_model(num_classes=len(JAFFE))
    with torch.no_grad():
        net.net.fc.bias[JAFFE.index("neutral")] += 4.0
    path = tmp_path_factory.mktemp("jaffe") / "model.pt"
    M.save_checkpoint(str(path), net, classes=JAFFE, channels=["equalized"],
                      model_args=dict(num_classes=len(JAFFE), in_channels=1, stem="imagenet"))
    return str(path)


@pytest.fixture(scope="module")
def annotated(ray_local, neutral_checkpoint, tmp_path_factory) -> Path:
    video, photo = shared(*VIDEO), shared(*PHOTO)
    tmp = tmp_path_factory.mktemp("report")
    broken = tmp / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp / "out"
    code = cli.main(["annotate", str(video), str(photo), str(broken), "--model",
                     neutral_checkpoint, "--output", str(out), "--min-score", "0.3",
                     "--preprocess-actors", "1"])
    assert code == 0
    return out


def test_faces_get_track_ids_and_tracks_keep_the_neutral_class(annotated):
    faces = readers.read_faces(str(annotated))
    assert faces.schema.field("track_id").type.bit_width == 32
    assert "neutral" in faces.column_names
    video = faces.filter(pc.equal(faces["media_type"], "video"))
    image = faces.filter(pc.equal(faces["media_type"], "image"))
    assert video.num_rows >= 5 and image.num_rows >= 1
    assert video["track_id"].null_count == 0 and image["track_id"].null_count == image.num_rows
    assert set(video["label"].to_pylist()) == {"neutral"}

    trk = readers.read_tracks(str(annotated))
    assert set(trk["source"].to_pylist()) == set(video["source"].to_pylist())
    assert sum(trk["faces"].to_pylist()) == video.num_rows
    assert sorted(set(video["track_id"].to_pylist())) == trk["track_id"].to_pylist()
    assert trk.schema.names[:8] == [n for n, _ in sink.TRACK_COLUMNS]
    for c in JAFFE:  # mean probability per class: the faces' mean
        for tid, mean in zip(trk["track_id"].to_pylist(), trk[c].to_pylist()):
            sel = video.filter(pc.equal(video["track_id"], tid))
            assert mean == pytest.approx(float(np.mean(sel[c].to_numpy())), rel=1e-5)
    longest = trk.sort_by([("faces", "descending")]).to_pylist()[0]
    assert longest["dominant_label"] == "neutral" and longest["faces"] >= 5
    assert longest["segments"][0]["label"] == "neutral"
    assert longest["segments"][0]["start_s"] == longest["start_s"]
    assert longest["segments"][-1]["end_s"] == longest["end_s"] > 3.0  # a 5 s clip


def test_report_is_a_self_contained_page_with_its_figures(annotated):
    html_path = Path(report.write_report(str(annotated)))
    assert html_path == annotated / "report" / "index.html"
    page = html_path.read_text()
    pngs = sorted(p.name for p in html_path.parent.glob("*.png"))
    assert pngs == ["contact_sheet.png", "labels.png", "sources.png", "timeline-00.png"]
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert sorted(base64.b64decode(b) for b in embedded) == \
        sorted((html_path.parent / p).read_bytes() for p in pngs)  # same bytes, embedded
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing outside the page
    assert "neutral" in page and "broken.jpg" in page  # the class and the files error
    assert "Errors (1 file)" in page


def _browser():
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no headless Chromium on PATH (Debian: apt-get install -y chromium); the "
                "page was checked without a browser in the test above")


def test_report_renders_with_its_images_in_chromium(annotated, tmp_path):
    browser = _browser()
    page = Path(report.write_report(str(annotated), str(tmp_path / "page" / "index.html")))
    assert (tmp_path / "page" / "labels.png").exists()  # PNGs next to a chosen page too
    probe = tmp_path / "probe.html"  # the page plus a script that reports each image
    probe.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    run = dict(capture_output=True, text=True, timeout=120)
    dom = subprocess.run([browser, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'p1'}",
                          "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], **run)
    found = re.search(r'<pre id="imgcheck">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    images = json.loads(found.group(1))
    assert len(images) == 4
    for complete, width, height, src in images:
        assert complete and width >= 600 and height >= 100
        assert src.startswith("data:image/png;base64,")

    shot = tmp_path / "shot.png"
    subprocess.run([browser, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'p2'}",
                    f"--screenshot={shot}", page.as_uri()], **run)
    import cv2
    img = cv2.imread(str(shot), cv2.IMREAD_GRAYSCALE)
    assert img is not None and img.shape == (2000, 1280)
    assert (img < 200).mean() > 0.03 and img.std() > 20  # text and figures, not a blank page


# --- the report's data streams: equal to a full pandas computation, batch by batch -------

CLASSES = ("calm", "joy", "anger")
RUN_A, RUN_B = "20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"
SMALL_BATCH = 16  # rows per scanned batch in these tests: far fewer than the faces


def _faces_table(source: str, media_type: str, frames: int, per_frame: int, seed: int):
    """Schema-correct face rows (sink.face_table): per_frame faces per frame at fixed
    places (so that tracking links them), scores on a 0.1 grid (ties on purpose), a real
    PNG crop per face whose grey level tells faces apart."""
    import cv2
    rng = np.random.default_rng(seed)
    n = frames * per_frame
    probs = rng.dirichlet(np.ones(len(CLASSES)), n).astype(np.float32)
    score = np.round(probs.max(axis=1), 1).astype(np.float32)
    label = np.array(CLASSES, object)[probs.argmax(axis=1)]
    label[score < 0.5] = sink.UNCERTAIN
    if media_type == "video":  # tracks of mostly one label: that label has few tracks
        label[rng.random(n) < 0.6] = "calm"
    face = np.tile(np.arange(per_frame), frames)
    row = dict(source=[source] * n, media_type=[media_type] * n,
               frame_index=np.repeat(np.arange(frames), per_frame),
               timestamp_s=np.repeat(np.arange(frames) * 0.5, per_frame),
               face_index=face.astype(np.int32), x=(20 + 150 * face).astype(np.int32),
               y=np.full(n, 20, np.int32), w=np.full(n, 60, np.int32),
               h=np.full(n, 60, np.int32), label=label, score=score,
               **{c: probs[:, j] for j, c in enumerate(CLASSES)}, model_id=["m"] * n,
               crop_png=[cv2.imencode(".png", np.full((48, 48), (seed * 37 + i) % 256,
                                                      np.uint8))[1].tobytes()
                         for i in range(n)])
    return sink.face_table(row, CLASSES)


def _commit_run(out, rid: str, items) -> None:
    """Stage items (source, media_type, frames, faces per frame, seed) as run rid and commit
    it as pipeline.run does: the videos tracked (finish.track), then the real commit."""
    for source, media_type, frames, per_frame, seed in items:
        files = sink.file_rows_table([dict(uri=source, media_type=media_type, status="ok",
                                           size_bytes=10, mtime_ns=seed)], "m")
        sink.write_tables(out.fs, out.staging(rid),
                          _faces_table(source, media_type, frames, per_frame, seed), files,
                          name=f"{seed:04d}")
    finish.track(out, rid, CLASSES, min_score=0.5)
    out.commit(rid, dict(run_id=rid, classes=list(CLASSES), model_id="m",
                         config=dict(min_score=0.5)))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    """A committed output of two runs: run B re-annotates /v/b.mp4 and /i/2.jpg of run A,
    whose rows of those two must then be ignored. 15 videos (more than MAX_TIMELINES), 30
    images; 700+ faces, many times SMALL_BATCH."""
    out = runs.Output(str(tmp_path_factory.mktemp("synthetic") / "out"))
    out.claim()
    videos = [(f"/v/{c}.mp4", "video", 4 + 3 * k, 1 + k % 3, k) for k, c in
              enumerate("abcdefghijklmno")]
    images = [(f"/i/{k}.jpg", "image", 1, 1 + k % 4, 100 + k) for k in range(30)]
    _commit_run(out, RUN_A, videos + images)
    _commit_run(out, RUN_B, [("/v/b.mp4", "video", 9, 2, 200), ("/i/2.jpg", "image", 1, 3, 201)])
    return out.uri


def _expected(out_uri: str, labels, per_label: int):
    """What the report showed when it loaded every face into pandas (the code before the
    streaming passes), with ties broken by (source, frame_index, face_index)."""
    import pandas as pd
    from fer_batch import report_data
    classes = report_data.model_classes(runs.Output(out_uri).committed_runs())
    # a column per class, whether it is an expression's or an entry of other_classes
    faces = report_data.with_class_columns(readers.read_faces(out_uri), classes).to_pandas()
    trk = readers.read_tracks(out_uri, as_pandas=True)
    picked = _reference_picks(faces, labels, per_label)
    videos = faces[faces["media_type"] == "video"]["source"].value_counts()
    return dict(faces=faces, tracks=trk, picked=picked, videos=videos,
                crosstab=pd.crosstab(faces["source"], faces["label"]))


def _reference_picks(faces, labels, per_label: int):
    """report.pick_crops before the streaming passes: per label, the best face of each track
    (or image face) by score first, then the second best of each, ..."""
    import pandas as pd
    f = faces.sort_values(["score", "source", "frame_index", "face_index"],
                          ascending=[False, True, True, True], kind="stable")
    face = f["source"] + "@" + f["frame_index"].astype(str) + "." + f["face_index"].astype(str)
    f["_who"] = (f["source"] + "#" + f["track_id"].astype("string")).fillna(face)
    f["_rank"] = f.groupby(["label", "_who"]).cumcount()
    f = f.sort_values("_rank", kind="stable")
    return pd.concat([f[f["label"] == lab].head(per_label) for lab in labels])


def test_picks_folded_over_batches_equal_picks_of_the_whole_table():
    """Few tracks per label, so later faces of a track must fill the sheet; scores with
    ties; folded over batches of 7 rows the picks are those of the whole table."""
    import pandas as pd
    import pyarrow as pa
    from fer_batch import report_data
    rng = np.random.default_rng(3)
    n = 400
    faces = pd.DataFrame(dict(
        source=rng.choice(["/a.mp4", "/b.mp4", "/c.jpg", "/d.jpg"], n, p=[.47, .47, .03, .03]),
        run_id=RUN_A,
        frame_index=np.arange(n), face_index=rng.integers(0, 3, n).astype(np.int32),
        track_id=pd.array(rng.integers(0, 3, n), "Int32"), label=rng.choice(["x", "y"], n),
        score=np.round(rng.random(n), 1).astype(np.float32), media_type="video"))
    faces.loc[faces["source"].str.endswith(".jpg"), ["track_id", "media_type"]] = [pd.NA,
                                                                                   "image"]
    tbl = pa.Table.from_pandas(faces, preserve_index=False)
    for per_label in (1, 5, 12, 40):
        n_faces, _, picks = report_data.tally_faces(tbl.to_batches(max_chunksize=7), per_label)
        picks = report_data.order_by_label(picks, ["x", "y"])
        exp = _reference_picks(faces, ["x", "y"], per_label)
        key = ["source", "frame_index", "face_index", "label", "score"]
        assert n_faces == n
        assert picks[key].reset_index(drop=True).equals(exp[key].reset_index(drop=True))
        tracked = picks.dropna(subset=["track_id"])
        repeats = tracked.duplicated(["label", "source", "track_id"]).any()
        assert repeats == (per_label == 40)  # second faces of a track only when needed


def _check_against_full_tables(d, out_uri: str) -> None:
    from fer_batch import report_data as R
    exp = _expected(out_uri, d.labels, R.CONTACT_PER_LABEL)
    faces, trk = exp["faces"], exp["tracks"]
    assert d.faces == len(faces) and d.tracks == len(trk)
    assert d.labels == report_data_labels(d.classes, faces)
    tab = R.source_label_table(d.counts, d.labels)
    assert tab.equals(exp["crosstab"].reindex(columns=d.labels, fill_value=0))
    key = ["source", "run_id", "frame_index", "face_index", "label", "score"]
    assert d.picked[key].reset_index(drop=True).equals(
        exp["picked"][key].reset_index(drop=True).astype(d.picked[key].dtypes))
    assert R.read_crops(d.out, d.picked, batch_rows=SMALL_BATCH) == \
        exp["picked"]["crop_png"].tolist()
    assert d.videos == len(exp["videos"])
    drawn = exp["videos"].head(R.MAX_TIMELINES)
    assert [t.source for t in d.timelines] == list(drawn.index)
    for tl in d.timelines:
        vf, vt = faces[faces["source"] == tl.source], trk[trk["source"] == tl.source]
        assert (tl.faces, tl.tracks) == (len(vf), len(vt))
        mean = vf.groupby("timestamp_s")[list(d.classes)].mean().sort_index()
        assert np.array_equal(tl.per_frame.index, mean.index)
        assert np.allclose(tl.per_frame[list(d.classes)], mean, rtol=1e-6, atol=1e-7)
        lanes = vt.sort_values(["faces", "track_id"], ascending=[False, True]) \
            .head(R.MAX_LANES).sort_values("track_id")
        assert tl.lanes["track_id"].tolist() == lanes["track_id"].tolist()
        for tid in lanes["track_id"]:
            assert sorted(tl.seen.loc[tl.seen["track_id"] == tid, "timestamp_s"]) == \
                sorted(vf.loc[vf["track_id"] == tid, "timestamp_s"])
    first = trk.sort_values(["source", "track_id"]).head(R.MAX_TABLE_ROWS)
    assert d.track_rows[["source", "track_id", "faces"]].reset_index(drop=True).equals(
        first[["source", "track_id", "faces"]].reset_index(drop=True))


def report_data_labels(classes, faces) -> list[str]:
    return list(classes) + sorted(set(faces["label"]) - set(classes))


def test_report_data_streams_faces_in_batches_and_equals_full_tables(synthetic, monkeypatch):
    """Bounded memory, shown by construction: every face and track the report reads comes
    through readers.iter_latest in batches of at most SMALL_BATCH rows and never with crops,
    and what those batches add up to equals the computation on whole tables."""
    from fer_batch import report_data
    seen = []
    streamed = readers.iter_latest

    def spy(out, table, *, columns, **kw):
        for piece in streamed(out, table, columns=columns, **kw):
            seen.append((table, tuple(piece.column_names), piece.num_rows))
            yield piece

    monkeypatch.setattr(readers, "iter_latest", spy)
    d = report_data.load(synthetic, batch_rows=SMALL_BATCH)
    face_pieces = [n for t, _, n in seen if t == "faces"]
    assert d.faces > 40 * SMALL_BATCH and len(face_pieces) > 40
    assert max(n for _, _, n in seen) <= SMALL_BATCH
    assert not any("crop_png" in cols for _, cols, _ in seen)
    assert "/v/b.mp4" in d.counts.index.get_level_values("source")
    _check_against_full_tables(d, synthetic)
    # batching changes nothing: one batch for everything gives the same picks and counts
    whole = report_data.load(synthetic, batch_rows=1 << 20)
    assert whole.picked.equals(d.picked) and whole.counts.equals(d.counts)


def test_report_data_keeps_only_the_latest_run_of_a_source(synthetic):
    from fer_batch import report_data
    d = report_data.load(synthetic, batch_rows=SMALL_BATCH)
    per_source = d.counts.groupby(level="source").sum()
    assert per_source["/v/b.mp4"] == 18 and per_source["/i/2.jpg"] == 3  # run B's rows
    assert set(d.picked.loc[d.picked["source"] == "/v/b.mp4", "run_id"]) <= {RUN_B}
    assert len(d.timelines) == report_data.MAX_TIMELINES and d.videos == 15


def test_synthetic_report_page(synthetic, tmp_path):
    page = Path(report.write_report(synthetic, str(tmp_path / "r" / "index.html"))).read_text()
    assert "3 more videos not shown." in page and "timeline of /v/o.mp4" in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 3 + 12


def test_report_data_equals_full_tables_on_a_real_output(annotated):
    """The real pipeline's output (a video with a track, a photo, a broken file): the
    streamed aggregates equal those of the whole faces table, as the report drew them."""
    from fer_batch import report_data
    d = report_data.load(str(annotated), batch_rows=4)
    assert d.faces > 4 and len(d.timelines) == 1
    _check_against_full_tables(d, str(annotated))
