"""Preprocessing: normalized store rows to model inputs, for training and inference alike.

Design. A store row is an image in H x W x C order, normalized to [0, 1] by the reader.
Training (:class:`streamnn.data.loader.Loader`) and inference (:class:`Preprocess`, used by the
trainer's evaluation, ``streamnn-eval`` and ``streamnn-predict``) both go through the
functions here, so they agree exactly:

* standardization: ``(x - mean) * (1 / std)`` with the store's ``/stats``, float32 copies
  made once (:func:`standardization`); features with ``std <= STD_FLOOR`` are only centred.
* flip: an image mirrored left-right (:func:`flip_images`).
* shift: an image translated by ``(dy, dx)``, ``|dy|, |dx| <= N`` pixels, the uncovered
  border filled by reflection (``"reflect"``: ``np.pad``'s mode, the edge pixel not
  repeated) or zeros (``"zero"``) (:func:`shift_images`).
* erase (random erasing, "cutout", as torchvision's ``RandomErasing``, Zhong et al. 2017): with
  probability P (default 0.5) a rectangle of the image, all channels, set to 0 in the model
  input, that is to the mean image when standardized, else black (:func:`erase_images`).

Augmentation draws (:class:`Augment`) are pure functions, so that resumed runs and any
number of ranks see the same images: the draws for the whole *global* batch k (the union of
every rank's batch k, :mod:`streamnn.data.order`), of which rank r of W keeps its interleaved
share ``[r::W]`` (the rows it holds). Flips: row i of global batch k of an epoch is mirrored
with probability 1/2, draw i of ``PCG64([seed, epoch, 0, k, FLIP])`` (the 0 stands where the
rank was before batches were global, so one-process flips did not change). Shifts: the (dy,
dx) pair i of ``PCG64([seed, epoch, k, SHIFT])``, uniform on ``[-N, N]^2``. Erasing: from
``PCG64([seed, epoch, k, ERASE])``, for the b rows of the global batch at once, in this order:
u ~ U[0, 1) (row i erased when u_i < P), the area fraction s ~ U[0.02, 0.33] of H * W, log r ~
U[log 0.3, log 3.3] (r = h / w), then h = round(sqrt(s H W r)) and w = round(sqrt(s H W / r))
(half to even, as ``np.rint``) clipped to [1, H] x [1, W] (torchvision draws again when the
rectangle does not fit; here it is clipped), then the top row uniform on [0, H - h] and the left
column on [0, W - w]. Flips come first, then shifts, standardization, erasing last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from streamnn.errors import StreamnnError
from streamnn.data.order import share

#: Constant features (std <= this) are only centred by standardization.
STD_FLOOR = 1e-8
_FLIP = 0x666C6970  # "flip": separates the flip streams from the loader's order stream
_SHIFT = 0x73686674  # "shft"
_ERASE = 0x65726173  # "eras"
PADDINGS = ("reflect", "zero")
DEFAULT_SHIFT = 4
#: The augmentations :class:`Augment` runs, in the order they are applied (standardization comes before erase).
KINDS = ("flip", "shift", "erase")
#: The erase probability of a plain "erase".
DEFAULT_ERASE = 0.5
#: Random erasing's bounds: the rectangle's fraction of the image area, its aspect ratio h / w.
ERASE_AREA = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)


def standardization(mean: Any, std: Any) -> tuple[np.ndarray, np.ndarray]:
    """(mean, 1/std) as float32 vectors (D,); constant features (std ~ 0) are only centred."""
    std = np.asarray(std, np.float64).reshape(-1)
    inv = np.where(std > STD_FLOOR, 1.0 / np.maximum(std, STD_FLOOR), 1.0)
    return np.asarray(mean, np.float64).reshape(-1).astype(np.float32), inv.astype(np.float32)


def flip_images(imgs: np.ndarray, which: np.ndarray, scratch: np.ndarray | None = None) -> None:
    """Mirror ``imgs[which]`` ((b, H, W, C), in place) left to right."""
    if not len(which):
        return
    picked = np.take(imgs, which, axis=0, out=None if scratch is None else scratch[:len(which)])
    imgs[which] = picked[:, :, ::-1, :]


def shift_images(imgs: np.ndarray, shifts: np.ndarray, max_shift: int, padding: str = "reflect",
                 scratch: np.ndarray | None = None) -> None:
    """Translate image j of ``imgs`` ((b, H, W, C), in place) by ``shifts[j] = (dy, dx)``.

    Output pixel (y, x) is input pixel (y - dy, x - dx) of the image padded by ``max_shift``
    (reflected or zero). ``scratch``: an optional (>= b, H + 2N, W + 2N, C) buffer.
    """
    b, H, W, C = imgs.shape
    n = int(max_shift)
    if n == 0 or b == 0:
        return
    shape = (b, H + 2 * n, W + 2 * n, C)
    padded = scratch[:b] if scratch is not None else np.empty(shape, imgs.dtype)
    padded[:, n:n + H, n:n + W] = imgs
    if padding == "zero":
        padded[:, :n], padded[:, n + H:], padded[:, :, :n], padded[:, :, n + W:] = 0, 0, 0, 0
    else:
        padded[:] = np.pad(imgs, ((0, 0), (n, n), (n, n), (0, 0)), mode="reflect")
    for j, (dy, dx) in enumerate(np.asarray(shifts).reshape(b, 2)):
        imgs[j] = padded[j, n - dy:n - dy + H, n - dx:n - dx + W]


def erase_images(imgs: np.ndarray, boxes: np.ndarray, channels_first: bool = False) -> None:
    """Set the rectangles ``boxes`` (rows ``(j, top, left, h, w)``) of images ``imgs[j]`` to 0, all
    channels, in place: ``imgs`` (b, H, W, C), or (b, C, H, W) with ``channels_first``."""
    for j, top, left, h, w in boxes.tolist():
        if channels_first:
            imgs[j, :, top:top + h, left:left + w] = 0
        else:
            imgs[j, top:top + h, left:left + w] = 0


@dataclass(frozen=True)
class Augment:
    """Which training augmentations run: flips, shifts of up to ``shift`` pixels, erasing with
    probability ``erase`` (0: none)."""

    flip: bool = False
    shift: int = 0
    padding: str = "reflect"
    erase: float = 0.0

    @classmethod
    def parse(cls, spec: str | None, shift: int = DEFAULT_SHIFT, padding: str = "reflect") -> Augment:
        """``None`` / "none", or any of "flip", "shift", "erase" joined by commas; "shift=N/PADDING" sets
        the shift in place, "erase=P" the erase probability (0 < P <= 1; "erase": 0.5)."""
        if spec in (None, "", "none", "None"):
            return cls()
        flip, n, pad, erase = False, 0, padding, 0.0
        for part in str(spec).split(","):
            name, eq, detail = part.strip().partition("=")
            if name == "flip" and not detail:
                flip = True
            elif name == "erase":
                erase = _probability(detail) if eq else DEFAULT_ERASE
                if not 0 < erase <= 1:
                    raise StreamnnError(f"bad erase augmentation {part.strip()!r}: erase=P needs a probability "
                                        f"0 < P <= 1 (plain erase: {DEFAULT_ERASE})")
            elif name == "shift":
                n = shift
                if detail:
                    amount, _, pad = detail.partition("/")
                    n = int(amount) if amount.isdigit() else -1
                if n < 1 or pad not in PADDINGS:
                    raise StreamnnError(f"bad shift augmentation {part!r}: shift up to N >= 1 pixels, padding "
                                        f"{' or '.join(PADDINGS)}")
            else:
                raise StreamnnError(f"unknown augment {part.strip()!r} (choose none, or any of {', '.join(KINDS)} "
                                    "joined by commas, e.g. flip,shift,erase=0.25)")
        return cls(flip, n, pad, erase)

    @property
    def spec(self) -> str | None:
        """The canonical text (``None`` for no augmentation), e.g. "flip,shift=4/reflect,erase=0.5"."""
        return self._text(f"shift={self.shift}/{self.padding}")

    @property
    def option(self) -> str | None:
        """The text of ``--augment`` and of a run's configuration: :attr:`spec` without the shift's size
        and padding (the ``shift`` and ``shift_padding`` settings), e.g. "flip,shift,erase=0.5"."""
        return self._text("shift")

    def _text(self, shift: str) -> str | None:
        parts = (["flip"] if self.flip else []) + ([shift] if self.shift else []) \
            + ([f"erase={self.erase!r}"] if self.erase else [])
        return ",".join(parts) or None

    def flips(self, seed: int, epoch: int, k: int, b: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Positions, in rank ``rank``'s interleaved share of the ``b``-row global batch k, of the rows to mirror."""
        rng = np.random.Generator(np.random.PCG64([seed, epoch, 0, k, _FLIP]))
        return np.flatnonzero(share(rng.random(b), rank, world_size) < 0.5)

    def shifts(self, seed: int, epoch: int, k: int, b: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """(dy, dx) of the rows of rank ``rank``'s interleaved share of the ``b``-row global batch k."""
        rng = np.random.Generator(np.random.PCG64([seed, epoch, k, _SHIFT]))
        return share(rng.integers(-self.shift, self.shift + 1, size=(b, 2)), rank, world_size)

    def erasures(self, seed: int, epoch: int, k: int, b: int, size: Sequence[int], rank: int = 0,
                 world_size: int = 1) -> np.ndarray:
        """The rectangles to erase in rank ``rank``'s interleaved share of the ``b``-row global batch k of
        ``size`` (H, W, ...) images: int64 rows ``(j, top, left, h, w)``, j the position in the share."""
        H, W = int(size[0]), int(size[1])
        rng = np.random.Generator(np.random.PCG64([seed, epoch, k, _ERASE]))
        erased = rng.random(b) < self.erase
        area = rng.uniform(*ERASE_AREA, size=b) * (H * W)
        ratio = np.exp(rng.uniform(np.log(ERASE_RATIO[0]), np.log(ERASE_RATIO[1]), size=b))
        h = np.clip(np.rint(np.sqrt(area * ratio)), 1, H).astype(np.int64)
        w = np.clip(np.rint(np.sqrt(area / ratio)), 1, W).astype(np.int64)
        top, left = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
        mine = share(erased, rank, world_size)
        boxes = share(np.stack([top, left, h, w], axis=1), rank, world_size)[mine]
        return np.column_stack([np.flatnonzero(mine), boxes]).astype(np.int64)


def _probability(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


@dataclass
class Preprocess:
    """Normalized rows to model inputs for inference: optional flip, then optional standardization."""

    image_shape: tuple[int, int, int]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    dtype: Any = np.float32
    _mean32: np.ndarray | None = field(default=None, init=False, repr=False)
    _inv32: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(s) for s in self.image_shape)  # type: ignore[assignment]
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.mean is not None:
            mean, inv = standardization(self.mean, self.std)
            self._mean32, self._inv32 = mean.reshape(-1, 1), inv.reshape(-1, 1)

    @property
    def standardize(self) -> bool:
        return self.mean is not None

    def __call__(self, X: np.ndarray, flip: bool = False) -> np.ndarray:
        """X (D, B) float32 in [0, 1] -> model input (D, B) of the model's dtype."""
        if flip:
            X = flip_columns(X, self.image_shape)
        if self._mean32 is not None:
            X = (X - self._mean32) * self._inv32
        return X.astype(self.dtype, copy=False)

    def rows_from_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (B, H, W, C) -> normalized columns (D, B) float32, as a store holds them."""
        return (images.reshape(len(images), -1).astype(np.float32) * np.float32(1 / 255)).T.copy()


def flip_columns(X: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """Mirror every image (a column of HWC-flattened pixels) left to right (a new array)."""
    h, w, c = image_shape
    return np.ascontiguousarray(X.reshape(h, w, c, -1)[:, ::-1]).reshape(X.shape)
