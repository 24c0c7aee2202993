"""A small scikit-learn classifier of 64x64 crops into the 15 photographs (the judge of conditional samples).

Features: the crop downsampled to 8x8 (colour, 192 values), 8-bin histograms of R, G, B and of the saturation,
channel means and standard deviations, and gradient statistics of the grey image (mean |dx|, |dy|, 8-bin
histogram of the gradient magnitude, a 4x4 map of local gradient energy). Standardised, then a multinomial
``LogisticRegression``. Fitted on held-out crops only (``data.heldout_crops``, plus their mirror images and
Gaussian-blurred copies, sigma 1 px: samples come through the VAE decoder, which is smoother than a photo), once
per process (deterministic), in a few seconds.

``heldout_accuracy()`` is its accuracy on other held-out crops (another seed: the strip is narrow, so these
overlap the fitting crops partly); ``train_region_accuracy()`` is its accuracy on crops of the *training* part
of the photos, which it never saw: the distribution the model's samples imitate.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from . import data

FIT_PER_CLASS = 80
FIT_SEED = 101
TEST_PER_CLASS = 40
TEST_SEED = 202
BLUR_SIGMA = 1.0


def features(images: torch.Tensor) -> np.ndarray:
    """Feature matrix [N, D] of images float [N, 3, H, W] in [0, 1] (resized to 64x64 if needed)."""
    x = torch.as_tensor(images, dtype=torch.float32).clamp(0, 1)
    if x.shape[-2:] != (64, 64):
        x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    n = x.shape[0]
    small = F.adaptive_avg_pool2d(x, 8).reshape(n, -1)
    hist = [torch.stack([torch.histc(x[i, c], bins=8, min=0, max=1) for c in range(3)]).reshape(-1)
            for i in range(n)]
    hist = torch.stack(hist) / (64 * 64)
    mx, mn = x.max(1).values, x.min(1).values
    sat = (mx - mn) / (mx + 1e-3)
    sat_hist = torch.stack([torch.histc(sat[i], bins=8, min=0, max=1) for i in range(n)]) / (64 * 64)
    stats = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
    grey = x.mean(1, keepdim=True)
    dx = (grey[..., :, 1:] - grey[..., :, :-1])[..., :-1, :]
    dy = (grey[..., 1:, :] - grey[..., :-1, :])[..., :, :-1]
    mag = (dx.square() + dy.square()).sqrt()
    grad = torch.stack([dx.abs().mean((1, 2, 3)), dy.abs().mean((1, 2, 3)), mag.std((1, 2, 3))], 1)
    mag_hist = torch.stack([torch.histc(mag[i], bins=8, min=0, max=0.5) for i in range(n)]) / mag[0].numel()
    energy = F.adaptive_avg_pool2d(mag, 4).reshape(n, -1)
    feats = torch.cat([small, hist, sat_hist, stats, grad * 10, mag_hist, energy * 10], 1)
    return feats.numpy().astype(np.float64)


def blur(x: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of images [N, 3, H, W] (reflect padding)."""
    k = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-k.square() / (2 * sigma * sigma))
    k = k / k.sum()
    n, c, h, w = x.shape
    y = F.conv2d(F.pad(x.reshape(-1, 1, h, w), (3, 3, 0, 0), mode="reflect"), k.view(1, 1, 1, 7))
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="reflect"), k.view(1, 1, 7, 1))
    return y.reshape(n, c, h, w)


@functools.lru_cache(maxsize=1)
def _model():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    x, y = data.heldout_crops(FIT_PER_CLASS, FIT_SEED)
    x = torch.cat([x, x.flip(-1)])
    x = torch.cat([x, blur(x)])
    y = torch.cat([y, y, y, y])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000))
    clf.fit(features(x), y.numpy())
    return clf


def predict(images: torch.Tensor) -> np.ndarray:
    """Class indices (into ``data.CAPTIONS``) of images float [N, 3, H, W] in [0, 1]."""
    return _model().predict(features(images)).astype(np.int64)


def predict_captions(images: torch.Tensor) -> list[str]:
    return [data.CAPTIONS[i] for i in predict(images)]


@functools.lru_cache(maxsize=1)
def heldout_accuracy() -> float:
    """Accuracy on held-out crops drawn with another seed than the fitting crops."""
    x, y = data.heldout_crops(TEST_PER_CLASS, TEST_SEED)
    return float((predict(x) == y.numpy()).mean())


@functools.lru_cache(maxsize=1)
def train_region_accuracy() -> float:
    """Accuracy on crops of the photos' training part (never seen by the classifier)."""
    x, y = data.train_crops(TEST_PER_CLASS, TEST_SEED)
    return float((predict(x) == y.numpy()).mean())
