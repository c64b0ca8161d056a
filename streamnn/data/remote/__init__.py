"""Stores read over the network: ``http://``, ``https://`` and ``s3://`` URLs (docs/remote.md).

``open_store(URL)`` and the loader's readers take a URL where they take a path. The metadata is
read once through a block-cached range file (:mod:`.rangefile`, h5py's file-object driver);
rows are fetched by byte range with the ``pread`` reader's design (:mod:`.reader`): runs of
adjacent rows coalesced into one range, several ranges in one request where the server allows,
many requests in flight, read ahead along the epoch order, written into the loader's buffers.
Every response is checked against the object's version seen at open (:mod:`.objects`): a
changed object is a one-line error, never mixed rows. A sharded store is read by its index's
URL as the one-file store it stands for (:mod:`.shards`); blocks may be kept in a local folder
(:mod:`.cache`, :func:`set_cache`).
The network libraries (urllib3 for HTTP, botocore for S3: the optional extra ``[remote]``) are
imported only by the modules that talk to a server, loaded only for a URL: nothing here imports
them, so the core stays free of them.
"""
from __future__ import annotations

import os
from typing import Any

#: URL schemes read remotely.
SCHEMES = ("http://", "https://", "s3://")


def is_url(path: Any) -> bool:
    """Whether ``path`` is a store URL (a str starting with a supported scheme) rather than a path."""
    return isinstance(path, str) and path.lower().startswith(SCHEMES)


def location(path: str | os.PathLike) -> Any:
    """A URL as given (a str), a local path as a ``Path``: how stores and loaders keep where they read."""
    from pathlib import Path
    return path if is_url(path) else Path(path)


def open_object(url: str, policy: Any = None, reuse: bool = False) -> Any:
    """The :class:`~.objects.RemoteObject` at ``url`` (``http(s)://`` or ``s3://``), its version
    read once (``reuse``: or taken from an answer of the server a moment ago, :func:`.objects.recent`)."""
    if url.lower().startswith("s3://"):
        from streamnn.data.remote.s3 import S3Object
        return S3Object(url, policy, reuse)
    from streamnn.data.remote.web import HttpObject
    return HttpObject(url, policy, reuse)


def set_cache(folder: str | os.PathLike | None, limit: str | int = "10G") -> None:
    """Cache the blocks of the stores this process (and the processes it starts) reads by URL in
    ``folder``, within ``limit`` bytes (e.g. "2G"); ``None``: no cache. Sets
    ``STREAMNN_REMOTE_CACHE`` and ``STREAMNN_REMOTE_CACHE_LIMIT``, read when a store is opened
    (docs/remote.md, "Local cache")."""
    from streamnn.data.remote.cache import parse_size
    if folder is None:
        os.environ.pop("STREAMNN_REMOTE_CACHE", None)
        return
    parse_size(str(limit), "cache limit")
    os.environ["STREAMNN_REMOTE_CACHE"] = os.fspath(folder)
    os.environ["STREAMNN_REMOTE_CACHE_LIMIT"] = str(limit)
