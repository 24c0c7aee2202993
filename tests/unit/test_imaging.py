"""Pure pixel/latent arithmetic of VAE Encode (Inversion) and Trajectory Preview (inversion/imaging.py)."""
import math

import pytest
import torch

from inversion import imaging as I
from inversion.errors import InversionInputError as E


def test_select_frames_properties():
    for count in range(1, 40):
        for frames in range(2, 45):
            idx = I.select_frames(count, frames)
            assert idx == sorted(set(idx))
            assert idx[0] == 0 and idx[-1] == count - 1
            assert len(idx) == min(count, frames)
    assert I.select_frames(11, 4) == [0, 3, 7, 10] and I.select_frames(0, 4) == [] and I.select_frames(1, 9) == [0]


@pytest.mark.parametrize("c", [1, 3, 4])
def test_to_rgb_takes_grey_rgb_and_rgba(c):
    x = torch.rand(2, 5, 6, c)
    out = I.to_rgb(x)
    assert out.shape == (2, 5, 6, 3)
    assert torch.equal(out, x[..., :3] if c >= 3 else x.repeat(1, 1, 1, 3))


@pytest.mark.parametrize("c", [2, 5, 8])
def test_to_rgb_refuses_other_channel_counts(c):
    with pytest.raises(E, match=f"has {c} channels but an IMAGE is grey \\(1\\), RGB \\(3\\) or RGBA"):
        I.to_rgb(torch.rand(1, 4, 4, c))


def test_to_rgb_refuses_non_images():
    with pytest.raises(E, match=r"\[B,H,W,C\]"):
        I.to_rgb(torch.rand(4, 4, 3))
    with pytest.raises(E, match="empty"):
        I.to_rgb(torch.rand(0, 4, 4, 3))


def test_fit_modes():
    x = torch.rand(1, 50, 70, 3)
    pad, valid = I.fit_pixels(x, 8, "pad")
    assert pad.shape == (1, 56, 72, 3) and valid == (50, 70) and torch.equal(pad[:, :50, :70], x)
    assert torch.equal(pad[:, 55, :70], x[:, 49])                       # the last row replicated
    crop, valid = I.fit_pixels(x, 8, "crop")
    assert crop.shape == (1, 48, 64, 3) and valid == (48, 64) and torch.equal(crop, x[:, 1:49, 3:67])
    res, valid = I.fit_pixels(x, 8, "resize")
    assert res.shape == (1, 48, 72, 3) and valid == (48, 72) and float(res.min()) >= 0 and float(res.max()) <= 1
    same, valid = I.fit_pixels(torch.rand(1, 16, 24, 3), 8, "error")
    assert valid == (16, 24)
    with pytest.raises(E, match="not a multiple of the VAE's factor 8; set 'fit' to pad, crop or resize"):
        I.fit_pixels(x, 8, "error")
    with pytest.raises(E, match="smaller than the VAE's factor"):
        I.fit_pixels(torch.rand(1, 4, 4, 3), 8, "crop")
    with pytest.raises(E, match="unknown fit"):
        I.fit_pixels(x, 8, "stretch")


def test_psnr():
    a = torch.zeros(1, 4, 4, 3)
    assert I.psnr(a, a) == I.PSNR_CAP_DB
    assert I.psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-5)
    assert math.isnan(I.psnr(a, a * float("nan")))
    assert I.psnr_from_sse(0.01 * 48, 48) == pytest.approx(20.0, abs=1e-9)


def test_ceiling_windows_are_cheap_inside_and_measured_in_their_core():
    assert I.ceiling_windows(8, 8) is None and I.ceiling_windows(32, 32) is None     # small: decoded whole
    assert I.ceiling_windows(20, 400) is None                                        # too narrow for a window
    for h, w in [(64, 64), (128, 128), (96, 160), (256, 256), (64, 512)]:
        ws = I.ceiling_windows(h, w)
        decoded = sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1, *_ in ws)
        assert 1 <= len(ws) <= 4 and decoded <= 0.06 * h * w, (h, w, decoded)
        for y0, y1, x0, x1, my0, my1, mx0, mx1 in ws:
            assert 0 <= y0 <= my0 < my1 <= y1 <= h and 0 <= x0 <= mx0 < mx1 <= x1 <= w
            # a margin is kept on every side that is not the image border
            assert (my0 - y0 >= 2 or y0 == 0) and (y1 - my1 >= 2 or y1 == h)
    assert len(I.ceiling_windows(256, 256)) == 4 and len(I.ceiling_windows(128, 128)) == 1


def test_fast_rgb_is_the_latent2rgb_formula():
    lat = torch.randn(3, 4, 5, 6)
    factors = [[0.3, 0.2, 0.1], [0.1, 0.3, 0.2], [0.2, 0.1, 0.3], [0.0, 0.1, 0.0]]
    bias = [0.1, -0.1, 0.0]
    rgb = I.fast_rgb(lat, factors, bias)
    want = ((torch.einsum("kchw,cr->khwr", lat, torch.tensor(factors)) + torch.tensor(bias) + 1) / 2).clamp(0, 1)
    assert rgb.shape == (3, 5, 6, 3) and torch.allclose(rgb, want, atol=1e-6)
    assert I.fast_rgb(lat.unsqueeze(2).expand(-1, -1, 2, -1, -1), factors).shape == (3, 5, 6, 3)   # video: frame 0
    with pytest.raises(E, match="5 latent channels but SD15's fast RGB factors expect 4; set decode=vae"):
        I.fast_rgb(torch.randn(1, 5, 2, 2), factors, format_name="SD15")


def test_rms():
    assert I.rms(torch.zeros(4), torch.full((4,), 2.0)) == pytest.approx(2.0)


# ---- a video VAE's time axis (frame_counts, fit_frames)
WAN_T = (lambda a: max(0, (a + 3) // 4), lambda a: max(0, a * 4 - 3))     # core's Wan 2.1 formulas
LTXV_T = (lambda a: max(0, (a + 7) // 8), lambda a: max(0, a * 8 - 7))


@pytest.mark.parametrize("formulas,frames,expected", [
    (WAN_T, 1, (1, 1)), (WAN_T, 4, (1, 5)), (WAN_T, 5, (5, 5)), (WAN_T, 7, (5, 9)), (WAN_T, 9, (9, 9)),
    (WAN_T, 121, (121, 121)), (WAN_T, 120, (117, 121)), (LTXV_T, 9, (9, 9)), (LTXV_T, 10, (9, 17)),
])
def test_frame_counts_are_the_counts_the_vae_encodes_whole(formulas, frames, expected):
    assert I.frame_counts(frames, *formulas) == expected


def test_fit_frames_pads_crops_or_refuses():
    clip = torch.arange(7, dtype=torch.float32).view(7, 1, 1, 1).expand(7, 2, 2, 3)
    padded, kept = I.fit_frames(clip, 5, 9, "pad")
    assert kept == 7 and padded.shape[0] == 9
    assert torch.equal(padded[:7], clip) and torch.equal(padded[7:], clip[6:7].expand(2, 2, 2, 3))
    cropped, kept = I.fit_frames(clip, 5, 9, "crop")
    assert kept == 5 and torch.equal(cropped, clip[:5])
    same, kept = I.fit_frames(clip[:5], 5, 5, "error")
    assert kept == 5 and torch.equal(same, clip[:5])
    with pytest.raises(E, match="7 frames but this video VAE encodes 5 or 9"):
        I.fit_frames(clip, 5, 9, "error")


def test_strip_puts_frames_side_by_side_in_time_order():
    frames = torch.rand(2, 3, 4, 5, 3)                   # K=2 items, F=3 frames of 4x5
    s = I.strip(frames)
    assert s.shape == (2, 4, 15, 3)
    for k in range(2):
        for f in range(3):
            assert torch.equal(s[k, :, f * 5:(f + 1) * 5], frames[k, f])


def test_rms_per_frame_is_per_time_slice():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.zeros(2, 3, 4, 4)
    b[:, 1] = 2.0                                        # only frame 1 differs, by 2 everywhere
    b[0, 2, 0, 0] = 4.0                                  # one value of frame 2: rms = sqrt(16 / 32)
    assert I.rms_per_frame(a, b) == pytest.approx([0.0, 2.0, math.sqrt(0.5)], rel=1e-6)


def test_trajectory_bytes_counts_states_and_estimates():
    # a 5-second Wan 2.1 clip at 832x480: latent [1,16,21,60,104], 50 steps: 101 float32 tensors of 2,096,640
    assert I.trajectory_bytes((1, 16, 21, 60, 104), 50) == 101 * 2_096_640 * 4


# ---- edges the mutation run found untested (issue 29): exact layouts and formulas, computed by hand from the rules
def test_ceiling_window_layouts_by_hand():
    """side = 24 when 4% of the area holds a 24x24 window, else the even part of sqrt(4% area) (at least 12);
    n = min(4, budget // side^2) windows, centred on rows (k + 1/2)/n and on the odd, then the even columns (n > 2),
    clamped inside the image; margin max(2, side // 6) on inner sides only."""
    assert I.ceiling_windows(32, 33) == [(10, 22, 10, 22, 12, 20, 12, 20)]              # just above whole_below
    assert I.ceiling_windows(64, 64) == [(26, 38, 26, 38, 28, 36, 28, 36)]              # side 12, margin 2
    assert I.ceiling_windows(70, 70) == [(28, 42, 28, 42, 30, 40, 30, 40)]              # side 14
    assert I.ceiling_windows(75, 75) == [(30, 44, 30, 44, 32, 42, 32, 42)]              # sqrt 15 -> side 14
    assert I.ceiling_windows(90, 90) == [(36, 54, 36, 54, 39, 51, 39, 51)]              # side 18, margin 3
    assert I.ceiling_windows(200, 240) == [(21, 45, 108, 132, 25, 41, 112, 128),        # n 3: columns 1, 0, 2
                                           (88, 112, 28, 52, 92, 108, 32, 48),
                                           (154, 178, 188, 212, 158, 174, 192, 208)]
    assert I.ceiling_windows(64, 512) == [(4, 28, 116, 140, 8, 24, 120, 136),           # n 2: columns 0, 1
                                          (36, 60, 372, 396, 40, 56, 376, 392)]
    # a window on the top or bottom border measures up to it (no margin there)
    assert I.ceiling_windows(48, 1200) == [(0, 24, 438, 462, 0, 20, 442, 458),
                                           (6, 30, 1038, 1062, 10, 26, 1042, 1058),
                                           (18, 42, 138, 162, 22, 38, 142, 158),       # n 4: columns
                                           (24, 48, 738, 762, 28, 48, 742, 758)]       # 1, 3, 0, 2


def test_ceiling_window_settings():
    assert I.ceiling_windows(32, 32, whole_below=0) == [(10, 22, 10, 22, 12, 20, 12, 20)]
    assert I.ceiling_windows(32, 33, whole_below=32 * 33) is None
    assert len(I.ceiling_windows(256, 256, max_windows=1)) == 1
    assert I.ceiling_windows(64, 64, fraction=0.2) == [(20, 44, 20, 44, 24, 40, 24, 40)]   # budget 819: side 24


def test_psnr_formulas_and_cap():
    a = torch.zeros(2, 4, 4, 3)
    b = a.clone()
    b[1] = 0.2                                      # one MSE over the batch: 0.04 / 2 = 0.02
    assert I.psnr(a, b) == pytest.approx(-10 * math.log10(0.02), abs=1e-4)
    assert I.psnr(a.half(), b.half()) == pytest.approx(-10 * math.log10(0.02), abs=1e-2)
    assert I.psnr(a, a + 1.5e-5) == pytest.approx(-10 * math.log10(2.25e-10), abs=1e-3)   # 96.5 dB: not capped
    assert I.psnr(a, a + 5e-6) == I.PSNR_CAP_DB
    assert I.psnr_from_sse(0.12, 3) == pytest.approx(-10 * math.log10(0.04), abs=1e-9)
    assert I.psnr_from_sse(2.25e-10 * 7, 7) == pytest.approx(-10 * math.log10(2.25e-10), abs=1e-6)
    assert I.psnr_from_sse(0.0, 7) == I.PSNR_CAP_DB and I.psnr_from_sse(1e-11, 1) == I.PSNR_CAP_DB
    for sse, count in ((1.0, 0), (1.0, -3), (math.inf, 4), (math.nan, 4)):
        assert math.isnan(I.psnr_from_sse(sse, count)), (sse, count)
    assert I.rms(torch.zeros(2, 2), torch.tensor([[3.0, 0.0], [0.0, 4.0]])) == pytest.approx(2.5)


def test_fast_rgb_reshape_dtype_clamp_and_message():
    factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    lat = torch.tensor([3.0, -3.0, 0.2], dtype=torch.float64).view(1, 3, 1, 1)
    rgb = I.fast_rgb(lat, factors)
    assert rgb.dtype == torch.float32 and torch.allclose(rgb.flatten(), torch.tensor([1.0, 0.0, 0.6]))
    two = torch.tensor([0.2, 0.4]).view(1, 2, 1, 1)                 # a 2-channel latent reshaped to 3 channels
    rgb = I.fast_rgb(two, factors, bias=[0.0, 0.0, 0.2], reshape=lambda x: torch.cat([x, x[:, :1]], 1))
    assert torch.allclose(rgb.flatten(), torch.tensor([0.6, 0.7, 0.7]))
    with pytest.raises(E) as e:
        I.fast_rgb(two, factors, format_name="Flux")
    assert str(e.value) == ("the trajectory has 2 latent channels but Flux's fast RGB factors expect 3; set "
                            "decode=vae and connect the model's VAE")


def test_fit_pixels_messages_and_sizes():
    with pytest.raises(E) as e:
        I.fit_pixels(torch.rand(1, 50, 70, 3), 8, "error")
    assert str(e.value) == ("the image is 70x50, not a multiple of the VAE's factor 8; set 'fit' to pad, crop or "
                            "resize, or resize the image to 64x48 first")
    with pytest.raises(E) as e:
        I.fit_pixels(torch.rand(1, 5, 70, 3), 8, "error")
    assert str(e.value).endswith("resize the image to 64x8 first")
    with pytest.raises(E) as e:
        I.fit_pixels(torch.rand(1, 4, 12, 3), 8, "crop")
    assert str(e.value) == ("the image (12x4) is smaller than the VAE's factor 8, so it cannot be cropped; use "
                            "fit=pad or resize, or a larger image")
    with pytest.raises(E, match="smaller than the VAE's factor 8"):
        I.fit_pixels(torch.rand(1, 12, 4, 3), 8, "crop")
    with pytest.raises(E) as e:
        I.fit_pixels(torch.rand(1, 8, 8, 3), 8, "stretch")
    assert str(e.value) == "unknown fit 'stretch'; use one of pad, crop, resize, error"
    x = torch.rand(1, 8, 16, 3)
    assert I.fit_pixels(x, 8, "crop")[0] is x                   # already a multiple: untouched whatever the fit
    crop, valid = I.fit_pixels(torch.arange(9 * 9 * 3, dtype=torch.float32).view(1, 9, 9, 3), 4, "crop")
    assert valid == (8, 8) and float(crop[0, 0, 0, 0]) == 0.0    # 1 extra row/column: offset 1 // 2 = 0
    tiny, valid = I.fit_pixels(torch.rand(1, 3, 3, 3), 8, "resize")
    assert tiny.shape == (1, 8, 8, 3) and valid == (8, 8)
    res, valid = I.fit_pixels(torch.rand(1, 53, 12, 3), 8, "resize")
    assert res.shape == (1, 56, 16, 3) and valid == (56, 16)   # 53/8 = 6.6 -> 7; 12/8 = 1.5 -> 2
    pad, valid = I.fit_pixels(torch.rand(1, 9, 16, 3), 8, "pad")
    assert pad.shape == (1, 16, 16, 3) and valid == (9, 16)


def test_ceiling_windows_on_the_left_and_right_borders_and_narrow_images():
    # n 2 on a 48-wide latent: the left window starts at column 0 (no margin there), the right one ends at 48
    assert I.ceiling_windows(700, 48) == [(163, 187, 0, 24, 167, 183, 0, 20), (513, 537, 24, 48, 517, 533, 28, 48)]
    # n 4 on a 50-wide latent, columns 1 3 0 2 (centres 18, 43, 6, 31): the column-3 window is pulled back inside
    # (x0 = 50 - 24), the column-0 one starts at the border (no margin there)
    assert I.ceiling_windows(1200, 50) == [(138, 162, 6, 30, 142, 158, 10, 26), (438, 462, 26, 50, 442, 458, 30, 50),
                                           (738, 762, 0, 24, 742, 758, 0, 20),
                                           (1038, 1062, 19, 43, 1042, 1058, 23, 39)]
    assert I.ceiling_windows(100, 24) == [(44, 56, 6, 18, 46, 54, 8, 16)]        # w = 2 side: still a window
    assert I.ceiling_windows(400, 20) is None                                      # side 16: 20 < 32 columns
    assert len(I.ceiling_windows(300, 300)) == 4                                   # budget for 6: at most 4
    for h, w in ((64, 64), (200, 240), (48, 1200), (1200, 50)):
        assert all(type(v) is int for win in I.ceiling_windows(h, w) for v in win), (h, w)   # slice indices


@pytest.mark.parametrize("h, w", [(300, 300), (1200, 50), (256, 256), (200, 1600), (90, 90), (700, 48)])
def test_ceiling_windows_sample_every_column_band_once(h, w):
    """n windows, one per row band and one per column band (a Latin square's diagonal): every part of the width
    is measured. At n 4 the columns were 1 3 1 3, so the left quarter of a large latent never was."""
    ws = I.ceiling_windows(h, w)
    n = len(ws)
    bands = sorted(min(n - 1, int((x0 + x1) / 2 / w * n)) for _, _, x0, x1, *_ in ws)
    assert bands == list(range(n)), ws
    assert sorted(min(n - 1, int((y0 + y1) / 2 / h * n)) for y0, y1, *_ in ws) == list(range(n)), ws


def test_the_error_formulas_subtract():
    a, b = torch.full((1, 2, 2, 3), 0.5), torch.full((1, 2, 2, 3), 0.6)
    assert I.psnr(a, b) == pytest.approx(20.0, abs=1e-4)
    assert I.rms(a, b) == pytest.approx(0.1, abs=1e-6)
    assert I.rms_per_frame(torch.full((2, 3, 2, 2), 0.5), torch.full((2, 3, 2, 2), 0.7)) == pytest.approx([0.2] * 3)
    assert I.psnr(a, a + 7e-6) == I.PSNR_CAP_DB                       # mse 4.9e-11 is past the 1e-10 cap
    assert I.psnr_from_sse(5e-11, 1) == I.PSNR_CAP_DB


def test_fit_edges():
    crop, valid = I.fit_pixels(torch.rand(1, 8, 12, 3), 8, "crop")   # exactly one factor high: croppable
    assert valid == (8, 8)
    crop, valid = I.fit_pixels(torch.rand(1, 12, 8, 3), 8, "crop")
    assert valid == (8, 8)
    two = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1).expand(1, 8, 2, 3)
    res, _ = I.fit_pixels(two, 8, "resize")                             # bilinear: values between 0 and 1 appear
    assert len(torch.unique(res)) > 2
    hdr = torch.tensor([-0.5, 1.5]).view(1, 1, 2, 1).expand(1, 8, 2, 3)
    res, _ = I.fit_pixels(hdr, 8, "resize")
    assert float(res.min()) == 0.0 and float(res.max()) == 1.0         # resized pixels are clamped to [0, 1]
    assert I.frame_counts(3, lambda a: a // 4, lambda t: 4 * t) == (0, 4)
    clip = torch.rand(3, 2, 2, 3)
    kept, n = I.fit_frames(clip, 1, 5, "crop")
    assert n == 1 and torch.equal(kept, clip[:1])
    with pytest.raises(E) as e:
        I.fit_frames(clip, 1, 5, "stretch")
    assert str(e.value) == "unknown fit 'stretch'; use one of pad, crop, resize, error"
    with pytest.raises(E) as e:
        I.fit_frames(clip, 1, 5, "error")
    assert str(e.value) == ("the clip has 3 frames but this video VAE encodes 1 or 5 frames without dropping any; set "
                            "'fit' to pad (repeat the last frame) or crop (drop the extra frames), or trim the clip")
    with pytest.raises(E) as e:
        I.fit_frames(clip, 0, 5, "crop")
    assert str(e.value) == ("the clip has 3 frames, fewer than this video VAE's smallest clip (5); use fit=pad or a "
                            "longer clip")


def test_fast_rgb_of_a_video_is_its_first_frame():
    factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    video = torch.stack([torch.full((1, 3, 1, 1), 0.2), torch.full((1, 3, 1, 1), -0.2)], dim=2)   # [1,3,2,1,1]
    assert torch.allclose(I.fast_rgb(video, factors).flatten(), torch.full((3,), 0.6))


def test_to_rgb_messages_word_for_word_and_one_pixel_images():
    for bad, got in ((torch.rand(4, 4, 3), "(4, 4, 3)"), ([1.0], "list")):
        with pytest.raises(E) as e:
            I.to_rgb(bad)
        assert str(e.value) == (f"pixels must be an IMAGE batch [B,H,W,C] (got {got}); connect an IMAGE output "
                                "(e.g. Load Image)")
    for shape in ((1, 0, 4, 3), (1, 4, 0, 3)):
        with pytest.raises(E) as e:
            I.to_rgb(torch.rand(shape))
        assert str(e.value) == f"the image is empty (shape {shape}); connect a non-empty IMAGE"
    assert I.to_rgb(torch.rand(1, 1, 1, 3)).shape == (1, 1, 1, 3)
    with pytest.raises(E) as e:
        I.to_rgb(torch.rand(1, 2, 2, 2))
    assert str(e.value) == ("the image has 2 channels but an IMAGE is grey (1), RGB (3) or RGBA (4, alpha dropped); "
                            "convert it to RGB before encoding")
