"""Image file bytes to a uint8 H x W x C array (BGR, or one gray channel) at a target size.

Design, in the order the steps run on every file:

0. **Read regular files only, and the header first.** The file is opened non-blocking and
   checked with ``fstat``: a FIFO, socket or device among the images is refused, never
   waited on; a file larger than ``max_file_size`` (default 512 MiB: an uncompressed BMP of
   ``max_pixels``) is refused unread. Then only its first 256 KiB are read, and a header
   that claims more than ``max_pixels`` is refused before the rest is read.
1. **Sniff, do not trust names.** The format comes from the first bytes (JPEG, PNG, GIF,
   BMP, WebP, TIFF, PNM have tiny header parsers here); a ``.jpg`` that holds text is
   rejected by content. Bytes of an unknown format are still offered to OpenCV, which
   knows a few more (JPEG 2000, AVIF, Sun raster, HDR, PFM).
2. **Refuse decompression bombs before allocating.** The header's width x height must not
   exceed ``max_pixels`` (default 89,478,485, Pillow's ``MAX_IMAGE_PIXELS``). For formats
   without a parser here the limit is checked after decoding, and OpenCV's own limit
   (environment variable ``OPENCV_IO_MAX_IMAGE_PIXELS``, default 2**30, read when cv2 is
   imported) bounds the allocation.
3. **Refuse truncated files.** A JPEG must hold an end-of-image marker (FFD9) after its
   first scan; trailing bytes after it (padding, appended data) are allowed. A PNG must
   hold its IEND chunk. (OpenCV 5's ``imdecode`` already rejects most truncated JPEGs, but
   ``imread`` and older versions fill the missing part with grey and only warn on stderr;
   the structural check gives the same, explicit answer everywhere.)
4. **Decode small.** For JPEGs, the largest ``IMREAD_REDUCED_*`` factor (2, 4 or 8: DCT
   scaling inside libjpeg-turbo) that still leaves the shorter side at least the longer
   target side; about 2-3x faster than a full decode at 64x64, PSNR ~36 dB against it.
5. **Listen to libjpeg.** libjpeg does not fail on damaged scan data: it fills what is
   missing with grey and prints a warning on stderr (a header claiming 9000x9000 in front of
   a small image: "Corrupt JPEG data: premature end of data segment", and a uniform grey
   picture). Those warnings are the only signal, and they are written by C code straight to
   file descriptor 2, so the decode runs with fd 2 pointed at a temporary file (a few
   microseconds: ``dup2`` there and back under a lock, with SIGINT/SIGTERM held back so that
   a Ctrl-C cannot leave fd 2 redirected). A ``Corrupt JPEG data`` or ``Premature end of JPEG file`` warning makes
   the file a skipped one with that reason, except ``N extraneous bytes before marker``
   (junk between segments: the pixels are complete, the image is kept and the warning
   dropped). Anything else written there is passed on to stderr unchanged. libjpeg prints
   only its *first* warning per image, so a harmless one can hide a later damaging one.
   (A structural check cannot see this damage without decoding the Huffman data itself;
   the end-of-image check of step 3 catches the common truncations without a decode.)
6. **Resize** with ``INTER_AREA`` straight to H x W: the aspect ratio is *not* kept
   (squashed, as in the tutorial this project follows).

Colour conversions are OpenCV's ``IMREAD_COLOR``/``IMREAD_GRAYSCALE``: gray and palette
images are expanded to BGR, CMYK JPEGs converted, 16-bit images scaled to 8 bits, and an
alpha channel is *dropped* (not composited), exactly as ``cv2.imread`` does. EXIF
orientation is *applied* by default (what a viewer shows; OpenCV's default);
``exif_orientation=False`` adds ``IMREAD_IGNORE_ORIENTATION``. :func:`decode_kwargs`
rebuilds these settings from a store's ``options`` so prediction decodes like packing did.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import struct
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from streamnn.errors import StreamnnError
from streamnn.paths import path_text

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's MAX_IMAGE_PIXELS: int(1024 * 1024 * 1024 // 4 // 3)
DEFAULT_MAX_FILE_SIZE = 512 << 20  # bytes; an uncompressed 24-bit BMP of DEFAULT_MAX_PIXELS is 256 MiB
DEFAULT_SIZE = 64
HEAD_BYTES = 256 << 10  # read before the rest, to check the header (JPEG APPn segments come first)

_REDUCED = {
    (False, 1): cv2.IMREAD_COLOR, (False, 2): cv2.IMREAD_REDUCED_COLOR_2,
    (False, 4): cv2.IMREAD_REDUCED_COLOR_4, (False, 8): cv2.IMREAD_REDUCED_COLOR_8,
    (True, 1): cv2.IMREAD_GRAYSCALE, (True, 2): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (True, 4): cv2.IMREAD_REDUCED_GRAYSCALE_4, (True, 8): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic...).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])


class DecodeError(StreamnnError):
    """A file that is not a usable image; ``reason`` is the short why (without the path)."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(reason, path)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: format name, pixel size (None if unknown) and any structural problem."""

    format: str | None
    width: int | None = None
    height: int | None = None
    problem: str | None = None


def parse_size(size: int | str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``64``, ``"64"``, ``"48x64"`` (H x W) or ``(48, 64)`` to ``(H, W)``."""
    if isinstance(size, str):
        parts = size.lower().replace("*", "x").split("x")
        try:
            dims = [int(p) for p in parts]
        except ValueError:
            raise StreamnnError(f"bad size {size!r}: use a side like 64 or HxW like 48x64") from None
    elif isinstance(size, (int, np.integer)):
        dims = [int(size)]
    else:
        dims = [int(s) for s in size]
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 1 or max(dims) > 4096:
        raise StreamnnError(f"bad size {size!r}: need 1 or 2 sides between 1 and 4096")
    return dims[0], dims[1]


# -- headers ------------------------------------------------------------------------------
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


def reduction_factor(width: int, height: int, size: tuple[int, int]) -> int:
    """Largest JPEG DCT scaling (8, 4, 2 or 1) whose output still covers ``size`` (H, W).

    The shorter side must stay at least the longer target side, so that the check holds
    whichever way EXIF orientation rotates the image.
    """
    need, short = max(size), min(width, height)
    for factor in (8, 4, 2):
        if short // factor >= need:
            return factor
    return 1


# -- decoding -----------------------------------------------------------------------------
def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)
    if img.dtype.kind == "f":
        return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    raise DecodeError(f"unsupported pixel type {img.dtype}")


def decode_image(data: bytes | bytearray | memoryview | np.ndarray, size: int | tuple[int, int] = DEFAULT_SIZE, *,
                 grayscale: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 exif_orientation: bool = True, reduced: bool = True) -> np.ndarray:
    """Decode image bytes to a uint8 array (H, W, 3) BGR, or (H, W, 1) if ``grayscale``.

    Raises :class:`DecodeError` with a short reason for empty, non-image, truncated,
    corrupt or too large (``width * height > max_pixels``) input. ``reduced=False``
    forces a full-resolution decode before the resize (slower, equal to
    ``cv2.imdecode`` + ``cv2.resize(..., INTER_AREA)``).
    """
    target = parse_size(size)
    raw = data if isinstance(data, bytes) else np.asarray(data, dtype=np.uint8).tobytes()
    if not raw:
        raise DecodeError("empty file")
    info = probe(raw)
    if info.problem:
        raise DecodeError(info.problem)
    if info.width is not None and info.height is not None and info.width * info.height > max_pixels:
        raise DecodeError(_too_large(info.width, info.height, max_pixels))
    factor = 1
    if reduced and info.format == "jpeg" and info.width and info.height:
        factor = reduction_factor(info.width, info.height, target)
    flags = _REDUCED[(grayscale, factor)] | (0 if exif_orientation else cv2.IMREAD_IGNORE_ORIENTATION)
    try:
        with _c_stderr() as said:
            img = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), flags)
    except cv2.error as exc:
        raise DecodeError(f"OpenCV cannot decode it ({_cv_message(exc)})") from None
    if said:
        _judge_warnings(said[0])
    if img is None or img.size == 0:
        raise DecodeError(f"corrupt {info.format.upper()} data" if info.format
                          else "not an image (unrecognized format)")
    if info.width is None and img.shape[0] * img.shape[1] > max_pixels:  # formats without a parser here
        raise DecodeError(_too_large(img.shape[1], img.shape[0], max_pixels))
    img = _to_uint8(img)
    if img.ndim == 3 and img.shape[2] == 4:  # defensive: IMREAD_COLOR never returns alpha
        img = img[:, :, :3]
    h, w = target
    if img.shape[:2] != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    if img.ndim == 2:
        img = img[:, :, None]
    return np.ascontiguousarray(img)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait (blocked) until the block is left: for steps that a signal
    must not cut in the middle (redirecting fd 2 and back; creating something to clean up and
    registering it)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_capture_lock = threading.Lock()
_capture_file: Any = None  # a temporary file, opened once per process


@contextlib.contextmanager
def _c_stderr() -> Iterator[list[bytes]]:
    """Inside, file descriptor 2 is a temporary file; on leaving, what was written there is
    appended to the yielded list (empty when nothing was). If fd 2 cannot be saved (closed)
    or no temporary file can be made, nothing is captured."""
    global _capture_file
    said: list[bytes] = []
    with _capture_lock, signals_deferred():  # a Ctrl-C must not leave fd 2 pointing at the file
        try:
            if _capture_file is None:
                _capture_file = tempfile.TemporaryFile()
            cap, saved = _capture_file.fileno(), os.dup(2)
        except OSError:
            yield said
            return
        try:
            os.dup2(cap, 2)
            try:
                yield said
            finally:
                os.dup2(saved, 2)
                end = os.lseek(cap, 0, os.SEEK_CUR)
                if end:
                    os.lseek(cap, 0, os.SEEK_SET)
                    said.append(os.read(cap, end))
                    os.ftruncate(cap, 0)
                    os.lseek(cap, 0, os.SEEK_SET)
        finally:
            os.close(saved)


_HARMLESS = re.compile(rb"^Corrupt JPEG data: \d+ extraneous bytes before marker 0x[0-9a-f]{2}$")
_DAMAGED = (b"Corrupt JPEG data", b"Premature end of JPEG file")


def _judge_warnings(text: bytes) -> None:
    """Raise for a libjpeg warning that means missing or damaged pixels; pass on the rest."""
    keep, damage = [], None
    for line in text.splitlines(keepends=True):
        bare = line.strip()
        if _HARMLESS.match(bare):
            continue
        if damage is None and bare.startswith(_DAMAGED):
            damage = bare.decode("ascii", "replace")
            continue
        keep.append(line)
    if keep:
        with contextlib.suppress(OSError):
            os.write(2, b"".join(keep))
    if damage is not None:
        raise DecodeError(f"corrupt JPEG data, libjpeg: {damage.split(': ', 1)[-1]}")


def _too_large(width: int, height: int, limit: int) -> str:
    return (f"image too large: {width}x{height} = {width * height / 1e6:.1f} Mpixels, "
            f"over the limit of {limit / 1e6:.1f} Mpixels (max_pixels)")


def _cv_message(exc: cv2.error) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else exc.__class__.__name__)[:120]


def read_regular_file(path: str | os.PathLike, max_file_size: int = DEFAULT_MAX_FILE_SIZE,
                      max_pixels: int | None = None) -> bytes:
    """The bytes of a regular file of at most ``max_file_size`` bytes. Anything else (folder,
    FIFO, socket, device) is refused without blocking: the file is opened non-blocking and
    checked with ``fstat`` first. With ``max_pixels``, an image header in the first
    ``HEAD_BYTES`` claiming more pixels is refused before the rest is read."""
    where = path_text(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise DecodeError("is a folder, not an image file", where)
            if not stat.S_ISREG(info.st_mode):
                raise DecodeError("not a regular file (a FIFO, socket or device)", where)
            if info.st_size > max_file_size:
                raise DecodeError(f"file too large: {_mib(info.st_size)}, over the limit of "
                                  f"{_mib(max_file_size)} (max_file_size); not read", where)
            with open(fd, "rb", closefd=False) as f:
                head = f.read(HEAD_BYTES)
                if max_pixels is not None and len(head) == HEAD_BYTES:
                    claim = probe(head)
                    if claim.width and claim.height and claim.width * claim.height > max_pixels:
                        raise DecodeError(_too_large(claim.width, claim.height, max_pixels), where)
                rest = f.read(max_file_size + 1 - len(head)) if len(head) == HEAD_BYTES else b""
            if len(head) + len(rest) > max_file_size:  # it grew while being read
                raise DecodeError(f"file too large: over the limit of {_mib(max_file_size)} "
                                  "(max_file_size)", where)
            return head + rest
        finally:
            os.close(fd)
    except OSError as exc:
        raise DecodeError(f"cannot read ({exc.strerror or exc.__class__.__name__})", where) from None


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def load_image(path: str | os.PathLike, size: int | tuple[int, int] = DEFAULT_SIZE, *,
               grayscale: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_file_size: int = DEFAULT_MAX_FILE_SIZE, exif_orientation: bool = True,
               reduced: bool = True) -> np.ndarray:
    """Read and decode one image file; see :func:`decode_image`. Errors name the file
    (in :func:`~streamnn.paths.path_text` form)."""
    data = read_regular_file(path, max_file_size, max_pixels)
    try:
        return decode_image(data, size, grayscale=grayscale, max_pixels=max_pixels,
                            exif_orientation=exif_orientation, reduced=reduced)
    except DecodeError as exc:
        raise DecodeError(exc.reason, path_text(path)) from None


def decode_options(size: tuple[int, int], *, grayscale: bool, max_pixels: int, exif_orientation: bool,
                   reduced: bool, max_file_size: int = DEFAULT_MAX_FILE_SIZE) -> dict[str, Any]:
    """The decoding settings as recorded in a store's ``options`` (JSON-able)."""
    return {"size": list(size), "grayscale": grayscale, "max_pixels": max_pixels, "max_file_size": max_file_size,
            "exif_orientation": "apply" if exif_orientation else "ignore",
            "reduced_decoding": reduced, "resize": "squash", "interpolation": "INTER_AREA",
            "alpha": "dropped", "opencv_version": cv2.__version__}


def decode_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for :func:`load_image` that reproduce a store's packing decode."""
    size = options.get("size", [DEFAULT_SIZE, DEFAULT_SIZE])
    return {"size": (int(size[0]), int(size[1])), "grayscale": bool(options.get("grayscale", False)),
            "max_pixels": int(options.get("max_pixels", DEFAULT_MAX_PIXELS)),
            "max_file_size": int(options.get("max_file_size", DEFAULT_MAX_FILE_SIZE)),
            "exif_orientation": options.get("exif_orientation", "apply") != "ignore",
            "reduced": bool(options.get("reduced_decoding", True))}
