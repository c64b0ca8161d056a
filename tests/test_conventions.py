"""streamnn.data.conventions: the channel orders and dtypes the framework adapters offer, one definition."""
from __future__ import annotations

import numpy as np
import pytest

from streamnn import StreamnnError
from streamnn.data.conventions import CHANNELS, DTYPES, chosen, to_uint8


def test_conventions_accept_names_and_dtypes_and_reject_others():
    torch = pytest.importorskip("torch")
    assert CHANNELS == ("RGB", "BGR") and DTYPES == ("float32", "uint8")
    for dtype in ("float32", np.float32, np.dtype("float32"), torch.float32):
        assert chosen("RGB", dtype) == ("RGB", "float32")
    assert chosen("BGR", torch.uint8) == chosen("BGR", np.uint8) == ("BGR", "uint8")
    for channels, dtype, standardize in (("GBR", "float32", False), ("RGB", "float64", False),
                                         ("RGB", "no-such-type", False), ("RGB", torch.int64, False),
                                         ("RGB", "uint8", True)):
        with pytest.raises(StreamnnError):
            chosen(channels, dtype, standardize)


def test_to_uint8_rounds_and_clips_in_place():
    x = np.array([-0.1, 0.0, 0.5, 1 / 255, 1.2], np.float32)
    assert to_uint8(x) is x and x.tolist() == [0, 0, 128, 1, 255]
