"""Decoding: header probes, reduced decoding vs full, conversions, EXIF, bad files and bombs."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagetree import bad_files, encode, jpeg_with_size, pil_bytes, smooth_image
from streamnn import StreamnnError
from streamnn.pack.decode import (DEFAULT_MAX_PIXELS, DecodeError, decode_image, decode_kwargs, decode_options,
                             load_image, parse_size, reduction_factor)
from streamnn.pack.probe import probe


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("fmt", [".jpg", ".png", ".bmp", ".tiff", ".webp", ".ppm", "GIF"])
def test_probe_reads_the_size_from_the_header(fmt):
    img = smooth_image(3, 37, 53)
    data = pil_bytes(img, "GIF") if fmt == "GIF" else encode(img, fmt)
    info = probe(data)
    assert (info.width, info.height, info.problem) == (53, 37, None)
    assert info.format == {".jpg": "jpeg", ".tiff": "tiff", ".ppm": "pnm", "GIF": "gif"}.get(fmt, fmt[1:])


def test_full_decode_equals_opencv_decode_plus_area_resize():
    data = encode(smooth_image(4, 120, 90))
    expected = cv2.resize(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), (32, 24),
                          interpolation=cv2.INTER_AREA)
    got = decode_image(data, (24, 32), reduced=False)
    assert got.dtype == np.uint8 and got.shape == (24, 32, 3)
    assert np.array_equal(got, expected)


def test_reduced_decoding_is_close_to_the_full_decode():
    img = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8), (0, 0), 4)
    data = encode(img, quality=90)
    reduced, full = decode_image(data, 64), decode_image(data, 64, reduced=False)
    assert not np.array_equal(reduced, full)  # it really took the fast path (1/4 scale)
    assert psnr(reduced, full) > 30


@pytest.mark.parametrize("w,h,size,factor", [(500, 375, (64, 64), 4), (150, 149, (64, 64), 2), (64, 64, (64, 64), 1),
                                              (1000, 1000, (64, 64), 8), (500, 375, (224, 224), 1),
                                              (600, 900, (64, 150), 4), (100, 1000, (32, 32), 2)])
def test_reduction_keeps_the_shorter_side_at_least_the_target(w, h, size, factor):
    assert reduction_factor(w, h, size) == factor


@pytest.mark.parametrize("size,expected", [(64, (64, 64)), ("32", (32, 32)), ("48x64", (48, 64)),
                                           ((20, 30), (20, 30)), ("7X9", (7, 9))])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["abc", "0", "1x2x3", -3, "99999"])
def test_parse_size_rejects_nonsense(size):
    with pytest.raises(StreamnnError, match="size"):
        parse_size(size)


def test_color_conversions_gray_rgba_16bit_palette_cmyk_bmp():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :30] = (0, 0, 255)  # BGR red left half
    img[:, 30:] = (255, 0, 0)  # blue right half
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    cases = {
        "png": encode(img, ".png"),
        "rgba": encode(np.dstack([img, np.full((40, 60), 40, np.uint8)]), ".png"),
        "png16": encode(img.astype(np.uint16) * 257, ".png"),
        "palette": pil_bytes(img, "PNG", mode="P"),
        "cmyk": pil_bytes(img, "JPEG", mode="CMYK"),
        "bmp": encode(img, ".bmp"),
    }
    for name, data in cases.items():
        out = decode_image(data, (20, 30))
        assert out.shape == (20, 30, 3), name
        assert np.abs(out[:, :10].astype(int) - (0, 0, 255)).max() < 20, name  # still red, BGR order
        assert np.abs(out[:, -10:].astype(int) - (255, 0, 0)).max() < 20, name
    gray_out = decode_image(encode(gray, ".png"), (20, 30))
    assert gray_out.shape == (20, 30, 3) and np.array_equal(gray_out[..., 0], gray_out[..., 2])


def test_grayscale_gives_one_channel():
    data = encode(smooth_image(5, 40, 48))
    out = decode_image(data, 16, grayscale=True, reduced=False)
    expected = cv2.resize(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE), (16, 16),
                          interpolation=cv2.INTER_AREA)
    assert out.shape == (16, 16, 1) and np.array_equal(out[..., 0], expected)


def test_exif_orientation_is_applied_unless_ignored():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:20] = (0, 0, 255)  # top half red
    data = pil_bytes(img, "JPEG", exif_orientation=6)  # "rotate 90 CW to display"
    upright = decode_image(data, (80, 40), reduced=False)
    assert upright[:, -5:, 2].mean() > 200 and upright[:, :5, 2].mean() < 50  # red moved to the right
    raw = decode_image(data, (40, 80), exif_orientation=False)
    assert raw[:5, :, 2].mean() > 200 and raw[-5:, :, 2].mean() < 50


@pytest.mark.parametrize("name,content", sorted(bad_files().items()))
def test_bad_files_raise_a_reason(name, content):
    with pytest.raises(DecodeError) as info:
        decode_image(content, 16)
    assert info.value.reason and "\n" not in info.value.reason


def test_truncated_jpeg_reason_names_the_missing_marker():
    reasons = {n: _reason(c) for n, c in bad_files().items()}
    assert reasons["truncated.jpg"] == reasons["truncated-padded.jpg"] == "truncated JPEG (no end-of-image marker)"
    assert reasons["truncated.png"] == "truncated PNG (no IEND chunk)"
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["notes.jpg"] == reasons["_DS_Store"] == "not an image (unrecognized format)"
    assert "too large: 16000x16000" in reasons["bomb.jpg"]


def _reason(content: bytes) -> str:
    try:
        decode_image(content, 16)
    except DecodeError as exc:
        return exc.reason
    return "decoded"


def test_trailing_bytes_after_the_end_marker_are_allowed():
    data = encode(smooth_image(6))
    assert decode_image(data + bytes(100) + b"trailer", 16).shape == (16, 16, 3)


def test_bomb_is_refused_from_the_header_and_the_limit_is_configurable():
    bomb = jpeg_with_size(16000, 16000)  # a few hundred bytes claiming 256 Mpixels
    with pytest.raises(DecodeError, match="too large"):
        decode_image(bomb, 64)
    with pytest.raises(DecodeError, match="too large"):
        decode_image(encode(smooth_image(1, 40, 50)), 16, max_pixels=1999)
    assert decode_image(encode(smooth_image(1, 40, 50)), 16, max_pixels=2000).shape == (16, 16, 3)
    assert DEFAULT_MAX_PIXELS == 89_478_485


def test_load_image_names_the_file(tmp_path):
    good = tmp_path / "ok.png"
    good.write_bytes(encode(smooth_image(2), ".png"))
    assert load_image(good, 8).shape == (8, 8, 3)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(DecodeError, match=r"bad\.jpg: not an image"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(DecodeError, match="cannot read"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(DecodeError, match="folder"):
        load_image(tmp_path)


def test_decode_kwargs_reproduce_the_packing_options():
    opts = decode_options((24, 32), grayscale=True, max_pixels=1000, exif_orientation=False, reduced=False)
    assert decode_kwargs(opts) == {"size": (24, 32), "grayscale": True, "max_pixels": 1000, "max_file_size": 512 << 20,
                                   "exif_orientation": False, "reduced": False}
    assert decode_kwargs({})["size"] == (64, 64)


_MAGIC = st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBP",
                          b"II*\0", b"MM\0*", b"P6 "])


@settings(max_examples=150, deadline=None)
@given(magic=_MAGIC, tail=st.binary(max_size=300))
def test_arbitrary_bytes_give_a_decode_error_or_an_image(magic, tail):
    try:
        out = decode_image(magic + tail, 8, max_pixels=1 << 20)
    except DecodeError as exc:
        assert exc.reason
    else:
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8


def test_a_header_claiming_more_than_the_data_holds_is_skipped_not_grey(capfd):
    """libjpeg fills the missing part with grey and only warns on stderr: that warning is the reason."""
    for width, height in ((9000, 9000), (3000, 2000), (640, 480)):
        with pytest.raises(DecodeError, match="corrupt JPEG data, libjpeg: premature end of data segment"):
            decode_image(jpeg_with_size(width, height), 64)
    assert "Corrupt JPEG" not in capfd.readouterr().err


def test_extraneous_bytes_before_a_marker_are_harmless_and_quiet(capfd):
    data = encode(smooth_image(3, 40, 48))
    end = data.rindex(b"\xff\xd9")
    padded = data[:end] + b"\x00\x17" + data[end:]  # junk between the scan data and the end marker
    assert np.array_equal(decode_image(padded, 16), decode_image(data, 16))
    assert capfd.readouterr().err == ""


def test_other_c_library_output_is_passed_on(capfd):
    from streamnn.pack.decode import _c_stderr

    with _c_stderr() as said:
        os.write(2, b"libpng warning: something\n")
    assert said == [b"libpng warning: something\n"] and capfd.readouterr().err == ""
    from streamnn.pack.decode import _judge_warnings

    _judge_warnings(said[0])
    assert capfd.readouterr().err == "libpng warning: something\n"


def test_a_huge_header_is_refused_before_the_body_is_read(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_with_size(30000, 30000) + bytes(400_000))
    with pytest.raises(DecodeError, match="too large: 30000x30000"):
        load_image(path, 16)
    with pytest.raises(DecodeError, match=r"file too large: 400\d+ bytes, over the limit of 1000 bytes"):
        load_image(path, 16, max_file_size=1000)
