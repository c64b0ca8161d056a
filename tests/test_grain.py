"""streamnn.grain: Grain's data-source protocol and fixed-shape host batches, tested without JAX or Grain."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from test_loader import SHAPE, D, make_store

from streamnn import StreamnnError
from streamnn.data.loader import Loader
from streamnn.grain import HostBatches, StoreSource


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("g") / "s.h5"
    px, labels = make_store(path, 50, dtype="uint8")
    return path, px, labels


def as_x(image):
    """(b, H, W, C) BGR float32 images as the Loader's X (D, b)."""
    return image.reshape(len(image), D).T


@pytest.mark.parametrize("count", [1, 2, 3])
def test_source_shards_by_process_and_pickles_its_settings(store, count):
    path, px, labels = store
    seen = Counter()
    for p in range(count):
        src = StoreSource(path, "train", process_index=p, process_count=count, channels="BGR", dtype="uint8")
        for i in range(len(src)):
            rec = src[i]
            assert rec["image"].shape == SHAPE and rec["image"].dtype == np.uint8
            row = src.stored_row(i)
            assert np.array_equal(rec["image"].reshape(-1), px[row]) and rec["label"] == labels[row]
            seen[row] += 1
        blob = pickle.dumps(src)
        assert len(blob) < 2000 and b"h5py" not in blob
        assert np.array_equal(pickle.loads(blob)[0]["image"], src[0]["image"])
        with pytest.raises(IndexError):
            src[len(src)]
    assert seen == Counter(range(50))
    rgb = StoreSource(path, "train")[0]["image"]
    np.testing.assert_allclose(rgb, px[0].reshape(SHAPE)[..., ::-1] / 255, rtol=1e-6)
    with pytest.raises(StreamnnError):
        StoreSource(path, "train", process_index=2, process_count=2)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_host_batches_have_fixed_shapes_and_the_loaders_rows(store, count):
    path, px, labels = store
    kw = dict(seed=4, augment="flip")
    shares = [list(HostBatches(path, "train", 8, process_index=p, process_count=count, channels="BGR", **kw))
              for p in range(count)]
    loader = Loader(path, "train", 8, reuse_buffers=False, **kw)
    want = list(loader)
    rows = -(-8 // count)
    for k, (X, Y) in enumerate(want):
        joined = np.empty_like(X)
        for p in range(count):
            b = shares[p][k]
            assert b["image"].shape == (rows, *SHAPE) and b["label"].dtype == np.int32 and b["mask"].shape == (rows,)
            m = b["mask"]
            assert not b["image"][~m].any()
            joined[:, p::count] = as_x(b["image"][m])
            assert b["label"][m].tolist() == Y.reshape(-1)[p::count].astype(int).tolist()
        np.testing.assert_array_equal(joined, X)  # the processes' rows (and flips) are the one-process batch
    assert {len(s) for s in shares} == {7}


def test_host_batches_resume_exactly_on_another_process_count(store):
    path, px, _ = store
    full = [as_x(b["image"][b["mask"]]) for b in HostBatches(path, "train", 6, channels="BGR", seed=1)]
    assert [X.shape[1] for X in full] == [6] * 8 + [2]
    two = [HostBatches(path, "train", 6, process_index=p, process_count=2, channels="BGR", seed=1) for p in range(2)]
    for h in two:
        it = iter(h)
        for _ in range(3):
            next(it)
    state = json.loads(json.dumps(two[0].get_state()))
    assert state["samples"] == 18
    three = [HostBatches(path, "train", 6, process_index=p, process_count=3, channels="BGR") for p in range(3)]
    for h in three:
        h.set_state(state)
    rest = [list(h) for h in three]
    for k, X in enumerate(full[3:]):
        joined = np.empty_like(X)
        for p in range(3):
            b = rest[p][k]
            joined[:, p::3] = as_x(b["image"][b["mask"]])
        np.testing.assert_array_equal(joined, X)


def test_no_jax_or_grain_needed():
    code = "import sys, streamnn.grain; assert not {'jax', 'grain', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_jax_example_of_the_docs_is_the_script_that_runs_it():
    import re
    import textwrap
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "frameworks.md").read_text()
    shown = re.search(r"## JAX and Grain\n.*?```python\n(.*?)```", page, flags=re.S).group(1)
    script = (root / "tools" / "example_jax.py").read_text()
    body = re.search(r"    # -- example: start --\n(.*?)    # -- example: end --", script, flags=re.S).group(1)
    lines = [line for line in textwrap.dedent(body).splitlines() if "(not in the docs' example)" not in line]
    assert shown.splitlines()[1:] == lines and shown.startswith("store, split, batch_size, epochs")
