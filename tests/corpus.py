"""Bad and odd input files for tests/test_bad_input.py and tests/test_failures.py.

Every file is generated here (PyAV encodes the videos, OpenCV/numpy write the images,
Pillow (a matplotlib dependency) the CMYK and palette ones); no binary file is checked in.
``write_corpus(folder)`` writes them all and returns ``{relative path: Case}``: the status and
message each file must end with in OUT/files. Videos are 160x120 so that encoding and
detection stay fast on a busy 2-core machine.

Faces come from one real photo of the shared data set (``FACE_PHOTO``); without it the
frames are plain noise, ``has_faces()`` is False and the tests that need faces skip.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

W, H = 160, 120  # video frame size, pixels
FPS = 10  # frames per second of the generated videos
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FACE_PHOTO = DATA / "photos" / "faceapi_expr_sad.jpg"  # 400x300, one frontal face: at 160x120
#                                                         the Haar cascade still finds it
BOMB_SIDE = 12_000  # a valid gray PNG/video frame of 144 Mpx: over the default 120 Mpx limit


@dataclasses.dataclass(frozen=True)
class Case:
    status: str  # expected OUT/files status: ok, error, skipped
    message: str = ""  # regular expression the error message must match (re.search)
    faces: bool | None = None  # True: at least one face; False: none; None: not checked
    listed: bool = True  # False: not a files row of its own (e.g. a directory)


def has_faces() -> bool:
    return FACE_PHOTO.is_file()


# --- pixels ---------------------------------------------------------------------------

def face_image(width: int = W, height: int = H, shift: int = 0) -> np.ndarray:
    """The face photo as (height, width, 3) uint8 RGB, moved right by shift pixels; noise
    when the photo is absent."""
    if not has_faces():
        rng = np.random.default_rng(shift)
        return rng.integers(0, 255, (height, width, 3), np.uint8)
    bgr = cv2.imread(str(FACE_PHOTO), cv2.IMREAD_COLOR)  # OpenCV: BGR
    rgb = cv2.cvtColor(cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA),
                       cv2.COLOR_BGR2RGB)
    return np.roll(rgb, shift, axis=1)


def face_frames(n: int, width: int = W, height: int = H):
    """n frames of the face, moving a pixel per frame (so frames differ), RGB uint8."""
    base = face_image(width, height)
    return [np.roll(base, i % 5, axis=1) for i in range(n)]


def blank_frames(n: int, width: int = W, height: int = H):
    return [np.full((height, width, 3), (i * 7) % 256, np.uint8) for i in range(n)]


# --- writers --------------------------------------------------------------------------

def write_video(path, frames, *, fps: int = FPS, codec: str = "libx264",
                pix_fmt: str = "yuv420p", times=None, faststart: bool = True) -> Path:
    """Encode RGB frames ((h, w, 3) uint8) with PyAV. times: presentation times in seconds
    for a variable frame rate; faststart puts the MP4 index first, as web videos have it."""
    path = Path(path)
    opts = {"movflags": "+faststart"} if faststart and path.suffix.lower() in (".mp4", ".mov")\
        else {}
    frames = list(frames)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", options=opts) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            s.options = {"preset": "ultrafast"}
        if times is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_numbered_video(path, n_frames: int, *, fps: int = FPS, gop: int = 20,
                         bframes: int = 2, x264_params: str = "", vfr: bool = False,
                         frame=None) -> str:
    """A real H.264 video (bframes B-frames between references, a keyframe every gop
    frames; the container from path's suffix) whose frame i shows its own number as a bar
    position, so frames are told apart by their pixels. vfr: irregular timestamps (a 1/1000
    s time base, intervals of 70-130 ms). x264_params: more x264 settings, e.g. open-gop=1."""
    rng = np.random.default_rng(0)
    h, w = (64, 96) if frame is None else frame(0).shape
    with av.open(str(path), mode="w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.gop_size = gop
        s.codec_context.options = {"keyint_min": str(gop), "sc_threshold": "0",
                                   "bf": str(bframes), "x264-params": x264_params}
        if vfr:
            s.codec_context.time_base = Fraction(1, 1000)
        t_ms = 0
        for i in range(n_frames):
            g = np.full((h, w), 40, np.uint8) if frame is None else frame(i).copy()
            g[:8, (i * 3) % w] = 255
            f = av.VideoFrame.from_ndarray(np.dstack([g] * 3), format="rgb24")
            if vfr:
                f.pts, f.time_base = t_ms, Fraction(1, 1000)
                t_ms += int(rng.integers(70, 131))
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return str(path)


def write_long_video(path, seconds: int = 60, width: int = W, height: int = H) -> Path:
    """A video of FPS * seconds frames with the face only in its first and last second, so
    that detection stays cheap while decoding goes through all of it."""
    n = FPS * seconds
    return write_video(path, face_frames(FPS, width, height)
                       + blank_frames(max(0, n - 2 * FPS), width, height)
                       + face_frames(FPS, width, height))


def write_audio_only(path) -> Path:
    """An MP4 with one AAC stream and no video."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for _ in range(8):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                            layout="mono")
            fr.sample_rate = 16000
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return Path(path)


def write_zero_frames(path) -> Path:
    """An AVI with a video stream header and no frames."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        c.start_encoding()
    return Path(path)


def rotate_mp4(data: bytes, degrees_cw: int = 90) -> bytes:
    """Set the display matrix of an MP4's first track (tkhd) to rotate by degrees_cw, as
    phones write portrait videos."""
    out = bytearray(data)
    i = out.find(b"tkhd")
    version = out[i + 4]
    off = i + 8 + (28 if version == 1 else 16) + 8 + 8
    one, zero = 1 << 16, 0
    a, b, c, d = {90: (zero, one, -one, zero), 180: (-one, zero, zero, -one),
                  270: (zero, -one, one, zero)}[degrees_cw]
    out[off:off + 36] = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 1 << 30)
    return bytes(out)


def truncate(data: bytes, fraction: float) -> bytes:
    return data[:int(len(data) * fraction)]


def corrupt_middle(data: bytes, n: int = 300, seed: int = 0) -> bytes:
    """Overwrite n bytes at the middle of the file with random bytes."""
    out = bytearray(data)
    mid = len(out) // 2
    out[mid:mid + n] = np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes()
    return bytes(out)


def exif_jpeg(jpeg: bytes, orientation: int) -> bytes:
    """Insert an EXIF APP1 segment holding only the Orientation tag after SOI."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + ifd + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def encode_image(ext: str, img: np.ndarray, params=()) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok, ext
    return buf.tobytes()


def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit gray PNG of width x height black pixels, built without the pixels: one
    deflate block for a band of rows (full flush: no references across blocks), repeated."""
    row = b"\x00" * (width + 1)  # filter byte + pixels
    band_rows = 256
    band = row * band_rows
    comp = zlib.compressobj(1, zlib.DEFLATED, -15)
    block = comp.compress(band) + comp.flush(zlib.Z_FULL_FLUSH)
    n, rest = divmod(height, band_rows)
    last = zlib.compressobj(1, zlib.DEFLATED, -15)
    tail = last.compress(row * rest) + last.flush()
    adler = 1
    for _ in range(n):
        adler = zlib.adler32(band, adler)
    adler = zlib.adler32(row * rest, adler)
    idat = b"\x78\x01" + block * n + tail + struct.pack(">I", adler)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                                    8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def header_bomb(fmt: str, width: int, height: int) -> bytes:
    """An image header declaring width x height, followed by a few bytes of data: what a
    decoder sizes its buffer from."""
    if fmt == "png":
        return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(
            ">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + _png_chunk(b"IDAT", b"\x78\x01"))
    if fmt == "jpeg":
        sof = struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"
        return b"\xff\xd8\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\x00" * 64
    if fmt == "bmp":
        dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 2835, 2835, 0, 0)
        return b"BM" + struct.pack("<IHHI", 14 + 40 + 1024 + 64, 0, 0, 14 + 40 + 1024) + dib \
            + b"\x00" * 1088
    if fmt == "tiff":
        entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
                   (262, 3, 1, 1), (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height),
                   (279, 4, 1, width * height)]
        ifd = struct.pack("<H", len(entries)) + b"".join(
            struct.pack("<HHII", t, k, n, v) if k == 4 else struct.pack("<HHIHH", t, k, n, v, 0)
            for t, k, n, v in entries) + struct.pack("<I", 0)
        return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 64
    if fmt == "webp":
        vp8x = struct.pack("<I", 0) + (width - 1).to_bytes(3, "little") \
            + (height - 1).to_bytes(3, "little")
        body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
        return b"RIFF" + struct.pack("<I", len(body)) + body
    if fmt == "gif":
        return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b"\x3b"
    if fmt == "pgm":
        return f"P5\n{width} {height}\n255\n".encode() + b"\x00" * 64
    raise ValueError(fmt)


def write_video_bomb(path, side: int = BOMB_SIDE, frames: int = 2) -> Path:
    """A MOV whose frames are side x side PNG images (valid, a few hundred KB on disk):
    decoding one frame would allocate side*side bytes and more."""
    png = png_bomb(side, side)
    with av.open(str(path), "w") as c:
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = side, side, "gray"
        s.time_base = Fraction(1, 1000)
        for i in range(frames):
            pkt = av.Packet(png)
            pkt.stream, pkt.time_base = s, s.time_base
            pkt.pts = pkt.dts = i * 1000
            pkt.duration = 1000
            c.mux(pkt)
    return Path(path)


def pil_bytes(img: np.ndarray, mode: str, fmt: str) -> bytes:
    from PIL import Image  # Pillow: OpenCV cannot write CMYK JPEGs or palette PNGs
    b = io.BytesIO()
    Image.fromarray(img).convert(mode).save(b, fmt)
    return b.getvalue()


HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n<body><h1>"
             b"Not Found</h1><p>The requested URL was not found on this server.</p></body>"
             b"</html>\n")


# --- the corpus -----------------------------------------------------------------------

def write_corpus(folder) -> dict[str, Case]:
    """Write every bad and odd file under folder; returns {path relative to folder: Case}.

    Folders: bad/ (must be errors), bombs/ (refused by --max-pixels), video/ (damaged and
    odd videos), image/ (odd but valid images), paths/ (names, links, folders).
    paths/vanish.jpg is meant to be deleted after listing (the test does it)."""
    root = Path(folder)
    for sub in ("bad", "bombs", "video", "image", "paths"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cases: dict[str, Case] = {}
    faces = has_faces() or None  # without the photo, face counts are not checked

    def put(rel: str, data: bytes, case: Case):
        (root / rel).write_bytes(data)
        cases[rel] = case

    face_bgr = cv2.cvtColor(face_image(240, 180), cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    face_jpg = encode_image(".jpg", face_bgr)
    face_png = encode_image(".png", face_bgr)
    rng = np.random.default_rng(0)

    # bad input: one error row each, with the cause
    put("bad/empty.jpg", b"", Case("error", r"^empty file \(0 bytes\)$"))
    put("bad/empty.mp4", b"", Case("error", r"^empty file \(0 bytes\)$"))
    put("bad/truncated.jpg", truncate(face_jpg, 0.6), Case("error", r"^truncated JPEG data"))
    put("bad/truncated.png", truncate(face_png, 0.6), Case("error", r"^truncated PNG data"))
    put("bad/header_only.jpg", face_jpg[:40], Case("error", r"damaged or truncated JPEG header"))
    put("bad/random.jpg", rng.integers(0, 256, 4000, np.uint8).tobytes(),
        Case("error", r"^not a decodable image: content is unrecognised data"))
    put("bad/random.webp", rng.integers(0, 256, 4000, np.uint8).tobytes(),
        Case("error", r"^not a decodable image: content is unrecognised data"))
    put("bad/random.mp4", rng.integers(0, 256, 20000, np.uint8).tobytes(),
        Case("error", r"^not a decodable video: .*content: unrecognised data"))
    put("bad/random.mkv", rng.integers(0, 256, 20000, np.uint8).tobytes(),
        Case("error", r"^not a decodable video"))
    put("bad/text.mp4", b"this is not a video\n" * 50,
        Case("error", r"^not a video: content is plain text$"))
    put("bad/error_page.jpg", HTML_PAGE,
        Case("error", r"^not a decodable image: content is an HTML page"))
    put("bad/video_named.png", write_video(root / "bad/_tmp.mp4", blank_frames(3)).read_bytes(),
        Case("error", r"^not a decodable image: content is an MP4/MOV video"))
    (root / "bad/_tmp.mp4").unlink()

    # decompression bombs: refused by --max-pixels before decoding
    limit = r"over the limit of \d+ \(--max-pixels\)"
    put("bombs/valid_12k.png", png_bomb(BOMB_SIDE, BOMB_SIDE),
        Case("error", rf"^image declares {BOMB_SIDE}x{BOMB_SIDE} pixels, {limit}"))
    for fmt, ext, side in (("png", "png", 100_000), ("jpeg", "jpg", 60_000),
                           ("bmp", "bmp", 30_000), ("tiff", "tif", 30_000),
                           ("webp", "webp", 30_000), ("gif", "png", 60_000),
                           ("pgm", "jpg", 30_000)):
        put(f"bombs/{fmt}_{side // 1000}k.{ext}", header_bomb(fmt, side, side),
            Case("error", rf"^image declares {side}x{side} pixels, {limit}"))
    write_video_bomb(root / "bombs/frames_12k.mov")
    cases["bombs/frames_12k.mov"] = Case("error", rf"^video frames are {BOMB_SIDE}x{BOMB_SIDE} "
                                         rf"pixels, {limit}")

    # damaged videos: the faces of the frames that decoded are kept, the damage is recorded
    clip = write_video(root / "video/_clip.mp4", face_frames(40)).read_bytes()
    (root / "video/_clip.mp4").unlink()
    put("video/truncated.mp4", truncate(clip, 0.5),
        Case("error", r"^video ends early \(truncated or damaged\): decoded \d+ of the 40 "
                      r"frames", faces))
    mkv = write_video(root / "video/_clip.mkv", face_frames(40)).read_bytes()
    (root / "video/_clip.mkv").unlink()
    put("video/truncated.mkv", truncate(mkv, 0.5),
        Case("error", r"^video ends early \(truncated or damaged\): last frame at", faces))
    put("video/no_index.mp4", truncate(write_video(root / "video/_x.mp4", face_frames(10),
                                                   faststart=False).read_bytes(), 0.7),
        Case("error", r"^not a decodable video: .*moov atom"))
    (root / "video/_x.mp4").unlink()
    put("video/corrupt_middle.mp4", corrupt_middle(clip),
        Case("error", r"skipped \d+ undecodable packet\(s\)", faces))
    write_audio_only(root / "video/audio_only.mp4")
    cases["video/audio_only.mp4"] = Case("error", r"^no video stream \(audio only")
    write_zero_frames(root / "video/zero_frames.avi")
    cases["video/zero_frames.avi"] = Case("error", r"^video has no decodable frames$")

    # odd but valid videos: status ok
    rot = write_video(root / "video/_rot.mp4",
                      [np.ascontiguousarray(np.rot90(f)) for f in face_frames(10)])
    put("video/rotated_90.mp4", rotate_mp4(rot.read_bytes(), 90), Case("ok", faces=faces))
    rot.unlink()
    times = [0.05 * i for i in range(10)] + [0.45 + 0.4 * i for i in range(1, 11)]
    write_video(root / "video/vfr.mkv", face_frames(len(times)), times=times)
    cases["video/vfr.mkv"] = Case("ok", faces=faces)
    write_video(root / "video/10bit.mp4", face_frames(10), pix_fmt="yuv420p10le")
    cases["video/10bit.mp4"] = Case("ok", faces=faces)
    write_video(root / "video/yuv444.mp4", face_frames(10), pix_fmt="yuv444p")
    cases["video/yuv444.mp4"] = Case("ok", faces=faces)
    write_video(root / "video/odd_161x121.mkv", face_frames(10, 161, 121), pix_fmt="yuv444p")
    cases["video/odd_161x121.mkv"] = Case("ok", faces=faces)
    write_video(root / "video/mjpeg.avi", face_frames(10), codec="mjpeg", pix_fmt="yuvj420p")
    cases["video/mjpeg.avi"] = Case("ok", faces=faces)
    write_video(root / "video/vp9.webm", face_frames(6), codec="libvpx-vp9")
    cases["video/vp9.webm"] = Case("ok", faces=faces)
    write_long_video(root / "video/long.mp4")
    cases["video/long.mp4"] = Case("ok", faces=faces)

    # odd but valid images: status ok
    gray = cv2.cvtColor(face_bgr, cv2.COLOR_BGR2GRAY)
    put("image/gray.png", encode_image(".png", gray), Case("ok", faces=faces))
    put("image/gray16.png", encode_image(".png", gray.astype(np.uint16) * 257),
        Case("ok", faces=faces))
    put("image/rgba.png", encode_image(".png", np.dstack([face_bgr, np.full(gray.shape, 200,
                                                                           np.uint8)])),
        Case("ok", faces=faces))
    put("image/palette.png", pil_bytes(face_image(240, 180), "P", "PNG"), Case("ok", faces=faces))
    put("image/cmyk.jpg", pil_bytes(face_image(240, 180), "CMYK", "JPEG"), Case("ok", faces=faces))
    stored = np.ascontiguousarray(np.rot90(face_bgr))  # stored turned left, EXIF turns it back
    put("image/exif_rotated.jpg", exif_jpeg(encode_image(".jpg", stored), 6),
        Case("ok", faces=faces))
    ok, multi = cv2.imencodemulti(".tiff", [gray, rng.integers(0, 255, (500, 700), np.uint8)])
    put("image/multipage.tif", multi.tobytes(), Case("ok", faces=faces))
    put("image/webp.webp", encode_image(".webp", face_bgr), Case("ok", faces=faces))
    put("image/bmp.bmp", encode_image(".bmp", face_bgr), Case("ok", faces=faces))
    put("image/tiny_1x1.png", encode_image(".png", np.zeros((1, 1), np.uint8)),
        Case("ok", faces=False))
    put("image/wide_20000x2.png", encode_image(".png", np.zeros((2, 20000), np.uint8)),
        Case("ok", faces=False))
    put("image/tall_1x20000.jpg", encode_image(".jpg", np.zeros((20000, 1), np.uint8)),
        Case("ok", faces=False))

    # paths
    put("paths/with space.jpg", face_jpg, Case("ok", faces=faces))
    put("paths/ünïcødé 顔.png", face_png, Case("ok", faces=faces))
    put("paths/UPPER.JPG", face_jpg, Case("ok", faces=faces))
    write_video(root / "paths/CLIP.MP4", face_frames(10))
    cases["paths/CLIP.MP4"] = Case("ok", faces=faces)
    os.symlink("with space.jpg", root / "paths/link_to_face.jpg")
    cases["paths/link_to_face.jpg"] = Case("ok", faces=faces)
    os.symlink("missing.jpg", root / "paths/broken_link.jpg")
    cases["paths/broken_link.jpg"] = Case("error", r"^cannot stat: .*broken symlink")
    os.symlink("..", root / "paths/loop")
    cases["paths/loop"] = Case("error", r"^symlink loop")
    (root / "paths/folder.jpg").mkdir()
    cases["paths/folder.jpg"] = Case("ok", listed=False)
    put("paths/folder.jpg/inside.png", face_png, Case("ok", faces=faces))
    put("paths/vanish.jpg", face_jpg, Case("error", r"^file not found when read"))
    put("paths/notes.txt", b"not media\n", Case("skipped", r"not an image or video extension"))
    os.mkfifo(root / "paths/fifo.mp4")  # reading it would block forever: never opened
    cases["paths/fifo.mp4"] = Case("error", r"^not a regular file \(FIFO, socket or device\)")
    return cases
