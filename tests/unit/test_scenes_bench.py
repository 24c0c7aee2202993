"""bench/edit.py's scoring (no ComfyUI): the ground truth scores perfectly, the unedited source scores as a failed
edit with a perfect background, and the items are seeded held-out scenes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench import edit as BE
from ddiminv_dev.scenes import render as R


@pytest.fixture(scope="module")
def batches():
    return BE.items(seed=5, n=3)


def test_items_are_seeded_test_scenes(batches):
    again = BE.items(seed=5, n=3)
    assert [b.kind for b in batches] == ["colour", "shape", "background"]
    for b, c in zip(batches, again, strict=True):
        assert [e.target_caption for e in b.edits] == [e.target_caption for e in c.edits]
        assert all(np.array_equal(x.image, y.image) for x, y in zip(b.gt, c.gt, strict=True))
    assert [e.target_caption for e in BE.items(seed=6, n=3)[0].edits] != [e.target_caption for e in batches[0].edits]


def test_ground_truth_scores_perfectly(batches):
    for b in batches:
        for e, s, g in zip(b.edits, b.src, b.gt, strict=True):
            r = BE.score(e, s, g, g.image)
            assert r["accuracy"] == 1.0 and r["iou"] > 0.8 and math.isinf(r["gt_psnr"]), (b.kind, r)
            if b.kind != "background":  # outside the edited object nothing changed
                assert math.isinf(r["bg_psnr"]) and r["bg_ssim"] == pytest.approx(1.0)


def test_unedited_source_fails_the_edit_but_keeps_the_background(batches):
    for b in batches:
        for e, s, g in zip(b.edits, b.src, b.gt, strict=True):
            r = BE.score(e, s, g, s.image)
            assert r["accuracy"] == 0.0 and math.isfinite(r["gt_psnr"]), (b.kind, r)
            assert math.isinf(r["bg_psnr"])  # the kept region is the source's own pixels


def test_a_blurred_result_scores_between(batches):
    from scipy.ndimage import uniform_filter
    b = batches[0]
    e, s, g = b.edits[0], b.src[0], b.gt[0]
    blurred = uniform_filter(g.image.astype(np.float32), size=(3, 3, 1)).round().astype(np.uint8)
    r = BE.score(e, s, g, blurred)
    assert 15 < r["bg_psnr"] < 40 and 15 < r["gt_psnr"] < 40 and r["bg_ssim"] < 1.0


def test_every_method_is_one_entry():
    assert all(callable(f) for f in BE.METHODS.values()) and len(BE.METHODS) >= 8
    assert R.HELD_OUT  # the benchmark's items may target held-out pairs (random_edit draws any target)


def test_a_wrong_background_is_a_failed_background_edit(batches):
    from dataclasses import replace
    b = batches[2]
    for e, s, g in zip(b.edits, b.src, b.gt, strict=True):
        third = next(x for x in R.BACKGROUNDS if x not in (e.source.background, e.target.background))
        wrong = R.render(replace(e.target, background=third, bg_x=0, bg_y=0)).image
        assert BE.score(e, s, g, wrong)["accuracy"] == 0.0


def test_held_out_targets_are_flagged():
    from ddiminv_dev.scenes import edits as E
    sc = R.Scene((R.Obj("circle", "red", 20, 30, 10), R.Obj("square", "blue", 45, 30, 9)), "grass", 3, 4)
    assert BE.held_out(E.colour_swap(sc, 0, "yellow")) and BE.held_out(E.shape_swap(sc, 1, "circle")) is False
    assert BE.held_out(E.colour_swap(sc, 1, "green")) is False and BE.held_out(E.shape_swap(sc, 0, "square")) is False


def test_background_edit_targets_come_from_held_out_columns_and_seeds():
    """A test item's target background is never a training crop or noise seed (issue 31: a procedural source's
    texture target came from column 0, a texture source's procedural target reused its column as a seed)."""
    from ddiminv_dev.scenes import edits as E
    rng = np.random.default_rng(0)
    kinds = set()
    for i in range(200):
        e = E.random_edit(rng, R.sample_scene(i, "test"), "background")
        t = e.target
        kinds.add((e.source.background in R.TEXTURES, t.background in R.TEXTURES))
        if t.background in R.TEXTURES:
            assert t.bg_x >= R.TEST_MIN_X and t.bg_x + R.REF <= R.TEXTURE_SIDE, (e.source_caption, t)
        else:
            assert t.bg_x >= 2**20, (e.source_caption, t)
    assert kinds == {(a, b) for a in (True, False) for b in (True, False)}  # every source/target kind occurred


def test_sdedit_samples_with_the_benchmark_scheduler(monkeypatch):
    calls = []
    monkeypatch.setattr(BE.B, "call", lambda node, *a, **k: calls.append((node, a)) or ({"samples": "z"},))

    class S:
        model, seed, steps, cfg = "model", 1, 7, 5.0
        cond = staticmethod(lambda texts: list(texts))
        encode = staticmethod(lambda images: "latent")

    b = BE.items(seed=5, n=1, kinds=("colour",))[0]
    assert BE.sdedit(0.6)(S, b) == "z"
    (node, args), = calls
    assert node == "KSampler" and args[4:6] == ("euler", BE.SCHED) and args[-1] == 0.6


def test_means_count_a_perfect_item_at_the_cap():
    assert BE.mean([math.inf, 20.0]) == (BE.PSNR_CAP + 20.0) / 2
    assert BE.mean([None, 20.0]) == 20.0 and BE.mean([None]) is None
    with pytest.raises(ValueError, match="non-finite"):
        BE.mean([math.nan, 1.0])


def test_every_row_is_charged_for_the_inversion_it_shares(monkeypatch):
    """The first row that inverts builds the trajectory (which encodes the latent); a later row reusing it is
    charged the same shared cost, and its own work on top (fake clock: units, not seconds)."""
    now = [0.0]
    monkeypatch.setattr(BE, "_clock", lambda: now[0])

    def work(units):
        now[0] += units

    b = BE.Batch("colour", [])

    def latent():
        work(2)
        return "latent"

    def invert():
        BE.cached(b, "latent", latent)
        work(3)
        return "traj"

    def row(own):
        def fn():
            work(own)
            return BE.cached(b, "traj", invert)
        return fn

    assert BE.timed(b, row(1)) == ("traj", 6.0, 5.0)  # builds both: 1 own + 3 inversion + 2 encoding
    assert BE.timed(b, row(4)) == ("traj", 9.0, 5.0)  # reuses both, still charged for them
    assert BE.timed(b, lambda: work(1)) == (None, 1.0, 0.0)  # uses nothing cached
