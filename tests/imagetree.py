"""Small generated image files and folder trees for the decode, pack and info tests."""
from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np


def smooth_image(seed: int, h: int = 40, w: int = 48, warm: bool | None = None) -> np.ndarray:
    """A smooth uint8 BGR image (gradient plus a disc), so JPEG and resizing stay well-behaved."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    if warm is not None:  # warm: red dominates; cool: blue dominates (BGR)
        a[2 if warm else 0], a[0 if warm else 2] = 230, 20
    t = np.linspace(0.0, 1.0, w)[None, :, None]
    img = (a * (1 - t) + b * t) * np.ones((h, 1, 1))
    img = np.clip(img, 0, 255).astype(np.uint8)
    cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(1, 2 + min(h, w) // 3)),
               tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    return img


def encode(img: np.ndarray, ext: str = ".jpg", **params: int) -> bytes:
    """Encode with OpenCV (``.jpg`` at quality 95 unless given)."""
    flags: list[int] = []
    if ext == ".jpg":
        flags = [cv2.IMWRITE_JPEG_QUALITY, params.get("quality", 95)]
    ok, buf = cv2.imencode(ext, img, flags)
    assert ok
    return buf.tobytes()


def pil_bytes(img_bgr: np.ndarray, fmt: str, mode: str | None = None, exif_orientation: int | None = None) -> bytes:
    """Encode with Pillow (CMYK JPEGs, EXIF orientation, palette images, which OpenCV cannot write)."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(img_bgr[:, :, ::-1]))
    if mode:
        im = im.convert(mode)
    out = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = im.getexif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    im.save(out, fmt, **kwargs)
    return out.getvalue()


def make_tree(root: Path, layout: Mapping[str, Mapping[str, int]], h: int = 40, w: int = 48,
              seed: int = 0, ext: str = ".jpg") -> dict[str, np.ndarray]:
    """Write ``root/<split>/<class>/<stem>.<i><ext>`` images; return {relative path: original BGR}.

    ``layout`` maps split folder -> class -> count; a split folder "" puts the classes right
    under ``root``. Class "cats" images are warm, others cool; file stems are the class name
    without a trailing "s" (``cats/cat.1.jpg``), numbered from 1.
    """
    made: dict[str, np.ndarray] = {}
    for s_i, (split, classes) in enumerate(layout.items()):
        for c_i, (cls, n) in enumerate(classes.items()):
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(1, n + 1):
                img = smooth_image(seed * 100_000 + s_i * 10_000 + c_i * 1000 + i, h, w, warm=(cls == "cats"))
                path = folder / f"{cls.rstrip('s')}.{i}{ext}"
                path.write_bytes(encode(img, ext))
                made[path.relative_to(root).as_posix()] = img
    return made


def jpeg_with_size(width: int, height: int) -> bytes:
    """A tiny valid JPEG whose frame header is patched to claim ``width`` x ``height`` pixels."""
    data = bytearray(encode(smooth_image(1, 16, 16)))
    i = 2
    while True:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
            return bytes(data)
        i += 2 + length


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` (CRC left stale)."""
    data = bytearray(encode(smooth_image(2, 8, 8), ".png"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return bytes(data)


def bad_files() -> dict[str, bytes]:
    """File name -> content of every kind of file that must be skipped."""
    jpg = encode(smooth_image(7, 120, 160))  # big enough that the cuts below fall in the scan data
    png = encode(smooth_image(8, 120, 160), ".png")
    return {
        "_DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(200),
        "Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(300),
        "notes.jpg": b"this is a text file with a .jpg name\n" * 5,
        "empty.jpg": b"",
        "truncated.jpg": jpg[: len(jpg) * 3 // 4],
        "truncated-padded.jpg": jpg[: len(jpg) * 3 // 4] + bytes(2000),  # as left by an interrupted copy
        "truncated.png": png[: len(png) // 2],
        "corrupt.jpg": jpg[:20] + bytes(range(256)) * 4,  # JFIF header, then garbage
        "bomb.jpg": jpeg_with_size(16000, 16000),
        "bomb.png": png_with_size(20000, 20000),
    }
