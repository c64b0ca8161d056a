"""The S3 backend of :class:`~.objects.RemoteObject`: ranged ``GetObject`` calls with botocore.

Credentials, region and endpoint come from botocore's standard chain only: the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ...), ``~/.aws/config`` and
``~/.aws/credentials``, instance roles. streamnn never prints them, never puts them in a message
(botocore's own messages, which name the endpoint, are replaced by ours) and never writes them
anywhere: only the ``s3://bucket/key`` URL is kept. botocore's retries are off: the shared
policy of :mod:`.objects` retries. Each request carries ``If-Match`` with the ETag seen at open,
and the response's validators are checked too.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from streamnn.data.remote.objects import Policy, RemoteObject, Transient, Version, parse_content_range
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


class S3Object(RemoteObject):
    """An object ``s3://bucket/key``."""

    def __init__(self, url: str, policy: Policy | None = None) -> None:
        if botocore is None:
            raise need_extra(url, "botocore")
        bucket, _, key = url[5:].partition("/")
        if not bucket or not key:
            raise StreamnnError("an S3 URL must be s3://BUCKET/KEY", url)
        self.bucket, self.key = bucket, key
        self._client: Any = None
        self._pid = -1
        super().__init__(url, policy)

    def _s3(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            t = self.policy.timeout
            config = botocore.config.Config(max_pool_connections=self.policy.threads, connect_timeout=t,
                                            read_timeout=t, retries={"total_max_attempts": 1})
            try:
                self._client = botocore.session.get_session().create_client("s3", config=config)
            except botocore.exceptions.BotoCoreError as exc:
                raise self.fail(f"cannot set up the S3 client from the AWS configuration "
                                f"({exc.__class__.__name__})") from None
            self._pid = os.getpid()
        return self._client

    def _call(self, name: str, **kwargs: Any) -> dict[str, Any]:
        try:
            return getattr(self._s3(), name)(Bucket=self.bucket, Key=self.key, **kwargs)
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
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise Transient(f"connection failed ({exc.__class__.__name__})") from None

    @staticmethod
    def _modified(value: Any) -> str | None:
        return None if value is None else str(value)

    def _stat(self, deadline: float) -> Version:
        head = self._call("head_object")
        return Version(int(head["ContentLength"]), head.get("ETag"), self._modified(head.get("LastModified")))

    def _get(self, offset: int, size: int, sinks: Sequence[memoryview], deadline: float) -> None:
        last = offset + size - 1
        extra = {"IfMatch": self.version.etag} if self.version.etag else {}
        resp = self._call("get_object", Range=f"bytes={offset}-{last}", **extra)
        body = resp["Body"]
        try:
            span = parse_content_range(resp.get("ContentRange"))
            self.validate(Version(span[2] if span else -1, resp.get("ETag"), self._modified(resp.get("LastModified"))))
            if span is None or span[:2] != (offset, last):
                raise self.fail(f"S3 sent bytes {span} for the range {offset}-{last}")

            def chunk(view: memoryview) -> int:
                data = body.read(len(view))
                view[:len(data)] = data
                return len(data)
            self.fill(sinks, chunk, deadline)
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise Transient(f"connection failed while reading ({exc.__class__.__name__})") from None
        except Exception as exc:
            if exc.__class__.__module__.startswith("urllib3"):
                raise Transient(f"connection failed while reading ({exc.__class__.__name__})") from None
            raise
        finally:
            body.close()

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None
