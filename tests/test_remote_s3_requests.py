"""The S3 backend's requests, seen by a mock S3 endpoint on 127.0.0.1 (and nginx over HTTPS): signed
GETs of one byte range, path-style on a configured endpoint, ``If-Match`` on every read; S3's
error codes in one line; SlowDown retried; a bucket in another region asked there; refreshed
credentials; the endpoint, region and CA bundle taken from the AWS configuration; and no
credential or signed header in any message or log record."""
from __future__ import annotations

import contextlib
import datetime
import email.utils
import http.server
import logging
import os
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamnn import StreamnnError, open_store
from streamnn.data.remote import open_object, s3
from streamnn.data.remote.objects import HEAD_BYTES, TAIL_BYTES

from servers import answer_ranges
from test_remote_tls import https  # noqa: F401 - nginx over HTTPS with a CA made by the test

KEY, SECRET, TOKEN = "AKIDMOCKKEY", "mock/secret+KEY", "mock-session-token"
CONTENT = np.random.default_rng(3).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()


class S3Mock:
    """GetObject on ``/BUCKET/KEY`` (any path) for ``content``, one byte range per request, as S3
    answers it: 412 to an ``If-Match`` that is not the ETag; 400 with ``x-amz-bucket-region`` to
    a request signed for another region than ``region``; the errors queued in ``script`` (status,
    code) first, one per request. Every request's path and headers are kept in ``seen``."""

    def __init__(self, content: bytes, region: str = "us-east-1") -> None:
        self.content, self.etag, self.region = content, '"v1"', region
        self.script: list[tuple[int, str]] = []
        self.seen: list[tuple[str, dict[str, str]]] = []
        lock, outer = threading.Lock(), self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def error(self, status: int, code: str, headers: dict[str, str] | None = None) -> None:
                body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>m</Message>'
                        f'<RequestId>1</RequestId></Error>').encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/xml", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                with lock:
                    outer.seen.append((self.path, dict(self.headers)))
                    step = outer.script.pop(0) if outer.script else None
                    etag = outer.etag
                if f"/{outer.region}/s3/aws4_request" not in self.headers.get("Authorization", ""):
                    return self.error(400, "AuthorizationHeaderMalformed", {"x-amz-bucket-region": outer.region})
                if step:
                    return self.error(*step)
                if self.headers.get("If-Match", etag) != etag:
                    return self.error(412, "PreconditionFailed")
                with contextlib.suppress(OSError):
                    self.wfile.write(b"".join(answer_ranges(self, outer.content, etag, multi=False)))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mock(monkeypatch):
    server = S3Mock(CONTENT)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN,
                        "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": server.endpoint, "AWS_CONFIG_FILE": "/dev/null",
                        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true",
                        "STREAMNN_REMOTE_TIMEOUT": "2", "STREAMNN_REMOTE_DEADLINE": "5", "STREAMNN_REMOTE_THREADS": "4"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("streamnn.data.remote.objects.REUSE_SECONDS", 0.0)  # every open asks the server
    monkeypatch.setattr(s3, "_REGIONS", {})
    yield server
    server.close()


def read(obj, offset: int, size: int) -> bytes:
    buf = bytearray(size)
    obj.read_into(offset, [buf])
    return bytes(buf)


def test_gets_are_signed_one_range_each_path_style_with_if_match(mock):
    obj = open_object("s3://bkt/a dir/caf\u00e9 +~x.h5")
    assert obj.multi is False and obj.head == CONTENT[:HEAD_BYTES] and obj.tail == (len(CONTENT) - TAIL_BYTES, CONTENT[-TAIL_BYTES:])
    assert sorted(h["Range"] for _, h in mock.seen) == [f"bytes=-{TAIL_BYTES}", f"bytes=0-{HEAD_BYTES - 1}"]
    obj.read_many([(10, [memoryview(bytearray(5))]), (2 << 20, [memoryview(bytearray(7))])])
    assert read(obj, 1000, 3000) == CONTENT[1000:4000]
    assert len(mock.seen) == 5 and all("," not in h["Range"] for _, h in mock.seen)  # never several ranges
    for n, (path, headers) in enumerate(mock.seen):
        assert path == "/bkt/a%20dir/caf%C3%A9%20%2B~x.h5"
        assert headers["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={KEY}/")
        assert "/us-east-1/s3/aws4_request" in headers["Authorization"] and headers["X-Amz-Security-Token"] == TOKEN
        assert headers.get("If-Match") == (None if n < 2 else '"v1"')  # the reads carry the ETag seen at open


@pytest.mark.parametrize("status,code,says", [
    (403, "SignatureDoesNotMatch", r"access denied \(S3 SignatureDoesNotMatch, HTTP 403\): the secret key does not match"),
    (403, "RequestTimeTooSkewed", r"access denied \(S3 RequestTimeTooSkewed, HTTP 403\): this machine's clock is off"),
    (403, "AccessDenied", r"access denied \(S3 AccessDenied, HTTP 403\)$"),
    (404, "NoSuchBucket", r"no such bucket \(S3 NoSuchBucket, HTTP 404\)"),
    (404, "NoSuchKey", r"no such object \(S3 NoSuchKey, HTTP 404\)"),
    (400, "InvalidBucketName", r"S3 refused the request \(S3 InvalidBucketName, HTTP 400\)")])
def test_s3_errors_are_one_line_at_once_and_name_no_endpoint_or_credential(mock, status, code, says):
    mock.script = [(status, code)] * 2
    start = time.monotonic()
    with pytest.raises(StreamnnError, match=says) as info:
        open_object("s3://bkt/k.h5")
    assert time.monotonic() - start < 2 and len(mock.seen) == 2  # the two opening requests, no retry
    text = str(info.value)
    assert text.startswith("s3://bkt/k.h5: ") and "\n" not in text
    assert all(s not in text for s in ("127.0.0.1", KEY, SECRET, TOKEN, "AWS4", "Signature=", "Authorization"))


def test_slowdown_and_5xx_are_retried_then_one_line(mock, monkeypatch):
    obj = open_object("s3://bkt/k.h5")
    mock.script = [(503, "SlowDown"), (500, "InternalError")]
    assert read(obj, 5, 100) == CONTENT[5:105] and len(mock.seen) == 5
    monkeypatch.setenv("STREAMNN_REMOTE_ATTEMPTS", "2")
    obj = open_object("s3://bkt/k.h5")
    mock.script = [(503, "SlowDown")] * 2
    with pytest.raises(StreamnnError, match=r"cannot read bytes 5..104: the server answered S3 SlowDown, HTTP 503 "
                                            r"\(gave up after 2 attempt"):
        read(obj, 5, 100)


def test_an_object_replaced_since_open_is_a_412_and_a_one_line_error(mock):
    obj = open_object("s3://bkt/k.h5")
    mock.etag = '"v2"'  # the same bytes under another ETag: only If-Match can tell
    with pytest.raises(StreamnnError, match=r"changed on the server .*S3 PreconditionFailed, HTTP 412"):
        read(obj, 0, 10)


def test_a_bucket_in_another_region_is_asked_there_once_for_all(mock):
    mock.region = "eu-west-1"  # AWS_REGION says us-east-1
    obj = open_object("s3://bkt/k.h5")
    assert read(obj, 7, 9) == CONTENT[7:16] and s3._REGIONS == {"bkt": "eu-west-1"}
    regions = ["us-east-1" if "/us-east-1/" in h["Authorization"] else "eu-west-1" for _, h in mock.seen]
    assert regions.count("us-east-1") <= 2 and regions[-1] == "eu-west-1" and len(regions) <= 5
    open_object("s3://bkt/other.h5")  # the bucket's region is known: no request is turned away
    assert all("/eu-west-1/" in h["Authorization"] for _, h in mock.seen[len(regions):])


def test_expiring_credentials_are_refreshed_between_requests(mock, monkeypatch):
    from botocore.credentials import RefreshableCredentials

    def later(key: str, minutes: int) -> dict[str, str]:
        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=minutes)
        return {"access_key": key, "secret_key": SECRET, "token": TOKEN, "expiry_time": expiry.isoformat()}
    credentials = RefreshableCredentials.create_from_metadata(later("AKIDFIRST", 60), lambda: later("AKIDSECOND", 60), "test")
    obj = open_object("s3://bkt/k.h5")
    obj.account = s3.Account(credentials, "us-east-1", mock.endpoint, "")
    read(obj, 0, 10)
    credentials._expiry_time = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=1)  # expiring
    read(obj, 0, 10)
    used = [h["Authorization"].split("Credential=")[1].split("/")[0] for _, h in mock.seen[2:]]
    assert used == ["AKIDFIRST", "AKIDSECOND"]


def test_no_log_record_holds_a_credential_or_a_signature(mock, caplog):
    caplog.set_level(logging.DEBUG)
    obj = open_object("s3://bkt/k.h5")
    read(obj, 3, 30)
    mock.script = [(403, "AccessDenied")]
    with pytest.raises(StreamnnError):
        read(obj, 3, 30)
    signatures = [h["Authorization"].split("Signature=")[1] for _, h in mock.seen]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(s not in logged for s in (SECRET, TOKEN, "Signature=", "x-amz-security-token", *signatures))


def test_no_credentials_is_one_line(mock, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(StreamnnError, match=r"^s3://bkt/k.h5: no S3 credentials found \(set them in the environment"):
        open_object("s3://bkt/k.h5")
    assert mock.seen == []


def test_s3_keeps_more_requests_in_flight_than_http_unless_told(mock, monkeypatch):
    from streamnn.data.remote.objects import Policy
    monkeypatch.delenv("STREAMNN_REMOTE_THREADS")
    assert open_object("s3://bkt/k.h5").policy.threads == s3.S3_THREADS > Policy.from_env().threads
    monkeypatch.setenv("STREAMNN_REMOTE_THREADS", "5")
    assert open_object("s3://bkt/k.h5").policy.threads == 5


def test_the_endpoint_and_region_come_from_the_aws_configuration(mock, monkeypatch, tmp_path):
    assert s3.locate("my-bucket", "a b/\u00e9~.h5", "eu-west-3", "") == (
        "https://my-bucket.s3.eu-west-3.amazonaws.com", "/a%20b/%C3%A9~.h5")
    assert s3.locate("my.dotted.bucket", "k", "us-east-1", "") == ("https://s3.us-east-1.amazonaws.com", "/my.dotted.bucket/k")
    assert s3.locate("bucket", "k", "cn-north-1", "")[0] == "https://bucket.s3.cn-north-1.amazonaws.com.cn"
    assert s3.locate("bucket", "d/k", "x", "https://minio.local:9000/base") == ("https://minio.local:9000", "/base/bucket/d/k")
    config = tmp_path / "config"
    config.write_text("[profile p]\nregion = ap-south-1\nendpoint_url = http://from-profile:1\n"
                      "[profile q]\nservices = mine\n[services mine]\ns3 =\n  endpoint_url = http://from-services:2\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://for-s3:3")
    assert s3.account("s3://b/k").endpoint == "http://for-s3:3"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert s3.account("s3://b/k").endpoint == mock.endpoint
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_REGION")
    assert (s3.account("s3://b/k").endpoint, s3.account("s3://b/k").region) == ("", "us-east-1")
    monkeypatch.setenv("AWS_PROFILE", "p")
    assert (s3.account("s3://b/k").endpoint, s3.account("s3://b/k").region) == ("http://from-profile:1", "ap-south-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    assert s3.account("s3://b/k").region == "eu-north-1"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert s3.account("s3://b/k").endpoint == ""
    monkeypatch.delenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
    monkeypatch.setenv("AWS_PROFILE", "q")
    assert s3.account("s3://b/k").endpoint == "http://from-services:2"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://nowhere")
    with pytest.raises(StreamnnError, match="S3 endpoint .* is not an http:// or https:// URL"):
        s3.account("s3://b/k")


@settings(max_examples=50, deadline=None)
@given(st.datetimes(min_value=datetime.datetime(1990, 1, 1), max_value=datetime.datetime(2200, 1, 1)))
def test_last_modified_reads_as_botocore_read_it(when):
    """The local cache's keys hold Last-Modified as botocore's client gave it: unchanged."""
    from botocore.utils import parse_timestamp
    header = email.utils.format_datetime(when.replace(microsecond=0, tzinfo=datetime.timezone.utc), usegmt=True)
    assert s3._as_botocore(header) == str(parse_timestamp(header))


# -- HTTPS: AWS_CA_BUNDLE ---------------------------------------------------------------------
def as_bucket(https) -> str:
    """The endpoint of the HTTPS server of test_remote_tls, its store also at /bkt/t.h5 (S3's path-style)."""
    server, path = https[:2]
    (path.parent / "bkt").mkdir(exist_ok=True)
    if not (path.parent / "bkt" / "t.h5").exists():
        os.link(path, path.parent / "bkt" / "t.h5")
    return server.url("").rstrip("/")


@pytest.mark.parametrize("trust", ["AWS_CA_BUNDLE", "SSL_CERT_FILE"])
def test_an_https_endpoint_is_trusted_by_aws_ca_bundle_or_as_http(mock, https, monkeypatch, trust):
    _, path, ca, other_ca = https
    monkeypatch.setenv("AWS_ENDPOINT_URL", as_bucket(https))
    monkeypatch.setenv("SSL_CERT_FILE", str(other_ca))
    monkeypatch.setenv(trust, str(ca))
    with open_store("s3://bkt/t.h5") as remote, open_store(path) as local:
        assert remote.fingerprint == local.fingerprint and np.array_equal(remote.dataset("train")[:], local.dataset("train")[:])


def test_an_https_certificate_that_does_not_verify_names_aws_ca_bundle(mock, https, monkeypatch):
    other_ca = https[3]
    monkeypatch.setenv("AWS_ENDPOINT_URL", as_bucket(https))
    monkeypatch.setenv("AWS_CA_BUNDLE", str(other_ca))
    start = time.monotonic()
    with pytest.raises(StreamnnError, match=r"^s3://bkt/t.h5: the server's TLS certificate does not verify .*"
                                            r"trust its CA with AWS_CA_BUNDLE=CA.pem$") as info:
        open_object("s3://bkt/t.h5")
    assert "127.0.0.1" not in str(info.value) and time.monotonic() - start < 2  # not retried
