"""Inference from Python: ``streamnn.load_model(checkpoint).predict(...)`` on files, folders and arrays."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import streamnn
from imagetree import encode, smooth_image
from streamnn import StreamnnError

FIXTURES = Path(__file__).parent / "fixtures" / "release-0.1.0"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("run", ["mlp", "cnn"])
def test_predict_a_folder_as_the_command_does(run, monkeypatch, recorded_blas):
    monkeypatch.chdir(FIXTURES)
    results = streamnn.load_model(f"{run}-done/checkpoint-latest.h5").predict("images")
    assert [{**r, "path": r["path"].as_posix()} for r in results] == EXPECTED[run]["predict"]


def test_arrays_in_either_channel_order_equal_the_file(tmp_path):
    model = streamnn.load_model(FIXTURES / "cnn-done" / "checkpoint-latest.h5")
    images = [smooth_image(seed, 23, 31) for seed in range(5)]
    paths = []
    for i, img in enumerate(images):  # PNG: lossless, so the file decodes to these very pixels
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(encode(img, ".png"))
    from_files = model.predict(paths)
    from_bgr = model.predict(images)
    from_rgb = model.predict(np.stack([img[:, :, ::-1] for img in images]), channels="RGB")
    from_read = model.predict([cv2.imread(str(p)) for p in paths])
    for a, b, c, d in zip(from_files, from_bgr, from_rgb, from_read):
        assert a["path"] in paths
        assert {k: a[k] for k in b} == b == c == d
    assert model.predict(images[0]) == from_bgr[:1]
    assert model.predict(images, tta=True) != from_bgr


def test_bad_inputs_are_one_line(tmp_path):
    model = streamnn.load_model(FIXTURES / "mlp-done" / "checkpoint-latest.h5")
    (tmp_path / "text.jpg").write_text("not an image")
    cases = [(lambda: model.predict(np.zeros((8, 8, 3), np.float32)), "uint8"),
             (lambda: model.predict(np.zeros((8, 8, 3), np.uint8), channels="HSV"), "channels"),
             (lambda: model.predict(tmp_path / "text.jpg"), "text.jpg"),
             (lambda: streamnn.load_model(tmp_path / "missing.h5"), "missing.h5")]
    for call, words in cases:
        with pytest.raises(StreamnnError, match=words) as err:
            call()
        assert "\n" not in str(err.value)
