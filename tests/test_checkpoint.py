"""HDF5 checkpoints: typed round trip, determinism, atomicity, and one-line errors for bad files."""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from streamnn import StreamnnError
from streamnn.run.checkpoint import (FORMAT_VERSION, differences, digest, get, load_checkpoint, normalize,
                                 save_checkpoint)
from streamnn.rng import make_rng, rng_state


def content() -> dict:
    rng = make_rng(3)
    return {
        "model": {"W0": rng.standard_normal((3, 4)).astype(np.float32), "b0": np.zeros((3, 1), np.float64),
                  "step": np.int64(7), "mask": np.array([True, False]), "scalar": np.array(2.5, np.float32)},
        "optimizer": {"t": 12, "lr": 0.001, "beta": np.float32(0.9), "m": {"W0": np.full((3, 4), -0.0)}},
        "rng": {"loader": rng_state(rng)},
        "flags": {"standardize": True, "augment": None, "nan": float("nan"), "neg": -0.0},
        "names": ["cats", "dogs", "ünïcode"],
        "empty": {},
        "config": '{"lr": 0.1}',
        "odd keys": {"m/W0": np.ones(2), ".hidden": 1, "100%": "a%2Fb", "%2E": 2.0},
    }


def test_round_trip_is_exact_and_typed(tmp_path):
    path = tmp_path / "c.h5"
    c = content()
    sha = save_checkpoint(path, c)
    loaded = load_checkpoint(path)
    assert differences(loaded, normalize(c)) == []
    assert digest(loaded) == sha == digest(c)
    assert loaded["model"]["W0"].dtype == np.float32 and loaded["model"]["scalar"].shape == ()
    assert type(loaded["model"]["step"]) is int and type(loaded["optimizer"]["beta"]) is float
    assert loaded["optimizer"]["beta"] == float(np.float32(0.9))
    assert loaded["flags"]["standardize"] is True and loaded["flags"]["augment"] is None
    assert loaded["names"] == ["cats", "dogs", "ünïcode"] and loaded["empty"] == {}
    assert get(loaded, "optimizer.m.W0").shape == (3, 4)
    assert sorted(loaded["odd keys"]) == sorted(c["odd keys"])
    with pytest.raises(StreamnnError, match="no entry 'optimizer.v'"):
        get(loaded, "optimizer.v")


def test_same_content_gives_identical_bytes_and_digest_sees_any_change(tmp_path):
    save_checkpoint(tmp_path / "a.h5", content())
    save_checkpoint(tmp_path / "b.h5", content())
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    changed = content()
    changed["model"]["W0"][0, 0] = np.nextafter(changed["model"]["W0"][0, 0], np.float32(9))
    assert digest(changed) != digest(content()) and differences(changed, content()) == ["model.W0"]
    retyped = content()
    retyped["model"]["b0"] = retyped["model"]["b0"].astype(np.float32)
    assert digest(retyped) != digest(content())
    assert digest({"a": 1}) != digest({"a": 1.0}) != digest({"a": True})
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "b.h5"]


@pytest.mark.parametrize("bad", [{"a": object()}, {"a": [1, 2]}, {"": 1}, {1: 2},
                                 {"a": np.array(["x"])}, {"a": 1 << 70}])
def test_unstorable_content_is_refused_before_writing(tmp_path, bad):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "c.h5", bad)
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    save_checkpoint(path, content())
    before = path.read_bytes()
    import streamnn.run.checkpoint as ck

    def boom(group, c, held):
        group.create_dataset("partial", data=np.zeros(3))
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "_write_group", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"x": 1})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.h5"]
    load_checkpoint(path)


def _one_line(err: pytest.ExceptionInfo, path) -> str:
    text = str(err.value)
    assert "\n" not in text and str(path) in text
    return text


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "c.h5"
    save_checkpoint(path, content())
    data = path.read_bytes()
    for cut in (0, 100, len(data) // 2, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(StreamnnError) as err:
            load_checkpoint(path)
        text = _one_line(err, path)
        assert "truncated" in text or "corrupt" in text


def test_flipped_byte_in_array_data_is_detected(tmp_path):
    path = tmp_path / "c.h5"
    save_checkpoint(path, content())
    with h5py.File(path, "r") as f:
        offset = f["content/model/W0"].id.get_offset()
    raw = bytearray(path.read_bytes())
    raw[offset + 5] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(StreamnnError, match="does not match its sha256") as err:
        load_checkpoint(path)
    _one_line(err, path)


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_text("not hdf5"), "not an HDF5 file"),
    (lambda p: h5py.File(p, "w").close(), "not a streamnn checkpoint"),
    (lambda p: h5py.File(p, "w").attrs.__setitem__("format", "streamnn-store"), "not a streamnn checkpoint"),
])
def test_foreign_files_are_refused(tmp_path, make, message):
    path = tmp_path / "c.h5"
    make(path)
    with pytest.raises(StreamnnError, match=message) as err:
        load_checkpoint(path)
    _one_line(err, path)


def test_missing_newer_and_tampered_checkpoints(tmp_path):
    with pytest.raises(StreamnnError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.h5")
    path = tmp_path / "c.h5"
    save_checkpoint(path, content())
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(StreamnnError, match="format version 2 is not supported"):
        load_checkpoint(path)
    save_checkpoint(path, content())
    with h5py.File(path, "r+") as f:
        f["content/optimizer"].attrs["t"] = 13
    with pytest.raises(StreamnnError, match="sha256"):
        load_checkpoint(path)
    save_checkpoint(path, content())
    with h5py.File(path, "r+") as f:
        del f["content"]
    with pytest.raises(StreamnnError, match="incomplete"):
        load_checkpoint(path)
