"""Stores over HTTPS (nginx on 127.0.0.1 with a certificate signed by a CA made by the test): a
certificate that the CA file in ``SSL_CERT_FILE`` signed is trusted; any other is a one-line
error at once, never retried and never read without verification."""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from streamnn import StreamnnError, open_store
from streamnn.data.loader import Loader

from servers import Nginx, make_certificate
from test_loader import make_store


@pytest.fixture(scope="module")
def https(tmp_path_factory):
    certs = tmp_path_factory.mktemp("certs")
    ca, cert, key = make_certificate(certs)
    other_ca, _, _ = make_certificate(certs, "other")
    root = tmp_path_factory.mktemp("www-tls")
    path = root / "t.h5"
    make_store(path, 40, "uint8")
    server = Nginx(root, tmp_path_factory.mktemp("nginx-tls"), tls=(cert, key))
    yield server, path, ca, other_ca
    server.close()


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr("streamnn.data.remote.objects.REUSE_SECONDS", 0.0)  # every open asks the server
    monkeypatch.setenv("STREAMNN_REMOTE_DEADLINE", "30")


def test_a_trusted_certificate_works(https, monkeypatch):
    server, path, ca, _ = https
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    url = server.url("t.h5")
    assert url.startswith("https://")
    with open_store(url) as remote, open_store(path) as local:
        assert remote.fingerprint == local.fingerprint
    with Loader(url, "train", batch_size=8, seed=1) as B, Loader(path, "train", batch_size=8, seed=1) as A:
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(A, B, strict=True))


@pytest.mark.parametrize("trust", ["other CA", "system"])
def test_a_certificate_that_does_not_verify_is_one_line_at_once(https, monkeypatch, trust):
    server, _, _, other_ca = https
    if trust == "other CA":
        monkeypatch.setenv("SSL_CERT_FILE", str(other_ca))
    else:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    start = time.monotonic()
    with pytest.raises(StreamnnError, match="TLS certificate does not verify") as info:
        open_store(server.url("t.h5"))
    text = str(info.value)
    assert "\n" not in text and text.startswith(server.url("t.h5")) and "SSL_CERT_FILE" in text
    assert time.monotonic() - start < 2  # not retried with backoff
