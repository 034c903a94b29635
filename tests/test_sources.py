import os

import numpy as np
import pytest

from fer_batch import sources, storage


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_media_type_is_case_insensitive():
    assert sources.media_type("a/B.JPG") == "image"
    assert sources.media_type("clip.MoV") == "video"
    assert sources.media_type("notes.txt") is None


def test_folder_is_listed_recursively_and_other_files_are_skipped(tmp_path):
    touch(tmp_path / "a" / "x.jpg")
    touch(tmp_path / "a" / "b" / "y.mp4", b"12345")
    touch(tmp_path / "readme.md")
    entries = sources.list_files([str(tmp_path)])
    by_name = {os.path.basename(e["uri"]): e for e in entries}
    assert set(by_name) == {"x.jpg", "y.mp4", "readme.md"}
    assert by_name["x.jpg"]["media_type"] == "image" and by_name["x.jpg"]["status"] == "pending"
    assert by_name["y.mp4"]["size_bytes"] == 5 and by_name["y.mp4"]["mtime_ns"] > 0
    assert by_name["readme.md"]["status"] == "skipped"
    assert "extension" in by_name["readme.md"]["error"]


def test_manifests_list_paths_relative_to_themselves(tmp_path):
    touch(tmp_path / "m" / "one.png")
    touch(tmp_path / "two.webp")
    (tmp_path / "list.txt").write_text("# comment\nm/one.png\n\n" + str(tmp_path / "two.webp"))
    (tmp_path / "list.csv").write_text("uri,label\nm/one.png,a\nmissing.jpg,b\n")
    txt = sources.list_files([str(tmp_path / "list.txt")])
    assert [os.path.basename(e["uri"]) for e in txt] == ["one.png", "two.webp"]
    csv_entries = {os.path.basename(e["uri"]): e for e in
                   sources.list_files([str(tmp_path / "list.csv")])}
    assert csv_entries["one.png"]["status"] == "pending"
    assert csv_entries["missing.jpg"]["status"] == "error"
    assert "not found" in csv_entries["missing.jpg"]["error"]


def test_duplicate_sources_list_each_file_once(tmp_path):
    f = touch(tmp_path / "x.jpg")
    entries = sources.list_files([str(tmp_path), str(f)])
    assert len(entries) == 1


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(storage.SourceError, match="source not found"):
        sources.list_files([str(tmp_path / "nope")])


def test_symlink_loops_are_reported_not_followed_forever(tmp_path):
    touch(tmp_path / "d" / "x.jpg")
    os.symlink(tmp_path / "d", tmp_path / "d" / "loop")
    entries = sources.list_files([str(tmp_path)])
    errors = [e for e in entries if e["status"] == "error"]
    assert len([e for e in entries if e["uri"].endswith("x.jpg")]) == 1
    assert errors and "symlink loop" in errors[0]["error"]


# --- every image format docs/failures.md names is listed as an image and decoded -------------

FORMATS = ("jpg", "png", "bmp", "tiff", "webp", "gif", "pgm")


@pytest.mark.parametrize("ext", FORMATS)
def test_every_documented_image_format_is_listed_and_decoded(tmp_path, ext):
    """An animated GIF was skipped ("not an image or video extension") although the same
    bytes named .jpg were read: each format is now an image by its extension, and decodes
    to the picture written (its first frame for a GIF)."""
    from PIL import Image

    from conftest import face_image
    from fer_batch import decode
    gray = face_image()[:240, :320]
    path = tmp_path / f"face.{ext}"
    if ext == "gif":  # animated: the first frame is the face, the second is black
        frames = [Image.fromarray(gray), Image.fromarray(np.zeros_like(gray))]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    else:
        Image.fromarray(gray).save(path)
    assert sources.media_type(str(path)) == "image"
    assert sources.media_type(str(path).upper()) == "image"
    got = decode.decode_image(path.read_bytes())
    assert got.shape == gray.shape
    lossy = ext in ("jpg", "webp")  # lossy codecs: close, not equal
    assert np.abs(got.astype(int) - gray).mean() < (3 if lossy else 0.01)
