"""Decoder inversion core (inversion/refine.py) with small differentiable decoders: the best iterate is never worse
than the mean, the optimiser gains where a gain exists, the anchor holds the latent back, windows equal the whole
decode for a local decoder, non-finite losses, early stop, no mutation, no graph on the result."""
from __future__ import annotations

import math

import pytest
import torch

from inversion import refine as R


def _decoder(seed=0, c=4, f=2):
    """A local nonlinear 'VAE decoder': 1x1 conv to 3*f*f channels, pixel shuffle (x f), sigmoid. Images NHWC."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3 * f * f, c, generator=g) * 0.6

    def decode(z):
        y = torch.einsum("oc,nchw->nohw", w, z)
        return torch.sigmoid(torch.nn.functional.pixel_shuffle(y, f)).movedim(1, -1)
    return decode


def _case(n=2, h=6, w=6, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    z_true = torch.randn(n, 4, h, w, generator=g)
    dec = _decoder(seed)
    target = dec(z_true)
    z0 = z_true + 0.5 * torch.randn(n, 4, h, w, generator=g)   # an "encoder mean" that misses
    return z0, target, dec


def _mse(a, b):
    return (a - b).square().flatten(1).mean(1)


def test_zero_steps_returns_the_mean_itself():
    z0, target, dec = _case()
    res = R.refine_latent(z0, target, dec, steps=0)
    assert res.latent is z0 and res.iterations == 0 and res.mse_after == res.mse_before


def test_refine_gains_and_reports_the_true_pixel_error():
    z0, target, dec = _case()
    res = R.refine_latent(z0, target, dec, steps=60, lr=0.1)
    before, after = _mse(dec(z0), target), _mse(dec(res.latent), target)
    assert torch.allclose(torch.tensor(res.mse_before, dtype=torch.float32), before, rtol=1e-4)
    assert torch.allclose(torch.tensor(res.mse_after, dtype=torch.float32), after, rtol=1e-3)
    gain_db = 10 * torch.log10(before / after)
    assert bool((gain_db > 10).all()), gain_db   # measured ~17-22 dB on this case


def test_best_iterate_is_never_worse_than_the_mean():
    """lr so large that every step makes it worse: each image keeps its mean, bit for bit."""
    z0, target, dec = _case(seed=3)
    res = R.refine_latent(z0, target, dec, steps=5, lr=50.0)
    assert all(a <= b for a, b in zip(res.mse_after, res.mse_before, strict=True))
    assert res.best_iteration == [0, 0]
    assert torch.equal(res.latent, z0)


def test_each_image_keeps_its_own_best():
    z0, target, dec = _case(n=2, seed=4)
    target = target.clone()
    target[1] = dec(z0[1:2])[0]          # image 1 is already perfect: its mean is its best iterate
    res = R.refine_latent(z0, target, dec, steps=20, lr=0.1)
    assert res.best_iteration[0] > 0 and res.best_iteration[1] == 0
    assert torch.equal(res.latent[1], z0[1])


def test_anchor_keeps_the_latent_near_the_mean():
    z0, target, dec = _case(seed=5)
    free = R.refine_latent(z0, target, dec, steps=40, lr=0.1, anchor=0.0)
    held = R.refine_latent(z0, target, dec, steps=40, lr=0.1, anchor=1.0)
    d_free = float((free.latent - z0).norm())
    d_held = float((held.latent - z0).norm())
    assert d_held < 0.5 * d_free, (d_held, d_free)
    assert sum(held.mse_after) < sum(held.mse_before)        # still a gain


def test_valid_region_excludes_padding():
    z0, target, dec = _case(seed=6)
    garbage = target.clone()
    garbage[:, 8:, :, :] = 0.0                                # rows 8.. are padding: whatever is there
    a = R.refine_latent(z0, target, dec, steps=10, lr=0.1, valid_hw=(8, 12))
    b = R.refine_latent(z0, garbage, dec, steps=10, lr=0.1, valid_hw=(8, 12))
    assert torch.equal(a.latent, b.latent)


def test_windows_tile_the_latent_exactly():
    for h, w, core, margin in ((10, 7, 4, 2), (4, 4, 8, 3), (9, 9, 3, 0)):
        wins = R.windows_for(h, w, core, margin)
        seen = torch.zeros(h, w, dtype=torch.int64)
        for y0, y1, x0, x1, cy0, cy1, cx0, cx1 in wins:
            seen[cy0:cy1, cx0:cx1] += 1
            assert 0 <= y0 <= cy0 < cy1 <= y1 <= h and 0 <= x0 <= cx0 < cx1 <= x1 <= w
            assert cy0 - y0 <= margin and y1 - cy1 <= margin
        assert bool((seen == 1).all())


def test_windowed_equals_whole_for_a_local_decoder():
    """The decoder is pointwise in latent space: the windows' summed gradients equal the whole one."""
    z0, target, dec = _case(h=10, w=10, seed=7)
    whole = R.refine_latent(z0, target, dec, steps=8, lr=0.1)
    wins = R.windows_for(10, 10, 4, 1)
    part = R.refine_latent(z0, target, dec, steps=8, lr=0.1, windows=wins)
    assert torch.allclose(whole.latent, part.latent, atol=1e-5)
    assert part.mse_after == pytest.approx(whole.mse_after, rel=1e-4)


def _conv_decoder(seed=0, c=4, f=2, k=5):
    """A decoder that mixes neighbouring latents: a k x k conv (zero padding, reach (k-1)/2 latent pixels), a
    tanh, a 1x1 conv to 3*f*f channels, pixel shuffle (x f), sigmoid. Images NHWC."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(8, c, k, k, generator=g) * (0.8 / k)
    w2 = torch.randn(3 * f * f, 8, 1, 1, generator=g) * 0.6

    def decode(z):
        y = torch.nn.functional.conv2d(torch.tanh(torch.nn.functional.conv2d(z, w1, padding=k // 2)), w2)
        return torch.sigmoid(torch.nn.functional.pixel_shuffle(y, f)).movedim(1, -1)
    return decode


@pytest.mark.parametrize("k", [3, 5])
def test_windows_need_a_margin_of_the_decoders_reach(k):
    """A window decoded with a margin of the decoder's reach ((k-1)/2 latent pixels) measures its core exactly as
    the whole decode does, at the mean and along the optimisation; one latent pixel less of margin does not."""
    reach = (k - 1) // 2
    g = torch.Generator().manual_seed(3)
    dec = _conv_decoder(seed=k, k=k)
    z_true = torch.randn(2, 4, 10, 10, generator=g)
    target = dec(z_true)
    z0 = z_true + 0.5 * torch.randn(2, 4, 10, 10, generator=g)
    whole = R.refine_latent(z0, target, dec, steps=6, lr=0.1)
    enough = R.refine_latent(z0, target, dec, steps=6, lr=0.1, windows=R.windows_for(10, 10, 4, reach))
    short = R.refine_latent(z0, target, dec, steps=6, lr=0.1, windows=R.windows_for(10, 10, 4, reach - 1))
    assert enough.mse_before == pytest.approx(whole.mse_before, rel=1e-6)
    assert torch.allclose(enough.latent, whole.latent, atol=1e-5)
    gap_before = max(abs(a / b - 1) for a, b in zip(short.mse_before, whole.mse_before, strict=True))
    gap_latent = float((short.latent - whole.latent).abs().max())
    print(f"margin {reach - 1} for reach {reach}: mse_before off by {gap_before:.3g}, latent by {gap_latent:.3g}")
    assert gap_before > 1e-3 and gap_latent > 1e-3


def test_non_finite_at_the_mean_is_an_error():
    z0, target, dec = _case()
    with pytest.raises(R.RefineError, match="NaN/Inf.*; run the VAE in float32"):
        R.refine_latent(z0, target, lambda z: dec(z) * float("nan"), steps=3)


def test_a_decoder_without_graph_is_an_error():
    z0, target, dec = _case()
    with pytest.raises(R.RefineError, match="no autograd graph.*; set refine to 0"):
        R.refine_latent(z0, target, lambda z: dec(z).detach(), steps=3)


def test_non_finite_later_stops_and_keeps_the_best():
    z0, target, dec = _case(seed=8)
    calls = [0]

    def flaky(z):
        calls[0] += 1
        out = dec(z)
        return out * float("nan") if calls[0] > 4 else out
    res = R.refine_latent(z0, target, flaky, steps=20, lr=0.1)
    assert res.stopped == "non-finite" and res.iterations < 20
    assert bool(torch.isfinite(res.latent).all())
    assert all(a < b for a, b in zip(res.mse_after, res.mse_before, strict=True))


def test_early_stop_when_nothing_improves():
    z0, _, dec = _case(seed=9)
    res = R.refine_latent(z0, dec(z0), dec, steps=200, lr=0.1, patience=5)
    assert res.stopped == "early" and res.iterations == 5
    assert torch.equal(res.latent, z0)


def test_inputs_not_mutated_and_result_has_no_graph():
    z0, target, dec = _case(seed=10)
    z_copy, t_copy = z0.clone(), target.clone()
    res = R.refine_latent(z0, target, dec, steps=5, lr=0.1, anchor=0.1)
    assert torch.equal(z0, z_copy) and torch.equal(target, t_copy)
    assert not res.latent.requires_grad and res.latent.grad_fn is None
    assert res.latent.dtype == z0.dtype and res.latent.shape == z0.shape


def test_progress_callback_once_per_step_and_it_can_interrupt():
    z0, target, dec = _case(seed=11)
    seen = []
    R.refine_latent(z0, target, dec, steps=6, lr=0.1, tol=0.0, on_step=lambda i, t, d: seen.append((i, t, d.shape)))
    assert [s[:2] for s in seen] == [(i, 6) for i in range(6)] and seen[0][2] == target.shape

    class Stop(Exception):
        pass

    def stop(i, t, d):
        if i == 2:
            raise Stop
    with pytest.raises(Stop):
        R.refine_latent(z0, target, dec, steps=6, lr=0.1, on_step=stop)


def test_cosine_schedule_and_bad_settings():
    assert R.cosine_lr(0, 10, 0.2) == pytest.approx(0.2)
    assert R.cosine_lr(9, 10, 0.2) == pytest.approx(0.02)
    assert R.cosine_lr(0, 1, 0.2) == 0.2
    lrs = [R.cosine_lr(i, 50, 1.0) for i in range(50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    z0, target, dec = _case()
    for kw in (dict(steps=-1), dict(steps=2, lr=math.nan), dict(steps=2, anchor=-1.0)):
        with pytest.raises(R.RefineError):
            R.refine_latent(z0, target, dec, **kw)


def _overshoot_case():
    """A raw (unclamped) identity decoder and a mean whose every pixel decodes past 1: clamped, it shows 1.0
    everywhere, so the clamped error has no gradient at all."""
    g = torch.Generator().manual_seed(12)
    target = 0.1 + 0.8 * torch.rand(2, 5, 5, 3, generator=g)
    z0 = (target + 1.0 + torch.rand(2, 5, 5, 3, generator=g)).movedim(-1, 1).contiguous()
    return z0, target, lambda z: z.movedim(1, -1)


def test_every_measure_is_on_the_clamped_decode():
    z0, target, dec = _overshoot_case()
    shown = _mse(dec(z0).clamp(0, 1), target)
    for loss in R.LOSSES:
        res = R.refine_latent(z0, target, dec, steps=3, lr=0.1, loss=loss)
        assert torch.allclose(torch.tensor(res.mse_before, dtype=torch.float32), shown, rtol=1e-5), loss
        after = _mse(dec(res.latent).clamp(0, 1), target)
        assert torch.allclose(torch.tensor(res.mse_after, dtype=torch.float32), after, rtol=1e-4), loss


def test_losses_that_see_past_the_clamp_recover_overshooting_pixels():
    z0, target, dec = _overshoot_case()
    stuck = R.refine_latent(z0, target, dec, steps=60, lr=1.0, loss="clamped")
    assert stuck.best_iteration == [0, 0] and stuck.mse_after == stuck.mse_before   # no gradient: no move
    for loss in ("unclamped", "straight"):
        res = R.refine_latent(z0, target, dec, steps=60, lr=1.0, loss=loss)
        gain_db = 10 * torch.log10(torch.tensor(res.mse_before) / torch.tensor(res.mse_after))
        assert bool((gain_db > 20).all()), (loss, gain_db)   # measured 27-30 dB on this case


def test_unknown_loss_is_an_error():
    z0, target, dec = _case()
    with pytest.raises(R.RefineError, match="unknown refine loss 'l1'; use one of clamped, unclamped, straight"):
        R.refine_latent(z0, target, dec, steps=2, loss="l1")


def test_the_node_policy_windows_large_or_tiled_latents_and_keeps_only_a_gain():
    """refine.plan_windows: a latent up to WHOLE_MAX latent pixels is decoded whole unless tiled; a larger one, or
    a tiled one, in windows_for(CORE, MARGIN). refine.keep_refined: only a strictly better ceiling replaces the
    mean (a tie, a loss or NaN keeps it)."""
    assert R.plan_windows(64, 64, tiled=False) is None and 64 * 64 <= R.WHOLE_MAX < 64 * 65
    assert R.plan_windows(64, 65, tiled=False) == R.windows_for(64, 65, R.CORE, R.MARGIN)
    assert R.plan_windows(8, 8, tiled=True) == R.windows_for(8, 8, R.CORE, R.MARGIN)
    assert (R.CORE, R.MARGIN) == (32, 8)
    assert R.keep_refined(20.0, 20.5) and not R.keep_refined(20.0, 20.0) and not R.keep_refined(20.0, 19.0)
    assert not R.keep_refined(20.0, float("nan"))


def _video_decoder(seed=0, c=4, f=2):
    """A causal 'video VAE decoder': frame t sees the cumulative mean of latent frames 0..t (time mixes, space is
    pointwise), then the image decoder's 1x1 map and pixel shuffle. [N,C,T,h,w] -> clips [N,T,H,W,3]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3 * f * f, c, generator=g) * 0.6

    def decode(z):
        t = z.shape[2]
        causal = z.cumsum(2) / torch.arange(1, t + 1, dtype=z.dtype).view(1, 1, t, 1, 1)
        y = torch.einsum("oc,ncthw->ntohw", w, causal).flatten(0, 1)
        img = torch.sigmoid(torch.nn.functional.pixel_shuffle(y, f)).movedim(1, -1)
        return img.reshape(z.shape[0], t, *img.shape[1:])
    return decode


def test_a_video_latent_is_refined_against_all_its_frames():
    """5-D latents [N,C,T,h,w] against clips [N,F,H,W,3]: the pixel error is per clip (all frames), it falls, the
    reported error is the true clamped MSE of the returned latent's decode, the shape is kept, nothing is mutated;
    h/w windows (whole time axis each) equal the whole decode for a decoder pointwise in space."""
    g = torch.Generator().manual_seed(11)
    dec = _video_decoder(3)
    z_true = torch.randn(2, 4, 3, 8, 8, generator=g)
    target = dec(z_true)
    z0 = z_true + 0.5 * torch.randn(z_true.shape, generator=g)
    z0_copy, t_copy = z0.clone(), target.clone()
    res = R.refine_latent(z0, target, dec, steps=20, lr=0.1)
    assert res.latent.shape == z0.shape and torch.equal(z0, z0_copy) and torch.equal(target, t_copy)
    before, after = _mse(dec(z0), target), _mse(dec(res.latent), target)
    assert res.mse_before == pytest.approx(before.tolist(), rel=1e-5)
    assert res.mse_after == pytest.approx(after.tolist(), rel=1e-4)
    ratio = [a / b for a, b in zip(res.mse_after, res.mse_before, strict=True)]
    assert max(ratio) < 0.2, ratio                 # measured 0.045 and 0.051
    part = R.refine_latent(z0, target, dec, steps=20, lr=0.1, windows=R.windows_for(8, 8, 3, 1))
    assert torch.allclose(part.latent, res.latent, atol=1e-5)


# ------------------------------------------------------------ edges the mutation run found untested (issue 29)
def test_a_two_step_refine_decays_the_learning_rate_at_its_last_step():
    assert R.cosine_lr(0, 2, 0.2) == 0.2
    assert R.cosine_lr(1, 2, 0.2) == pytest.approx(0.02)


def test_windows_need_a_positive_core_and_a_non_negative_margin():
    for core, margin in ((0, 1), (2, -1)):
        with pytest.raises(ValueError, match=r"^core must be positive and margin non-negative$"):
            R.windows_for(4, 4, core, margin)
    assert len(R.windows_for(3, 2, 1, 0)) == 6                 # a core of one latent pixel is valid


def test_bad_settings_name_the_setting_and_the_fix():
    z0, target, dec = _case()
    for kw, msg in ((dict(steps=-1), "refine must be >= 0 (got -1); use 0 for the posterior mean"),
                    (dict(steps=2, lr=math.nan), "the learning rate must be a finite number >= 0 (got nan); use "
                                                 "the default"),
                    (dict(steps=2, anchor=-1.0), "the anchor must be a finite number >= 0 (got -1.0); use the "
                                                 "default")):
        with pytest.raises(R.RefineError) as e:
            R.refine_latent(z0, target, dec, **kw)
        assert str(e.value) == msg


@pytest.mark.parametrize("valid", [(12, 12), (6, 6)])
def test_windows_measure_only_the_valid_pixels(valid):
    """Padding rows/columns past valid_hw hold garbage: a window whose core runs into them (valid 12 of 16 pixels)
    or lies wholly in them (valid 6) compares only its valid part, so the windowed pixel error is the whole
    decode's and the hand-computed one over the valid pixels."""
    z0, target, dec = _case(n=1, h=8, w=8, seed=9)
    target = target.clone()
    vh, vw = valid
    target[:, vh:, :, :] = 5.0
    target[:, :, vw:, :] = -5.0
    want = float(_mse(dec(z0)[:, :vh, :vw], target[:, :vh, :vw])[0])
    whole = R.refine_latent(z0, target, dec, steps=0, valid_hw=valid)
    part = R.refine_latent(z0, target, dec, steps=0, valid_hw=valid, windows=R.windows_for(8, 8, 4, 1))
    assert whole.mse_before[0] == pytest.approx(want, rel=1e-5)
    assert part.mse_before[0] == pytest.approx(want, rel=1e-5)


def test_a_decoder_of_the_wrong_size_is_named_with_both_sizes():
    z0, target, _ = _case(n=1, h=8, w=8)

    def dec(z):     # 8x8 latent -> 12x12 pixels, the image is 16x16
        return torch.nn.functional.interpolate(z[:, :3], size=(12, 12)).movedim(1, -1)
    with pytest.raises(R.RefineError) as e:
        R.refine_latent(z0, target, dec, steps=0)
    # (it said "not the 1x size of the image": the factor came from 12 // 8)
    assert str(e.value) == ("the VAE decodes a (8, 8) latent to (12, 12) pixels, not the image's (16, 16) (a whole "
                            "multiple of the latent); set refine to 0 for this VAE")


def test_the_measures_clamp_below_as_well():
    """A decode under 0 where the image is 0 shows 0: no error; above 1 where the image is 1 shows 1."""
    target = torch.zeros(1, 2, 2, 3)
    target[:, 1] = 1.0
    z = torch.full((1, 3, 2, 2), -0.5)
    z[:, :, 1] = 1.5
    res = R.refine_latent(z, target, lambda v: v.movedim(1, -1), steps=0)
    assert res.mse_before == [0.0]


def test_unclamped_pulls_back_an_overshoot_the_clamp_hides_and_straight_does_not():
    """Pixel A decodes to 1.5 where the image is 1 (clamped: right), pixel B to 1.3 where it is 0.5 (clamped:
    wrong). Both losses fix B; only 'unclamped' moves A (its raw error is 0.5), 'straight' leaves it exactly."""
    target = torch.tensor([1.0, 0.5]).view(1, 1, 2, 1).expand(1, 1, 2, 3).contiguous()
    z0 = torch.tensor([1.5, 1.3]).view(1, 1, 1, 2).expand(1, 3, 1, 2).contiguous()
    dec = lambda v: v.movedim(1, -1)                                   # noqa: E731
    unclamped = R.refine_latent(z0, target, dec, steps=30, lr=0.5, loss="unclamped")
    straight = R.refine_latent(z0, target, dec, steps=30, lr=0.5, loss="straight")
    for res in (unclamped, straight):
        assert res.best_iteration[0] > 0 and res.mse_after[0] < 0.1 * res.mse_before[0]
    assert torch.equal(straight.latent[..., 0], z0[..., 0])
    assert float(unclamped.latent[..., 0].max()) < 1.3, unclamped.latent[..., 0]


def test_the_anchor_term_has_its_stated_weight_per_image():
    """Identity decoder, no clamp reached: J = mean((z - t)^2) + anchor * mean(((z - z0)/s)^2) per image has the
    minimiser z* = (s^2 t + anchor z0) / (s^2 + anchor) elementwise (s: the image's std of z0, float64 here).
    A batch of two converges to each image's own z*, at anchor = s^2 (half way)."""
    g = torch.Generator().manual_seed(21)
    t = 0.3 + 0.4 * torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64)
    z0 = t + 0.2 * (2 * torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) - 1)
    s2 = z0.flatten(1).std(dim=1).square().view(2, 1, 1, 1)
    anchor = float(s2.mean())
    want = (s2 * t + anchor * z0) / (s2 + anchor)
    res = R.refine_latent(z0.float(), t.movedim(1, -1).float(), lambda v: v.movedim(1, -1), steps=300, lr=0.1,
                          anchor=anchor, patience=300)
    err = float((res.latent.double() - want).abs().max() / (t - z0).abs().max())
    print("anchor minimiser error", err)
    assert err < 1e-2            # measured 3.6e-5; an anchor 2x too weak is off by 0.17, 16x too strong by 0.45
