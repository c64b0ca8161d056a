"""One remote object (an HTTP URL or an S3 key) read by byte range: its version, checked on every
response, and the retry policy (timeouts, backoff, a deadline) shared by the HTTP and S3 backends.

A backend (:mod:`.web`, :mod:`.s3`) implements :meth:`RemoteObject._open` (one ranged GET of
the object's first bytes, whose answer gives its :class:`Version`: size, ETag, Last-Modified;
the bytes are kept: they are the store's superblock and first metadata) and
:meth:`RemoteObject._get` (one ranged GET whose response validators are compared with the
version seen at open *before* its body is written anywhere). :meth:`RemoteObject.read_into` adds the policy: a connection reset, a timeout, a 5xx
or a 429 is retried with exponential backoff (jittered) until ``retries`` attempts or the
``deadline`` have passed, then it is a one-line error; a missing object, a refused access or a
changed object is a one-line error at once. Messages name the URL as given, never an endpoint
or a credential.

With a local cache (:mod:`.cache`: ``STREAMNN_REMOTE_CACHE``), reads of blocks held on disk are
served from there, and the blocks read are filled in the background.

An object opened again by the same process within ``REUSE_SECONDS`` of an answer of the server
takes the version that answer had, without a request (:func:`recent`): every later response is
still checked against it, so a store replaced in between is a one-line error at its first
request, never mixed data.
"""
from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from streamnn.errors import StreamnnError


def _env_number(name: str, default: float, low: float) -> float:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= low:
        raise StreamnnError(f"environment variable {name}={text!r} must be a number >= {low:g}")
    return value


@dataclass(frozen=True)
class Policy:
    """How hard to try (environment variables ``STREAMNN_REMOTE_*``, read when a store is opened)."""

    #: Seconds without a byte (connect or read) after which one request is abandoned and retried.
    timeout: float = 20.0
    #: Seconds one read may take, all attempts included: past it, the job ends with a one-line error.
    deadline: float = 120.0
    #: Attempts of one read (the first included).
    attempts: int = 6
    #: Requests in flight (threads of the row reader's pool).
    threads: int = 32
    #: The local cache's folder ("": none) and its byte limit (:mod:`.cache`).
    cache: str = ""
    cache_limit: int = 0

    @classmethod
    def from_env(cls) -> Policy:
        from streamnn.data.remote.cache import cache_from_env
        folder, limit = cache_from_env()
        return cls(timeout=_env_number("STREAMNN_REMOTE_TIMEOUT", cls.timeout, 0.01),
                   deadline=_env_number("STREAMNN_REMOTE_DEADLINE", cls.deadline, 0.01),
                   attempts=int(_env_number("STREAMNN_REMOTE_ATTEMPTS", cls.attempts, 1)),
                   threads=int(_env_number("STREAMNN_REMOTE_THREADS", cls.threads, 1)),
                   cache=folder, cache_limit=limit)


class Version(NamedTuple):
    """What identifies the object's content: size, ETag and Last-Modified (None: not sent)."""

    size: int
    etag: str | None
    modified: str | None


class Transient(Exception):
    """A failure worth retrying (reset, timeout, 5xx, 429); its text says what happened."""


class NoMultiRange(Exception):
    """The server does not answer a request for several byte ranges with those ranges."""


#: A byte range to read: its offset in the object and the buffers it fills, in order.
Range = tuple[int, Sequence[memoryview]]


#: First backoff (seconds), doubled each attempt up to ``MAX_BACKOFF``, times a jitter in [0.5, 1].
BACKOFF = 0.1
MAX_BACKOFF = 2.0
#: Bytes of the object read by the request that opens it: its first ones (the superblock and the
#: first metadata) and, where the server answers several ranges at once, its last ones too.
HEAD_BYTES = 256 << 10
TAIL_BYTES = 1 << 20
#: Seconds during which a version the server answered with is taken again without a request.
REUSE_SECONDS = 10.0
_SEEN: dict[str, tuple[Version, float]] = {}


def recent(url: str) -> Version | None:
    """The version of ``url`` the server answered with in the last ``REUSE_SECONDS``, if any."""
    seen = _SEEN.get(url)
    return seen[0] if seen is not None and time.monotonic() - seen[1] < REUSE_SECONDS else None


class RemoteObject:
    """A read-only object read by byte range; ``url`` is how messages name it."""

    def __init__(self, url: str, policy: Policy | None = None, reuse: bool = False) -> None:
        self.url = url
        self.policy = policy or Policy.from_env()
        self.requests = 0  # ranged GETs answered (bytes transferred: ``bytes_read``)
        self.bytes_read = 0
        self._count = threading.Lock()
        #: The error that ended a read: later and concurrent reads fail with it at once (a dead
        #: server ends the job after one deadline, not after one deadline per request in flight).
        self.broken: StreamnnError | None = None
        #: The object's first bytes as the opening request read them (empty: not read), and its
        #: last ones (their offset and bytes) if it read them too.
        self.head, self.tail = b"", None
        known = recent(url) if reuse else None
        if known is None:
            self.version, self.head, self.tail = self._retrying(lambda deadline: self._open(deadline), "open")  # type: ignore[misc]
            self.requests, self.bytes_read = 1, len(self.head) + len(self.tail[1] if self.tail else b"")
            self.seen()
        else:
            self.version = known
        self.cache = None
        if self.policy.cache and (self.version.etag or self.version.modified):
            from streamnn.data.remote.cache import BlockCache
            self.cache = BlockCache(self.policy.cache, self.policy.cache_limit, self)

    def seen(self) -> None:
        """The server just answered with :attr:`version` (see :func:`recent`)."""
        _SEEN[self.url] = (self.version, time.monotonic())

    # -- what a backend provides ---------------------------------------------------------------
    def _open(self, deadline: float) -> tuple[Version, bytes, tuple[int, bytes] | None]:
        """One ranged GET of the first ``HEAD_BYTES`` (and the last ``TAIL_BYTES`` where the
        server can): the object's version, those bytes and (their offset, the last ones)."""
        raise NotImplementedError

    def _get(self, offset: int, size: int, sinks: Sequence[memoryview], deadline: float) -> None:
        """One ranged GET of ``size`` bytes at ``offset`` into ``sinks`` (in order), the
        response's validators checked with :meth:`validate` before the body is read."""
        raise NotImplementedError

    #: Whether the server answers one request for several ranges (None: not known yet).
    multi: bool | None = False

    def _get_many(self, ranges: Sequence[Range], deadline: float) -> None:
        """One GET of several byte ranges (raise :class:`NoMultiRange` if the server will not)."""
        raise NoMultiRange

    def close(self) -> None:
        """Stop the cache's filling (the connections stay pooled for the process)."""
        if self.cache is not None:
            self.cache.close()

    # -- shared ---------------------------------------------------------------------------------
    def fail(self, message: str) -> StreamnnError:
        return StreamnnError(message, self.url)

    def changed(self, how: str) -> StreamnnError:
        return self.fail(f"the store changed on the server while it was being read ({how}); stopping "
                         f"rather than reading other data (restart on the store as it is now)")

    def validate(self, got: Version) -> None:
        """Raise :meth:`changed` unless a response's validators are the version seen at open."""
        want = self.version
        if got.size != want.size:
            raise self.changed(f"its size changed from {want.size} to {got.size} bytes")
        if got.etag != want.etag:
            raise self.changed(f"its ETag changed from {want.etag} to {got.etag}")
        if got.modified != want.modified:
            raise self.changed(f"its Last-Modified changed from {want.modified} to {got.modified}")

    def check_deadline(self, deadline: float, what: str = "reading") -> None:
        if time.monotonic() > deadline:
            raise Transient(f"no progress within the deadline while {what}")

    def _retrying(self, attempt: Callable[[float], object], what: str) -> object:
        policy = self.policy
        start = time.monotonic()
        deadline = start + policy.deadline
        for n in range(1, policy.attempts + 1):
            if self.broken is not None:  # another request gave up: the job ends, no more tries
                raise self.broken
            try:
                return attempt(deadline)
            except Transient as exc:
                left = deadline - time.monotonic()
                if n == policy.attempts or left <= 0:
                    self.broken = self.fail(f"cannot {what}: {exc} (gave up after {n} attempt(s) in "
                                            f"{time.monotonic() - start:.1f} s; STREAMNN_REMOTE_DEADLINE="
                                            f"{policy.deadline:g}, STREAMNN_REMOTE_ATTEMPTS={policy.attempts})")
                    raise self.broken from None
                pause = min(MAX_BACKOFF, BACKOFF * 2 ** (n - 1)) * random.uniform(0.5, 1.0)
                time.sleep(max(0.0, min(pause, left)))
        raise AssertionError("unreachable")

    def read_into(self, offset: int, bufs: Sequence[np.ndarray | memoryview | bytearray]) -> None:
        """Fill ``bufs`` (in order) with the object's bytes from ``offset`` (:meth:`read_many`)."""
        self.read_many([(offset, [memoryview(b).cast("B") for b in bufs])])

    def read_many(self, ranges: Sequence[Range]) -> None:
        """Fill each range's sinks (in order) with the object's bytes from its offset: from the
        cache's blocks where it has them, else from the server (:meth:`fetch_many`)."""
        todo = []
        for offset, sinks in ranges:
            size = sum(len(s) for s in sinks)
            if offset < 0 or offset + size > self.version.size:
                raise self.fail(f"bytes {offset}..{offset + size} lie beyond the object's end "
                                f"({self.version.size} bytes: truncated?)")
            if size:
                todo.append((offset, sinks))
        if self.cache is not None:
            self.cache.read_many(todo)
        elif todo:
            self.fetch_many(todo)

    def fetch_many(self, ranges: Sequence[Range]) -> None:
        """The ranges from the server: one request for them all where the server sends several
        ranges in one answer (``multi``), else one request each; retried as the policy says."""
        if len(ranges) > 1 and self.multi is not False:
            try:
                if self.multi is None:  # the first time: one try, whatever fails falls back for good
                    self._get_many(ranges, time.monotonic() + self.policy.deadline)
                else:
                    self._retrying(lambda deadline: self._get_many(ranges, deadline), f"read {len(ranges)} byte ranges")
                self.multi = True
                self._counted(sum(len(s) for _, sinks in ranges for s in sinks))
                return
            except (NoMultiRange, Transient):
                self.multi = False
        for offset, sinks in ranges:
            size = sum(len(s) for s in sinks)
            self._retrying(lambda deadline: self._get(offset, size, sinks, deadline),
                           f"read bytes {offset}..{offset + size - 1}")
            self._counted(size)

    def _counted(self, size: int) -> None:
        with self._count:
            self.requests += 1
            self.bytes_read += size
        self.seen()

    def fill(self, sinks: Sequence[memoryview], chunk: Callable[[memoryview], int], deadline: float) -> None:
        """Read a response body into ``sinks`` with ``chunk(view) -> bytes read`` (0 at its end)."""
        for sink in sinks:
            have = 0
            while have < len(sink):
                got = chunk(sink[have:have + (1 << 20)])
                if not got:
                    raise Transient("the response ended early (connection closed)")
                have += got
                self.check_deadline(deadline)


def parse_content_range(value: str | None) -> tuple[int, int, int] | None:
    """``bytes a-b/total`` as (a, b, total), or None."""
    if not value or not value.startswith("bytes "):
        return None
    try:
        span, total = value[6:].split("/")
        a, b = span.split("-")
        return int(a), int(b), int(total)
    except ValueError:
        return None
