"""VAE Encode (Inversion): the source latent for DDIM inversion, plus the VAE's own reconstruction ceiling.

The latent is the posterior mean (what core ``VAEEncode`` returns: ``vae.encode`` takes the mode of the
diagonal Gaussian), so inverting it and sampling back can at best reproduce ``decode(encode(image))``.
``vae_ceiling`` measures that bound: the PSNR (dB, data range 1) of ``decode(encode(image))`` against the image
that was encoded, over the pixels that came from the source image (padding excluded). By default
(``ceiling = sampled``) a large image is measured on a few latent windows (about 5% of its area, decoded with
a margin of context), so the node costs about what core VAE Encode costs; ``full`` decodes everything.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..inversion import checks, imaging
from ..inversion.errors import InversionInputError, node_boundary
from . import _comfy as C
from . import _comfy_image as CV
from .types import CATEGORY

DISPLAY = "VAE Encode (Inversion)"
CEILING_MODES = ("sampled", "full")


def measure_ceiling(vae, latent, fitted, valid_hw, factor: int, mode: str, tiled: bool):
    """(PSNR dB, fraction of the image measured, number of windows or 0 for a full decode)."""
    n = fitted.shape[0]
    vh, vw = valid_hw
    windows = None
    if mode == "sampled" and latent.ndim == 4:
        windows = imaging.ceiling_windows(int(latent.shape[-2]), int(latent.shape[-1]))
    if windows is None:
        decoded = CV.decode(vae, latent, tiled)[:n]
        ref = fitted[:, :vh, :vw, :].to(decoded.device)
        rec = decoded[:, :vh, :vw, :]
        if rec.shape != ref.shape:  # VAEs that do not round-trip the size exactly: compare the common region
            hh, ww = min(rec.shape[1], ref.shape[1]), min(rec.shape[2], ref.shape[2])
            rec, ref = rec[:, :hh, :ww], ref[:, :hh, :ww]
        return imaging.psnr(rec, ref), 1.0, 0
    sse, count = 0.0, 0
    for (y0, y1, x0, x1, my0, my1, mx0, mx1) in windows:
        dec = CV.decode(vae, latent[:, :, y0:y1, x0:x1], False)[:n]
        gy0, gy1 = my0 * factor, min(my1 * factor, vh)      # measured core in image pixels, source pixels only
        gx0, gx1 = mx0 * factor, min(mx1 * factor, vw)
        if gy1 <= gy0 or gx1 <= gx0:
            continue
        rec = dec[:, gy0 - y0 * factor:gy1 - y0 * factor, gx0 - x0 * factor:gx1 - x0 * factor, :].float()
        ref = fitted[:, gy0:gy1, gx0:gx1, :].to(rec.device).float()
        if rec.shape != ref.shape:
            continue
        sse += float(((rec - ref) ** 2).sum())
        count += rec.numel()
    if count == 0:
        return measure_ceiling(vae, latent, fitted, valid_hw, factor, "full", tiled)
    return imaging.psnr_from_sse(sse, count), count / max(1, n * vh * vw * 3), len(windows)


class DDIMInvVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DDIMInvVAEEncode",
            display_name=DISPLAY,
            category=CATEGORY,
            description=(
                "Encodes an image to the latent DDIM Invert starts from (the posterior mean, identical to core VAE "
                "Encode for sizes that fit the VAE) and reports the VAE ceiling: the PSNR of decode(encode(image)) "
                "against the image, the best any inversion + reconstruction can reach (measured on a few windows "
                "of a large image by default, so the node costs about what VAE Encode costs). Alpha is dropped; "
                "sizes that are not a multiple of the VAE factor are handled per 'fit'."
            ),
            inputs=[
                io.Image.Input("pixels", tooltip="The image (batch) to encode: grey, RGB or RGBA (alpha dropped); "
                                                 "other "
                                                 "channel counts are refused."),
                io.Vae.Input("vae", tooltip="The VAE of the model you will invert with."),
                io.Combo.Input("fit", options=list(imaging.FIT_MODES), default="pad", optional=True,
                               tooltip="When width/height are not multiples of the VAE factor (usually 8): pad = "
                                       "replicate the bottom/right edge (nothing is lost; crop the decoded result "
                                       "back), crop = centre-crop like core VAE Encode, resize = scale to the nearest "
                                       "multiple, error = refuse."),
                io.Boolean.Input("tiled", default=False, optional=True,
                                 tooltip="Encode (and decode, for a full ceiling) in tiles to save memory on large "
                                         "images. Tiling changes the latent slightly at tile seams."),
                io.Combo.Input("ceiling", options=list(CEILING_MODES), default="sampled", optional=True,
                               tooltip="How vae_ceiling is measured. sampled: decode up to 4 latent windows (about 5% "
                                       "of a large image, with context margins; small images are decoded whole), "
                                       "an estimate that keeps the node within ~1.2x of core VAE Encode. full: "
                                       "decode the whole image (exact; about 3x the time of VAE Encode)."),
            ],
            outputs=[
                io.Latent.Output("latent", display_name="latent", tooltip="The posterior-mean latent (feed it to DDIM "
                                                                          "Invert)."),
                io.Float.Output("vae_ceiling", display_name="vae_ceiling",
                                tooltip="PSNR (dB) of decode(encode(image)) vs the image: the reconstruction ceiling "
                                        "(sampled or full, see 'ceiling'; the text output says which)."),
            ],
        )

    @classmethod
    def execute(cls, pixels, vae, fit="pad", tiled=False, ceiling="sampled") -> io.NodeOutput:
        with node_boundary(DISPLAY), torch.no_grad():
            return cls._run(pixels, vae, fit, tiled, ceiling)

    @classmethod
    def _run(cls, pixels, vae, fit, tiled, ceiling) -> io.NodeOutput:
        if vae is None:
            raise InversionInputError("no VAE is connected; connect the VAE output of your checkpoint loader")
        if ceiling not in CEILING_MODES:
            raise InversionInputError(f"ceiling {ceiling!r} is unknown; use one of {', '.join(CEILING_MODES)}")
        rgb = imaging.to_rgb(pixels)
        imaging.check_finite_image(rgb)
        factor = CV.downscale_factor(vae)
        fitted, valid = imaging.fit_pixels(rgb, factor, fit)
        latent = CV.encode(vae, fitted, bool(tiled))
        checks.check_finite_result(latent, "the VAE's latent", "run the VAE in float32 (--fp32-vae) or check the VAE "
                                                            "file")
        db, frac, nwin = measure_ceiling(vae, latent, fitted, valid, factor, ceiling, bool(tiled))
        latent = latent.to(C.output_device())
        h, w = pixels.shape[1], pixels.shape[2]
        how = (f"measured on {nwin} latent windows = {100 * frac:.1f}% of the image (ceiling=full measures all)"
               if nwin else "measured on the whole image")
        text = (f"VAE ceiling: {db:.2f} dB PSNR (decode(encode(image)) vs image, {how}; {fitted.shape[0]} image(s), "
                f"{w}x{h} -> {fitted.shape[2]}x{fitted.shape[1]}, fit={fit}{', tiled' if tiled else ''})")
        return io.NodeOutput({"samples": latent}, db, ui=ui.PreviewText(text))


NODES = [DDIMInvVAEEncode]
