"""The learned model's data: 15 real photographs from ``skimage.data``, one short caption each.

Each photo is converted to RGB float in [0, 1] and resized (antialiased) by
``scale = max(SHORT_SIDE / min(h, w), MIN_WIDTH / w)``: the shorter side becomes 160 px (a 64 px crop then
shows a recognisable part of the picture), and every photo is at least 208 px wide so that the held-out strip
(the right ``HELDOUT_FRACTION`` = 31.25 % of the width, never trained on) is at least 65 px wide and holds a
64x64 crop. Training crops come from the left 68.75 %, evaluation crops from the right strip only.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = (
    ("astronaut", "an astronaut"),
    ("chelsea", "a cat"),
    ("coffee", "a cup of coffee"),
    ("rocket", "a rocket"),
    ("retina", "a retina"),
    ("immunohistochemistry", "a stained tissue"),
    ("hubble_deep_field", "a galaxy field"),
    ("stereo_motorcycle", "a motorcycle"),
    ("camera", "a cameraman"),
    ("coins", "coins"),
    ("moon", "the moon"),
    ("page", "a page of text"),
    ("text", "painted text"),
    ("brick", "a brick wall"),
    ("grass", "grass"),
)
NAMES = [n for n, _ in CLASSES]
CAPTIONS = [c for _, c in CLASSES]
SHORT_SIDE = 160
MIN_WIDTH = 208
HELDOUT_FRACTION = 0.3125
CROP = 64


def caption_index(caption: str) -> int:
    """The class index of ``caption`` (exact match after stripping; case-insensitive)."""
    key = str(caption).strip().lower()
    for i, c in enumerate(CAPTIONS):
        if c == key:
            return i
    raise ValueError(f"unknown caption {caption!r}: the learned model knows only {', '.join(map(repr, CAPTIONS))}")


@functools.lru_cache(maxsize=None)
def photo(index: int) -> torch.Tensor:
    """Photo ``index`` as float [3, H, W] in [0, 1], resized as the module docstring says."""
    import skimage.data
    im = getattr(skimage.data, NAMES[index])()
    if isinstance(im, tuple):  # stereo_motorcycle: (left, right, disparity)
        im = im[0]
    im = np.asarray(im)
    if im.ndim == 2:
        im = np.stack([im] * 3, axis=-1)
    im = im[..., :3]
    x = torch.from_numpy(im.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    h, w = x.shape[-2:]
    scale = max(SHORT_SIDE / min(h, w), MIN_WIDTH / w)
    size = (int(round(h * scale)), int(round(w * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x[0].clamp(0, 1).contiguous()


def split_column(index: int) -> int:
    """First column of the held-out strip of photo ``index``."""
    w = photo(index).shape[-1]
    return w - int(math.ceil(w * HELDOUT_FRACTION))


def train_region(index: int) -> torch.Tensor:
    return photo(index)[:, :, :split_column(index)]


def heldout_region(index: int) -> torch.Tensor:
    return photo(index)[:, :, split_column(index):]


def _crops(regions, n_per_class: int, size: int, g: torch.Generator, flip: bool):
    out, labels = [], []
    for c, reg in enumerate(regions):
        h, w = reg.shape[-2:]
        ys = torch.randint(0, h - size + 1, (n_per_class,), generator=g)
        xs = torch.randint(0, w - size + 1, (n_per_class,), generator=g)
        fl = torch.rand(n_per_class, generator=g) < 0.5
        for y, x, f in zip(ys.tolist(), xs.tolist(), fl.tolist(), strict=True):
            crop = reg[:, y:y + size, x:x + size]
            out.append(crop.flip(-1) if (flip and f) else crop)
            labels.append(c)
    return torch.stack(out), torch.tensor(labels, dtype=torch.long)


def train_crops(n_per_class: int, seed: int, size: int = CROP, flip: bool = True):
    """Random ``size`` crops of the training part of every photo (random horizontal flips with ``flip``).

    Returns (images float [N, 3, size, size] in [0, 1], labels long [N]), class-major order."""
    g = torch.Generator().manual_seed(int(seed))
    return _crops([train_region(i) for i in range(len(NAMES))], n_per_class, size, g, flip)


def heldout_crops(n_per_class: int, seed: int, size: int = CROP):
    """Random ``size`` crops of the held-out strip of every photo (never trained on), no flips.

    Returns (images float [N, 3, size, size] in [0, 1], labels long [N]), class-major order."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    return _crops([heldout_region(i) for i in range(len(NAMES))], n_per_class, size, g, False)


class CropSampler:
    """Endless seeded random training crops (mixed classes) for the trainers."""

    def __init__(self, size: int, seed: int, flip: bool = True):
        self.size, self.flip = size, flip
        self.g = torch.Generator().manual_seed(int(seed))
        self.regions = [train_region(i) for i in range(len(NAMES))]

    def batch(self, n: int):
        cls = torch.randint(0, len(self.regions), (n,), generator=self.g).tolist()
        out = []
        for c in cls:
            reg = self.regions[c]
            h, w = reg.shape[-2:]
            y = int(torch.randint(0, h - self.size + 1, (1,), generator=self.g))
            x = int(torch.randint(0, w - self.size + 1, (1,), generator=self.g))
            crop = reg[:, y:y + self.size, x:x + self.size]
            if self.flip and bool(torch.rand(1, generator=self.g) < 0.5):
                crop = crop.flip(-1)
            out.append(crop)
        return torch.stack(out), torch.tensor(cls, dtype=torch.long)


def demo_image(caption: str) -> torch.Tensor:
    """A fixed held-out 64x64 crop of the caption's photo (vertically centred in the held-out strip, left
    edge of the strip), as a ComfyUI IMAGE: float [1, 64, 64, 3] in [0, 1]."""
    reg = heldout_region(caption_index(caption))
    h = reg.shape[-2]
    y = (h - CROP) // 2
    return reg[:, y:y + CROP, :CROP].permute(1, 2, 0)[None].contiguous().clone()
