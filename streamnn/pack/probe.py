"""Image headers (:func:`probe`): format, pixel size and structural problems of image bytes,
from the headers and end markers only, without decoding pixels.

The format comes from the first bytes (JPEG, PNG, GIF, BMP, WebP, TIFF, PNM), never from the
file name. A JPEG must hold an end-of-image marker (FFD9) after its first scan (trailing bytes
after it are allowed) and a PNG its IEND chunk, so that truncated files get the same, explicit
answer whatever OpenCV would do with them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: format name, pixel size (None if unknown) and any structural problem."""

    format: str | None
    width: int | None = None
    height: int | None = None
    problem: str | None = None


def _jpeg(data: bytes) -> ImageInfo:
    i, n, size = 2, len(data), None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return ImageInfo("jpeg", *(size or (None, None)), "corrupt JPEG (bad marker)")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker == 0xD9:
            return ImageInfo("jpeg", *(size or (None, None)), "corrupt JPEG (ends before any image data)")
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF and i + 9 <= n:
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            size = (width, height)  # (height 0 would come from a DNL marker, which libjpeg rejects)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if size is None:
                return ImageInfo("jpeg", None, None, "corrupt JPEG (no frame header)")
            if data.rfind(b"\xff\xd9") < i:
                return ImageInfo("jpeg", *size, "truncated JPEG (no end-of-image marker)")
            return ImageInfo("jpeg", *size)
        i += 2 + length
    return ImageInfo("jpeg", *(size or (None, None)), "truncated JPEG (header incomplete)")


def _png(data: bytes) -> ImageInfo:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return ImageInfo("png", None, None, "truncated or corrupt PNG header")
    width, height = struct.unpack(">II", data[16:24])
    end = data.rfind(b"IEND")
    if end < 0 or end + 8 > len(data):
        return ImageInfo("png", width, height, "truncated PNG (no IEND chunk)")
    return ImageInfo("png", width, height)


def _bmp(data: bytes) -> ImageInfo:
    if len(data) < 26:
        return ImageInfo("bmp", None, None, "truncated BMP header")
    if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return ImageInfo("bmp", abs(width), abs(height))


def _webp(data: bytes) -> ImageInfo:
    kind = data[12:16]
    if kind == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return ImageInfo("webp", w & 0x3FFF, h & 0x3FFF)
    if kind == b"VP8L" and len(data) >= 25:
        bits = struct.unpack("<I", data[21:25])[0]
        return ImageInfo("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if kind == b"VP8X" and len(data) >= 30:
        return ImageInfo("webp", 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little"))
    return ImageInfo("webp", None, None, "truncated or corrupt WebP header")


def _tiff(data: bytes) -> ImageInfo:
    e = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(e + "I", data[4:8])
        (count,) = struct.unpack(e + "H", data[ifd:ifd + 2])
        dims: dict[int, int] = {}
        for k in range(count):
            tag, typ, _, value = struct.unpack(e + "HHI4s", data[ifd + 2 + 12 * k:ifd + 14 + 12 * k])
            if tag in (256, 257):
                dims[tag] = struct.unpack(e + ("H" if typ == 3 else "I"), value[:2] if typ == 3 else value)[0]
        return ImageInfo("tiff", dims.get(256), dims.get(257))
    except struct.error:
        return ImageInfo("tiff", None, None, "truncated or corrupt TIFF header")


def _pnm(data: bytes) -> ImageInfo:
    tokens: list[int] = []
    for line in data[2:512].splitlines():
        for tok in line.split(b"#")[0].split():
            if not tok.isdigit():
                return ImageInfo("pnm", None, None, "corrupt PNM header")
            tokens.append(int(tok))
        if len(tokens) >= 2:
            return ImageInfo("pnm", tokens[0], tokens[1])
    return ImageInfo("pnm", None, None, "truncated PNM header")


def probe(data: bytes) -> ImageInfo:
    """Format, size and structural problems of image bytes, from the headers and end markers
    only (no pixel decoding)."""
    head = data[:16]
    if head[:3] == b"\xff\xd8\xff":
        return _jpeg(data)
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return _png(data)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        if len(data) < 10:
            return ImageInfo("gif", None, None, "truncated GIF header")
        return ImageInfo("gif", *struct.unpack("<HH", data[6:10]))
    if head[:2] == b"BM":
        return _bmp(data[:32])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp(data[:32])
    if head[:4] in (b"II*\0", b"MM\0*"):
        return _tiff(data)
    if head[:1] == b"P" and head[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6") and head[2:3].isspace():
        return _pnm(data[:512])
    return ImageInfo(None)
