"""A clip through the unchanged workflow: frames -> VAE Encode (Inversion) on a video VAE -> DDIM Invert (exact) ->
Inverted-Latent Sampler -> core VAE Decode -> frames, on tiny real video VAEs built through ``comfy.sd.VAE``
(``ddiminv_dev/tiny_video_vaes.py``) and the matching tiny video models (``ddiminv_dev/tiny_families.py``)."""
from __future__ import annotations

import pytest
import torch

from ddiminv_dev import host, tiny_families as tf

STEPS = 6
# kind of tiny VAE, family of tiny model, clip size (frames, pixels): Wan 2.1 8x/4x, LTXV 32x/8x
CASES = {"wan21": ("WAN21_T2V", 9, 64), "ltxv": ("LTXV", 9, 64)}
MIN_GAIN = {"wan21": 0.7, "ltxv": 0.12}    # dB refine=12 must add (measured on this CPU: +1.14, +0.22)


def _prompt(kind: str, frames: int | None = None, fit: str = "pad", refine: int = 0, regenerate: bool = True,
            model: str | None = None, experts: bool = False):
    """``experts``: Wan 2.2 A14B's two experts (a second tiny model, seed 5, as model_high_noise of DDIM Invert
    and the sampler; DDIM Invert's default boundary 0.875)."""
    name, t, size = CASES[kind]
    name = model or name
    p = {
        "vae": {"class_type": "TestTinyVideoVAE", "inputs": {"kind": kind, "seed": 0}},
        "img": {"class_type": "TestNoiseImage", "inputs": {"width": size, "height": size, "batch": frames or t,
                                                          "channels": 3, "seed": 5, "poison": "none"}},
        "enc": {"class_type": "DDIMInvVAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["vae", 0], "fit": fit,
                                                             "refine": refine}},
        "enc_out": {"class_type": "TestLatentSink", "inputs": {"samples": ["enc", 0]}},
    }
    if regenerate:
        p.update({
            "m": {"class_type": "TestFamilyModel", "inputs": {"name": name, "seed": 0}},
            "c": {"class_type": "TestFamilyConditioning", "inputs": {"name": name, "seed": 1}},
            "n": {"class_type": "TestFamilyConditioning", "inputs": {"name": name, "seed": 2}},
            "inv": {"class_type": "DDIMInvert", "inputs": {
                "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "latent": ["enc", 0], "steps": STEPS,
                "cfg": 1.0, "scheduler": "simple", "method": "exact"}},
            "rec": {"class_type": "DDIMInvSampler", "inputs": {
                "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "trajectory": ["inv", 2],
                "cfg": 1.0}},
            "rec_out": {"class_type": "TestLatentSink", "inputs": {"samples": ["rec", 0]}},
            "dec_rec": {"class_type": "VAEDecode", "inputs": {"samples": ["rec", 0], "vae": ["vae", 0]}},
            "dec_src": {"class_type": "VAEDecode", "inputs": {"samples": ["enc", 0], "vae": ["vae", 0]}},
            "show_rec": {"class_type": "PreviewImage", "inputs": {"images": ["dec_rec", 0]}},
            "show_src": {"class_type": "PreviewImage", "inputs": {"images": ["dec_src", 0]}},
        })
        if experts:
            p["hi"] = {"class_type": "TestFamilyModel", "inputs": {"name": name, "seed": 5}}
            p["inv"]["inputs"]["model_high_noise"] = ["hi", 0]
            p["rec"]["inputs"]["model_high_noise"] = ["hi", 0]
    return p


def _frames(res, node: str) -> torch.Tensor:
    out = res.outputs(node)[0]
    return out.reshape(-1, *out.shape[-3:])


@pytest.mark.parametrize("kind", list(CASES))
def test_clip_round_trips_through_a_video_vae(kind):
    """frames -> 5-D latent -> exact inversion -> sampler: the latent comes back at float32 rounding (measured at
    6 steps, cfg 1: Wan 2.1 3.8e-7, LTXV 1.1e-7) and decodes to the clip's frame count, the frames core VAE Decode
    makes of the encoded latent (max pixel difference measured 1.5e-5 and 3.3e-6: the pixels sit at the VAE
    ceiling)."""
    name, t, size = CASES[kind]
    res = host.run(_prompt(kind))
    src, rec = res.outputs("enc")[0]["samples"], res.outputs("rec")[0]["samples"]
    assert src.ndim == 5 and src.shape == rec.shape, (src.shape, rec.shape)
    fmt = tf.latent_format(name)
    a, b = fmt.process_in(rec.float()), fmt.process_in(src.float())
    err = float((a - b).norm() / b.norm())
    f_rec, f_src = _frames(res, "dec_rec"), _frames(res, "dec_src")
    pix = float((f_rec - f_src).abs().max())
    text = res.ui("enc")["text"][0]
    print(f"\nVIDEO VAE {kind}: latent {tuple(src.shape)}, round trip {err:.3g}, frames {f_rec.shape[0]}, "
          f"max pixel diff to decode(encode) {pix:.3g}\n{text}")
    assert err <= 1e-6, err
    assert f_rec.shape[0] == t and f_src.shape[0] == t
    assert pix <= 1e-4, pix
    assert f"a {t}-frame clip -> {src.shape[2]} latent frames" in text and "worst frame" in text


def test_wan22_two_experts_clip_round_trips():
    """Wan 2.2 A14B (two experts, each loaded by ComfyUI as WAN21_T2V, on the Wan 2.1 VAE as the A14B models
    are): frames -> 5-D latent -> exact inversion switching experts at step 4 (boundary 0.875; 6 'simple' steps,
    shift 8) -> sampler with the same pair -> core VAE Decode. Latent round trip at float32 rounding (measured
    3.8e-7, bar 1e-6), the clip's frame count back, pixels at decode(encode) (measured 1.7e-5, bar 1e-4); the
    second expert really ran (the noise moves by more than 1e-2 against one model's)."""
    res = host.run(_prompt("wan21", experts=True))
    one = host.run(_prompt("wan21"))
    src, rec = res.outputs("enc")[0]["samples"], res.outputs("rec")[0]["samples"]
    assert src.ndim == 5 and src.shape == rec.shape, (src.shape, rec.shape)
    traj = res.outputs("inv")[2]
    assert traj.extra["experts"]["switch_step"] == 4, traj.extra["experts"]
    fmt = tf.latent_format("WAN21_T2V")
    a, b = fmt.process_in(rec.float()), fmt.process_in(src.float())
    err = float((a - b).norm() / b.norm())
    moved = float((traj.noise - one.outputs("inv")[2].noise).norm() / traj.noise.norm())
    f_rec, f_src = _frames(res, "dec_rec"), _frames(res, "dec_src")
    pix = float((f_rec - f_src).abs().max())
    print(f"\nWAN 2.2 two experts on the Wan 2.1 VAE: latent {tuple(src.shape)}, round trip {err:.3g}, noise vs one "
          f"model's {moved:.3g}, frames {f_rec.shape[0]}, max pixel diff to decode(encode) {pix:.3g}")
    assert err <= 1e-6, err
    assert moved > 1e-2, moved
    assert f_rec.shape[0] == 9 and f_src.shape[0] == 9
    assert pix <= 1e-4, pix
    assert "end_at_step / start_at_step 4" in "\n".join(res.ui("rec")["text"])


def _float64_chain(res, monkeypatch) -> tuple:
    """The same chain in float64: DDIM Invert's exact inversion and the sampler's BDIA replay (the pure core the
    nodes run: ``methods.invert`` / ``methods.sample``, same schedule, Options and input scale) with a float64 copy
    of the prompt's network, the conditioning ComfyUI hands the network (captured from one guided evaluation),
    and the pack's float32 cast of each evaluation's input lifted (``methods._eval``, for this reference only).
    Returns (its round trip, the float32 chain's inverted noise against the float64 one), both relative."""
    import copy
    C, M = host.pack_submodule("nodes._comfy"), host.pack_submodule("inversion.methods")
    model, traj = res.outputs("m")[0], res.outputs("inv")[2]
    seen = {}

    def capture(apply_model, args):
        seen["c"] = args["c"]
        return apply_model(args["input"], args["timestep"], **args["c"])
    probe = model.clone()
    probe.set_model_unet_function_wrapper(capture)
    with torch.no_grad():
        C.run_guided(probe, res.outputs("c")[0], res.outputs("n")[0], 1.0, tuple(traj.states.shape[1:]),
                     traj.sampling_sigmas(), lambda fn, dev, pr: fn(traj.states[1].float(), float(traj.sigmas[1])),
                     1, "capture")
    ms, net = model.model.model_sampling, copy.deepcopy(model.model.diffusion_model).double()
    c64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in seen["c"].items()}
    context = c64.pop("c_crossattn")

    def fn64(x, sigma):
        s, xd = torch.full((x.shape[0],), float(sigma), dtype=torch.float64), x.double()
        out = net(ms.calculate_input(s, xd), ms.timestep(s).double(), context=context, **c64)
        return ms.calculate_denoised(s, out.double(), xd)
    monkeypatch.setattr(M, "_eval", lambda fn, x, sigma: fn(x, float(sigma)))
    x0 = C.to_model_space(model, res.outputs("enc")[0]["samples"]).double()
    with torch.no_grad():
        t64 = M.invert(x0, traj.sigmas.double(), fn64, M.Options(method=traj.method), family="flow",
                       input_scale=C.input_scale(model))
        x64 = M.sample(t64, fn64, replay="bdia")
    assert t64.states.shape == traj.states.shape and float(t64.noise.double().norm()) > 0
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    return rel(x64, x0), rel(traj.noise, t64.noise)


def test_hunyuan_video_clip_round_trips_on_a_stand_in_vae(monkeypatch):
    """HunyuanVideo: core builds its VAE at full width whatever the weights say (``tiny_video_vaes.REFUSED``), so
    the tiny HunyuanVideo model runs the clip end to end on the tiny Wan 2.1 VAE, whose latent has HunyuanVideo's
    geometry (16 channels, 4x in time, 8x in space): frames -> 5-D latent -> exact inversion with the HunyuanVideo
    model (its own latent format's process_in) -> sampler -> core VAE Decode. The clip's frame count back, pixels
    at decode(encode).

    The latent round trip (measured 9.1e-7) against a float64 run of the same chain (:func:`_float64_chain`): that
    run round-trips to 0 (measured: exactly), so what the float32 chain loses is float32 rounding of the
    evaluations (the last replay step evaluates the network on the float32 cast of the reconstructed state, 1.6e-8
    from the inversion's, and the tiny random network amplifies it); the float32 chain's inverted noise sits
    3.7e-7 from the float64 one. The bar is 4x that gap (round trip / gap measured 2.5): on another CPU's BLAS both
    move together."""
    assert "hunyuan_video" in __import__("ddiminv_dev.tiny_video_vaes", fromlist=["REFUSED"]).REFUSED
    res = host.run(_prompt("wan21", model="HunyuanVideo"))
    src, rec = res.outputs("enc")[0]["samples"], res.outputs("rec")[0]["samples"]
    assert src.ndim == 5 and src.shape == rec.shape, (src.shape, rec.shape)
    fmt = tf.latent_format("HunyuanVideo")
    a, b = fmt.process_in(rec.float()), fmt.process_in(src.float())
    err = float((a - b).norm() / b.norm())
    f_rec, f_src = _frames(res, "dec_rec"), _frames(res, "dec_src")
    pix = float((f_rec - f_src).abs().max())
    err64, gap = _float64_chain(res, monkeypatch)
    print(f"\nHUNYUAN VIDEO on the Wan 2.1 VAE: latent {tuple(src.shape)}, round trip {err:.3g} (float64 run of the "
          f"chain: {err64:.3g}; float32 vs float64 inverted noise {gap:.3g}, ratio {err / gap:.3g}), frames "
          f"{f_rec.shape[0]}, max pixel diff to decode(encode) {pix:.3g}")
    assert err64 <= 1e-12, err64          # exact: nothing but float64 rounding (measured 0)
    assert gap <= 1e-6, gap               # the float32 chain is that chain at float32 precision (measured 3.7e-7)
    assert err <= 4 * gap, (err, gap)     # measured 2.5x
    assert f_rec.shape[0] == 9 and f_src.shape[0] == 9
    assert pix <= 1e-4, pix


@pytest.mark.parametrize("fit,latent_t,needle", [
    ("pad", 3, "encoded as 9 frames, fit=pad"), ("crop", 2, "encoded as 5 frames, fit=crop"),
    ("error", None, "the clip has 7 frames but this video VAE encodes 5 or 9 frames")])
def test_a_frame_count_the_vae_cannot_take(fit, latent_t, needle):
    """Wan encodes 1 + 4k frames (core silently drops the rest of a 7-frame clip): pad repeats the last frame,
    crop drops the extra ones, error refuses with the counts it can take."""
    res = host.run(_prompt("wan21", frames=7, fit=fit, regenerate=False), expect_success=latent_t is not None)
    if latent_t is None:
        assert needle in res.error_text() and "VAE Encode (Inversion)" in res.error_text(), res.error_text()
        return
    assert res.outputs("enc")[0]["samples"].shape[2] == latent_t
    assert needle in res.ui("enc")["text"][0], res.ui("enc")["text"][0]


@pytest.mark.parametrize("kind", list(CASES))
def test_refine_inverts_the_decoder_over_the_whole_clip(kind):
    """refine > 0 on a video VAE optimises the 5-D latent against all the clip's frames (the decoder is causal over
    time, so the clip is not cut in time): the ceiling rises past the mean's by a margin (so the refined latent is
    the one returned, not the mean kept by the never-worse rule), the text reports it over the whole clip, the
    latent keeps its shape and the input frames are not mutated. Measured at 12 iterations (see the print)."""
    from ddiminv_dev import tiny_video_vaes as tv
    name, t, size = CASES[kind]
    cls = host.pack_submodule("nodes.encode").DDIMInvVAEEncode
    vae = tv.tiny_video_vae(kind, 0)
    img = torch.rand(t, size, size, 3, generator=torch.Generator().manual_seed(5))
    before = img.clone()
    with torch.inference_mode():
        mean = cls.execute(img, vae)
        out = cls.execute(img, vae, refine=12)
    z0, c0 = mean.args[0]["samples"], mean.args[1]
    z1, c1 = out.args[0]["samples"], out.args[1]
    text = out.ui.as_dict()["text"][0]
    print(f"\nREFINE {kind}: {c0:.3f} dB -> {c1:.3f} dB ({c1 - c0:+.3f}), latent {tuple(z1.shape)}\n{text}")
    assert torch.equal(img, before)
    assert z1.ndim == 5 and z1.shape == z0.shape and not torch.equal(z1, z0)
    assert not z1.requires_grad and z1.grad_fn is None
    assert c1 > c0 + MIN_GAIN[kind], (c0, c1)
    assert f"refine: {c0:.2f} dB -> {c1:.2f} dB" in text and "of 12 iterations" in text, text
    assert "worst frame" in text and f"a {t}-frame clip" in text, text


def _preview_prompt(decode: str, keep: int, show: str = "states") -> dict:
    p = _prompt("wan21")
    p["prev"] = {"class_type": "DDIMInvTrajectoryPreview", "inputs": {
        "trajectory": ["inv", 2], "vae": ["vae", 0], "show": show, "frames": 3, "decode": decode, "keep": keep}}
    return p


def test_preview_shows_each_kept_state_as_a_strip_over_the_clip():
    """decode=vae with keep >= the clip: each kept state is a strip of all 9 decoded frames (the clip's count);
    decode=fast with keep=2: latent frames 0 and 2, each the Latent2RGB of that frame; per-frame drift whose
    mean square is the state's overall drift."""
    import comfy.latent_formats
    from ddiminv_dev import host as h
    imaging = h.pack_submodule("inversion.imaging")
    res = host.run(_preview_prompt("vae", 16))
    imgs, data = res.outputs("prev")[0], res.ui("prev")["ddim_trajectory"][0]
    assert data["clip"] == {"unit": "frame", "count": 9, "frames": list(range(9))}, data["clip"]
    assert imgs.shape == (3, 64, 9 * 64, 3), imgs.shape          # 3 kept states x 9 frames of 64x64
    # the source state's strip is core VAE Decode of the encoded clip, frame by frame
    src_frames = _frames(res, "dec_src")
    assert float((imgs[0].reshape(64, 9, 64, 3).permute(1, 0, 2, 3) - src_frames).abs().max()) <= 1e-5
    for f in data["frames"]:
        ff = torch.tensor(f["figure_frames"])
        assert ff.shape == (3,)
        assert abs(float(ff.square().mean().sqrt()) - f["figure"]) <= 1e-5 * max(1.0, f["figure"]), (ff, f)

    res = host.run(_preview_prompt("fast", 2))
    imgs, data = res.outputs("prev")[0], res.ui("prev")["ddim_trajectory"][0]
    assert data["clip"] == {"unit": "latent frame", "count": 3, "frames": [0, 2]}, data["clip"]
    assert imgs.shape == (3, 8, 2 * 8, 3), imgs.shape
    traj = res.outputs("inv")[2]
    fmt = comfy.latent_formats.Wan21()
    last = traj.states[-1, 0]                                     # frames picked 0, steps evenly: the last is N
    for j, t in enumerate((0, 2)):
        want = imaging.fast_rgb(last[None, :, t], fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias)[0]
        assert float((imgs[-1, :, j * 8:(j + 1) * 8] - want).abs().max()) <= 1e-6, t


def test_preview_refuses_keep_below_two():
    """keep < 2 is refused: by ComfyUI's validation (the schema's min) and by the node itself when it arrives
    through a link (which validation does not check)."""
    p = _preview_prompt("fast", 2)
    p["prev"]["inputs"]["keep"] = 1
    assert "prev" in host.validate(p)[3]
    preview = host.pack_submodule("nodes.preview").DDIMInvTrajectoryPreview
    from ddiminv_dev.fixtures.preview_nodes import make_trajectory
    with pytest.raises(Exception, match="keep must be an integer >= 2"):
        preview.execute(make_trajectory(steps=3), keep=1)


def test_tile_frames_tiles_the_encoder_over_time():
    """tile_frames > 0 encodes a 17-frame clip through core's temporal encode_tiled: a tile covering the clip is
    the untiled latent (measured: identical; bar 1e-6 relative), a 9-frame tile restarts Wan 2.1's causal encoder
    mid-clip and gives a different latent of the same shape (measured 0.90 relative on this random tiny VAE: no
    bar can say "matches", so the node says so in its text and vae_ceiling reports the cost); image VAEs and
    tiles under two latent frames are refused."""
    from ddiminv_dev import tiny_video_vaes as tv
    cls = host.pack_submodule("nodes.encode").DDIMInvVAEEncode
    vae = tv.tiny_video_vae("wan21", 0)
    img = torch.rand(17, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        whole = cls.execute(img, vae).args[0]["samples"]
        cover = cls.execute(img, vae, tile_frames=17)
        short = cls.execute(img, vae, tile_frames=9)
    rel = lambda z: float((z - whole).norm() / whole.norm())  # noqa: E731
    z_cover, z_short = cover.args[0]["samples"], short.args[0]["samples"]
    print(f"\nTILE_FRAMES wan21 17 frames: cover {rel(z_cover):.3g}, 9-frame tiles {rel(z_short):.3g}")
    assert z_cover.shape == whole.shape and rel(z_cover) <= 1e-6
    assert z_short.shape == whole.shape and rel(z_short) > 0.1
    assert "temporal tiles of 9 frames (shorter than the clip" in short.ui.as_dict()["text"][0]
    assert "temporal tiles of 17 frames (covering the clip" in cover.ui.as_dict()["text"][0]
    with pytest.raises(Exception, match="tile_frames 3 is shorter than two latent frames of this WanVAE.*use at "
                                        "least 5 or 0"):
        with torch.inference_mode():
            cls.execute(img, vae, tile_frames=3)


def test_tile_frames_on_an_image_vae_is_refused():
    p = {"img": {"class_type": "TestNoiseImage", "inputs": {"width": 32, "height": 32, "batch": 1, "channels": 3,
                                                           "seed": 0, "poison": "none"}},
         "vae": {"class_type": "TestTinyVAE", "inputs": {"seed": 0}},
         "enc": {"class_type": "DDIMInvVAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["vae", 0],
                                                             "tile_frames": 9}},
         "out": {"class_type": "TestLatentSink", "inputs": {"samples": ["enc", 0]}}}
    res = host.run(p, expect_success=False)
    text = res.error_text()
    assert "VAE Encode (Inversion)" in text and "this VAE is an image VAE" in text and "set tile_frames to 0" in text


def test_refine_a_clip_in_hw_windows():
    """tiled=True on a clip whose latent is wider than a window's core (5 frames of 32x264 -> latent [1,16,2,4,33],
    cores of 32: 2 windows): refine optimises in h/w windows, each decoding the whole clip (time is never cut),
    and the ceiling still rises past the mean's (measured +0.63 dB at 4 iterations; bar: MIN_GAIN wan21's 0.7
    halved, the windows' margins cut the decoder's context), shape kept, the text names the windows."""
    from ddiminv_dev import tiny_video_vaes as tv
    cls = host.pack_submodule("nodes.encode").DDIMInvVAEEncode
    vae = tv.tiny_video_vae("wan21", 0)
    img = torch.rand(5, 32, 264, 3, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        mean = cls.execute(img, vae, tiled=True, ceiling="full")
        out = cls.execute(img, vae, tiled=True, ceiling="full", refine=4)
    z0, c0 = mean.args[0]["samples"], mean.args[1]
    z1, c1 = out.args[0]["samples"], out.args[1]
    text = out.ui.as_dict()["text"][0]
    print(f"\nREFINE wan21 clip in windows: {c0:.3f} dB -> {c1:.3f} dB ({c1 - c0:+.3f}), latent "
          f"{tuple(z1.shape)}\n{text}")
    assert z1.shape == z0.shape == (1, 16, 2, 4, 33), z1.shape
    assert "in 2 windows" in text and "a 5-frame clip" in text, text
    assert c1 > c0 + MIN_GAIN["wan21"] / 2, (c0, c1)
