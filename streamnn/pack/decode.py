"""Image file bytes to a uint8 H x W x C array (BGR, or one gray channel) at a target size.

The steps, on every file: read regular files only, the header first (a FIFO or device is
refused, never waited on; a file over ``max_file_size`` is refused unread); sniff the format
from the bytes (:mod:`.probe`), refuse decompression bombs (more than ``max_pixels``) and
truncated files before decoding; decode JPEGs small (``IMREAD_REDUCED_*``, when the result
still covers the target); listen to libjpeg's warnings on fd 2 (damaged scan data is
skipped, not kept as grey); resize with ``INTER_AREA`` straight to H x W (squashed, the
aspect ratio is not kept). Colour conversions, alpha and EXIF orientation are OpenCV's
``IMREAD_COLOR`` / ``IMREAD_GRAYSCALE`` (``exif_orientation=False`` adds
``IMREAD_IGNORE_ORIENTATION``); :func:`decode_kwargs` rebuilds these settings from a store's
``options`` so prediction decodes like packing did. See docs/packing.md for the design of each step.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import cv2
import numpy as np

from streamnn.errors import StreamnnError
from streamnn.pack.probe import probe
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
class DecodeError(StreamnnError):
    """A file that is not a usable image; ``reason`` is the short why (without the path)."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(reason, path)
        self.reason = reason


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
