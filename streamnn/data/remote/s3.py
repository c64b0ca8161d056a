"""The S3 backend of :class:`~.objects.RemoteObject`: ranged ``GetObject`` calls with botocore.

Credentials, region and endpoint come from botocore's standard chain only: the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ...), ``~/.aws/config`` and
``~/.aws/credentials``, instance roles. streamnn never prints them, never puts them in a message
(botocore's own messages, which name the endpoint, are replaced by ours) and never writes them
anywhere: only the ``s3://bucket/key`` URL is kept. botocore's retries are off: the shared
policy of :mod:`.objects` retries. Each request carries ``If-Match`` with the ETag seen at open,
and the response's validators are checked too. One client per process (and policy), shared by
the objects it opens; TLS certificates are botocore's (``AWS_CA_BUNDLE`` names another bundle).
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from streamnn.data.remote.cache import FILL_THREADS
from streamnn.data.remote.objects import HEAD_BYTES, TAIL_BYTES, Policy, RemoteObject, Transient, Version, parse_content_range
from streamnn.data.remote.web import need_extra
from streamnn.errors import StreamnnError

try:
    import botocore.config
    import botocore.exceptions
    import botocore.session
except ImportError:  # pragma: no cover - the optional extra
    botocore = None

TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed",
                   "Throttling", "ThrottlingException"}
CHANGED_CODES = {"PreconditionFailed", "412", "InvalidRange", "416"}
_CLIENTS: dict[tuple[int, float, int, str], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def client(policy: Policy, url: str) -> Any:
    """The process's S3 client for ``policy``'s timeout and connections and the ``AWS_*``
    environment (made on first use)."""
    settings = hashlib.sha256(repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))).encode())
    key = (os.getpid(), policy.timeout, policy.threads, settings.hexdigest())  # a new setting: a new client
    with _CLIENTS_LOCK:
        made = _CLIENTS.get(key)
        if made is None:
            if any(k[0] != key[0] for k in _CLIENTS):  # inherited through a fork: not ours
                _CLIENTS.clear()
            t = policy.timeout
            config = botocore.config.Config(max_pool_connections=policy.threads + FILL_THREADS, connect_timeout=t,
                                            read_timeout=t, retries={"total_max_attempts": 1})
            try:
                made = _CLIENTS[key] = botocore.session.get_session().create_client("s3", config=config)
            except botocore.exceptions.BotoCoreError as exc:
                raise StreamnnError(f"cannot set up the S3 client from the AWS configuration "
                                    f"({exc.__class__.__name__})", url) from None
        return made


class S3Object(RemoteObject):
    """An object ``s3://bucket/key``."""

    def __init__(self, url: str, policy: Policy | None = None, reuse: bool = False) -> None:
        if botocore is None:
            raise need_extra(url, "botocore")
        bucket, _, key = url[5:].partition("/")
        if not bucket or not key:
            raise StreamnnError("an S3 URL must be s3://BUCKET/KEY", url)
        self.bucket, self.key = bucket, key
        super().__init__(url, policy, reuse)

    def _call(self, name: str, **kwargs: Any) -> dict[str, Any]:
        try:
            return getattr(client(self.policy, self.url), name)(Bucket=self.bucket, Key=self.key, **kwargs)
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in TRANSIENT_CODES or status >= 500 or status == 429:
                raise Transient(f"S3 answered {code or status}") from None
            if code in CHANGED_CODES:
                raise self.changed(f"S3 answered {code}") from None
            if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
                raise self.fail(f"no such object (S3 {code})") from None
            raise self.fail(f"S3 refused the request ({code or status})") from None
        except botocore.exceptions.NoCredentialsError:
            raise self.fail("no S3 credentials found (set them in the environment or ~/.aws/credentials)") from None
        except botocore.exceptions.SSLError:
            raise self.fail("the server's TLS certificate does not verify: trust its CA with "
                            "AWS_CA_BUNDLE=CA.pem") from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise Transient(f"connection failed ({exc.__class__.__name__})") from None

    @staticmethod
    def _modified(value: Any) -> str | None:
        return None if value is None else str(value)

    def _open(self, deadline: float) -> tuple[Version, bytes, tuple[int, bytes] | None]:
        """The first ``HEAD_BYTES`` and, by a second request sent at the same time (S3 answers
        one range per request), the last ``TAIL_BYTES``: one round trip."""
        with ThreadPoolExecutor(1) as pool:
            last = pool.submit(self._range, f"bytes=-{TAIL_BYTES}", deadline)
            version, span, head = self._range(f"bytes=0-{HEAD_BYTES - 1}", deadline)
            if span[0] != 0 or span[1] != min(HEAD_BYTES, span[2]) - 1:
                raise self.fail(f"S3 sent bytes {span} for the range 0-{HEAD_BYTES - 1}")
            got, tail_span, tail = last.result()
        if got != version:  # replaced between the two answers: open again
            raise Transient("the object changed while it was opened")
        return version, head, (tail_span[0], tail) if tail_span[1] == span[2] - 1 else None

    def _range(self, spec: str, deadline: float) -> tuple[Version, tuple[int, int, int], bytes]:
        resp = self._call("get_object", Range=spec)
        span = parse_content_range(resp.get("ContentRange"))
        if span is None:
            resp["Body"].close()
            raise self.fail(f"S3 sent no Content-Range for the range {spec[6:]}")
        data = memoryview(bytearray(span[1] - span[0] + 1))
        self._body(resp, [data], deadline)
        return Version(span[2], resp.get("ETag"), self._modified(resp.get("LastModified"))), span, bytes(data)

    def _get(self, offset: int, size: int, sinks: Sequence[memoryview], deadline: float) -> None:
        last = offset + size - 1
        extra = {"IfMatch": self.version.etag} if self.version.etag else {}
        resp = self._call("get_object", Range=f"bytes={offset}-{last}", **extra)
        span = parse_content_range(resp.get("ContentRange"))
        try:
            self.validate(Version(span[2] if span else -1, resp.get("ETag"), self._modified(resp.get("LastModified"))))
            if span is None or span[:2] != (offset, last):
                raise self.fail(f"S3 sent bytes {span} for the range {offset}-{last}")
        except BaseException:
            resp["Body"].close()
            raise
        self._body(resp, sinks, deadline)

    def _body(self, resp: dict[str, Any], sinks: Sequence[memoryview], deadline: float) -> None:
        """Read a response's body into ``sinks`` (closed at the end)."""
        body = resp["Body"]

        def chunk(view: memoryview) -> int:
            data = body.read(len(view))
            view[:len(data)] = data
            return len(data)
        try:
            self.fill(sinks, chunk, deadline)
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise Transient(f"connection failed while reading ({exc.__class__.__name__})") from None
        except Exception as exc:
            if exc.__class__.__module__.startswith("urllib3"):
                raise Transient(f"connection failed while reading ({exc.__class__.__name__})") from None
            raise
        finally:
            body.close()

