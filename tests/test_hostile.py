"""Issue 13, the hostile-input items left after test_safety.py: checkpoints whose metadata
lies (8), names that matplotlib would read as formulas and a report that overwrites its
neighbours (5, 13), readers that list twice (6), credentials in URLs, local paths in S3
manifests and symlinks out of the tree (10), TIFF headers with duplicated size tags (4) and
locks that are not owned (9). Two tests use a moto S3 server (s3); only the last,
test_follow_symlinks_end_to_end, starts Ray. None trains."""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import delegating_fs
from fer_batch import cli, finish, model as M


# --- 8. checkpoint metadata is validated -------------------------------------------------

@pytest.fixture(scope="module")
def good_ckpt(random_checkpoint) -> dict:
    return torch.load(random_checkpoint, weights_only=True)


def _edited(ckpt: dict, edit) -> dict:
    ck = {k: v for k, v in ckpt.items() if k != "state_dict"}
    ck = copy.deepcopy(ck)
    ck["state_dict"] = dict(ckpt["state_dict"])  # tensors shared, mapping copied
    edit(ck)
    return ck


def _bytes(ckpt: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def _set(path: str, value):
    def edit(ck):
        *parents, last = path.split(".")
        d = ck
        for p in parents:
            d = d[p]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
    return edit


BAD_METADATA = {  # edit -> regex of the message
    "no classes": (_set("classes", KeyError), r"no 'classes' entry"),
    "no model_args": (_set("model_args", KeyError), r"no 'model_args' entry"),
    "no input": (_set("input", KeyError), r"no 'input' entry"),
    "no model_id": (_set("model_id", KeyError), r"no 'model_id' entry"),
    "input size missing": (_set("input.size", KeyError), r"input size None"),
    "classes as a string": (_set("classes", "anger"), r"'classes' is a str"),
    "duplicate class names": (_set("classes", ["anger", "fear", "anger", "disgust", "happiness",
                                               "sadness", "surprise"]),
                              r"duplicate class names \['anger'\]"),
    "a class that is not a string": (_set("classes", [1, 2, 3, 4, 5, 6, 7]), r"non-empty names"),
    "num_classes as a string": (_set("model_args.num_classes", "7"), r"num_classes '7'"),
    "absurd input size": (_set("input.size", 100000), r"input size 100000 .* 16\.\.512"),
    "input size as float": (_set("input.size", 48.0), r"input size 48\.0"),
    "unknown channel": (_set("input.channels", ["infrared"]), r"input channels \['infrared'\]"),
    "channels as a string": (_set("input.channels", "equalized"), r"input channels 'equalized'"),
    "unknown stem": (_set("model_args.stem", "huge"), r"unknown stem 'huge'"),
    "extra model_args": (_set("model_args.dropout", 0.5), r"'model_args' keys"),
    "in_channels disagrees with channels": (_set("model_args.in_channels", 2),
                                            r"in_channels 2 for 1 input channel"),
    "crop_margin as text": (_set("preprocessing.crop_margin", "0.1"), r"crop_margin '0\.1'"),
    "state_dict of strings": (_set("state_dict", {"net.fc.weight": "x"}), r"to tensors"),
    "model_args as a list": (_set("model_args", [7, 1, "imagenet"]), r"'model_args' is a list"),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_checkpoint_metadata_is_a_checkpoint_error(good_ckpt, case):
    edit, message = BAD_METADATA[case]
    ck = _edited(good_ckpt, edit)
    with pytest.raises(M.CheckpointError, match=message) as e:
        M.model_from_checkpoint(ck, "bad.pt")  # what read_checkpoint's callers then call
    assert str(e.value).startswith("bad.pt: ") and "\n" not in str(e.value)


def test_model_id_that_does_not_match_the_weights_is_refused(good_ckpt):
    def edit(ck):
        k = "net.fc.bias"
        ck["state_dict"][k] = ck["state_dict"][k] + 1.0  # weights changed, id kept
    with pytest.raises(M.CheckpointError, match=r"model_id .* does not match its weights"):
        M.model_from_checkpoint(_edited(good_ckpt, edit), "swapped.pt")
    with pytest.raises(M.CheckpointError, match=r"does not match"):
        M.model_from_checkpoint(_edited(good_ckpt, _set("model_id", "0" * 16)), "swapped.pt")


def test_read_checkpoint_refuses_bad_metadata_from_bytes(good_ckpt):
    data = _bytes(_edited(good_ckpt, _set("classes", "anger")))
    with pytest.raises(M.CheckpointError, match=r"file\.pt: .*'classes' is a str"):
        M.read_checkpoint(data, "file.pt")


def test_fp16_and_older_checkpoints_stay_legal(tmp_path, random_checkpoint, good_ckpt):
    half = str(tmp_path / "half.pt")
    M.export_half(random_checkpoint, half)
    net, meta = M.load_checkpoint(half)  # model_id is the hash of the stored fp16 tensors
    assert meta["model_id"] != good_ckpt["model_id"]
    assert next(net.parameters()).dtype == torch.float32
    old = _edited(good_ckpt, _set("preprocessing.crop_margin", KeyError))
    (tmp_path / "old.pt").write_bytes(_bytes(old))
    net, meta = M.load_checkpoint(str(tmp_path / "old.pt"))
    assert "crop_margin" not in meta["preprocessing"] and meta["classes"] == list(M.EMOTIONS)


def test_cli_turns_a_bad_checkpoint_into_exit_2_and_one_line(tmp_path, good_ckpt, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"\x89PNG")
    for case in ("no classes", "duplicate class names", "unknown stem"):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(_bytes(_edited(good_ckpt, BAD_METADATA[case][0])))
        out = tmp_path / f"out-{case.replace(' ', '_')}"
        code = cli.main(["annotate", str(src), "--model", str(bad), "--output", str(out)])
        err = capsys.readouterr().err
        assert code == cli.EXIT_USAGE, (case, err)
        assert err.count("\n") == 1 and str(bad) in err, err
        assert "Traceback" not in err and not out.exists()


# --- helpers: a committed output written by the real sink and commit, without Ray -------

def stage_faces(out, rid: str, classes, source: str, n_faces: int = 2,
                media_type: str = "video") -> dict:
    """Stage run rid: n_faces faces of source (frames 0..n-1, labelled classes[0]) and its
    files row, as the sink writes them. Returns its manifest."""
    from fer_batch import sink
    row = {n: [0] * n_faces for n, _ in sink.FACE_COLUMNS + sink.FACE_TAIL}
    row.update({c: [0.0] * n_faces for c in classes})
    row.update(source=[source] * n_faces, media_type=[media_type] * n_faces,
               frame_index=list(range(n_faces)),
               timestamp_s=[0.5 * i for i in range(n_faces)], label=[classes[0]] * n_faces,
               score=[0.9] * n_faces, model_id=["m"] * n_faces, crop_png=[b""] * n_faces,
               x=[10] * n_faces, y=[10] * n_faces, w=[30] * n_faces, h=[30] * n_faces)
    row[classes[0]] = [0.9] * n_faces
    faces = sink.face_table(row, classes)
    files = sink.file_rows_table([dict(uri=source, media_type=media_type, status="ok",
                                       size_bytes=10, mtime_ns=5)], "m")
    sink.write_tables(out.fs, out.staging(rid), faces, files, name=f"{abs(hash(source)):x}")
    return dict(run_id=rid, classes=list(classes), model_id="m", config={})


def committed_output(root: Path, classes, sources_: list[str], rid: str):
    from fer_batch import runs
    out = runs.Output(str(root))
    out.claim()
    for src in sources_:
        manifest = stage_faces(out, rid, classes, src)
    finish.track(out, rid, classes)  # as pipeline.run: tracked, then committed
    out.commit(rid, manifest)
    return out


RID1, RID2 = "20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"


# --- 5 and 13. the report draws names as written and replaces only its own files ---------

DOLLAR_CLASSES = ["$\\alpha_$", "calm"]  # a class name matplotlib would parse as a formula
DOLLAR_FILE = "/data/$\\foo$.mp4"


def test_report_draws_dollar_names_as_text(tmp_path):
    from fer_batch import report
    committed_output(tmp_path / "out", DOLLAR_CLASSES, [DOLLAR_FILE, "/data/a$b$c.jpg"], RID1)
    page = Path(report.write_report(str(tmp_path / "out"))).read_text()
    assert "$\\foo$.mp4" in page and "timeline-00.png" not in page  # named, embedded
    pngs = sorted(p.name for p in (tmp_path / "out" / "report").glob("*.png"))
    assert "labels.png" in pngs and "timeline-00.png" in pngs and "contact_sheet.png" in pngs


def test_mpl_text_renders_exactly_the_plain_string():
    """The escaped text is drawn pixel for pixel like the raw string with math parsing off."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from fer_batch import report

    def draw(text, parse_math=True):
        fig = Figure(figsize=(3, 0.5))
        canvas = FigureCanvasAgg(fig)
        fig.text(0.02, 0.3, text, parse_math=parse_math)
        canvas.draw()
        return np.asarray(canvas.buffer_rgba()).copy()

    for name in ("$\\foo$.jpg", "a$b$c", "$5 and $6", "cost $3"):
        assert np.array_equal(draw(report.mpl_text(name)), draw(name, parse_math=False)), name


def test_report_html_never_replaces_a_users_files(tmp_path, capsys):
    committed_output(tmp_path / "out", ["calm", "joy"], ["/data/v.mp4"], RID1)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "labels.png").write_bytes(b"\x89PNG my own chart")
    (mine / "notes.txt").write_text("keep")
    code = cli.main(["report", str(tmp_path / "out"), "--html", str(mine / "x.html")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and "labels.png" in err and err.count("\n") == 1, err
    assert (mine / "labels.png").read_bytes() == b"\x89PNG my own chart"
    assert sorted(p.name for p in mine.iterdir()) == ["labels.png", "notes.txt"]
    # a folder of its own: written; written again over its own figures
    page = tmp_path / "page" / "x.html"
    for _ in range(2):
        assert cli.main(["report", str(tmp_path / "out"), "--html", str(page)]) == 0
    assert (page.parent / "labels.png").read_bytes()[:4] == b"\x89PNG"


# --- 6. readers use one listing of the committed runs -----------------------------------

def hooked_fs(inner, when, hook):
    """A pyarrow filesystem over `inner` (the local disk or S3) that runs hook() once, the
    first time when(operation, path) is true, right after that operation: the moment another
    process's commit or lock lands between two steps of the code under test."""
    pending = [hook]

    def after(op, path):
        if pending and when(op, path):
            pending.pop()()

    def get_file_info_selector(selector):
        infos = inner.get_file_info(selector)
        after("list", selector.base_dir)
        return infos

    def open_input_stream(path):
        after("before-read", path)
        data = inner.open_input_stream(path).read()  # what this reader sees
        after("read", path)
        return pa_buffer_stream(data)
    return delegating_fs(inner, get_file_info_selector=get_file_info_selector,
                         open_input_stream=open_input_stream)


def pa_buffer_stream(data: bytes):
    import pyarrow as pa
    return pa.BufferReader(data)


def _commit_after_listing(hook):
    import pyarrow.fs as pafs
    return hooked_fs(pafs.LocalFileSystem(), lambda op, p: op == "list" and p.endswith("/_runs"),
                     hook)


@pytest.mark.parametrize("table", ["faces", "tracks"])
def test_readers_see_one_snapshot_when_a_commit_lands_mid_read(tmp_path, table):
    from fer_batch import readers, runs
    read = dict(faces=readers.read_faces, tracks=readers.read_tracks)[table]
    root = tmp_path / "out"
    plain = committed_output(root, ["calm", "joy"], ["/data/v.mp4"], RID1)
    before = read(str(root)).num_rows
    assert before > 0
    second = stage_faces(plain, RID2, ["calm", "joy"], "/data/v.mp4")  # v.mp4 redone tonight
    finish.track(plain, RID2, ["calm", "joy"])
    hooked = runs.Output(str(root))
    hooked.fs = _commit_after_listing(lambda: plain.commit(RID2, second))
    snap = read(hooked)  # listed before RID2 committed: RID1's rows, not none
    assert snap.num_rows == before and set(snap["run_id"].to_pylist()) == {RID1}
    assert (root / "_runs" / f"{RID2}.json").exists()  # the commit did land mid-read
    after = read(str(root))
    assert after.num_rows == before and set(after["run_id"].to_pylist()) == {RID2}


# --- 10. no secret from a URL is stored; manifests and links cannot widen what is read ---

SIGNED = ("https://photos.s3.amazonaws.com/cam/a.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
          "&X-Amz-Credential=AKIAEXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
          "&X-Amz-Signature=deadbeefsecret&X-Amz-Expires=3600")
SECRETS = ("deadbeefsecret", "AKIAEXAMPLE", "v2secret", "sastoken")


@pytest.mark.parametrize("uri, stored", [
    (SIGNED, "https://photos.s3.amazonaws.com/cam/a.jpg"),
    ("s3://b/k.mp4?AWSAccessKeyId=AKIAEXAMPLE&Signature=v2secret&Expires=1", "s3://b/k.mp4"),
    ("https://acct.blob.core.windows.net/c/x.png?sv=2020&sig=sastoken", "https://acct.blob."
     "core.windows.net/c/x.png"),
    ("https://host/v.mp4?token=sastoken", "https://host/v.mp4"),
    ("/photos/what?.jpg", "/photos/what?.jpg"),  # a ? in a name is kept
    ("/photos/a.jpg?size=large", "/photos/a.jpg?size=large"),  # a query without a secret
])
def test_strip_credentials(uri, stored):
    from fer_batch import storage
    assert storage.strip_credentials(uri) == stored


def test_a_manifest_with_presigned_urls_stores_no_secret(tmp_path):
    from fer_batch import sink, sources
    (tmp_path / "a.jpg").write_bytes(b"x")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"a.jpg\n{SIGNED}\n"
                        "s3://b/k.mp4?AWSAccessKeyId=AKIAEXAMPLE&Signature=v2secret\n"
                        .replace("s3://b/k.mp4", "https://h/k.mp4"))
    entries = sources.list_files([str(manifest)])
    assert [e["status"] for e in entries] == ["pending", "error", "error"]
    urls = [e for e in entries if e["status"] == "error"]
    assert {e["uri"] for e in urls} == {"https://photos.s3.amazonaws.com/cam/a.jpg",
                                        "https://h/k.mp4"}
    assert all("s3:// URIs only" in e["error"] for e in urls)
    table = sink.file_rows_table(entries, "m")  # the files table as written
    text = str(table.to_pylist())
    assert not any(s in text for s in SECRETS), text


def test_a_presigned_source_argument_is_refused_without_its_secret(tmp_path):
    from fer_batch import sources, storage
    with pytest.raises(storage.SourceError, match="is a URL") as e:
        sources.list_files([SIGNED])
    assert not any(s in str(e.value) for s in SECRETS)
    with pytest.raises(storage.SourceError) as e:
        storage.check_access(SIGNED)
    assert not any(s in str(e.value) for s in SECRETS)


def test_symlinks_out_of_the_source_tree_are_not_followed_by_default(tmp_path):
    from fer_batch import sources
    from fer_batch.config import AnnotateConfig
    src, elsewhere = tmp_path / "photos", tmp_path / "private"
    (src / "trip").mkdir(parents=True)
    elsewhere.mkdir()
    (src / "trip" / "a.jpg").write_bytes(b"x")
    (elsewhere / "secret.jpg").write_bytes(b"y")
    (src / "inside.jpg").symlink_to(src / "trip" / "a.jpg")  # within the tree: followed
    (src / "out.jpg").symlink_to(elsewhere / "secret.jpg")
    (src / "outdir").symlink_to(elsewhere)
    assert AnnotateConfig().follow_symlinks is False
    got = {Path(e["uri"]).name: e for e in sources.list_files([str(src)])}
    assert sorted(got) == ["a.jpg", "inside.jpg", "out.jpg", "outdir"]
    assert got["inside.jpg"]["status"] == "pending"
    for name in ("out.jpg", "outdir"):
        assert got[name]["status"] == "skipped" and got[name]["size_bytes"] is None
        assert "outside the source folder: not followed (--follow-symlinks" in got[name]["error"]
    followed = {Path(e["uri"]).name: e["status"]
                for e in sources.list_files([str(src)], follow_symlinks=True)}
    assert followed == {"a.jpg": "pending", "inside.jpg": "pending", "out.jpg": "pending",
                        "secret.jpg": "pending"}


# --- 4. a TIFF that declares its size twice is refused on the larger one -----------------

def tiff_with_two_widths(first_w: int, second_w: int, h: int, real_w: int) -> bytes:
    """A deflate-compressed gray TIFF of real_w x h zeros whose IFD holds ImageWidth twice
    (first_w, then second_w): libtiff believes the first, a reader that keeps the last
    believes the second."""
    import struct
    import zlib
    data = zlib.compress(bytes(real_w * h), 9)  # 16 MB of zeros -> ~16 KB
    entries = [(256, 4, first_w), (256, 4, second_w), (257, 4, h), (258, 3, 8), (259, 3, 8),
               (262, 3, 1), (273, 4, None), (277, 3, 1), (278, 4, h), (279, 4, len(data))]
    data_at = 8 + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(entries)))
    for tag, typ, v in entries:
        v = data_at if v is None else v
        out += struct.pack("<HHI", tag, typ, 1)
        out += struct.pack("<H", v) + b"\0\0" if typ == 3 else struct.pack("<I", v)
    return bytes(out + struct.pack("<I", 0) + data)


@pytest.mark.parametrize("first_w, second_w", [(4000, 8), (8, 4000)])
def test_tiff_with_a_duplicated_width_is_refused_before_decoding(first_w, second_w):
    import cv2
    from fer_batch import decode, formats
    data = tiff_with_two_widths(first_w, second_w, 4000, 4000)
    if first_w == 4000:  # what libtiff makes of it: the first width, 16 MB of pixels
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE).shape == \
            (4000, 4000)
    assert formats.image_size(data) == (4000, 4000)
    with pytest.raises(decode.DecodeError, match=r"declares 4000x4000 pixels, over the limit "
                       r"of 1000000 .*refused before decoding"):
        decode.decode_image(data, max_pixels=1_000_000)


# --- 9. locks have an owner; a stale local lock is taken over atomically ---------------

def dead_pid() -> int:
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_the_owner_releases_the_lock_and_a_broken_lock_commits_nothing(tmp_path):
    import json
    import socket
    from fer_batch import runs
    root = tmp_path / "out"
    a = runs.Output(str(root))
    a.acquire(RID1)
    held = json.loads((root / "_lock").read_text())
    assert held["owner"] == a.lock_owner and RID1 in held["owner"]
    assert socket.gethostname() in held["owner"] and str(os.getpid()) in held["owner"]
    runs.Output(str(root)).release()  # not the owner: nothing happens
    assert json.loads((root / "_lock").read_text())["owner"] == a.lock_owner
    manifest = stage_faces(a, RID1, ["calm", "joy"], "/data/v.mp4")
    b = runs.Output(str(root))
    b.acquire(RID2, break_lock=True)  # "that run is dead": it is not
    a.release()  # a's lock is gone: b's stays
    assert json.loads((root / "_lock").read_text())["owner"] == b.lock_owner
    with pytest.raises(runs.LockedError, match=f"taken over by run {RID2}.*nothing of run "
                                               f"{RID1} was committed"):
        a.commit_or_set_aside(RID1, manifest)
    assert not (root / "_runs").exists() and not (root / "_failed").exists()
    assert (root / "_staging" / RID1).is_dir()  # left for b's recovery, not moved
    b.release()
    assert not (root / "_lock").exists()


def test_a_stale_local_lock_is_taken_over_atomically(tmp_path):
    import json
    import socket
    import pyarrow.fs as pafs
    from fer_batch import runs
    root = tmp_path / "out"
    runs.Output(str(root)).claim()
    stale = dict(run_id="20251231T000000Z-dddddd", host=socket.gethostname(), pid=dead_pid(),
                 started="2025-12-31T00:00:00+00:00")
    (root / "_lock").write_text(json.dumps(stale))
    y = runs.Output(str(root))
    x = runs.Output(str(root))  # reads the stale lock; y takes it over before x acts on it
    x.fs = hooked_fs(pafs.LocalFileSystem(), lambda op, p: op == "read" and p.endswith("/_lock"),
                     lambda: y.acquire(RID2))
    with pytest.raises(runs.LockedError, match=f"in use by run {RID2}"):
        x.acquire(RID1)
    assert json.loads((root / "_lock").read_text())["owner"] == y.lock_owner and y.holds_lock()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("_lock")) == ["_lock"]
    y.release()
    (root / "_lock").write_text(json.dumps(stale))  # no race: the stale lock is taken over
    z = runs.Output(str(root))
    z.acquire(RID1)
    assert z.holds_lock() and RID1 in json.loads((root / "_lock").read_text())["owner"]
    z.release()


# --- 9 and 10 on a real S3 server (moto; conftest's s3 fixture) -----------------------

def test_s3_lock_is_read_back_and_released_only_by_its_owner(s3):
    from fer_batch import runs
    from s3_server import OUT
    uri = f"s3://{OUT}/hostile"
    a, b = runs.Output(uri), runs.Output(uri)
    # b writes its lock (--break-lock) after a wrote but before a reads its lock back
    a.fs = hooked_fs(a.fs, lambda op, p: op == "before-read" and p.endswith("/_lock"),
                     lambda: b.acquire(RID2, break_lock=True))
    with pytest.raises(runs.LockedError, match=f"in use by run {RID2}"):
        a.acquire(RID1)
    assert a.lock_owner is None and b.holds_lock()
    a.release()
    runs.Output(uri).release()  # neither owns it
    assert b.holds_lock()
    b.release()
    assert not b.exists(b.path("_lock"))


def test_s3_manifest_cannot_name_local_paths_or_store_a_signature(s3):
    from fer_batch import sink, sources
    from s3_server import IN
    s3.put_object(Bucket=IN, Key="hostile/a.jpg", Body=b"x")
    s3.put_object(Bucket=IN, Key="hostile/list.txt",
                  Body=f"a.jpg\n/etc/hostname\n{SIGNED}\n".encode())
    entries = {e["uri"]: e for e in sources.list_files([f"s3://{IN}/hostile/list.txt"])}
    assert entries[f"s3://{IN}/hostile/a.jpg"]["status"] == "pending"
    assert entries["/etc/hostname"]["status"] == "error"
    assert "a local path in an S3 manifest" in entries["/etc/hostname"]["error"]
    assert entries["https://photos.s3.amazonaws.com/cam/a.jpg"]["status"] == "error"
    text = str(sink.file_rows_table(list(entries.values()), "m").to_pylist())
    assert not any(s in text for s in SECRETS)


# --- end to end (starts Ray): the flag reaches the listing, the run commits -------------

def test_follow_symlinks_end_to_end(ray_local, random_checkpoint, tmp_path):
    """A link out of the source folder is one skipped row by default and is read with
    --follow-symlinks; a presigned manifest line stores no secret; both runs commit."""
    import cv2
    import corpus
    import fer_batch
    src, private = tmp_path / "photos", tmp_path / "private"
    src.mkdir()
    private.mkdir()
    ok, photo = cv2.imencode(".jpg", corpus.face_image(200, 150))
    assert ok
    (src / "a.jpg").write_bytes(photo.tobytes())
    (private / "b.jpg").write_bytes(photo.tobytes())
    (src / "b.jpg").symlink_to(private / "b.jpg")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{src / 'a.jpg'}\n{SIGNED}\n")
    for flags, status in (([], "skipped"), (["--follow-symlinks"], "ok")):
        out = tmp_path / f"out{len(flags)}"
        assert cli.main(["annotate", str(src), str(manifest), "--model", random_checkpoint,
                         "--output", str(out), *flags]) == 0
        files = fer_batch.read_files(str(out), as_pandas=True).set_index("source")
        assert files.loc[str(src / "a.jpg"), "status"] == "ok"
        assert files.loc[str(src / "b.jpg"), "status"] == status
        assert files.loc["https://photos.s3.amazonaws.com/cam/a.jpg", "status"] == "error"
        text = " ".join([*files.index, *files["error"].fillna("")])
        text += "".join(p.read_bytes().decode("latin-1") for p in out.rglob("*.json"))
        assert not any(s in text for s in SECRETS)


def test_an_image_over_max_image_bytes_is_an_error_row_and_is_not_read(tmp_path, monkeypatch):
    """Images are read whole: one over --max-image-bytes is refused from its size, before a
    byte is read, and the next file of the same task is processed normally."""
    import cv2
    from fer_batch import preprocess, storage
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    noise = np.random.default_rng(0).integers(0, 255, (400, 400), np.uint8)
    big.write_bytes(cv2.imencode(".png", noise)[1].tobytes())
    small.write_bytes(cv2.imencode(".png", noise[:20, :20])[1].tobytes())
    limit = small.stat().st_size + 10
    assert big.stat().st_size > limit
    cropper = preprocess.FaceCropper(max_image_bytes=limit)
    rows = {}
    for p in (big, small):
        entry = dict(uri=str(p), media_type="image", size_bytes=p.stat().st_size, mtime_ns=0)
        rows[p.name] = list(cropper.process(entry))[-1]
    assert rows["big.png"]["status"][0] == "error"
    assert "over the limit of" in rows["big.png"]["error"][0]
    assert "--max-image-bytes" in rows["big.png"]["error"][0]
    assert rows["small.png"]["status"][0] == "ok"
    with pytest.raises(storage.TooLargeError, match="over the limit"):
        storage.read_bytes(str(big), max_bytes=limit)
