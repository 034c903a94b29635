import os

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
