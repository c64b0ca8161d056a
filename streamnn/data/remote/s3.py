"""The S3 backend of :class:`~.objects.RemoteObject`: the HTTP backend's ranged GETs (:mod:`.web`:
urllib3's pooled connections, every answer checked, bodies read straight into the rows'
buffers), each signed with AWS Signature Version 4 by botocore's signer.

botocore gives the standard credential chain and the signer, nothing more: no botocore client
is made, so no service model is loaded before the first request, and a ranged GET costs about a
third of the CPU time it costs through a client. Credentials: the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ...), ``~/.aws/credentials`` and
``~/.aws/config``, instance roles; credentials that expire are refreshed by botocore (taken anew
for every request). Region: ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / the profile's, else
us-east-1; a bucket in another region is found from S3's answer (``x-amz-bucket-region``) and
asked again there. Endpoint: ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` or the profile's
``endpoint_url`` (an S3-compatible server: ``ENDPOINT/BUCKET/KEY``, path-style), else AWS
(``https://BUCKET.s3.REGION.amazonaws.com/KEY``; path-style for a bucket whose name has dots).
TLS: the bundle named by ``AWS_CA_BUNDLE`` (or ``ca_bundle`` in the profile), else the system's
CA certificates or ``SSL_CERT_FILE``, as for HTTP.

S3 answers one byte range per request (``multi`` is False: never asked for several); the open
asks for the first and the last bytes by two requests sent together (one round trip). Every
request for the object's bytes carries ``If-Match`` with the ETag seen at open. Answers: 5xx,
429 and S3's ``SlowDown`` are retried by the shared policy; 412 is a changed object; 404 no such
object; 403 access denied, with S3's error code (``SignatureDoesNotMatch``,
``RequestTimeTooSkewed``, ...) read from the small XML body. streamnn never prints, logs or
writes the credentials or the signed headers (botocore's signer logs the canonical request at
DEBUG level: those records are dropped); messages name the ``s3://`` URL only, never the endpoint.
"""
from __future__ import annotations

import dataclasses
import email.utils
import functools
import hashlib
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote, urlsplit

from streamnn.data.remote.objects import HEAD_BYTES, TAIL_BYTES, Policy, RemoteObject, Transient, Version
from streamnn.data.remote.web import HttpObject, need_extra, pool_manager
from streamnn.errors import StreamnnError

try:
    import botocore.auth
    import botocore.awsrequest
    import botocore.exceptions
    import botocore.session
    import urllib3
except ImportError:  # pragma: no cover - the optional extra
    botocore = None

#: Requests in flight for S3 unless ``STREAMNN_REMOTE_THREADS`` says otherwise: S3 answers one
#: byte range per request, so a shuffled epoch is one request per row, at most threads / round
#: trip rows per second (docs/remote.md, "Speed": at 60 ms, 64 doubles 32's rows/s; 128 adds
#: nothing on 2 cores).
S3_THREADS = 64
#: S3's error codes worth a retry, whatever the status.
TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
                   "ThrottlingException"}
#: What an error code tells the user to do.
HINTS = {"SignatureDoesNotMatch": "the secret key does not match the access key",
         "InvalidAccessKeyId": "the access key is not known to this server",
         "RequestTimeTooSkewed": "this machine's clock is off: set it right (NTP)",
         "ExpiredToken": "the session token expired", "InvalidToken": "the session token is not valid",
         "PermanentRedirect": "the bucket is in another region: set AWS_REGION",
         "AuthorizationHeaderMalformed": "the bucket is in another region: set AWS_REGION"}
#: Bytes of an error answer read for its code (S3's are a few hundred bytes of XML).
ERROR_BYTES = 8192
_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")
#: A bucket name S3 serves as a host name (virtual-hosted style): no dots, no capitals.
_VIRTUAL = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class _NoSigningLog(logging.Filter):
    """botocore's signer logs the canonical request and the string it signs at DEBUG level: the
    session token and the signed headers are in them. Those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


if botocore is not None:
    logging.getLogger("botocore.auth").addFilter(_NoSigningLog())


@dataclasses.dataclass(frozen=True)
class Account:
    """Where and as whom the process reads S3, from the AWS configuration."""

    credentials: Any  # botocore's credentials: ``get_frozen_credentials()`` refreshes expiring ones
    region: str
    endpoint: str  # an S3-compatible server's URL, "" for AWS
    ca_bundle: str  # "" for the system's (or SSL_CERT_FILE's) CA certificates


_ACCOUNTS: dict[tuple[int, str], Account] = {}
_ACCOUNTS_LOCK = threading.Lock()
#: Regions of buckets that S3 said are elsewhere than the configured region.
_REGIONS: dict[str, str] = {}


def account(url: str) -> Account:
    """The process's :class:`Account` for the ``AWS_*`` environment (made on first use)."""
    settings = hashlib.sha256(repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))).encode())
    key = (os.getpid(), settings.hexdigest())  # another setting: another account
    with _ACCOUNTS_LOCK:
        made = _ACCOUNTS.get(key)
        if made is None:
            if any(k[0] != key[0] for k in _ACCOUNTS):  # inherited through a fork: not ours
                _ACCOUNTS.clear()
            made = _ACCOUNTS[key] = _configured(url)
        return made


def _configured(url: str) -> Account:
    try:
        session = botocore.session.get_session()
        credentials = session.get_credentials()
        region = session.get_config_variable("region") or "us-east-1"
        endpoint = "" if session.get_config_variable("ignore_configured_endpoint_urls") else _endpoint(session)
        ca_bundle = session.get_config_variable("ca_bundle") or ""
    except botocore.exceptions.BotoCoreError as exc:
        raise StreamnnError(f"cannot set up S3 access from the AWS configuration ({exc.__class__.__name__})",
                            url) from None
    if credentials is None:
        raise StreamnnError("no S3 credentials found (set them in the environment or ~/.aws/credentials)", url)
    if not _REGION.fullmatch(region):
        raise StreamnnError(f"the AWS region {region!r} is not a region name (AWS_REGION)", url)
    parts = urlsplit(endpoint)
    if endpoint and (parts.scheme not in ("http", "https") or not parts.hostname):
        raise StreamnnError("the configured S3 endpoint (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or endpoint_url) "
                            "is not an http:// or https:// URL", url)
    return Account(credentials, region, endpoint.rstrip("/"), ca_bundle)


def _endpoint(session: Any) -> str:
    """The S3 endpoint configured: the environment's, else the profile's ("": AWS)."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name, "").strip():
            return os.environ[name].strip()
    config = session.get_scoped_config()
    services = session.full_config.get("services", {}).get(config.get("services", ""), {})
    return str(services.get("s3", {}).get("endpoint_url") or config.get("endpoint_url") or "").strip()


def locate(bucket: str, key: str, region: str, endpoint: str) -> tuple[str, str]:
    """The origin (``scheme://host[:port]``) and the path (URI-encoded as SigV4 signs it) of
    ``key`` in ``bucket``: path-style on an S3-compatible ``endpoint``; on AWS, virtual-hosted
    where the bucket's name can be a host name, else path-style."""
    path = quote(key, safe="/~")
    if endpoint:
        parts = urlsplit(endpoint)
        return f"{parts.scheme}://{parts.netloc}", f"{parts.path}/{quote(bucket, safe='')}/{path}"
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    if _VIRTUAL.fullmatch(bucket):
        return f"https://{bucket}.s3.{region}.{domain}", f"/{path}"
    return f"https://s3.{region}.{domain}", f"/{quote(bucket, safe='')}/{path}"


def s3_policy() -> Policy:
    """The policy from the environment, with ``S3_THREADS`` requests in flight unless
    ``STREAMNN_REMOTE_THREADS`` is set."""
    policy = Policy.from_env()
    if not os.environ.get("STREAMNN_REMOTE_THREADS", "").strip():
        policy = dataclasses.replace(policy, threads=S3_THREADS)
    return policy


@functools.lru_cache(maxsize=256)
def _as_botocore(modified: str | None) -> str | None:
    """Last-Modified as botocore's client gave it (``2024-01-01 00:00:00+00:00``): the local
    cache's keys made before stay valid."""
    if modified is None:
        return None
    try:
        return str(email.utils.parsedate_to_datetime(modified))
    except (TypeError, ValueError):
        return modified


class S3Object(HttpObject):
    """An object ``s3://bucket/key``."""

    multi = False  # one byte range per request
    if_match = True
    ca_variable = "AWS_CA_BUNDLE"

    def __init__(self, url: str, policy: Policy | None = None, reuse: bool = False) -> None:
        if botocore is None:
            raise need_extra(url, "botocore and urllib3")
        bucket, _, key = url[5:].partition("/")
        if not bucket or not key:
            raise StreamnnError("an S3 URL must be s3://BUCKET/KEY", url)
        self.bucket, self.key = bucket, key
        self.account = account(url)
        self._where: tuple[str, str, str] = ("", "", "")  # region, origin, path
        RemoteObject.__init__(self, url, policy or s3_policy(), reuse)

    def _located(self) -> tuple[str, str, str]:
        region = _REGIONS.get(self.bucket, self.account.region)
        if self._where[0] != region:
            self._where = (region, *locate(self.bucket, self.key, region, self.account.endpoint))
        return self._where

    def _send(self, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        """The GET signed for the bucket's region (S3's answer names another: signed again for it)."""
        for moved in (False, True):
            region, origin, path = self._located()
            request = botocore.awsrequest.AWSRequest("GET", origin + path, headers=headers)
            try:
                credentials = self.account.credentials.get_frozen_credentials()
            except botocore.exceptions.BotoCoreError as exc:
                raise Transient(f"cannot refresh the S3 credentials ({exc.__class__.__name__})") from None
            botocore.auth.S3SigV4Auth(credentials, "s3", region).add_auth(request)
            pool = pool_manager(self.policy, self.account.ca_bundle).connection_from_url(origin)
            resp = pool.urlopen("GET", path, headers=dict(request.headers.items()), preload_content=False,
                                redirect=False, retries=False, assert_same_host=False)
            there = resp.headers.get("x-amz-bucket-region", "")
            if moved or resp.status not in (301, 307, 400) or there == region or not _REGION.fullmatch(there):
                return resp
            resp.drain_conn()
            resp.release_conn()
            _REGIONS[self.bucket] = there
        raise AssertionError("unreachable")

    def _error_code(self, resp: urllib3.BaseHTTPResponse) -> str:
        body = b""
        if resp.status != 200:
            try:
                body = resp.read(ERROR_BYTES)
            except (urllib3.exceptions.HTTPError, OSError):
                pass
        super()._error_code(resp)
        found = _CODE.search(body)
        return found.group(1).decode() if found else ""

    def _refused(self, status: int, code: str) -> Exception:
        said = f"S3 {code}, HTTP {status}" if code else f"HTTP {status}"
        hint = f": {HINTS[code]}" if code in HINTS else ""
        if code in TRANSIENT_CODES or status in (408, 429) or status >= 500:
            return Transient(f"the server answered {said}")
        if code == "PreconditionFailed" or status in (412, 416):
            return self.changed(f"{said} to a range inside the object")
        if status == 404 or code in ("NoSuchKey", "NoSuchBucket"):
            return self.fail(f"{'no such bucket' if code == 'NoSuchBucket' else 'no such object'} ({said})")
        if status in (401, 403):
            return self.fail(f"access denied ({said}){hint}")
        if status == 200:
            return super()._refused(status, code)
        return self.fail(f"S3 refused the request ({said}){hint}")

    def _version(self, resp: urllib3.BaseHTTPResponse) -> tuple[Version, tuple[int, int, int] | None]:
        version, span = super()._version(resp)
        return version._replace(modified=_as_botocore(version.modified)), span

    def _open(self, deadline: float) -> tuple[Version, bytes, tuple[int, bytes] | None]:
        """The first ``HEAD_BYTES`` and, by a second request sent at the same time (S3 answers
        one range per request), the last ``TAIL_BYTES``: one round trip."""
        with ThreadPoolExecutor(1) as pool:
            last = pool.submit(self._read_span, f"-{TAIL_BYTES}", deadline)
            version, span, head = self._head(deadline)
            got, tail_span, tail = last.result()
        if got != version:  # replaced between the two answers: open again
            raise Transient("the object changed while it was opened")
        return version, head, (tail_span[0], tail) if tail_span[1] == span[2] - 1 else None
