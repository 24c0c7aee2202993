"""Procedurally rendered scenes with exact ground-truth edits (development code; numpy + scikit-image only).

A :class:`Scene` is one to three non-overlapping :class:`Obj` (shape, colour, centre, half-size) on a
background (three textures cut from ``skimage.data`` photographs, two procedural fills). :func:`render` turns
it into an RGB uint8 picture, per-object masks and coverages; :func:`caption` writes its caption in the
grammar of ``docs/scenes.md`` and :func:`parse_caption` reads one back. Edits (:mod:`.edits`) are functions
``Scene -> Scene``, so rendering the edited scene *is* the ground-truth edit.

Rendering is exact and seeded: every object is drawn with 4x4 supersampled coverage ``a`` and composited as
``round(bg * (1 - a) + colour * a)`` over a uint8 background; a pixel an object does not touch (``a == 0``)
keeps the background value bit for bit, and an object pixel it fully covers (``a == 1``) is the palette colour
whatever the background. The mask of an object is ``a > 0``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import numpy as np

VERSION = "2"  # bump when a change alters rendered pixels (cached training pools are keyed on it)
SIZE = 128  # default picture side (px): 16x16 latent cells, so shapes survive the VAE round trip
REF = 64  # the side at which object sizes, gaps and texture crops are given (scaled by size / REF)
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB (uint8): saturated and far apart, none close to a background's mean
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 40),
}
COLOUR_NAMES = tuple(COLOURS)
TEXTURES = {  # background word -> (skimage.data photo, RGB tint applied to the grey photo)
    "grass": ("grass", (0.50, 0.68, 0.38)),
    "bricks": ("brick", (0.78, 0.56, 0.46)),
    "gravel": ("gravel", (0.62, 0.62, 0.60)),
}
PLAIN = {  # background word -> (top RGB, bottom RGB, noise std): procedural vertical gradients
    "paper": ((236, 232, 222), (226, 222, 212), 3.0),
    "night": ((12, 16, 44), (34, 40, 78), 3.0),
}
BACKGROUNDS = tuple(TEXTURES) + tuple(PLAIN)
# colour x shape pairs the training sampler never draws (generalisation is measured on them)
HELD_OUT = frozenset({("green", "triangle"), ("yellow", "circle")})
TEXTURE_SIDE = 256  # textures are resized to this side before cropping
TRAIN_MAX_X = 112  # training crops (REF px wide) start at x in [0, TRAIN_MAX_X]: they cover columns [0, 176)
TEST_MIN_X = 176  # test crops start at x >= 176: columns never in a training crop
MIN_HALF, MAX_HALF = 8, 14  # object half-size range at REF (at SIZE 128: objects 32..56 px, 4..7 latent cells)
GAP = 2  # px between the bounding circles of two objects (and to the border)
MIN_DX = 4  # px at REF between two objects' centre x, so that "left to right" (the caption's order) is never a tie
REACH = 1.3  # bounding-circle radius / half-size: every shape (square corners 1.22, triangle corners 1.28) fits


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: float  # centre, px (at the scene's size)
    cy: float
    half: float  # half of the bounding-box side, px

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; use one of {', '.join(SHAPES)}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; use one of {', '.join(COLOURS)}")


@dataclass(frozen=True)
class Scene:
    objects: tuple  # of Obj, left to right (the caption's order)
    background: str
    bg_x: int = 0  # texture crop offset (textures) / noise seed (procedural backgrounds)
    bg_y: int = 0
    size: int = SIZE
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; use one of {', '.join(BACKGROUNDS)}")
        if not 1 <= len(self.objects) <= 3:
            raise ValueError("a scene has one to three objects")

    def with_objects(self, objects) -> Scene:
        return replace(self, objects=tuple(objects))


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # uint8 [H, W, 3]
    masks: np.ndarray  # bool [n, H, W], object i's pixels (coverage > 0)
    coverage: np.ndarray  # float32 [n, H, W] in [0, 1]
    caption: str


# ------------------------------------------------------------------------------------------ backgrounds
@functools.lru_cache(maxsize=None)
def _texture(word: str) -> np.ndarray:
    """Tinted texture, float32 [TEXTURE_SIDE, TEXTURE_SIDE, 3] in [0, 255]."""
    import skimage.data
    import skimage.transform
    name, tint = TEXTURES[word]
    g = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
    g = skimage.transform.resize(g, (TEXTURE_SIDE, TEXTURE_SIDE), anti_aliasing=True, preserve_range=True)
    g = 0.25 + 0.75 * (g - g.min()) / max(float(g.max() - g.min()), 1e-6)  # keep some contrast, never black
    return (g[..., None] * np.asarray(tint, np.float32)[None, None] * 255.0).astype(np.float32)


def background(scene: Scene) -> np.ndarray:
    """The scene's background, uint8 [size, size, 3]."""
    s = scene.size
    if scene.background in TEXTURES:
        tex = _texture(scene.background)
        crop = tex[scene.bg_y:scene.bg_y + REF, scene.bg_x:scene.bg_x + REF]  # a REF px crop, resized to size
        if crop.shape[:2] != (REF, REF):
            raise ValueError(f"texture offset ({scene.bg_x}, {scene.bg_y}) out of range")
        if s != REF:
            import skimage.transform
            crop = skimage.transform.resize(crop, (s, s), order=1, preserve_range=True)
        return np.clip(np.round(crop), 0, 255).astype(np.uint8)
    top, bottom, std = PLAIN[scene.background]
    t = np.linspace(0.0, 1.0, s, dtype=np.float32)[:, None, None]
    grad = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    noise = np.random.default_rng(scene.bg_x * 7919 + scene.bg_y).normal(0.0, std, (s, s, 1)).astype(np.float32)
    return np.clip(np.round(grad + noise), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ shapes
def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, h: float) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        s = 0.86 * h  # a square of about the circle's area
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    # triangle, apex up: apex (0, -h), base corners (+-h, 0.8h) relative to the centre
    top, base = -h, 0.8 * h
    inside_y = (dy >= top) & (dy <= base)
    half_width = h * (dy - top) / (base - top)
    return inside_y & (np.abs(dx) <= half_width)


def coverage(obj: Obj, size: int) -> np.ndarray:
    """Fraction of each pixel that ``obj`` covers (4x4 supersampling), float32 [size, size]."""
    n = SUPERSAMPLE
    sub = (np.arange(size * n, dtype=np.float32) + 0.5) / n  # subpixel centres, pixel units
    y, x = np.meshgrid(sub, sub, indexing="ij")
    inside = _inside(obj.shape, x, y, obj.cx, obj.cy, obj.half).astype(np.float32)
    return inside.reshape(size, n, size, n).mean(axis=(1, 3))


def render(scene: Scene) -> Rendered:
    """Picture, masks, coverages and caption of ``scene``."""
    bg = background(scene)
    img = bg.astype(np.float32)
    covs = np.stack([coverage(o, scene.size) for o in scene.objects]).astype(np.float32)
    for o, a in zip(scene.objects, covs, strict=True):
        col = np.asarray(COLOURS[o.colour], np.float32)
        img = img * (1.0 - a[..., None]) + col * a[..., None]
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    out[covs.sum(0) == 0] = bg[covs.sum(0) == 0]  # untouched pixels: the background, bit for bit
    return Rendered(out, covs > 0, covs, caption(scene))


# ------------------------------------------------------------------------------------------------ grammar
def object_phrase(o) -> str:
    colour, shape = (o.colour, o.shape) if isinstance(o, Obj) else o
    return f"a {colour} {shape}"


def caption_of(pairs, background_word: str) -> str:
    """Caption of (colour, shape) pairs listed left to right on ``background_word``."""
    phrases = [object_phrase(p) for p in pairs]
    if len(phrases) == 1:
        objs = phrases[0]
    else:
        objs = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{objs} on {background_word}"


def caption(scene: Scene) -> str:
    return caption_of([(o.colour, o.shape) for o in scene.objects], scene.background)


def parse_caption(text: str) -> tuple[list[tuple[str, str]], str]:
    """((colour, shape) pairs left to right, background word) of a caption in the grammar; ValueError if not."""
    t = " ".join(str(text).strip().lower().split())
    head, sep, bg = t.rpartition(" on ")
    if not sep or bg not in BACKGROUNDS:
        raise ValueError(f"not a scene caption: {text!r} (expected '... on <{'|'.join(BACKGROUNDS)}>')")
    if " and " in head:
        first, _, last = head.rpartition(" and ")
        parts = first.split(", ") + [last]
    else:
        parts = [head]
    pairs = []
    for p in parts:
        words = p.split(" ")
        if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
            raise ValueError(f"not an object phrase: {p!r} in {text!r} (expected 'a <colour> <shape>')")
        pairs.append((words[1], words[2]))
    if not 1 <= len(pairs) <= 3:
        raise ValueError(f"a caption names one to three objects: {text!r}")
    return pairs, bg


# ------------------------------------------------------------------------------------------------ sampling
def _place(rng: np.random.Generator, n: int, size: int, tries: int = 200):
    """n non-overlapping (cx, cy, half), or None."""
    k = size / REF
    for _ in range(tries):
        out = []
        for _i in range(n):
            h = float(rng.uniform(MIN_HALF, MAX_HALF)) * k
            lo, hi = h + GAP * k, size - h - GAP * k
            cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
            if any((cx - x) ** 2 + (cy - y) ** 2 < (REACH * (h + hh) + GAP * k) ** 2 or abs(cx - x) < MIN_DX * k
                   for x, y, hh in out):
                break
            out.append((cx, cy, h))
        else:
            return out
    return None


def layout(rng: np.random.Generator, pairs, background_word: str, split: str = "train", size: int = SIZE) -> Scene:
    """A random layout of the (colour, shape) ``pairs`` (left to right) on ``background_word``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    while True:
        spots = _place(rng, len(pairs), size)
        if spots is not None:
            break
    spots.sort(key=lambda s: s[0])
    objs = tuple(Obj(shape, colour, cx, cy, h) for (colour, shape), (cx, cy, h) in zip(pairs, spots, strict=True))
    return Scene(objs, background_word, *background_offsets(rng, background_word, split), size)


def background_offsets(rng: np.random.Generator, background_word: str, split: str = "train") -> tuple[int, int]:
    """(bg_x, bg_y) of a random ``background_word`` of ``split``: a texture crop from the split's columns, or a
    procedural noise seed from the split's range (test seeds are >= 2**20, training ones below)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if background_word in TEXTURES:
        x0, x1 = (0, TRAIN_MAX_X) if split == "train" else (TEST_MIN_X, TEXTURE_SIDE - REF)
        return int(rng.integers(x0, x1 + 1)), int(rng.integers(0, TEXTURE_SIDE - REF + 1))
    bx, by = int(rng.integers(0, 2**20)), int(rng.integers(0, 2**20))
    return bx + (0 if split == "train" else 2**20), by  # test noise seeds never equal training ones


def allowed_pairs(split: str = "train") -> list[tuple[str, str]]:
    pairs = [(c, s) for c in COLOUR_NAMES for s in SHAPES]
    return [p for p in pairs if p not in HELD_OUT] if split == "train" else pairs


def random_pairs(rng: np.random.Generator, split: str = "train", n: int | None = None,
                 weights=(0.3, 0.45, 0.25)) -> list[tuple[str, str]]:
    pool = allowed_pairs(split)
    if n is None:
        n = int(rng.choice([1, 2, 3], p=np.asarray(weights) / np.sum(weights)))
    return [pool[int(i)] for i in rng.integers(0, len(pool), n)]


def sample_scene(seed_or_rng, split: str = "train", n: int | None = None, size: int = SIZE) -> Scene:
    """A random scene. ``split="train"`` never draws a :data:`HELD_OUT` pair and crops textures from the
    training columns; ``"test"`` draws every pair and crops textures from the other columns."""
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(int(seed_or_rng))
    pairs = random_pairs(rng, split, n)
    bgw = BACKGROUNDS[int(rng.integers(0, len(BACKGROUNDS)))]
    return layout(rng, pairs, bgw, split, size)


def to_tensor(images) -> "np.ndarray":
    """uint8 [..., H, W, 3] -> float32 in [0, 1] (a ComfyUI IMAGE layout when given [B, H, W, 3])."""
    return np.asarray(images, np.float32) / 255.0
