"""VAE Encode (Inversion) in the real host: equality with core VAEEncode, fit modes, channels, the ceiling (whole and
sampled), errors in the pack's style. The pure pixel arithmetic is unit-tested in tests/unit/test_imaging.py."""
from __future__ import annotations

import math

import pytest
import torch

from ddiminv_dev import host

NODE = "DDIMInvVAEEncode"


def _image(f, width=64, height=64, batch=1, channels=3, seed=0, poison="none"):
    return f.TestNoiseImage().make(width, height, batch, channels, seed, poison)[0]


def _prompt(width=64, height=64, batch=1, channels=3, seed=0, poison="none", fit="pad", tiled=False, vae_seed=0,
            ceiling="sampled"):
    return {
        "img": {"class_type": "TestNoiseImage", "inputs": {"width": width, "height": height, "batch": batch,
                                                          "channels": channels, "seed": seed, "poison": poison}},
        "vae": {"class_type": "TestTinyVAE", "inputs": {"seed": vae_seed}},
        "enc": {"class_type": NODE, "inputs": {"pixels": ["img", 0], "vae": ["vae", 0], "fit": fit, "tiled": tiled,
                                               "ceiling": ceiling}},
        # PreviewAny is an output node: it makes the executor run the encoder
        "out": {"class_type": "PreviewAny", "inputs": {"source": ["enc", 1]}},
    }


def _run(**kw):
    r = host.run(_prompt(**kw))
    latent, ceiling = r.outputs("enc")
    return r, latent["samples"], ceiling


def _error(**kw) -> str:
    p = _prompt(**kw)
    assert host.validate(p)[0], "ComfyUI's validation rejected the prompt before the node's own check"
    r = host.run(p, expect_success=False)
    assert not r.success
    err = r.error()
    assert err is not None and err["node_id"] == "enc" and err["exception_type"].endswith("InversionInputError"), err
    msg = err.get("exception_message", "")
    assert msg.startswith("VAE Encode (Inversion): "), msg
    return msg


def _psnr(a, b):
    mse = float(torch.mean((a.float() - b.float()) ** 2))
    return -10 * math.log10(mse)


def test_schema_documented(fx):
    nodes, _ = fx
    schema = nodes.NODE_CLASS_MAPPINGS[NODE].define_schema()
    assert schema.display_name == "VAE Encode (Inversion)"
    assert schema.category == "sampling/ddim_inversion"
    assert schema.description
    assert [i.id for i in schema.inputs] == ["pixels", "vae", "fit", "tiled", "ceiling", "refine", "refine_lr",
                                             "refine_anchor", "tile_frames"]
    assert all(i.tooltip for i in schema.inputs)
    assert all(o.tooltip for o in schema.outputs)
    fit = schema.inputs[2]
    assert fit.optional and set(fit.options) == {"crop", "pad", "resize", "error"} and fit.default == "pad"
    refine = schema.inputs[5]
    assert refine.optional and refine.default == 0 and refine.min == 0   # default: today's node (the mean)
    tile = schema.inputs[8]
    assert tile.optional and tile.default == 0 and tile.min == 0        # default: the whole clip at once


@torch.inference_mode()  # the VAE was built inside the executor (inference mode): use it the same way
def test_equals_core_vae_encode(fx):
    nodes, f = fx
    r, latent, ceiling = _run(batch=2)
    ref = nodes.VAEEncode().encode(f.tiny_vae(0), _image(f, batch=2))[0]["samples"]
    assert latent.shape == (2, 4, 8, 8)
    assert torch.equal(latent, ref)
    import comfy.model_management
    assert latent.device == comfy.model_management.intermediate_device()


def test_deterministic(fx):
    _, l1, c1 = _run(seed=3)
    _, l2, c2 = _run(seed=3)
    assert torch.equal(l1, l2) and c1 == c2


@torch.inference_mode()
def test_ceiling_is_psnr_of_round_trip(fx):
    _, f = fx
    r, latent, ceiling = _run(batch=2, seed=1)
    vae = f.tiny_vae(0)
    img = _image(f, batch=2, seed=1)
    want = _psnr(vae.decode(vae.encode(img)), img)
    assert isinstance(ceiling, float) and math.isfinite(ceiling)
    assert ceiling == pytest.approx(want, abs=1e-4)
    text = r.ui("enc")["text"][0]
    assert f"{ceiling:.2f} dB" in text and "whole image" in text


@torch.inference_mode()
def test_rgba_drops_alpha(fx):
    nodes, f = fx
    _, latent, ceiling = _run(channels=4, seed=2)
    rgba = _image(f, channels=4, seed=2)
    ref = nodes.VAEEncode().encode(f.tiny_vae(0), rgba[..., :3].contiguous())[0]["samples"]
    assert torch.equal(latent, ref)
    _, latent3, ceiling3 = _run(channels=3, seed=2)
    assert latent.shape == latent3.shape


@torch.inference_mode()
def test_fit_pad_keeps_every_pixel(fx):
    _, f = fx
    _, latent, ceiling = _run(width=70, height=50, fit="pad")
    assert latent.shape == (1, 4, 7, 9)  # ceil(50/8), ceil(70/8)
    img = _image(f, width=70, height=50)
    padded = torch.nn.functional.pad(img.movedim(-1, 1), (0, 2, 0, 6), mode="replicate").movedim(1, -1)
    vae = f.tiny_vae(0)
    ref = vae.encode(padded)
    assert torch.allclose(latent, ref, atol=1e-5)
    # the ceiling is measured over the source pixels only
    want = _psnr(vae.decode(ref)[:, :50, :70], img)
    assert ceiling == pytest.approx(want, abs=1e-4)


@torch.inference_mode()
def test_fit_crop_matches_core_centre_crop(fx):
    nodes, f = fx
    _, latent, _ = _run(width=70, height=50, fit="crop")
    assert latent.shape == (1, 4, 6, 8)
    ref = nodes.VAEEncode().encode(f.tiny_vae(0), _image(f, width=70, height=50))[0]["samples"]
    assert torch.allclose(latent, ref, atol=1e-6)


def test_fit_resize_to_nearest_multiple(fx):
    _, latent, ceiling = _run(width=70, height=50, fit="resize")
    assert latent.shape == (1, 4, 6, 9)  # round(50/8)=6, round(70/8)=9
    assert math.isfinite(ceiling)


def test_fit_error_names_the_fix(fx):
    msg = _error(width=70, height=50, fit="error")
    assert "multiple" in msg and "fit" in msg and "pad" in msg


def test_fit_irrelevant_for_multiples(fx):
    lat = [_run(fit=fit)[1] for fit in ("pad", "crop", "resize", "error")]
    assert all(torch.equal(lat[0], x) for x in lat[1:])


def test_tiled(fx):
    _, latent, ceiling = _run(width=64, height=64, tiled=True)
    _, plain, _ = _run(width=64, height=64)
    assert latent.shape == plain.shape
    assert math.isfinite(ceiling)
    assert torch.allclose(latent, plain, atol=1e-3)  # one tile covers a 64x64 image


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_non_finite_image_is_refused(fx, poison):
    msg = _error(poison=poison)
    assert "NaN/Inf" in msg and "fix the node that produced it" in msg


@pytest.mark.parametrize("channels", [2, 5, 8])
def test_images_that_are_not_grey_rgb_or_rgba_are_refused(fx, channels):
    """5 channels used to pass (the first three were taken as RGB) while 2 failed: both are refused now."""
    msg = _error(channels=channels)
    assert f"has {channels} channels" in msg and "grey (1), RGB (3) or RGBA (4" in msg and "convert it to RGB" in msg


@torch.inference_mode()
def test_grey_image_is_repeated_to_rgb(fx):
    nodes, f = fx
    _, latent, _ = _run(channels=1, seed=5)
    grey = _image(f, channels=1, seed=5)
    ref = nodes.VAEEncode().encode(f.tiny_vae(0), grey.expand(-1, -1, -1, 3).contiguous())[0]["samples"]
    assert torch.equal(latent, ref)


@torch.inference_mode()
def test_sampled_ceiling_of_a_large_image_estimates_the_full_one(fx):
    """512x512: the default decodes one 14x14 latent window (~5% of the image) instead of everything."""
    _, f = fx
    r, latent, sampled = _run(width=512, height=512, seed=7)
    _, latent_full, full = _run(width=512, height=512, seed=7, ceiling="full")
    assert torch.equal(latent, latent_full)
    text = r.ui("enc")["text"][0]
    assert "measured on 1 latent windows" in text and "ceiling=full measures all" in text
    assert abs(sampled - full) < 0.5, (sampled, full)
    vae = f.tiny_vae(0)
    img = _image(f, width=512, height=512, seed=7)
    assert full == pytest.approx(_psnr(vae.decode(vae.encode(img)), img), abs=1e-4)


@torch.inference_mode()
def test_inputs_not_mutated(fx):
    nodes, f = fx
    cls = nodes.NODE_CLASS_MAPPINGS[NODE]
    img = _image(f, width=70, height=50, channels=4)
    before = img.clone()
    out = cls.execute(img, f.tiny_vae(0), fit="pad")
    assert torch.equal(img, before)
    assert out.args[0]["samples"].shape == (1, 4, 7, 9)
