"""Reading a (generated or edited) scene picture with direct pixel measures, no learned judge:

* :func:`read_colour` — the palette colour nearest (RGB) to the median of the pixels inside a mask (eroded, so
  that anti-aliased edges do not count);
* :func:`segment` — the pixels near a palette colour inside a window around where an object should be;
* :func:`read_shape` — the shape whose template (same centroid and area) overlaps a mask best (IoU);
* :func:`read_background` — the background whose reference statistics (mean RGB, texture contrast) are nearest
  to the pixels outside the objects.

Image metrics: PSNR and SSIM come from scikit-image (:func:`bg_psnr`, :func:`bg_ssim`, :func:`psnr`); IoU
(:func:`iou`) is scikit-learn's ``jaccard_score`` counted in numpy (a unit test holds the two equal).
"""
from __future__ import annotations

import functools

import numpy as np

from . import render as R

PALETTE = np.asarray([R.COLOURS[c] for c in R.COLOUR_NAMES], np.float32)
SEGMENT_DISTANCE = 90.0  # RGB distance to the palette colour that still counts as the object's colour


def _erode(mask: np.ndarray, r: int = 1) -> np.ndarray:
    from scipy.ndimage import binary_erosion
    e = binary_erosion(mask, iterations=r)
    return e if e.any() else mask


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation
    return binary_dilation(mask, iterations=r) if r > 0 else mask.copy()


def read_colour(image: np.ndarray, mask: np.ndarray) -> str:
    """The palette colour nearest to the median RGB of ``image`` (uint8 [H, W, 3]) inside ``mask`` (eroded)."""
    px = image[_erode(np.asarray(mask, bool))].astype(np.float32)
    if len(px) == 0:
        raise ValueError("read_colour: empty mask; pass the object's (non-empty) mask")
    med = np.median(px, axis=0)
    return R.COLOUR_NAMES[int(np.argmin(((PALETTE - med) ** 2).sum(1)))]


def segment(image: np.ndarray, colour: str, window: np.ndarray, distance: float = SEGMENT_DISTANCE) -> np.ndarray:
    """Pixels of ``image`` inside ``window`` (bool [H, W]) within ``distance`` (RGB) of palette ``colour``."""
    d = np.sqrt(((image.astype(np.float32) - np.asarray(R.COLOURS[colour], np.float32)) ** 2).sum(-1))
    return (d <= distance) & np.asarray(window, bool)


def template(shape: str, mask: np.ndarray) -> np.ndarray:
    """The ``shape`` with the centroid and the area of ``mask`` (bool [H, W]), as a bool mask."""
    ys, xs = np.nonzero(mask)
    area = float(len(ys))
    unit = {"circle": np.pi, "square": (2 * 0.86) ** 2, "triangle": 0.5 * 2 * 1.8}[shape]  # area at half = 1
    half = np.sqrt(area / unit)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    if shape == "triangle":  # centroid of the apex-up triangle sits 0.2 * half below its box centre
        cy -= (-1.0 + 0.8 + 0.8) / 3 * half
    return R.coverage(R.Obj(shape, R.COLOUR_NAMES[0], float(cx), float(cy), float(half)), mask.shape[0]) >= 0.5


def read_shape(mask: np.ndarray) -> str | None:
    """The shape whose template overlaps ``mask`` best (IoU); None for a mask of fewer than 12 pixels."""
    mask = np.asarray(mask, bool)
    if mask.sum() < 12:
        return None
    return max(R.SHAPES, key=lambda s: iou(template(s, mask), mask))


@functools.lru_cache(maxsize=None)
def _bg_refs(size: int = R.SIZE) -> tuple[np.ndarray, tuple]:
    rng = np.random.default_rng(0)
    feats, names = [], []
    for b in R.BACKGROUNDS:
        for _ in range(6):
            sc = R.layout(rng, [("red", "circle")], b, "test", size)
            bg = R.background(sc)
            feats.append(_bg_features(bg, np.zeros(bg.shape[:2], bool)))
            names.append(b)
    return np.stack(feats), tuple(names)


def _bg_features(image: np.ndarray, objects: np.ndarray) -> np.ndarray:
    px = image[~objects].astype(np.float32)
    grey = image.astype(np.float32).mean(-1)
    gx, gy = np.abs(np.diff(grey, axis=1)), np.abs(np.diff(grey, axis=0))
    keep_x, keep_y = ~(objects[:, 1:] | objects[:, :-1]), ~(objects[1:] | objects[:-1])
    contrast = np.concatenate([gx[keep_x], gy[keep_y]]).mean() if keep_x.any() else 0.0
    return np.concatenate([px.mean(0) / 255.0, [contrast / 25.0]]).astype(np.float32)


def read_background(image: np.ndarray, objects: np.ndarray) -> str:
    """The background nearest (mean RGB, mean gradient) to ``image`` outside ``objects`` (bool [H, W], dilated by
    2 px here)."""
    refs, names = _bg_refs(int(image.shape[0]))
    f = _bg_features(image, dilate(np.asarray(objects, bool), 2))
    return names[int(np.argmin(((refs - f) ** 2).sum(1)))]


# ----------------------------------------------------------------------------------- library metrics
def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1 for two empty ones): scikit-learn's ``jaccard_score(b, a)``
    for binary labels, counted here in numpy (tests/unit/test_scenes.py checks it equals scikit-learn's, bit for
    bit): ``jaccard_score`` validated its 16k-pixel inputs on every call and was a quarter of the time of reading
    a picture (``read_shape`` compares each object with three templates)."""
    a, b = np.asarray(a, bool).ravel(), np.asarray(b, bool).ravel()
    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(a & b)) / union


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio
    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(a, b, data_range=255))


def bg_psnr(result: np.ndarray, source: np.ndarray, keep: np.ndarray) -> float:
    """PSNR (dB) of ``result`` against ``source`` over the pixels ``keep`` (outside the dilated edit mask)."""
    keep = np.asarray(keep, bool)
    return psnr(result[keep], source[keep])


def bg_ssim(result: np.ndarray, source: np.ndarray, keep: np.ndarray) -> float:
    """Mean of scikit-image's SSIM map (7x7 windows, colour) over the pixels ``keep``, both pictures blanked
    outside ``keep`` first (as PIE-Bench masks them), so that changes elsewhere do not count."""
    from skimage.metrics import structural_similarity
    keep = np.asarray(keep, bool)
    a, b = result * keep[..., None], source * keep[..., None]
    _, full = structural_similarity(a, b, data_range=255, channel_axis=-1, full=True)
    return float(full.mean(-1)[keep].mean())


def read_scene(image: np.ndarray, min_pixels: int = 40,
               distance: float = 60.0) -> tuple[list[tuple[str, str | None]], str]:
    """Read a whole picture without knowing its layout (for samples): ((colour, shape) of every object, left to
    right; background). Objects are the connected regions of pixels within ``distance`` (RGB) of one palette
    colour, of at least ``min_pixels`` pixels."""
    from scipy.ndimage import binary_opening, label
    img = image.astype(np.float32)
    d = np.sqrt(((img[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1))  # [H, W, colours]
    nearest, close = d.argmin(-1), d.min(-1) <= distance
    found, union = [], np.zeros(image.shape[:2], bool)
    for c, name in enumerate(R.COLOUR_NAMES):
        mask = binary_opening(close & (nearest == c))
        lab, n = label(mask)
        for k in range(1, n + 1):
            m = lab == k
            if m.sum() >= min_pixels:
                found.append((float(np.nonzero(m)[1].mean()), name, read_shape(m)))
                union |= m
    found.sort()
    return [(c, s) for _, c, s in found], read_background(image, union)
