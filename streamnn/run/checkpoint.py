"""HDF5 checkpoints: one file holding a nested dict of arrays, numbers and strings.

Design. A checkpoint's *content* is a plain nested ``dict`` whose leaves are

* numpy arrays (numeric or bool, any shape, 0-d included)  -> HDF5 datasets, dtype kept;
* ``bool`` / ``int`` / ``float`` / ``str`` (numpy scalars too) -> attributes of their group;
* ``None``                                                   -> an empty attribute;
* lists or tuples of ``str``                                 -> 1-D UTF-8 string datasets,
  read back as ``list[str]``.

Reading accepts exactly these: any other dtype HDF5 can return (opaque, compound, vlen,
reference, array, strings of another shape) is refused in one line naming the member;
big-endian numbers are read into native byte order (the digest is byte-order free).

Keys are any non-empty strings ('/' and '%' are percent-encoded in HDF5 names).
Numeric scalars are normalized to Python ``bool``, ``int`` or ``float`` (exact values), so a
loaded checkpoint equals the saved content after that normalization. No pickle anywhere.

Layout (format version 1)::

    /            attrs: format = "streamnn-checkpoint", format_version, streamnn_version,
                        sha256 (digest of the content, see :func:`digest`)
    /content     the nested dict: sub-dicts are groups, leaves as above

:func:`save_checkpoint` writes through :func:`streamnn.atomic.atomic_output` (temporary
file in the same folder, fsync, rename, fsync of the folder), so a crash at any moment
leaves the previous checkpoint intact. :func:`load_checkpoint` reads everything, recomputes
the digest and raises a one-line :class:`StreamnnError` for a missing, truncated, foreign,
newer or corrupt file; it never returns partial content. Writing the same content twice
gives byte-identical files (HDF5 timestamps are off), and :func:`digest` compares content.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import h5py
import numpy as np

from streamnn.version import __version__
from streamnn.atomic import atomic_output
from streamnn.errors import StreamnnError
from streamnn.h5write import h5_output
from streamnn.paths import path_text

FORMAT = "streamnn-checkpoint"
FORMAT_VERSION = 1
_STR = h5py.string_dtype("utf-8")
_HEADER = ("format", "format_version", "streamnn_version", "sha256")

Leaf = Union[np.ndarray, bool, int, float, str, None, list]
Content = dict[str, Any]


# -- normalization and digest -------------------------------------------------------------
def _check_key(key: object, where: str) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"checkpoint key {key!r} at {where or '/'} must be a non-empty str")
    return key


def _escape(key: str) -> str:
    """HDF5 name for a key: '%', '/' and a leading '.' are percent-encoded."""
    out = key.replace("%", "%25").replace("/", "%2F")
    return "%2E" + out[1:] if out.startswith(".") else out


def _unescape(name: str) -> str:
    return re.sub("%(25|2F|2E)", lambda m: {"25": "%", "2F": "/", "2E": "."}[m.group(1)], name)


def _normalize_leaf(value: Any, where: str) -> Leaf:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        if not -(1 << 63) <= int(value) < (1 << 63):
            raise TypeError(f"checkpoint integer at {where} does not fit in 64 bits")
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":
            raise TypeError(f"checkpoint array at {where} has unsupported dtype {value.dtype}")
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"checkpoint value at {where} has unsupported type {type(value).__name__}")


def normalize(content: Mapping[str, Any], _where: str = "") -> Content:
    """The content as :func:`load_checkpoint` will return it (raises TypeError if not storable)."""
    out: Content = {}
    for key, value in content.items():
        where = f"{_where}/{_check_key(key, _where)}"
        out[key] = normalize(value, where) if isinstance(value, Mapping) else _normalize_leaf(value, where)
    return out


def _feed(h: Any, content: Mapping[str, Any], prefix: str) -> None:
    for key in sorted(content):
        value, path = content[key], f"{prefix}/{key}"
        h.update(path.encode() + b"\0")
        if isinstance(value, Mapping):
            h.update(b"dict\0")
            _feed(h, value, path)
        elif isinstance(value, np.ndarray):
            arr = np.ascontiguousarray(value)
            little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
            h.update(f"array\0{little.dtype.str}\0{list(arr.shape)}\0".encode())
            h.update(little)  # its buffer, not a copy (C-contiguous)
        elif isinstance(value, list):
            h.update(b"strs\0" + "\0".join(value).encode() + f"\0{len(value)}\0".encode())
        elif isinstance(value, float):
            h.update(b"float\0" + value.hex().encode() + b"\0")  # exact, distinguishes -0.0 and NaNs
        else:  # None, bool, int, str: repr is exact and typed
            h.update(f"{type(value).__name__}\0{value!r}\0".encode())


def digest(content: Mapping[str, Any]) -> str:
    """sha256 hex of the normalized content: equal digests mean equal content, bit for bit."""
    h = hashlib.sha256()
    _feed(h, normalize(content), "")
    return h.hexdigest()


# -- writing ------------------------------------------------------------------------------
def _write_group(group: h5py.Group, content: Content, held: list[Any]) -> None:
    """Write ``content`` into ``group``, holding every object made (:mod:`streamnn.h5write`)."""
    held.append(group)
    for key, value in content.items():
        key = _escape(key)
        if isinstance(value, dict):
            _write_group(group.create_group(key), value, held)
        elif isinstance(value, np.ndarray):
            held.append(group.create_dataset(key, data=value))
        elif isinstance(value, list):
            held.append(group.create_dataset(key, data=np.array(value, dtype=object), dtype=_STR,
                                             shape=(len(value),)))
        elif value is None:
            group.attrs[key] = h5py.Empty("f")
        elif isinstance(value, str):
            group.attrs.create(key, value, dtype=_STR)
        elif isinstance(value, bool):
            group.attrs[key] = np.bool_(value)
        elif isinstance(value, int):
            group.attrs[key] = np.int64(value)
        else:
            group.attrs[key] = np.float64(value)


def save_checkpoint(path: str | os.PathLike, content: Mapping[str, Any]) -> str:
    """Write ``content`` to ``path`` atomically and durably; return its digest."""
    content = normalize(content)
    sha = digest(content)
    path = Path(path)
    with atomic_output(path) as tmp, h5_output(tmp, path) as (f, held):  # a failed write: one line
        f.attrs.create("format", FORMAT, dtype=_STR)
        f.attrs["format_version"] = np.int64(FORMAT_VERSION)
        f.attrs.create("streamnn_version", __version__, dtype=_STR)
        f.attrs.create("sha256", sha, dtype=_STR)
        _write_group(f.create_group("content"), content, held)
    return sha


# -- reading ------------------------------------------------------------------------------
def _read_attr(value: Any) -> Leaf:
    if isinstance(value, h5py.Empty):
        return None
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise ValueError(f"unexpected attribute type {type(value).__name__}")


def _read_group(group: h5py.Group, max_bytes: int) -> Content:
    """The content under ``group``; a dataset declaring more bytes than ``max_bytes`` (the file's
    size: this writer never compresses) is refused before it is read."""
    out: Content = {_unescape(key): _read_attr(value) for key, value in group.attrs.items()}
    for name in group:
        key = _unescape(name)
        item = group.get(name)  # a dangling link gives None (or KeyError)
        if isinstance(item, h5py.Group):
            out[key] = _read_group(item, max_bytes)
        elif isinstance(item, h5py.Dataset):
            out[key] = _read_dataset(item, max_bytes)
        else:
            raise ValueError(f"{group.name}/{name} is neither a group nor a dataset")
    return out


def _read_dataset(item: h5py.Dataset, max_bytes: int) -> Leaf:
    """A dataset as this format writes them: a 1-D list of strings, or a numeric or bool array (in
    native byte order). Any other dtype HDF5 can hold (opaque, compound, enum-free vlen, reference,
    array, strings of another shape) is a ValueError naming it, before its values are read."""
    dtype = item.dtype
    if item.size * max(dtype.itemsize, 1) > max_bytes:
        raise ValueError(f"dataset {item.name} declares {item.size:,} values, more than the file holds")
    if h5py.check_string_dtype(dtype) is not None:
        if item.ndim != 1:
            raise ValueError(f"dataset {item.name} holds strings in shape {item.shape}, not a list")
        try:
            values = [v.decode() if isinstance(v, bytes) else v for v in item[...]]
        except UnicodeDecodeError:
            values = []
        if not all(isinstance(v, str) for v in values) or len(values) != item.size:
            raise ValueError(f"dataset {item.name} holds strings that are not UTF-8 text")
        return values
    if (dtype.kind not in "biufc" or dtype.names is not None or dtype.subdtype is not None
            or h5py.check_vlen_dtype(dtype) is not None or h5py.check_ref_dtype(dtype) is not None):
        raise ValueError(f"dataset {item.name} has dtype {dtype.str}, which a checkpoint does not hold")
    arr = np.asarray(item[()])
    return arr.astype(arr.dtype.newbyteorder("="), copy=False) if arr.dtype.byteorder not in "=|" else arr


def _header(f: h5py.File) -> dict[str, Any]:
    return {k: _read_attr(f.attrs[k]) for k in _HEADER if k in f.attrs}


def load_checkpoint(path: str | os.PathLike) -> Content:
    """Read and verify a checkpoint; raise a one-line StreamnnError for anything wrong."""
    where = path_text(path)
    path = Path(path)
    if not path.is_file():
        raise StreamnnError("no such checkpoint file" if not os.path.lexists(path) else "is not a regular file",
                            where)
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise StreamnnError("not a checkpoint: not an HDF5 file, or truncated", where) from None
    try:
        with f:
            head = _header(f)
            if head.get("format") != FORMAT:
                raise StreamnnError(f"not a streamnn checkpoint (format {head.get('format')!r})", where)
            if head.get("format_version") != FORMAT_VERSION:
                raise StreamnnError(f"checkpoint format version {head.get('format_version')} is not supported "
                                    f"(this streamnn {__version__} reads version {FORMAT_VERSION})", where)
            if "content" not in f or "sha256" not in head:
                raise StreamnnError("checkpoint is incomplete (no content or digest)", where)
            content = _read_group(f["content"], max(path.stat().st_size, 1 << 16))
            computed = digest(content)
    except StreamnnError:
        raise
    except MemoryError as exc:  # its arrays are bounded by the file's size: a real shortage, not corruption
        raise StreamnnError(f"checkpoint does not fit in the memory available ({str(exc).strip() or 'MemoryError'})",
                            where) from None
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
        raise StreamnnError(f"checkpoint is corrupt or truncated ({exc.__class__.__name__}: "
                            f"{' '.join(str(exc).split())[:120]})", where) from None
    if computed != head["sha256"]:
        raise StreamnnError("checkpoint content does not match its sha256 digest (corrupt file)", where)
    return content


def checkpoint_digest(path: str | os.PathLike) -> str:
    """The recorded content digest of a verified checkpoint file."""
    return digest(load_checkpoint(path))


def get(content: Mapping[str, Any], dotted: str, path: str | os.PathLike | None = None) -> Any:
    """``content["a"]["b"]`` for ``"a.b"``, or a one-line StreamnnError naming the missing key."""
    node: Any = content
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise StreamnnError(f"checkpoint has no entry {dotted!r} (not written by this streamnn?)", path)
        node = node[part]
    return node


def differences(a: Mapping[str, Any], b: Mapping[str, Any], _prefix: str = "") -> list[str]:
    """Dotted paths where two contents differ (empty: equal bit for bit, NaNs equal)."""
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        where = f"{_prefix}{key}"
        if key not in a or key not in b:
            out.append(where)
        elif isinstance(a[key], Mapping) and isinstance(b[key], Mapping):
            out += differences(a[key], b[key], where + ".")
        elif not _leaf_equal(a[key], b[key]):
            out.append(where)
    return out


def _leaf_equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")))
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex() or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b
