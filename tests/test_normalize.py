"""normalize_into: stored values to normalized float32, the same bits whichever path does the work
(OpenCV's SIMD pass for contiguous uint8, NumPy's cast and multiply otherwise)."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from streamnn.data.readers.base import normalize_into


def reference(raw: np.ndarray, scale: np.float32) -> np.ndarray:
    out = raw.astype(np.float32)  # one rounding for the cast (exact for uint8), one for the product
    return out * scale if scale != 1 else out


shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple) | st.sampled_from(
    [(1,), (1, 1), (4, 1), (1, 4), (2, 2), (5,), (64, 12288), (4096 * 3, 3), (7, 4096, 3)])
scales = st.sampled_from([1 / 255, 1 / 256, 0.1, 1.0, 2.0, 3e-7]) | st.floats(2.0**-20, 8.0, width=32)


@settings(max_examples=200, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(["uint8", "float16", "float32"]), scale=scales,
       seed=st.integers(0, 2**32 - 1), strided=st.booleans())
def test_the_same_bits_as_the_cast_then_the_float32_product(shape, dtype, scale, seed, strided):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, shape).astype(dtype)
    scale = np.float32(scale)
    if strided and raw.ndim:  # a view that is not contiguous takes the NumPy path, same values
        raw = np.repeat(raw, 2, axis=-1)[..., ::2]
    out = np.full(raw.shape, np.nan, np.float32)
    assert normalize_into(raw, out, scale) is out
    np.testing.assert_array_equal(out.view(np.uint32), reference(raw, scale).view(np.uint32))


def test_every_byte_exactly():
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for scale in (np.float32(1 / 255), np.float32(0.0039215687), np.float32(1 / 3)):
        out = normalize_into(raw, np.empty(raw.shape, np.float32), scale)
        assert [float(v) for v in out.ravel()] == [float(np.float32(b) * scale) for b in range(256)]


def test_a_strided_output_is_written_in_place():
    raw = np.arange(60, dtype=np.uint8).reshape(6, 10)
    big = np.zeros((6, 20), np.float32)
    normalize_into(raw, big[:, ::2], np.float32(0.5))
    np.testing.assert_array_equal(big[:, ::2], raw * np.float32(0.5))
    assert not big[:, 1::2].any()
