"""Edits as functions of a scene: each gives the edited :class:`~.render.Scene`, so its rendering is the
ground-truth edit (same layout, same background crop, same noise), with the source and target captions.

* :func:`colour_swap` — object ``index`` gets another colour; only its mask's pixels change.
* :func:`shape_swap` — object ``index`` gets another shape in the same box; only pixels in the union of the old
  and the new mask change.
* :func:`background_swap` — another background; pixels every object fully covers keep their value.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import render as R

KINDS = ("colour", "shape", "background")


@dataclass(frozen=True)
class Edit:
    kind: str
    source: R.Scene
    target: R.Scene
    index: int | None  # the edited object (None for a background swap)

    @property
    def source_caption(self) -> str:
        return R.caption(self.source)

    @property
    def target_caption(self) -> str:
        return R.caption(self.target)


def _object_swap(field: str, scene: R.Scene, index: int, value: str) -> Edit:
    """The ``field`` edit (colour or shape): object ``index`` gets ``value``; the rest of the scene unchanged."""
    o = scene.objects[index]
    if value == getattr(o, field):
        raise ValueError(f"{field}_swap: object {index} is already {'a ' if field == 'shape' else ''}{value}; "
                         f"pick another {field}")
    objs = list(scene.objects)
    objs[index] = replace(o, **{field: value})
    return Edit(field, scene, scene.with_objects(objs), index)


def colour_swap(scene: R.Scene, index: int, colour: str) -> Edit:
    return _object_swap("colour", scene, index, colour)


def shape_swap(scene: R.Scene, index: int, shape: str) -> Edit:
    return _object_swap("shape", scene, index, shape)


def background_swap(scene: R.Scene, background: str, bg_x: int | None = None, bg_y: int | None = None) -> Edit:
    if background == scene.background:
        raise ValueError(f"background_swap: the scene is already on {background}; pick another background")
    if background in R.TEXTURES:
        bx = bg_x if bg_x is not None else min(scene.bg_x, R.TEXTURE_SIDE - R.REF) if scene.bg_x < R.TEXTURE_SIDE else 0
        by = bg_y if bg_y is not None else min(scene.bg_y, R.TEXTURE_SIDE - R.REF) if scene.bg_y < R.TEXTURE_SIDE else 0
    else:
        bx = bg_x if bg_x is not None else scene.bg_x
        by = bg_y if bg_y is not None else scene.bg_y
    return Edit("background", scene, replace(scene, background=background, bg_x=int(bx), bg_y=int(by)), None)


def random_edit(rng: np.random.Generator, scene: R.Scene, kind: str, split: str = "test") -> Edit:
    """A random edit of ``kind`` (any target, held-out pairs included: the benchmark measures them). A background
    edit's target texture crop (or noise seed) is drawn from ``split``'s range, so a test item never shows a
    training background."""
    if kind == "background":
        target = str(rng.choice([b for b in R.BACKGROUNDS if b != scene.background]))
        return background_swap(scene, target, *R.background_offsets(rng, target, split))
    i = int(rng.integers(0, len(scene.objects)))
    o = scene.objects[i]
    if kind == "colour":
        return colour_swap(scene, i, str(rng.choice([c for c in R.COLOUR_NAMES if c != o.colour])))
    if kind == "shape":
        return shape_swap(scene, i, str(rng.choice([s for s in R.SHAPES if s != o.shape])))
    raise ValueError(f"unknown edit kind {kind!r}; use one of {', '.join(KINDS)}")
