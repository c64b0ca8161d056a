"""The decoding worker of ``streamnn-pack``: decode a chunk of files, and the wire format.

A worker is a separate Python process (started by :class:`streamnn.pack.pool.Decoder` as
``python -c WORKER_BOOT <request fd> <result fd> <parent pid>``). This module is all it imports besides NumPy, OpenCV and
:mod:`streamnn.pack.decode`: no h5py and no store code, so a worker starts in about two thirds of
the time a worker importing :mod:`streamnn.pack.job` takes (its start-up is a fixed cost of every
pack, a noticeable one for a few thousand images). Workers compute the exact integer pixel
sums of their chunks (:func:`pixel_sums`) for the statistics.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import sys
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from streamnn.pack.decode import DecodeError, load_image


def pixel_sums(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-feature sums of x and x**2 over uint8 rows (B, D), as int64."""
    rows = rows.reshape(len(rows), -1)
    s1 = rows.sum(axis=0, dtype=np.int64)
    s2 = np.zeros(rows.shape[1], np.int64)
    for i in range(0, len(rows), 256):  # 256 * 255**2 < 2**32: uint32 partial sums cannot overflow
        sq = rows[i:i + 256].astype(np.uint32)
        sq *= sq
        s2 += sq.sum(axis=0, dtype=np.uint32)
    return s1, s2


ChunkResult = tuple[np.ndarray, list[str | None], tuple[int, np.ndarray, np.ndarray] | None]


def decode_chunk(paths: Sequence[str], in_stats: Sequence[bool], kwargs: dict[str, Any]) -> ChunkResult:
    """Decode files. Return the stacked uint8 images that worked, a reason (or None) per file,
    and (n, sum x, sum x**2) over the decoded images flagged ``in_stats`` (None if none)."""
    images, reasons, counted = [], [], []
    for p, flag in zip(paths, in_stats):
        try:
            images.append(load_image(p, **kwargs))
            reasons.append(None)
            counted.append(flag)
        except DecodeError as exc:
            reasons.append(exc.reason)
        except MemoryError:
            reasons.append("out of memory while decoding")
    h, w = kwargs["size"]
    stack = np.stack(images) if images else np.empty((0, h, w, 1 if kwargs["grayscale"] else 3), np.uint8)
    sums = None
    if any(counted):
        chosen = stack[np.asarray(counted)]
        s1, s2 = pixel_sums(chosen)
        sums = (len(chosen), s1.astype(np.uint16), s2.astype(np.uint32))  # chunks <= 257 images: no overflow
    return stack, reasons, sums


# The parent and a worker talk over two pipes in frames (8-byte little-endian length, then
# the payload), with no pickle: a request is the chunk's paths as bytes with their
# statistics flags, a result is JSON (reasons, summed-row count) followed by raw arrays.
LEN = struct.Struct("<Q")
_ITEM = struct.Struct("<BI")


def encode_request(paths: Sequence[str], in_stats: Sequence[bool]) -> bytes:
    parts = [struct.pack("<I", len(paths))]
    for p, flag in zip(paths, in_stats):
        raw = os.fsencode(p)
        parts += [_ITEM.pack(bool(flag), len(raw)), raw]
    return b"".join(parts)


def _decode_request(data: bytes) -> tuple[list[str], list[bool]]:
    (n,), at, paths, flags = struct.unpack_from("<I", data), 4, [], []
    for _ in range(n):
        flag, size = _ITEM.unpack_from(data, at)
        at += _ITEM.size
        paths.append(os.fsdecode(data[at:at + size]))
        flags.append(bool(flag))
        at += size
    return paths, flags


def _encode_result(result: ChunkResult) -> bytes:
    stack, reasons, sums = result
    head = json.dumps({"reasons": reasons, "summed": sums[0] if sums else None}).encode()
    parts = [struct.pack("<I", len(head)), head]
    if sums:
        parts += [sums[1].tobytes(), sums[2].tobytes()]
    return b"".join([*parts, np.ascontiguousarray(stack).tobytes()])


def decode_result(data: bytes, kwargs: dict[str, Any]) -> ChunkResult:
    (size,) = struct.unpack_from("<I", data)
    head = json.loads(data[4:4 + size])
    reasons, summed, at = head["reasons"], head["summed"], 4 + size
    h, w = kwargs["size"]
    shape = (h, w, 1 if kwargs["grayscale"] else 3)
    d = h * w * shape[2]
    sums = None
    if summed is not None:
        s1 = np.frombuffer(data, np.uint16, d, at)
        s2 = np.frombuffer(data, np.uint32, d, at + 2 * d)
        sums, at = (int(summed), s1, s2), at + 6 * d
    n_images = sum(r is None for r in reasons)
    stack = np.frombuffer(data, np.uint8, n_images * d, at).reshape(n_images, *shape)
    return stack, reasons, sums


def _read_frame(fd: int) -> bytes | None:
    """One frame from a blocking file descriptor; None at end of file."""
    head = _read_exactly(fd, LEN.size)
    return None if head is None else _read_exactly(fd, LEN.unpack(head)[0]) or b""


def _read_exactly(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        part = os.read(fd, min(n - len(buf), 1 << 20))
        if not part:
            return None
        buf += part
    return bytes(buf)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# A worker's first lines, before the imports (about a second on a busy machine): on Linux, get
# SIGKILL when the parent dies, even by SIGKILL (PR_SET_PDEATHSIG = 1). Elsewhere the worker
# ends when its request pipe reaches end of file.
WORKER_BOOT = """\
import ctypes, signal, sys
if sys.platform.startswith("linux"):
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
from streamnn.pack.worker import worker_main
worker_main()
"""


def worker_main() -> None:
    """A decoding worker (``python -c WORKER_BOOT <request fd> <result fd> <parent pid>``):
    decode requested chunks until end of file."""
    requests, results, parent = (int(a) for a in sys.argv[1:4])
    if os.getppid() != parent:  # the parent died before the death signal was arranged
        os._exit(1)
    try:
        _serve(requests, results)
    except BrokenPipeError:  # the parent stopped listening (it is ending): end quietly
        os._exit(1)


def _serve(requests: int, results: int) -> None:
    """Read the options, say ready, then answer every request until end of file."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # the parent handles them
    cv2.setNumThreads(1)
    config = _read_frame(requests)
    if config is None:
        return
    kwargs = json.loads(config)
    kwargs["size"] = tuple(kwargs["size"])
    _write_all(results, LEN.pack(5) + b"ready")
    while (frame := _read_frame(requests)) is not None:
        payload = _encode_result(decode_chunk(*_decode_request(frame), kwargs))
        _write_all(results, LEN.pack(len(payload)) + payload)
