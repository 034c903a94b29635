"""What is this file? Its format and size from its first bytes, before any decoder runs.

Pure functions on bytes: ``image_format`` names an image by its signature, ``image_size``
reads the (width, height) its header declares (JPEG, PNG, BMP, TIFF, WebP, GIF, PNM), so
decode.py refuses a decompression bomb before a pixel buffer exists, and
``describe_content`` names what a file that is not media looks like, for error rows.
"""

from __future__ import annotations

import re
import struct

HEAD_BYTES = 512  # bytes looked at to name the content of a file that is not media


def describe_content(head: bytes) -> str:
    """A short name for what the first bytes of a non-media file look like."""
    h = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if h.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in h[:256]:
        return "an HTML page (a saved error page or web page?)"
    if h.startswith((b"<?xml", b"<svg")):
        return "XML/SVG text"
    if h.startswith((b"{", b"[")):
        return "JSON text"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if head.startswith(b"\x1f\x8b"):
        return "gzip data"
    if head[4:8] == b"ftyp":
        return "an MP4/MOV video or HEIC image"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "a Matroska/WebM video"
    for cut in range(4):  # the sample may end inside a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text and all(c.isprintable() or c in "\r\n\t" for c in text):
            return "plain text"
        break
    return f"unrecognised data (first bytes {head[:8].hex(' ')})"


def image_format(data: bytes) -> str | None:
    """The image format named by the file's signature, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if len(data) > 2 and data[0:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "pnm"
    return None


def _png_size(d: bytes):
    if d[12:16] == b"IHDR":
        return struct.unpack(">II", d[16:24])
    return None


def _jpeg_size(d: bytes):
    i = 2
    while i + 9 < len(d):
        if d[i] != 0xFF:
            i += 1
            continue
        marker = d[i + 1]
        if marker in (0xD8, 0x01, 0xFF) or 0xD0 <= marker <= 0xD7:
            i += 1 if marker == 0xFF else 2
            continue
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                      0xCF):
            h, w = struct.unpack(">HH", d[i + 5:i + 9])
            return w, h
        if marker == 0xDA:  # start of scan before any frame header: damaged
            return None
        i += 2 + struct.unpack(">H", d[i + 2:i + 4])[0]
    return None


def _bmp_size(d: bytes):
    (header,) = struct.unpack("<I", d[14:18])
    if header == 12:  # OS/2 BITMAPCOREHEADER
        return struct.unpack("<HH", d[18:22])
    w, h = struct.unpack("<ii", d[18:26])
    return abs(w), abs(h)  # negative height = top-down rows


_TIFF_INTS = {1: "B", 3: "H", 4: "I", 16: "Q"}  # BYTE, SHORT, LONG, LONG8 (BigTIFF)


def _tiff_size(d: bytes):
    """Size of the first page (the one OpenCV decodes). A dimension tag written more than
    once counts with its largest value: libtiff keeps the first, other readers the last, and
    the pixel limit must hold for whichever a decoder believes."""
    e = "<" if d[:2] == b"II" else ">"
    big = struct.unpack(e + "H", d[2:4])[0] == 43
    if big:
        off = struct.unpack(e + "Q", d[8:16])[0]
        n, at, size = struct.unpack(e + "Q", d[off:off + 8])[0], off + 8, 20
    else:
        off = struct.unpack(e + "I", d[4:8])[0]
        n, at, size = struct.unpack(e + "H", d[off:off + 2])[0], off + 2, 12
    dims = {}
    for k in range(min(n, 4096)):
        p = at + k * size
        tag, typ = struct.unpack(e + "HH", d[p:p + 4])
        if tag in (256, 257):
            code = _TIFF_INTS.get(typ, "I")
            v = d[p + 12:p + 20] if big else d[p + 8:p + 12]
            value = struct.unpack(e + code, v[:struct.calcsize(code)])[0]
            dims[tag] = max(dims.get(tag, 0), value)
    return (dims[256], dims[257]) if len(dims) == 2 else None


def _webp_size(d: bytes):
    chunk = d[12:16]
    if chunk == b"VP8 " and d[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", d[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and d[20] == 0x2F:
        (b,) = struct.unpack("<I", d[21:25])
        return (b & 0x3FFF) + 1, ((b >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        w = int.from_bytes(d[24:27], "little") + 1
        h = int.from_bytes(d[27:30], "little") + 1
        return w, h
    return None


def _gif_size(d: bytes):
    return struct.unpack("<HH", d[6:10])


def _pnm_size(d: bytes):
    text = re.sub(rb"#[^\n]*", b" ", d[2:256])
    tokens = text.split()
    return int(tokens[0]), int(tokens[1])


_SIZE_READERS = dict(jpeg=_jpeg_size, png=_png_size, bmp=_bmp_size, tiff=_tiff_size,
                     webp=_webp_size, gif=_gif_size, pnm=_pnm_size)


def image_size(data: bytes, fmt: str | None = None):
    """(width, height) declared by an image's header, without decoding pixels; None when the
    format is unknown or the header is cut short or damaged."""
    fmt = fmt or image_format(data)
    try:
        return _SIZE_READERS[fmt](data) if fmt else None
    except (struct.error, IndexError, ValueError, KeyError):
        return None


def looks_truncated(data: bytes, fmt: str) -> bool:
    """Whether an image file that would not decode lacks its end marker (JPEG, PNG)."""
    tail = data.rstrip(b"\x00")[-16:]
    if fmt == "jpeg":
        return not tail.endswith(b"\xff\xd9")
    if fmt == "png":
        return b"IEND" not in tail
    return False
