"""The HTTP(S) backend of :class:`~.objects.RemoteObject`: ranged GETs with urllib3.

Why urllib3 rather than fsspec's HTTP filesystem: each ranged GET must be checked against the
object's version (ETag, Last-Modified, size from ``Content-Range``) before its body lands in the
loader's buffers, retried under one policy, and read straight into the rows' buffers; urllib3
gives exactly that (a thread-safe connection pool, ``readinto``, per-request timeouts), where
fsspec returns bytes without the response's headers and retries by its own rules. One pool of
``policy.threads`` kept-alive connections per server and process, shared by every object the
process opens (the loader's reader reuses the connections its store was opened with; created
lazily: never shared across a fork). Credentials in the URL (``user:password@``) are refused:
they would end up in run folders. ``https://`` certificates are verified against the system's
CA certificates, or the bundle named by ``SSL_CERT_FILE`` (``SSL_CERT_DIR``); a certificate that
does not verify is a one-line error at once, not retried. The S3 backend (:mod:`.s3`) is this
class with each request signed and S3's answers read (:meth:`HttpObject._send`,
:meth:`HttpObject._error_code`, :meth:`HttpObject._refused`).
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

from streamnn.data.remote.cache import FILL_THREADS
from streamnn.data.remote.objects import (HEAD_BYTES, TAIL_BYTES, NoMultiRange, Policy, Range, RemoteObject, Transient,
                                          Version, parse_content_range)
from streamnn.errors import StreamnnError

try:
    import urllib3
except ImportError:  # pragma: no cover - the optional extra
    urllib3 = None


def need_extra(url: str, module: str) -> StreamnnError:
    return StreamnnError(f"reading a store from a URL needs {module}: pip install 'streamnn[remote]'", url)


_POOLS: dict[tuple[int, float, int, str, str, str], urllib3.PoolManager] = {}
_POOLS_LOCK = threading.Lock()


def pool_manager(policy: Policy, ca_certs: str = "") -> urllib3.PoolManager:
    """The process's pool manager for ``policy``'s timeout and connections and the certificates
    trusted (made on first use: another ``SSL_CERT_FILE``, or CA bundle ``ca_certs``, makes new
    connections)."""
    key = (os.getpid(), policy.timeout, policy.threads, os.environ.get("SSL_CERT_FILE", ""),
           os.environ.get("SSL_CERT_DIR", ""), ca_certs)
    with _POOLS_LOCK:
        manager = _POOLS.get(key)
        if manager is None:
            if any(k[0] != key[0] for k in _POOLS):  # inherited through a fork: not ours
                _POOLS.clear()
            t = policy.timeout
            trust = {"ca_certs": ca_certs} if ca_certs else {}
            manager = _POOLS[key] = urllib3.PoolManager(num_pools=8, maxsize=policy.threads + FILL_THREADS, block=False,
                                                        retries=False, timeout=urllib3.Timeout(connect=t, read=t), **trust)
        return manager


class HttpObject(RemoteObject):
    """An object on an HTTP(S) server that honours ``Range`` (nginx, S3's HTTPS endpoint, ...)."""

    def __init__(self, url: str, policy: Policy | None = None, reuse: bool = False) -> None:
        if urllib3 is None:
            raise need_extra(url, "urllib3")
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            raise StreamnnError("credentials in a URL are not accepted (they would be written into run "
                                "folders); serve the store without them or use s3:// with the standard "
                                "AWS credentials", f"{parts.scheme}://{parts.hostname}{parts.path}")
        if not parts.hostname:
            raise StreamnnError("not a valid URL (no host)", url)
        super().__init__(url, policy, reuse)

    #: The variable that names the CA bundle to trust (said when a certificate does not verify).
    ca_variable = "SSL_CERT_FILE"
    #: Whether requests for the object's bytes carry ``If-Match`` with the ETag seen at open.
    if_match = False

    def _send(self, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        """One GET of the object with ``headers``, its body not read (raises urllib3's errors)."""
        return pool_manager(self.policy).request("GET", self.url, preload_content=False, redirect=False, headers=headers)

    def _request(self, spans: str, many: bool = False, whole: int = 0, match: bool = False) -> urllib3.BaseHTTPResponse:
        """The answer (206) to a GET of the byte ranges ``spans`` ("a-b,c-d"); another status is
        raised as what it means (``many``: a 200 is :class:`NoMultiRange`, unless the whole
        object follows and is at most ``whole`` bytes: then that answer; ``match``: with
        ``If-Match`` where the backend sends it)."""
        headers = {"Range": f"bytes={spans}", "Accept-Encoding": "identity"}
        if match and self.if_match and self.version.etag:
            headers["If-Match"] = self.version.etag
        try:
            resp = self._send(headers)
        except urllib3.exceptions.SSLError as exc:
            raise self.fail(_tls_reason(exc, self.ca_variable)) from None
        except urllib3.exceptions.HTTPError as exc:
            raise Transient(_reason(exc)) from None
        status = resp.status
        if status == 206 or (status == 200 and many and 0 < int(resp.headers.get("Content-Length") or 0) <= whole):
            return resp
        code = self._error_code(resp)
        if many and status in (200, 416):  # the whole object, or several ranges refused
            raise NoMultiRange
        raise self._refused(status, code)

    def _error_code(self, resp: urllib3.BaseHTTPResponse) -> str:
        """Drop an answer that is not the bytes asked for (a 200's whole object unread: its
        connection is closed) and say what its body names as the error ("": nothing)."""
        if resp.status == 200:
            resp.close()
        else:
            resp.drain_conn()
        resp.release_conn()
        return ""

    def _refused(self, status: int, code: str) -> Exception:
        """What an answer with ``status`` (not 206) means: :class:`Transient`, or a one-line error."""
        if status in (408, 429) or status >= 500:
            return Transient(f"the server answered HTTP {status}")
        if status == 200:
            return self.fail("the server ignores byte ranges (answered 200 to a Range request): it cannot "
                             "serve a store to stream")
        if status in (412, 416):
            return self.changed(f"HTTP {status} to a range inside the object")
        what = {404: "no such object", 401: "access denied", 403: "access denied"}.get(status, "refused")
        return self.fail(f"{what} (HTTP {status})")

    #: Not known until a request for several ranges was answered (see :meth:`_get_many`).
    multi: bool | None = None

    def _get_many(self, ranges: Sequence[Range], deadline: float) -> None:
        """One GET of several ranges, answered as ``multipart/byteranges`` (nginx, Apache, ...)
        or as one range covering them; a server that answers otherwise (the whole object, with
        200) is asked one range at a time from then on (:class:`NoMultiRange`)."""
        spans: list[list[int]] = []
        for a, b in sorted((o, o + sum(len(s) for s in sinks) - 1) for o, sinks in ranges):
            if spans and a <= spans[-1][1] + 1:  # overlapping or adjacent: one range
                spans[-1][1] = max(spans[-1][1], b)
            else:
                spans.append([a, b])
        resp = self._request(",".join(f"{a}-{b}" for a, b in spans), many=True)
        try:
            kind = resp.headers.get("Content-Type", "")
            etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
            if kind.lower().startswith("multipart/byteranges"):
                boundary = kind.split("boundary=", 1)[-1].strip().strip('"').encode()
                self.validate(Version(self.version.size, etag, modified))
                parts = _parts(resp.read(), boundary)
            else:
                version, span = self._version(resp)
                self.validate(version)
                parts = [(*span, memoryview(resp.read()))] if span else []
            self.check_deadline(deadline)
            for a, b, total, data in parts:
                if total != self.version.size:
                    raise self.changed(f"its size changed from {self.version.size} to {total} bytes")
                if b - a + 1 != len(data):
                    raise Transient("the response ended early (connection closed)")
            for offset, sinks in ranges:
                where = next((p for p in parts if p[0] <= offset and offset + sum(len(s) for s in sinks) - 1 <= p[1]), None)
                if where is None:
                    raise NoMultiRange
                at = offset - where[0]
                for sink in sinks:
                    sink[:] = where[3][at:at + len(sink)]
                    at += len(sink)
        except urllib3.exceptions.HTTPError as exc:
            resp.close()
            raise Transient(_reason(exc)) from None
        except BaseException:
            resp.close()
            raise
        finally:
            resp.release_conn()

    def _version(self, resp: urllib3.BaseHTTPResponse) -> tuple[Version, tuple[int, int, int] | None]:
        span = parse_content_range(resp.headers.get("Content-Range"))
        version = Version(span[2] if span else -1, resp.headers.get("ETag"), resp.headers.get("Last-Modified"))
        return version, span

    def _open(self, deadline: float) -> tuple[Version, bytes, tuple[int, bytes] | None]:
        if self.multi is not False:
            try:
                return self._open_many(deadline)
            except NoMultiRange:
                self.multi = False
        version, _, head = self._head(deadline)
        return version, head, None

    def _head(self, deadline: float) -> tuple[Version, tuple[int, int, int], bytes]:
        """The object's first ``HEAD_BYTES`` by one ranged GET: its version, span and bytes."""
        version, span, head = self._read_span(f"0-{HEAD_BYTES - 1}", deadline)
        if span[0] != 0 or span[1] != min(HEAD_BYTES, span[2]) - 1:
            raise self.fail(f"the server sent bytes {span} for the range 0-{HEAD_BYTES - 1}")
        return version, span, head

    def _read_span(self, spans: str, deadline: float) -> tuple[Version, tuple[int, int, int], bytes]:
        """One byte range (``a-b``, or ``-n``: the last n bytes) read whole: the answer's version,
        its ``Content-Range`` and the bytes."""
        resp = self._request(spans)
        with _reading(resp):
            version, span = self._version(resp)
            if span is None:
                raise self.fail("the server's answer to a Range request has no usable Content-Range")
            data = memoryview(bytearray(span[1] - span[0] + 1))
            self.fill([data], resp.readinto, deadline)
        return version, span, bytes(data)

    def _open_many(self, deadline: float) -> tuple[Version, bytes, tuple[int, bytes] | None]:
        """The first ``HEAD_BYTES`` and the last ``TAIL_BYTES`` in one request (where the store's
        labels, paths and statistics usually are); :class:`NoMultiRange` if the server will not."""
        resp = self._request(f"0-{HEAD_BYTES - 1},-{TAIL_BYTES}", many=True, whole=HEAD_BYTES + TAIL_BYTES)
        try:
            kind = resp.headers.get("Content-Type", "")
            etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
            if resp.status == 200:  # a small object, sent whole
                data = resp.read()
                parts = [(0, len(data) - 1, len(data), memoryview(data))]
            elif kind.lower().startswith("multipart/byteranges"):
                parts = _parts(resp.read(), kind.split("boundary=", 1)[-1].strip().strip('"').encode())
                self.multi = True
            else:  # one range: covering both (several ranges answered), or the first alone (not)
                version, span = self._version(resp)
                parts = [(*span, memoryview(resp.read()))] if span else []
                self.multi = None if not span or span[1] != span[2] - 1 else True
            self.check_deadline(deadline)
        except urllib3.exceptions.HTTPError as exc:
            resp.close()
            raise Transient(_reason(exc)) from None
        finally:
            resp.release_conn()
        if not parts or any(b - a + 1 != len(data) for a, b, _, data in parts):
            raise Transient("the response ended early (connection closed)")
        total = parts[0][2]
        head = next((p[3] for p in parts if p[0] == 0 and p[1] + 1 >= min(HEAD_BYTES, total)), None)
        tail = next(((p[0], bytes(p[3])) for p in parts if p[1] == total - 1), None)
        if head is None or any(p[2] != total for p in parts):
            raise NoMultiRange
        return Version(total, etag, modified), bytes(head[:HEAD_BYTES]), tail

    def _get(self, offset: int, size: int, sinks: Sequence[memoryview], deadline: float) -> None:
        last = offset + size - 1
        resp = self._request(f"{offset}-{last}", match=True)
        with _reading(resp):
            version, span = self._version(resp)
            self.validate(version)
            if span is None or span[:2] != (offset, last):
                raise self.fail(f"the server sent bytes {span} for the range {offset}-{last}")
            self.fill(sinks, resp.readinto, deadline)


@contextlib.contextmanager
def _reading(resp: urllib3.BaseHTTPResponse) -> Iterator[None]:
    """Reading a response's body: a failed connection is :class:`Transient`; afterwards the
    connection goes back to the pool, closed first unless the body was read whole."""
    whole = False
    try:
        yield
        whole = True
    except urllib3.exceptions.HTTPError as exc:
        raise Transient(_reason(exc)) from None
    except OSError as exc:
        raise Transient(f"{exc.__class__.__name__}: {exc}") from None
    finally:
        if not whole:  # a half-read response: its connection cannot be reused
            resp.close()
        resp.release_conn()


def _parts(body: bytes, boundary: bytes) -> list[tuple[int, int, int, memoryview]]:
    """The parts of a ``multipart/byteranges`` body: (first byte, last byte, total, bytes)."""
    view, out, pos = memoryview(body), [], 0
    mark = b"--" + boundary
    while True:
        at = body.find(mark, pos)
        if at < 0 or body[at + len(mark):at + len(mark) + 2] == b"--":
            return out
        end = body.find(b"\r\n\r\n", at)
        if end < 0:
            raise Transient("a multipart answer is cut short")
        span = None
        for line in body[at:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-range":
                span = parse_content_range(value.strip().decode("latin-1"))
        if span is None:
            raise Transient("a part of a multipart answer has no Content-Range")
        start = end + 4
        out.append((*span, view[start:start + span[1] - span[0] + 1]))
        pos = start + span[1] - span[0] + 1


def _tls_reason(exc: BaseException, variable: str = "SSL_CERT_FILE") -> str:
    """Why the TLS handshake failed, in one line (OpenSSL's verify message when there is one)."""
    text = " ".join(str(exc).split())
    for marker in ("certificate verify failed: ", "CERTIFICATE_VERIFY_FAILED"):
        if marker in text:
            detail = text.split(marker, 1)[1].split(" (_ssl")[0].strip(" ]()'\"")
            return (f"the server's TLS certificate does not verify ({detail or 'certificate verify failed'}): "
                    f"trust its CA with {variable}=CA.pem")
    return f"the TLS connection failed ({text[:120]})"


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
