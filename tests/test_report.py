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
from fer_batch import cli, report, runs, tracks

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
    faces = runs.read_faces(str(annotated))
    assert faces.schema.field("track_id").type.bit_width == 32
    assert "neutral" in faces.column_names
    video = faces.filter(pc.equal(faces["media_type"], "video"))
    image = faces.filter(pc.equal(faces["media_type"], "image"))
    assert video.num_rows >= 5 and image.num_rows >= 1
    assert video["track_id"].null_count == 0 and image["track_id"].null_count == image.num_rows
    assert set(video["label"].to_pylist()) == {"neutral"}

    trk = runs.read_tracks(str(annotated))
    assert set(trk["source"].to_pylist()) == set(video["source"].to_pylist())
    assert sum(trk["faces"].to_pylist()) == video.num_rows
    assert sorted(set(video["track_id"].to_pylist())) == trk["track_id"].to_pylist()
    assert trk.schema.names[:8] == [n for n, _ in tracks.TRACK_COLUMNS]
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
