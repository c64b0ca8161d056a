"""The HTTP(S) backend of :class:`~.objects.RemoteObject`: ranged GETs with urllib3.

Why urllib3 rather than fsspec's HTTP filesystem: each ranged GET must be checked against the
object's version (ETag, Last-Modified, size from ``Content-Range``) before its body lands in the
loader's buffers, retried under one policy, and read straight into the rows' buffers; urllib3
gives exactly that (a thread-safe connection pool, ``readinto``, per-request timeouts), where
fsspec returns bytes without the response's headers and retries by its own rules. A pool of
``policy.threads`` kept-alive connections per process (created lazily: never shared across a
fork). Credentials in the URL (``user:password@``) are refused: they would end up in run folders.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from urllib.parse import urlsplit

from streamnn.data.remote.objects import Policy, RemoteObject, Transient, Version, parse_content_range
from streamnn.errors import StreamnnError

try:
    import urllib3
except ImportError:  # pragma: no cover - the optional extra
    urllib3 = None


def need_extra(url: str, module: str) -> StreamnnError:
    return StreamnnError(f"reading a store from a URL needs {module}: pip install 'streamnn[remote]'", url)


class HttpObject(RemoteObject):
    """An object on an HTTP(S) server that honours ``Range`` (nginx, S3's HTTPS endpoint, ...)."""

    def __init__(self, url: str, policy: Policy | None = None) -> None:
        if urllib3 is None:
            raise need_extra(url, "urllib3")
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            raise StreamnnError("credentials in a URL are not accepted (they would be written into run "
                                "folders); serve the store without them or use s3:// with the standard "
                                "AWS credentials", f"{parts.scheme}://{parts.hostname}{parts.path}")
        if not parts.hostname:
            raise StreamnnError("not a valid URL (no host)", url)
        self._pool: urllib3.PoolManager | None = None
        self._pid = -1
        super().__init__(url, policy)

    def _manager(self) -> urllib3.PoolManager:
        if self._pool is None or self._pid != os.getpid():
            t = self.policy.timeout
            self._pool = urllib3.PoolManager(num_pools=2, maxsize=self.policy.threads, block=False, retries=False,
                                             timeout=urllib3.Timeout(connect=t, read=t))
            self._pid = os.getpid()
        return self._pool

    def _request(self, first: int, last: int) -> urllib3.BaseHTTPResponse:
        try:
            resp = self._manager().request("GET", self.url, preload_content=False, redirect=False,
                                           headers={"Range": f"bytes={first}-{last}", "Accept-Encoding": "identity"})
        except urllib3.exceptions.HTTPError as exc:
            raise Transient(_reason(exc)) from None
        status = resp.status
        if status == 206:
            return resp
        resp.drain_conn()
        resp.release_conn()
        if status in (408, 429) or status >= 500:
            raise Transient(f"the server answered HTTP {status}")
        if status == 200:
            raise self.fail("the server ignores byte ranges (answered 200 to a Range request): it cannot "
                            "serve a store to stream")
        if status in (412, 416):
            raise self.changed(f"HTTP {status} to a range inside the object")
        what = {404: "no such object", 401: "access denied", 403: "access denied"}.get(status, "refused")
        raise self.fail(f"{what} (HTTP {status})")

    def _version(self, resp: urllib3.BaseHTTPResponse) -> tuple[Version, tuple[int, int, int] | None]:
        span = parse_content_range(resp.headers.get("Content-Range"))
        version = Version(span[2] if span else -1, resp.headers.get("ETag"), resp.headers.get("Last-Modified"))
        return version, span

    def _stat(self, deadline: float) -> Version:
        resp = self._request(0, 0)
        try:
            version, span = self._version(resp)
            if span is None:
                raise self.fail("the server's answer to a Range request has no usable Content-Range")
            resp.read()
        except urllib3.exceptions.HTTPError as exc:
            raise Transient(_reason(exc)) from None
        finally:
            resp.release_conn()
        return version

    def _get(self, offset: int, size: int, sinks: Sequence[memoryview], deadline: float) -> None:
        last = offset + size - 1
        resp = self._request(offset, last)
        ok = False
        try:
            version, span = self._version(resp)
            self.validate(version)
            if span is None or span[:2] != (offset, last):
                raise self.fail(f"the server sent bytes {span} for the range {offset}-{last}")
            self.fill(sinks, resp.readinto, deadline)
            ok = True
        except urllib3.exceptions.HTTPError as exc:
            raise Transient(_reason(exc)) from None
        except OSError as exc:
            raise Transient(f"{exc.__class__.__name__}: {exc}") from None
        finally:
            if ok:
                resp.release_conn()
            else:  # a half-read response: its connection cannot be reused
                resp.close()
                resp.release_conn()


def _reason(exc: BaseException) -> str:
    """A short description of a urllib3 failure (no host, no headers)."""
    inner = getattr(exc, "reason", None) or (exc.args[1] if len(exc.args) > 1 else None)
    name = exc.__class__.__name__
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError) or "timed out" in str(exc).lower():
        return "the server sent nothing within STREAMNN_REMOTE_TIMEOUT (stalled)"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return f"connection failed ({inner.__class__.__name__ if isinstance(inner, BaseException) else name})"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return "cannot connect to the server"
    return f"connection failed ({name})"
