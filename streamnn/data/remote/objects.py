"""One remote object (an HTTP URL or an S3 key) read by byte range: its version, checked on every
response, and the retry policy (timeouts, backoff, a deadline) shared by the HTTP and S3 backends.

A backend (:mod:`.web`, :mod:`.s3`) implements :meth:`RemoteObject._stat` (the object's
:class:`Version`: size, ETag, Last-Modified) and :meth:`RemoteObject._get` (one ranged GET whose
response validators are compared with the version seen at open *before* its body is written
anywhere). :meth:`RemoteObject.read_into` adds the policy: a connection reset, a timeout, a 5xx
or a 429 is retried with exponential backoff (jittered) until ``retries`` attempts or the
``deadline`` have passed, then it is a one-line error; a missing object, a refused access or a
changed object is a one-line error at once. Messages name the URL as given, never an endpoint
or a credential.
"""
from __future__ import annotations

import os
import random
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

    @classmethod
    def from_env(cls) -> Policy:
        return cls(timeout=_env_number("STREAMNN_REMOTE_TIMEOUT", cls.timeout, 0.01),
                   deadline=_env_number("STREAMNN_REMOTE_DEADLINE", cls.deadline, 0.01),
                   attempts=int(_env_number("STREAMNN_REMOTE_ATTEMPTS", cls.attempts, 1)),
                   threads=int(_env_number("STREAMNN_REMOTE_THREADS", cls.threads, 1)))


class Version(NamedTuple):
    """What identifies the object's content: size, ETag and Last-Modified (None: not sent)."""

    size: int
    etag: str | None
    modified: str | None


class Transient(Exception):
    """A failure worth retrying (reset, timeout, 5xx, 429); its text says what happened."""


#: First backoff (seconds), doubled each attempt up to ``MAX_BACKOFF``, times a jitter in [0.5, 1].
BACKOFF = 0.1
MAX_BACKOFF = 2.0


class RemoteObject:
    """A read-only object read by byte range; ``url`` is how messages name it."""

    def __init__(self, url: str, policy: Policy | None = None) -> None:
        self.url = url
        self.policy = policy or Policy.from_env()
        self.requests = 0  # ranged GETs answered (bytes transferred: ``bytes_read``)
        self.bytes_read = 0
        #: The error that ended a read: later and concurrent reads fail with it at once (a dead
        #: server ends the job after one deadline, not after one deadline per request in flight).
        self.broken: StreamnnError | None = None
        self.version = self._retrying(lambda deadline: self._stat(deadline), "open")

    # -- what a backend provides ---------------------------------------------------------------
    def _stat(self, deadline: float) -> Version:
        raise NotImplementedError

    def _get(self, offset: int, size: int, sinks: Sequence[memoryview], deadline: float) -> None:
        """One ranged GET of ``size`` bytes at ``offset`` into ``sinks`` (in order), the
        response's validators checked with :meth:`validate` before the body is read."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (a backend's pools)."""

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
        """Fill ``bufs`` (in order) with the object's bytes from ``offset``: one ranged GET,
        retried as the policy says."""
        sinks = [memoryview(b).cast("B") for b in bufs]
        size = sum(len(s) for s in sinks)
        if size == 0:
            return
        if offset < 0 or offset + size > self.version.size:
            raise self.fail(f"bytes {offset}..{offset + size} lie beyond the object's end "
                            f"({self.version.size} bytes: truncated?)")
        self._retrying(lambda deadline: self._get(offset, size, sinks, deadline),
                       f"read bytes {offset}..{offset + size - 1}")
        self.requests += 1
        self.bytes_read += size

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
