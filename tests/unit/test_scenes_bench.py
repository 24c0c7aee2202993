"""bench/edit.py without ComfyUI: its scoring (the ground truth scores perfectly, the unedited source scores as a
failed edit with a perfect background), its items (seeded held-out scenes and backgrounds), its means and its
rows on fake nodes and a fake clock (what each row runs and what it is charged for)."""
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
        encode = staticmethod(lambda images, refine=0: ("latent", 28.0))  # (LATENT, vae_ceiling)

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

    both = ["latent", "traj"]
    assert BE.timed(b, row(1)) == ("traj", 6.0, 5.0, both)  # builds both: 1 own + 3 inversion + 2 encoding
    assert BE.timed(b, row(4)) == ("traj", 9.0, 5.0, both)  # reuses both, still charged for them
    assert BE.timed(b, lambda: work(1)) == (None, 1.0, 0.0, [])  # uses nothing cached


# ------------------------------------------------------------------ the rows on a fake ComfyUI (fake clock: units)
COST = {"CLIPTextEncode": 1.0, "KSampler": 7.0, "encode": 2.0, "invert": 5.0, "sample": 3.0}  # refine: 1 / iteration


@pytest.fixture
def fake(monkeypatch):
    """(Setup-like object, log of calls): the rows run through the real ``Setup.cond`` / ``Setup.encode`` on fake
    nodes, each advancing a fake clock by its COST (a refine iteration by 1)."""
    from types import SimpleNamespace

    import torch
    now, log = [0.0], []
    monkeypatch.setattr(BE, "_clock", lambda: now[0])

    def work(what, **info):
        now[0] += COST[what]
        log.append((what, info))

    def call(node, *a, **k):
        work(node)
        return ([[torch.zeros(1, 3, 2), {}]],) if node == "CLIPTextEncode" else ({"samples": ("ksampler", a[5])},)

    def encode(pixels, vae, refine=0, **k):
        work("encode", refine=refine)
        now[0] += refine
        return ({"samples": ("latent", refine)}, 28.0 + refine / 100)

    def invert(model, pos, neg, latent, steps, denoise, sched, method):
        work("invert", method=method, sched=sched)
        return (None, None, ("traj", method, latent["samples"]))

    def sample(model, pos, neg, traj, cfg, **kw):
        work("sample", **kw)
        return ({"samples": ("result", traj, tuple(sorted(kw.items())))},)

    mods = {"nodes.encode": SimpleNamespace(DDIMInvVAEEncode=SimpleNamespace(execute=encode)),
            "nodes.invert": SimpleNamespace(DDIMInvert=SimpleNamespace(execute=invert)),
            "nodes.sampler": SimpleNamespace(DDIMInvSampler=SimpleNamespace(execute=sample))}
    monkeypatch.setattr(BE.B, "call", call)
    monkeypatch.setattr(BE.B, "pack", mods.__getitem__)
    S = SimpleNamespace(model="m", clip="c", vae="v", seed=1, steps=4, cfg=5.0, refine=25, torch=torch, _cond={})
    S.cond = lambda texts: BE.Setup.cond(S, texts)
    S.pixels = lambda images: "pixels"
    S.encode = lambda images, refine=0: BE.Setup.encode(S, images, refine)
    return S, log


def _clip_units(b, *which):
    texts = {"source": [e.source_caption for e in b.edits], "target": [e.target_caption for e in b.edits],
             "negative": [""]}
    return sum(len(set(texts[w])) * COST["CLIPTextEncode"] for w in which)


def test_exact_from_refined_latent_inverts_the_refined_latent_and_pays_for_the_refine(fake):
    S, log = fake
    b = BE.items(seed=5, n=2, kinds=("colour",))[0]
    out, seconds, shared, charged = BE.timed(b, lambda: BE.METHODS["exact from refined latent"](S, b))
    assert out == ("result", ("traj", "exact", ("latent", 25)), (("exact_replay", "ddim"),))
    assert [i for w, i in log if w == "encode"] == [{"refine": 25}]
    assert [i for w, i in log if w == "invert"] == [{"method": "exact", "sched": BE.SCHED}]
    assert charged == ["cond-negative", "cond-source", "cond-target", "latent-refined", "traj-exact-refined"]
    clip = _clip_units(b, "source", "target", "negative")
    assert seconds == 2 + 25 + 5 + 3 + clip and shared == seconds - 3
    assert b.ceilings == {"latent-refined": 28.25}
    # the plain exact row next to it starts from the posterior mean and is not charged for the refine
    out, seconds, _, charged = BE.timed(b, lambda: BE.METHODS["exact, ddim replay"](S, b))
    assert out == ("result", ("traj", "exact", ("latent", 0)), (("exact_replay", "ddim"),))
    assert charged == ["cond-negative", "cond-source", "cond-target", "latent", "traj-exact"]
    assert seconds == 2 + 5 + 3 + clip


def test_every_row_is_charged_for_the_prompts_it_encodes(fake):
    """Conditioning is built once per batch and charged to every row using it: SDEdit 0.8, run after SDEdit 0.6,
    costs what 0.6 cost (before: Setup memoised it, so only the first row paid for CLIP)."""
    S, _ = fake
    b = BE.items(seed=5, n=2, kinds=("shape",))[0]
    first = BE.timed(b, lambda: BE.METHODS["sdedit 0.6 (core KSampler)"](S, b))
    second = BE.timed(b, lambda: BE.METHODS["sdedit 0.8 (core KSampler)"](S, b))
    expect = COST["KSampler"] + COST["encode"] + _clip_units(b, "target", "negative")
    assert first[1] == expect and second[1] == expect, (first, second)
    assert first[3] == second[3] == ["cond-negative", "cond-target", "latent"]


def test_methods_are_chosen_by_name_even_with_a_comma_in_the_name():
    """--methods splits on commas, and "exact, ddim replay" holds one (it could not be chosen: 'unknown methods
    ['exact', 'ddim replay']')."""
    assert BE.parse_methods("all") == list(BE.METHODS)
    assert BE.parse_methods("exact, ddim replay,exact from refined latent") == ["exact, ddim replay",
                                                                                "exact from refined latent"]
    assert BE.parse_methods("null-text, exact, ddim replay") == ["null-text", "exact, ddim replay"]
    with pytest.raises(ValueError, match="unknown methods 'exact'"):
        BE.parse_methods("null-text,exact")


# ------------------------------------------------------------------ the model axis and FlowEdit
def test_which_rows_run_on_which_model_family():
    """The pure rule: FlowEdit on flow models only; null-text and negative-prompt on VP models only (issue 32's
    flow rows); every other row on both. Unknown families and methods are refused, not silently run."""
    flow = [m for m in BE.METHODS if BE.applies(m, "flow")]
    vp = [m for m in BE.METHODS if BE.applies(m, "vp")]
    assert set(BE.METHODS) - set(flow) == {"null-text", "negative-prompt"}
    assert set(BE.METHODS) - set(vp) == {"flowedit"}
    assert {"sdedit 0.6 (core KSampler)", "core FlipSigmas+SamplerCustom", "ddim (plain)", "exact, ddim replay",
            "ddim + source_drift", "exact from refined latent"} <= set(flow) & set(vp)
    with pytest.raises(ValueError, match="family 'eps'"):
        BE.applies("flowedit", "eps")
    with pytest.raises(ValueError, match="unknown method 'flow-edit'"):
        BE.applies("flow-edit", "flow")
    assert BE.parse_models("all") == list(BE.MODELS) and BE.parse_models("scenes-dit") == ["scenes-dit"]
    with pytest.raises(ValueError, match="unknown models"):
        BE.parse_models("scenes-sd3")


def test_run_leaves_out_the_rows_that_do_not_apply_and_names_the_model(monkeypatch):
    """``run`` on a flow model skips null-text (logged as left out) and stamps every row with the model's name."""
    import torch
    from types import SimpleNamespace
    called = []
    monkeypatch.setitem(BE.METHODS, "ddim (plain)", lambda S, b: called.append("ddim") or "z")
    monkeypatch.setitem(BE.METHODS, "null-text", lambda S, b: called.append("null-text") or "z")
    b = BE.items(seed=5, n=1, kinds=("colour",))[0]
    img = b.src[0].image
    S = SimpleNamespace(name="scenes-dit", family="flow", vae="v", torch=torch, pixels=lambda images: "p",
                        decode=lambda latent: np.stack([img]))
    monkeypatch.setattr(BE.B, "call", lambda node, *a, **k: ({"samples": "gt"},))
    logs = []
    rows, pictures = BE.run(S, [b], ["null-text", "ddim (plain)"], log=logs.append)
    assert called == ["ddim"] and [(r["model"], r["method"]) for r in rows] == [("scenes-dit", "ddim (plain)")]
    assert "scenes-dit (flow): left out (do not apply): null-text" in logs and list(pictures) == [("colour",
                                                                                                   "ddim (plain)")]


def test_flowedit_row_runs_the_source_pass_then_the_target_pass(fake, monkeypatch):
    """The FlowEdit row: the source pass with the source prompt at FLOWEDIT's source CFG, then the edit with the
    target prompt at its CFG, on the model-space source latent, with n_max = FLOWEDIT's fraction of the steps and
    the run's seed; a VP model is refused by the core's check (with the fix), before any pass runs."""
    import torch
    from types import SimpleNamespace

    from inversion import flowedit as FE
    S, log = fake
    S.family, S.steps, S.seed = "flow", 20, 7
    x = torch.randn(2, 4, 8, 8)
    runs = []

    def run_guided(model, pos, neg, cfg, shape, sig, loop, steps, label):
        runs.append((pos, cfg, steps, label))
        tag = {id(S._c["source"]): 1.0, id(S._c["target"]): 2.0}[id(pos)]
        return loop(lambda z, s: z * 0 + tag * 0.1, "cpu", None)

    C = SimpleNamespace(to_model_space=lambda m, s: x * 2, to_vae_space=lambda m, s: s / 2,
                        sampling_sigmas=lambda m, sched, n: torch.linspace(1, 0, n + 1), run_guided=run_guided)
    mods = {"nodes._comfy": C, "inversion.flowedit": FE}
    real = BE.B.pack
    monkeypatch.setattr(BE.B, "pack", lambda d: mods[d] if d in mods else real(d))
    b = BE.items(seed=5, n=2, kinds=("colour",))[0]
    S._c = {"source": BE._src(S, b), "target": BE._tgt(S, b)}
    out = BE.METHODS["flowedit"](S, b)
    n_max = round(20 * 33 / 50)
    assert [(r[1], r[2], r[3]) for r in runs] == [(3.5, n_max, "FlowEdit (source)"), (13.5, n_max, "FlowEdit")]
    p = FE.Params(n_max=n_max, seed=7)
    want = FE.flowedit(lambda z, s: z * 0 + 0.1, lambda z, s: z * 0 + 0.2, x * 2, torch.linspace(1, 0, 21), p,
                       family="flow") / 2
    assert torch.equal(out, want)
    assert not torch.equal(out, x)   # the two prompts' denoisers differ: an edit happened
    S.family = "vp"
    runs.clear()
    with pytest.raises(FE.FlowEditError, match="needs a flow model"):
        BE.METHODS["flowedit"](S, b)
    assert runs == []
