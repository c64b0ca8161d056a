"""Faults of a remote store, injected by a mock server on 127.0.0.1: resets, 503s and short bodies
are retried (the batches stay exact); a stalled server and a changed object end in one-line errors
within the deadline; an object changed under a running loader never yields mixed rows."""
from __future__ import annotations

import time

import numpy as np
import pytest

from streamnn import StreamnnError, open_store
from streamnn.data.loader import Loader

from servers import MockServer
from test_loader import make_store

N = 60


@pytest.fixture(scope="module")
def content(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    make_store(d / "a.h5", N, "uint8", seed=1)
    make_store(d / "b.h5", N, "uint8", seed=2)  # another store of the same size: a replacement
    return d / "a.h5", (d / "a.h5").read_bytes(), (d / "b.h5").read_bytes()


@pytest.fixture
def mock(content):
    server = MockServer(content[1], changed=content[2])
    yield server
    server.close()


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setenv("STREAMNN_REMOTE_TIMEOUT", "0.5")
    monkeypatch.setenv("STREAMNN_REMOTE_DEADLINE", "2")
    monkeypatch.setenv("STREAMNN_REMOTE_THREADS", "4")


def epoch(where, **kw):
    with Loader(where, "train", batch_size=8, seed=3, augment="flip", **kw) as L:
        return [X.copy() for X, _ in L]


@pytest.mark.parametrize("when, faults", [(0, ["reset"]), (4, ["503", "503"]), (9, ["short"]),
                                          (6, ["reset", "503", "short"])])
def test_transient_faults_are_retried_and_the_batches_stay_exact(content, mock, faults, when):
    path = content[0]
    want = epoch(path)
    mock.faults = [None] * when + faults  # at open, or among the row reads
    got = epoch(mock.url())
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert not mock.faults  # every fault was met


def test_persistent_503_ends_in_one_line_after_the_attempts(mock, monkeypatch):
    monkeypatch.setenv("STREAMNN_REMOTE_ATTEMPTS", "3")
    mock.faults = ["503"] * 10
    with pytest.raises(StreamnnError) as info:
        open_store(mock.url())
    text = str(info.value)
    assert "\n" not in text and "HTTP 503" in text and "3 attempt(s)" in text and text.startswith(mock.url())


@pytest.mark.parametrize("when", [0, 6])
def test_a_stalled_server_ends_the_job_within_the_deadline(mock, when):
    mock.stall = 30.0  # far beyond the deadline: the server never answers
    mock.faults = [None] * when + ["stall"] * 50
    start = time.monotonic()
    with pytest.raises(StreamnnError, match="stalled|deadline") as info:
        epoch(mock.url())
    assert time.monotonic() - start < 2 + 0.5 + 2  # deadline + one timeout + a margin, never a hang
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("when", [5, 8])
def test_an_object_changed_under_the_loader_is_a_one_line_error_never_mixed_rows(content, mock, when):
    want = epoch(content[0], prefetch=0)
    mock.faults = [None] * when + ["change"]
    got = []
    with pytest.raises(StreamnnError, match="changed on the server") as info:
        with Loader(mock.url(), "train", batch_size=8, seed=3, augment="flip", prefetch=0) as L:
            for X, _ in L:
                got.append(X.copy())
    assert "\n" not in str(info.value) and "ETag" in str(info.value)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))  # what came before is the old store, exactly


@pytest.mark.parametrize("reuse", [0.0, 10.0])
def test_object_replaced_between_loader_and_reader_is_refused(content, mock, monkeypatch, reuse):
    """The loader was made on one version, the reader opens another: the fingerprints differ
    (a reader opened at once takes the loader's version and meets the change at its first request)."""
    monkeypatch.setattr("streamnn.data.remote.objects.REUSE_SECONDS", reuse)
    with Loader(mock.url(), "train", batch_size=8) as L:
        mock.faults = ["change"]
        with pytest.raises(StreamnnError, match="the store changed since the loader was made" if not reuse
                           else "the store changed on the server") as info:
            next(iter(L))
    assert "\n" not in str(info.value)


def test_a_server_that_sends_the_whole_object_for_several_ranges_is_asked_one_range_at_a_time(content):
    """Some servers answer a request for several ranges with the whole object (200): it is not
    read, and the object is read one range per request from then on, exactly."""
    server = MockServer(content[1], multi=False)
    try:
        want = epoch(content[0])
        got = epoch(server.url())
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
        several = [i for i, r in enumerate(server.ranges) if "," in r]
        assert several and len(several) <= 4  # tried once per thread in flight at most, then never again
        assert "," not in "".join(server.ranges[max(several) + 1:])
    finally:
        server.close()
