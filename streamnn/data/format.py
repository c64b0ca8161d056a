"""The store format: its constants and content fingerprint (the format is described in docs/format.md).

Format version 1 (``format = "streamnn-store"``)::

    /                       root attributes:
        format              "streamnn-store"
        format_version      1
        streamnn_version    version that wrote the file
        command             the command line that made it
        created             ISO 8601 UTC time
        class_names         label i is class_names[i]
        image_shape         (H, W, C)
        pixel_layout        "HWC": a row is the image flattened in H x W x C order
        channel_order       "BGR" (as OpenCV decodes) or "GRAY"
        dtype               stored dtype: "float32" | "float16" | "uint8"
        scale               normalized = stored * scale, in [0, 1] (1.0 or 1/255)
        options             JSON of the packing options
        counts              JSON {split: {class_name: count}}
        fingerprint         sha256 hex of class names, image shape and every split's
                            labels and paths (content identity for checkpoints)
    /<split>/X              (N, D) stored dtype, D = H*W*C, one image per row
    /<split>/y              (N,) int32 labels
    /<split>/paths          (N,) UTF-8 source path of each row, relative to the source root
    /stats/mean, /stats/std (D,) float64, of the normalized training split (absent if none)
    /skipped/paths, /skipped/reasons   files that were not packed, and why

Splits are the groups other than ``stats`` and ``skipped``. The Kaggle folders map to
``train`` (training_set) and ``test`` (test_set). X is uncompressed and contiguous by
default: the loader's random row reads are then a gather from a memory map of the file.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

import h5py
import numpy as np

FORMAT = "streamnn-store"
FORMAT_VERSION = 1
RESERVED_GROUPS = ("stats", "skipped")
#: Stored pixel dtypes of X (``streamnn-pack --dtype``).
STORE_DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}
CHANNEL_ORDERS = ("BGR", "RGB", "GRAY")
COMPRESSIONS = (None, "lzf", "gzip")
#: HDF5 dtype of the stored strings (class names, paths).
STRING_DTYPE = h5py.string_dtype("utf-8")


def fingerprint(class_names: Sequence[str], image_shape: Sequence[int],
                splits: Iterable[tuple[str, np.ndarray, Sequence[str]]]) -> str:
    """sha256 over class names, image shape and each split's (name, labels, paths), in order."""
    h = hashlib.sha256()
    h.update(json.dumps([list(class_names), [int(s) for s in image_shape]]).encode())
    for name, y, paths in sorted(splits, key=lambda s: s[0]):
        h.update(b"\0split\0" + name.encode())
        h.update(np.ascontiguousarray(y, dtype="<i4").tobytes())
        for p in paths:
            h.update(p.encode() + b"\0")
    return h.hexdigest()
