"""Random erasing (``--augment ...,erase[=P]``): the spec, the draws, the loader, the PyTorch adapter, the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from streamnn import StreamnnError
from streamnn.cli.train import main as train_main
from streamnn.data.loader import Loader
from streamnn.data.transforms import ERASE_AREA, ERASE_RATIO, Augment, erase_images
from streamnn.run.checkpoint import load_checkpoint
from streamnn.run.folder import LATEST
from streamnn.run.trainer import Trainer
from test_loader import SHAPE, D, make_store
from test_train import _stop_at, assert_same_run
from test_train import make_store as make_learnable_store

H, W, C = SHAPE
KW = dict(batch_size=8, seed=5, prefetch=0)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A float32 store and a uint8 one (whose PyTorch batches are made from its bytes), 30 rows each."""
    where = tmp_path_factory.mktemp("erase")
    for dtype in ("float32", "uint8"):
        make_store(where / f"{dtype}.h5", 30, dtype=dtype)
    return where / "float32.h5", where / "uint8.h5"


def erased_mask(aug: Augment, epoch: int, k: int, gb: int, b: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """(b, H, W, C) True on the pixels that erasing sets to 0, by a loop over the rectangles."""
    mask = np.zeros((b, H, W, C), bool)
    for j, top, left, h, w in aug.erasures(KW["seed"], epoch, k, gb, SHAPE, rank, world):
        mask[j, top:top + h, left:left + w, :] = True
    return mask


# -- the spec --------------------------------------------------------------------------------
@given(flip=st.booleans(), shift=st.integers(0, 9), padding=st.sampled_from(["reflect", "zero"]),
       erase=st.one_of(st.just(0.0), st.floats(1e-6, 1.0)))
def test_spec_round_trips(flip, shift, padding, erase):
    aug = Augment(flip, shift, padding if shift else "reflect", erase)
    assert Augment.parse(aug.spec) == aug
    assert Augment.parse(aug.option, shift or 4, padding if shift else "reflect") == aug


def test_spec_text():
    assert Augment.parse("erase") == Augment(erase=0.5)
    assert Augment.parse("flip,shift,erase", 3).spec == "flip,shift=3/reflect,erase=0.5"
    aug = Augment.parse("flip,shift=3/zero,erase=0.25")
    assert aug == Augment(True, 3, "zero", 0.25) and aug.spec == "flip,shift=3/zero,erase=0.25"
    assert aug.option == "flip,shift,erase=0.25" and Augment.parse("erase=1").spec == "erase=1.0"
    assert Augment.parse("flip,shift").option == "flip,shift"  # the text of earlier runs stays as it was
    for bad in ("erase=0", "erase=1.5", "erase=-0.1", "erase=nan", "erase=inf", "erase=", "erase=half"):
        with pytest.raises(StreamnnError, match="bad erase augmentation") as err:
            Augment.parse(f"flip,{bad}")
        assert "\n" not in str(err.value) and bad in str(err.value)
    with pytest.raises(StreamnnError, match="unknown augment 'cutout'.*erase"):
        Augment.parse("flip,cutout")


def test_cli_refuses_bad_values_in_one_line(stores, tmp_path):
    for bad, message in (("flip,erase=2", "Error: bad erase augmentation 'erase=2'"),
                         ("rotate", "Error: unknown augment 'rotate'"),
                         ("shift=2/zero", "give the shift's size and padding with --shift")):
        r = CliRunner().invoke(train_main, [str(stores[0]), "--augment", bad, "--out", str(tmp_path / "x")])
        assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "x" / LATEST).exists()


# -- the draws -------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), epoch=st.integers(0, 99), k=st.integers(0, 999), b=st.integers(0, 40),
       size=st.tuples(st.integers(1, 70), st.integers(1, 70)), p=st.floats(0.01, 1.0))
def test_rectangles_lie_inside_and_follow_the_bounds(seed, epoch, k, b, size, p):
    hh, ww = size
    aug = Augment(erase=p)
    boxes = aug.erasures(seed, epoch, k, b, size)
    assert boxes.dtype == np.int64 and boxes.shape[1] == 5
    j, top, left, h, w = boxes.T
    assert np.all(np.diff(j) > 0) and np.all((j >= 0) & (j < b))
    assert np.all((h >= 1) & (h <= hh) & (w >= 1) & (w <= ww))
    assert np.all((top >= 0) & (top + h <= hh) & (left >= 0) & (left + w <= ww))
    # The sizes, from the documented draws one row at a time: u, s, log r, then the corners.
    rng = np.random.Generator(np.random.PCG64([seed, epoch, k, 0x65726173]))
    u, s = rng.random(b), rng.uniform(*ERASE_AREA, size=b)
    log_r = rng.uniform(math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]), size=b)
    want = []
    for i in range(b):
        if u[i] < p:
            r = math.exp(log_r[i])
            want.append((i, min(max(round(math.sqrt(s[i] * hh * ww * r)), 1), hh),
                         min(max(round(math.sqrt(s[i] * hh * ww / r)), 1), ww)))
    assert [tuple(row) for row in boxes[:, [0, 3, 4]].tolist()] == want
    for world in (2, 3):  # every rank keeps its interleaved share of the global batch's draws
        joined = []
        for rank in range(world):
            part = aug.erasures(seed, epoch, k, b, size, rank, world)
            joined += [(rank + int(pos) * world, *row) for pos, *row in part.tolist()]
        assert sorted(joined) == [tuple(row) for row in boxes.tolist()]


def test_draws_depend_on_seed_epoch_batch_and_follow_the_probability():
    aug = Augment(erase=0.25)
    boxes = aug.erasures(1, 2, 3, 20000, (32, 32))
    assert abs(len(boxes) / 20000 - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 20000)
    area = boxes[:, 3] * boxes[:, 4] / 1024
    assert area.min() < 0.03 and area.max() > 0.3 and 0.1 < np.median(area) < 0.25
    assert np.array_equal(boxes, aug.erasures(1, 2, 3, 20000, (32, 32)))
    for other in ((0, 2, 3), (1, 3, 3), (1, 2, 4)):
        assert not np.array_equal(boxes[:50], aug.erasures(*other, 20000, (32, 32))[:50])
    assert len(Augment(erase=1.0).erasures(1, 2, 3, 50, (8, 8))) == 50


def test_erase_images_zeroes_every_channel_in_either_layout():
    rng = np.random.default_rng(0)
    hwc = rng.random((3, 6, 7, 2)).astype(np.float32) + 1
    chw = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))
    boxes = np.array([[0, 1, 2, 3, 4], [2, 0, 0, 6, 7]])
    erase_images(hwc, boxes)
    erase_images(chw, boxes, channels_first=True)
    mask = np.zeros(hwc.shape, bool)
    mask[0, 1:4, 2:6], mask[2] = True, True
    assert np.array_equal(hwc == 0, mask) and np.array_equal(chw.transpose(0, 2, 3, 1), hwc)


# -- the loader ------------------------------------------------------------------------------
@pytest.mark.parametrize("standardize", [False, True])
def test_exactly_the_erased_pixels_are_zero(stores, standardize):
    path = stores[0]
    aug = Augment.parse("flip,shift=1/reflect,erase=0.5")
    with Loader(path, "train", augment="flip,shift=1/reflect", standardize=standardize, **KW) as plain, \
            Loader(path, "train", augment=aug.spec, standardize=standardize, **KW) as erased:
        assert erased.augment == "flip,shift=1/reflect,erase=0.5"
        count = 0
        for epoch in (0, 1):
            for k, ((X, _), (E, _)) in enumerate(zip(plain, erased)):
                b = X.shape[1]
                mask = erased_mask(aug, epoch, k, b, b).reshape(b, D).T
                np.testing.assert_array_equal(E, np.where(mask, 0, X))  # the rest bit for bit as without
                assert np.array_equal((E != X).any(axis=0), mask.any(axis=0))  # (the test sees the erasing)
                count += int(mask.any(axis=0).sum())
    assert 15 < count < 45  # of 60 images, P = 0.5


def test_ranks_hold_their_share_of_the_one_process_batch(stores):
    path = stores[0]
    with Loader(path, "train", augment="erase", **KW) as one:
        full = [X.copy() for X, _ in one]
    for world in (2, 3):
        parts = []
        for rank in range(world):
            with Loader(path, "train", augment="erase", rank=rank, world_size=world, **KW) as L:
                parts.append([X.copy() for X, _ in L])
        for k, X in enumerate(full):
            joined = np.empty_like(X)
            for rank in range(world):
                joined[:, rank::world] = parts[rank][k]
            np.testing.assert_array_equal(joined, X)


def test_resume_mid_epoch_gives_the_same_batches(stores):
    path = stores[0]
    kw = dict(augment="flip,erase=0.7", standardize=True, **KW)
    with Loader(path, "train", **kw) as straight:
        want = [X.copy() for _ in range(2) for X, _ in straight]  # two epochs of 4 batches
    with Loader(path, "train", **kw) as first:
        it = iter(first)
        got = [next(it)[0].copy() for _ in range(3)]
        state = first.state_dict()
    assert state["augment"] == "flip,erase=0.7"
    with Loader(path, "train", standardize=True, **KW) as resumed:  # the saved augmentation is adopted
        resumed.load_state_dict(state)
        got += [X.copy() for _ in range(2) for X, _ in resumed]
    assert len(got) == len(want) == 8 and all(np.array_equal(a, b) for a, b in zip(got, want))
    # A state saved without erasing (all earlier states) resumes without it.
    with Loader(path, "train", augment="flip", **KW) as old:
        it = iter(old)
        next(it)
        old_state = old.state_dict()
        rest = [X.copy() for X, _ in it]
    with Loader(path, "train", augment="flip,erase=1", **KW) as L:
        L.load_state_dict(old_state)
        assert L.augment == "flip" and all(np.array_equal(X, r) for (X, _), r in zip(L, rest))


# -- the PyTorch adapter ---------------------------------------------------------------------
@pytest.mark.parametrize("store", [0, 1], ids=["float32-store", "uint8-store"])
def test_pytorch_batches_are_the_loaders_with_the_same_erasures(stores, store):
    torch = pytest.importorskip("torch")
    from streamnn.torch import StoreBatches

    path = stores[store]
    kw = dict(batch_size=8, seed=5, augment="flip,shift=1/reflect,erase=0.6")
    with Loader(path, "train", prefetch=0, **kw) as L:
        want = [X.T.reshape(-1, H, W, C).copy() for X, _ in L]  # (b, H, W, C) BGR float32
    nchw = [x.numpy()[:, ::-1].transpose(0, 2, 3, 1) for x, _ in StoreBatches(path, "train", **kw)]
    nhwc = [x.numpy() for x, _ in StoreBatches(path, "train", layout="NHWC", channels="BGR", **kw)]
    last = [x.permute(0, 2, 3, 1).numpy()[..., ::-1]
            for x, _ in StoreBatches(path, "train", layout="channels_last", **kw)]
    u8 = [x.numpy()[:, ::-1].transpose(0, 2, 3, 1) for x, _ in StoreBatches(path, "train", dtype=torch.uint8, **kw)]
    assert len(want) == len(nchw) == len(nhwc) == len(u8) == 4
    for k, w in enumerate(want):
        mask = erased_mask(Augment.parse(kw["augment"]), 0, k, len(w), len(w))
        assert mask.any() and np.all(w[mask] == 0)
        for got in (nchw[k], nhwc[k], last[k]):
            np.testing.assert_array_equal(got, w)
        np.testing.assert_array_equal(u8[k], np.rint(w * 255).astype(np.uint8))
    # Ranks: rank r of 2 gets the rows r::2 of the one-process batches, erasures included.
    for rank in range(2):
        part = [x.numpy() for x, _ in StoreBatches(path, "train", layout="NHWC", channels="BGR", rank=rank,
                                                   world_size=2, **kw)]
        assert all(np.array_equal(p, w[rank::2]) for p, w in zip(part, want))


# -- training --------------------------------------------------------------------------------
def test_cli_training_with_erasing_resumes_bit_identical(tmp_path, monkeypatch):
    store = make_learnable_store(tmp_path / "s.h5")
    args = [str(store), "--hidden", "8", "--batch-size", "16", "--val-fraction", "0.25", "--augment", "flip,erase",
            "--standardize", "--lr", "0.01", "--seed", "3", "--epochs", "1", "-q"]  # 3 steps
    straight = tmp_path / "straight"
    r = CliRunner().invoke(train_main, [*args, "--out", str(straight)])
    assert r.exit_code == 0, r.output
    assert json.loads((straight / "config.json").read_text())["augment"] == "flip,erase=0.5"
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, on_step=None: fit(self, on_step=_stop_at(2)))  # mid-epoch
    out = tmp_path / "stopped"
    r = CliRunner().invoke(train_main, [*args, "--out", str(out)])
    assert r.exit_code == 130 and load_checkpoint(out / LATEST)["progress"]["step"] == 2
    monkeypatch.setattr(Trainer, "fit", fit)
    r = CliRunner().invoke(train_main, [*args, "--out", str(out), "--resume"])  # the same options: fine
    assert r.exit_code == 0, r.output
    assert_same_run(straight, out)
    r = CliRunner().invoke(train_main, ["--augment", "flip", "--out", str(out), "--resume"])
    assert r.exit_code == 1 and "cannot change --augment 'flip' (saved: 'flip,erase=0.5')" in r.output
