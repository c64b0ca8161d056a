#!/usr/bin/env python
"""Generate the synthetic "cats vs dogs" demo image set in the Kaggle folder layout.

    python tools/make_demo_data.py [--out data/demo] [--train 200] [--test 60] [--seed 2024]

writes ``OUT/training_set/{cats,dogs}/{cat,dog}.<i>.jpg`` and ``OUT/test_set/...`` (same
names as the Kaggle download). Every image is drawn with OpenCV from a seeded NumPy
generator, so the same arguments give the same pixels (and, with the same OpenCV/libjpeg,
the same bytes).

The classes differ the way a linear model can partly see, but not trivially:

- "cats": a round head in warm colours with two pointed triangular ears, eyes, whiskers;
- "dogs": a wider oval head in cool colours with two floppy ear ellipses hanging down,
  a dark nose and a tongue.

Backgrounds are random two-colour gradients with clutter (lines, rectangles) in any hue;
head position, size, tilt, image size (64-96 px per side), blur, JPEG quality and noise
vary; about 10% of the animals get a colour from the other class's range. A logistic
regression on 64x64 pixels gets roughly 80-90% test accuracy.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import cv2
import numpy as np

WARM, COOL = (0, 30), (90, 130)  # OpenCV hue ranges (0-180)


def _hsv_color(rng: np.random.Generator, hue: tuple[int, int], sat=(120, 255), val=(120, 255)) -> tuple[int, ...]:
    hsv = np.array([[[rng.integers(*hue) % 180, rng.integers(*sat), rng.integers(*val)]]], np.uint8)
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    a = np.array(_hsv_color(rng, (0, 180), (20, 160), (60, 230)), np.float32)
    b = np.array(_hsv_color(rng, (0, 180), (20, 160), (60, 230)), np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = (a * (1 - t[..., None]) + b * t[..., None]).astype(np.uint8)
    for _ in range(rng.integers(0, 4)):
        color = _hsv_color(rng, (0, 180), (0, 200), (40, 240))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if rng.random() < 0.5:
            cv2.line(img, p1, p2, color, int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            cv2.rectangle(img, p1, p2, color, -1 if rng.random() < 0.5 else 2)
    return img


def _rot(points: np.ndarray, center: tuple[float, float], angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    d = points - np.asarray(center)
    return np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]], 1) + np.asarray(center)


def draw_cat(img: np.ndarray, rng: np.random.Generator, hue: tuple[int, int]) -> None:
    h, w = img.shape[:2]
    r = rng.uniform(0.18, 0.3) * min(h, w)
    cx, cy = rng.uniform(r * 1.1, w - r * 1.1), rng.uniform(r * 1.6, h - r * 1.05)
    tilt = rng.uniform(-0.35, 0.35)
    fur, dark = _hsv_color(rng, hue), _hsv_color(rng, (0, 180), (0, 80), (0, 70))
    for side in (-1, 1):  # pointed ears first, the head covers their base
        ear = np.array([[cx + side * 0.95 * r, cy - 0.25 * r], [cx + side * 0.75 * r, cy - 1.55 * r],
                        [cx + side * 0.1 * r, cy - 0.85 * r]])
        cv2.fillPoly(img, [np.round(_rot(ear, (cx, cy), tilt)).astype(np.int32)], fur, cv2.LINE_AA)
    cv2.circle(img, (round(cx), round(cy)), round(r), fur, -1, cv2.LINE_AA)
    for side in (-1, 1):
        eye = _rot(np.array([[cx + side * 0.4 * r, cy - 0.15 * r]]), (cx, cy), tilt)[0]
        cv2.ellipse(img, (round(eye[0]), round(eye[1])), (max(1, round(0.13 * r)), max(1, round(0.2 * r))),
                    np.degrees(tilt), 0, 360, dark, -1, cv2.LINE_AA)
        for dy in (0.25, 0.45):
            a = _rot(np.array([[cx + side * 0.3 * r, cy + dy * r], [cx + side * 1.3 * r, cy + (dy - 0.1) * r]]),
                     (cx, cy), tilt)
            cv2.line(img, tuple(np.round(a[0]).astype(int)), tuple(np.round(a[1]).astype(int)), dark, 1, cv2.LINE_AA)


def draw_dog(img: np.ndarray, rng: np.random.Generator, hue: tuple[int, int]) -> None:
    h, w = img.shape[:2]
    r = rng.uniform(0.18, 0.3) * min(h, w)
    cx, cy = rng.uniform(r * 1.5, w - r * 1.5), rng.uniform(r * 1.2, h - r * 1.4)
    tilt = rng.uniform(-0.3, 0.3)
    fur = _hsv_color(rng, hue)
    ear_color = _hsv_color(rng, hue, (80, 255), (60, 180))
    dark = _hsv_color(rng, (0, 180), (0, 80), (0, 60))
    cv2.ellipse(img, (round(cx), round(cy)), (round(1.15 * r), round(0.95 * r)), np.degrees(tilt), 0, 360,
                fur, -1, cv2.LINE_AA)
    for side in (-1, 1):  # floppy ears hang down on both sides, over the head
        ear = _rot(np.array([[cx + side * 1.05 * r, cy + 0.2 * r]]), (cx, cy), tilt)[0]
        cv2.ellipse(img, (round(ear[0]), round(ear[1])), (max(2, round(0.35 * r)), max(3, round(0.85 * r))),
                    np.degrees(tilt) + side * 15, 0, 360, ear_color, -1, cv2.LINE_AA)
        eye = _rot(np.array([[cx + side * 0.38 * r, cy - 0.25 * r]]), (cx, cy), tilt)[0]
        cv2.circle(img, (round(eye[0]), round(eye[1])), max(1, round(0.12 * r)), dark, -1, cv2.LINE_AA)
    nose = _rot(np.array([[cx, cy + 0.3 * r]]), (cx, cy), tilt)[0]
    cv2.ellipse(img, (round(nose[0]), round(nose[1])), (max(1, round(0.22 * r)), max(1, round(0.15 * r))),
                np.degrees(tilt), 0, 360, dark, -1, cv2.LINE_AA)
    tongue = _rot(np.array([[cx, cy + 0.62 * r]]), (cx, cy), tilt)[0]
    cv2.ellipse(img, (round(tongue[0]), round(tongue[1])), (max(1, round(0.14 * r)), max(1, round(0.2 * r))),
                np.degrees(tilt), 0, 180, (120, 110, 230), -1, cv2.LINE_AA)


def make_image(rng: np.random.Generator, kind: str) -> bytes:
    """One JPEG of a "cat" or a "dog" on a random background."""
    h, w = int(rng.integers(64, 97)), int(rng.integers(64, 97))
    img = _background(rng, h, w)
    own, other = (WARM, COOL) if kind == "cat" else (COOL, WARM)
    hue = other if rng.random() < 0.1 else own
    (draw_cat if kind == "cat" else draw_dog)(img, rng, hue)
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (3, 3), rng.uniform(0.3, 1.0))
    noise = rng.normal(0.0, rng.uniform(2.0, 6.0), img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 80))])
    assert ok
    return data.tobytes()


def make_demo(out: Path, n_train: int, n_test: int, seed: int) -> int:
    """Write the tree (replacing ``out``); return the total number of bytes written."""
    if out.exists():
        shutil.rmtree(out)
    total = 0
    for split_index, (split, n) in enumerate((("training_set", n_train), ("test_set", n_test))):
        for class_index, (folder, stem) in enumerate((("cats", "cat"), ("dogs", "dog"))):
            rng = np.random.default_rng([seed, split_index, class_index])
            d = out / split / folder
            d.mkdir(parents=True)
            first = 1 if split == "training_set" else n_train + 1  # Kaggle numbers test files after train
            for i in range(first, first + n):
                data = make_image(rng, stem)
                (d / f"{stem}.{i}.jpg").write_bytes(data)
                total += len(data)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "demo")
    parser.add_argument("--train", type=int, default=200, help="training images per class")
    parser.add_argument("--test", type=int, default=60, help="test images per class")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    total = make_demo(args.out, args.train, args.test, args.seed)
    print(f"wrote {2 * (args.train + args.test)} images ({total / 1e6:.2f} MB) to {args.out}")


if __name__ == "__main__":
    main()
