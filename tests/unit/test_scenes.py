"""The scene renderer (no ComfyUI): deterministic per seed, edits change only what they say, the training
sampler never draws a held-out colour x shape pair, captions parse back, and the pixel readers of
:mod:`ddiminv_dev.scenes.measure` read ground-truth renders right."""
from __future__ import annotations

import numpy as np
import pytest

from ddiminv_dev.scenes import edits as E
from ddiminv_dev.scenes import measure as M
from ddiminv_dev.scenes import render as R

SEEDS = range(12)


def _scenes(split="test", seeds=SEEDS):
    return [R.sample_scene(s, split) for s in seeds]


def test_deterministic_per_seed():
    a, b = R.render(R.sample_scene(7)), R.render(R.sample_scene(7))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks) and a.caption == b.caption
    c = R.render(R.sample_scene(8))
    assert not np.array_equal(a.image, c.image)


def test_render_layout():
    for sc in _scenes():
        r = R.render(sc)
        assert r.image.shape == (R.SIZE, R.SIZE, 3) and r.image.dtype == np.uint8
        assert r.masks.shape == (len(sc.objects), R.SIZE, R.SIZE)
        assert (r.masks.sum(0) <= 1).all(), "objects overlap"
        assert all(m.sum() >= 110 for m in r.masks), "an object is smaller than ~2 latent cells across"
        cx = [o.cx for o in sc.objects]
        assert cx == sorted(cx), "caption order is left to right"
        full = r.coverage == 1
        for o, f in zip(sc.objects, full, strict=True):
            assert (r.image[f] == np.asarray(R.COLOURS[o.colour], np.uint8)).all()
        bg = R.background(sc)
        assert np.array_equal(r.image[~r.masks.any(0)], bg[~r.masks.any(0)])


@pytest.mark.parametrize("seed", SEEDS)
def test_colour_swap_changes_only_the_object(seed):
    sc = R.sample_scene(seed, "test")
    e = E.random_edit(np.random.default_rng(seed), sc, "colour")
    src, tgt = R.render(e.source), R.render(e.target)
    m = src.masks[e.index]
    assert np.array_equal(m, tgt.masks[e.index])
    changed = (src.image != tgt.image).any(-1)
    assert changed.any() and not (changed & ~m).any()
    assert M.read_colour(tgt.image, m) == e.target.objects[e.index].colour


@pytest.mark.parametrize("seed", SEEDS)
def test_shape_swap_changes_only_the_union_of_masks(seed):
    sc = R.sample_scene(seed, "test")
    e = E.random_edit(np.random.default_rng(seed), sc, "shape")
    src, tgt = R.render(e.source), R.render(e.target)
    union = src.masks[e.index] | tgt.masks[e.index]
    changed = (src.image != tgt.image).any(-1)
    assert changed.any() and not (changed & ~union).any()
    assert not np.array_equal(src.masks[e.index], tgt.masks[e.index])
    others = [i for i in range(len(sc.objects)) if i != e.index]
    assert all(np.array_equal(src.masks[i], tgt.masks[i]) for i in others)
    assert (tgt.masks.sum(0) <= 1).all(), "the new shape overlaps another object"


@pytest.mark.parametrize("seed", SEEDS)
def test_background_swap_keeps_object_pixels(seed):
    sc = R.sample_scene(seed, "test")
    e = E.random_edit(np.random.default_rng(seed), sc, "background")
    src, tgt = R.render(e.source), R.render(e.target)
    assert np.array_equal(src.masks, tgt.masks)
    inside = (src.coverage == 1).any(0)
    assert np.array_equal(src.image[inside], tgt.image[inside])
    outside = ~src.masks.any(0)
    assert (src.image[outside] != tgt.image[outside]).any(-1).mean() > 0.9
    assert M.read_background(tgt.image, tgt.masks.any(0)) == e.target.background


def test_edit_captions():
    sc = R.Scene((R.Obj("circle", "red", 20, 30, 10), R.Obj("square", "blue", 45, 30, 9)), "grass", 3, 4)
    assert R.caption(sc) == "a red circle and a blue square on grass"
    assert E.colour_swap(sc, 1, "yellow").target_caption == "a red circle and a yellow square on grass"
    assert E.shape_swap(sc, 0, "triangle").target_caption == "a red triangle and a blue square on grass"
    assert E.background_swap(sc, "night").target_caption == "a red circle and a blue square on night"
    with pytest.raises(ValueError, match="already red"):
        E.colour_swap(sc, 0, "red")


def test_training_sampler_never_draws_held_out_pairs():
    rng = np.random.default_rng(0)
    drawn = {p for _ in range(3000) for p in R.random_pairs(rng, "train")}
    assert drawn == set(R.allowed_pairs("train")) and not drawn & R.HELD_OUT
    rng = np.random.default_rng(0)
    assert R.HELD_OUT <= {p for _ in range(3000) for p in R.random_pairs(rng, "test")}
    for s in range(200):
        assert not {(o.colour, o.shape) for o in R.sample_scene(s, "train").objects} & R.HELD_OUT


def test_training_captions_avoid_held_out_pairs():
    from ddiminv_dev.scenes.train import training_captions
    caps = training_captions(n2=40, n3=20)
    assert len(caps) == 10 * len(R.BACKGROUNDS) + 40 + 20
    assert len({R.caption_of([tuple(p) for p in ps], b) for ps, b in caps}) == len(caps)
    assert not {tuple(p) for ps, _ in caps for p in ps} & R.HELD_OUT


def test_textures_of_test_scenes_are_unseen_columns():
    for s in range(40):
        tr, te = R.sample_scene(s, "train"), R.sample_scene(s, "test")
        if tr.background in R.TEXTURES:
            assert tr.bg_x + R.REF <= R.TEST_MIN_X
        if te.background in R.TEXTURES:
            assert te.bg_x >= R.TEST_MIN_X


def test_captions_parse_back():
    for sc in _scenes("test", range(60)):
        pairs, bg = R.parse_caption(R.caption(sc))
        assert pairs == [(o.colour, o.shape) for o in sc.objects] and bg == sc.background
    assert R.parse_caption("a red circle, a blue square and a green triangle on bricks") == (
        [("red", "circle"), ("blue", "square"), ("green", "triangle")], "bricks")


@pytest.mark.parametrize("bad", ["a red circle", "a pink circle on grass", "a red hexagon on grass",
                                 "red circle on grass", "a red circle on the moon", "a red circle and on grass"])
def test_bad_captions_are_refused(bad):
    with pytest.raises(ValueError):
        R.parse_caption(bad)


def test_readers_read_ground_truth():
    n = ok_c = ok_s = ok_b = 0
    for sc in _scenes("test", range(30)):
        r = R.render(sc)
        for o, m, c in zip(sc.objects, r.masks, r.coverage, strict=True):
            n += 1
            ok_c += M.read_colour(r.image, m) == o.colour
            seg = M.segment(r.image, o.colour, M.dilate(m, 3))
            ok_s += M.read_shape(seg) == o.shape
            assert M.iou(seg, c >= 0.5) > 0.8  # measured min 0.84 (a small triangle), mean 0.96
        ok_b += M.read_background(r.image, r.masks.any(0)) == sc.background
    assert ok_c == n and ok_s == n and ok_b == 30


def test_library_metrics():
    a = np.zeros((16, 16, 3), np.uint8)
    b = a.copy()
    b[:8] = 10
    keep = np.zeros((16, 16), bool)
    keep[8:] = True
    # rows 0-7 changed: outside them PSNR is infinite and SSIM 1 (SSIM windows see blanked, equal pixels there)
    assert M.bg_psnr(b, a, keep) == float("inf") and M.bg_ssim(b, a, keep) == pytest.approx(1.0, abs=1e-6)
    assert M.bg_psnr(b, a, ~keep) == pytest.approx(10 * np.log10(255**2 / 100))
    assert M.bg_ssim(b, a, ~keep) < 0.1  # measured 0.071 (a whole-map mean would be ~0.5)
    assert M.iou(keep, keep) == 1.0 and M.iou(keep, ~keep) == 0.0


def test_iou_is_scikit_learns_jaccard_score():
    """M.iou counts in numpy what sklearn's jaccard_score computes: equal, bit for bit, on masks of every overlap
    (the empty pair is 1 by M.iou's own convention; sklearn warns and gives 0 there)."""
    from sklearn.metrics import jaccard_score
    rng = np.random.default_rng(0)
    for density in (0.002, 0.05, 0.3, 0.7, 0.998):
        for _ in range(8):
            a, b = rng.random((2, 32, 32)) < density
            assert M.iou(a, b) == float(jaccard_score(b.ravel(), a.ravel())), density
    sc = _scenes("test", range(1))[0]
    r = R.render(sc)
    seg = M.segment(r.image, sc.objects[0].colour, M.dilate(r.masks[0], 3))
    for shape in R.SHAPES:
        t = M.template(shape, seg)
        assert M.iou(t, seg) == float(jaccard_score(seg.ravel(), t.ravel())), shape
    assert M.iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def test_committed_weights_fit_the_budget():
    """All committed model weights (the learned model's, the scenes SD1.5 model's in ``scenes/weights``, the scenes
    flow DiT's in ``scenes/weights_dit``) <= 32 MB (issue 32); the scenes SD1.5 model <= 10 MB and the DiT with its
    16-channel VAE <= 10 MB (planned: 3.1 MB DiT at depth 4 rank 32 + 5.0 MB TAESD)."""
    from pathlib import Path
    root = Path(R.__file__).resolve().parents[1]
    every = list(root.glob("*/weights*/*.safetensors"))
    sd15 = [p for p in every if p.parent.parent.name == "scenes" and p.parent.name == "weights"]
    flow = [p for p in every if p.parent.parent.name == "scenes" and p.parent.name == "weights_dit"]
    assert any(p.parent.parent.name == "learned" for p in every) and sd15
    assert sum(p.stat().st_size for p in every) <= 32_000_000
    assert sum(p.stat().st_size for p in sd15) <= 10_000_000
    assert sum(p.stat().st_size for p in flow) <= 10_000_000


def test_read_scene_reads_ground_truth_without_the_layout():
    from ddiminv_dev.scenes.evaluate import judge
    for sc in _scenes("test", range(40)):
        r = R.render(sc)
        assert M.read_scene(r.image) == ([(o.colour, o.shape) for o in sc.objects], sc.background)
        v = judge(r.caption, r.image)
        assert v["caption"] and v["colour"] and v["shape"] and v["background"]
    blank = R.background(R.layout(np.random.default_rng(0), [("red", "circle")], "grass", "test"))
    assert M.read_scene(blank)[0] == [] and not judge("a red circle on grass", blank)["count"]
