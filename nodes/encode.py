"""VAE Encode (Inversion): the source latent for DDIM inversion, plus the VAE's own reconstruction ceiling.

The latent is the posterior mean (what core ``VAEEncode`` returns: ``vae.encode`` takes the mode of the
diagonal Gaussian), so inverting it and sampling back can at best reproduce ``decode(encode(image))``.
``vae_ceiling`` measures exactly that bound: the PSNR (dB, data range 1) of ``decode(encode(image))``
against the image that was encoded, over the pixels that came from the source image (padding excluded).
"""
from __future__ import annotations

import math

import torch
from comfy_api.latest import io, ui

FIT_MODES = ["pad", "crop", "resize", "error"]
PSNR_CAP_DB = 100.0  # a perfect reconstruction reports this instead of +inf (JSON has no inf)


def downscale_factor(vae) -> int:
    """The VAE's spatial compression (8 for SD/SDXL/Flux VAEs); 8 when the VAE does not say."""
    try:
        f = vae.spacial_compression_encode()
        f = int(f)
        return f if f > 0 else 8
    except Exception:
        return 8


def to_rgb(pixels: torch.Tensor) -> torch.Tensor:
    """[B,H,W,C] image -> [B,H,W,3]: alpha (4th channel) dropped, grey (1 channel) repeated."""
    if pixels.ndim != 4:
        raise ValueError(f"VAE Encode (Inversion): expected an IMAGE batch [B,H,W,C], got shape {tuple(pixels.shape)}; "
                         "connect an IMAGE output (e.g. Load Image) to 'pixels'.")
    c = pixels.shape[-1]
    if c >= 3:
        return pixels[..., :3]
    if c == 1:
        return pixels.expand(-1, -1, -1, 3)
    raise ValueError(f"VAE Encode (Inversion): the image has {c} channels; expected RGB (3), RGBA (4) or grey (1). "
                     "Convert the image to RGB before encoding.")


def check_finite(pixels: torch.Tensor) -> None:
    if not bool(torch.isfinite(pixels).all()):
        bad = int((~torch.isfinite(pixels)).sum())
        raise ValueError(f"VAE Encode (Inversion): the image contains {bad} NaN/Inf values. Fix the node that produced "
                         "it (or clamp/replace the values, e.g. with an image-adjust node) before encoding; a VAE "
                         "would turn them into a NaN latent and the inversion would be meaningless.")


def fit_pixels(pixels: torch.Tensor, factor: int, fit: str):
    """Make H and W multiples of ``factor``. Returns (fitted_pixels, valid_hw) where ``valid_hw`` is the
    (h, w) region at the top-left of the fitted image that holds source pixels (for the ceiling)."""
    _, h, w, _ = pixels.shape
    if h % factor == 0 and w % factor == 0:
        return pixels, (h, w)
    if fit == "error":
        raise ValueError(f"VAE Encode (Inversion): the image is {w}x{h}, not a multiple of the VAE's factor {factor}. "
                         f"Set 'fit' to pad, crop or resize, or resize the image to "
                         f"{(w // factor) * factor or factor}x{(h // factor) * factor or factor} first.")
    if fit == "crop":
        if h < factor or w < factor:
            raise ValueError(f"VAE Encode (Inversion): the image ({w}x{h}) is smaller than the VAE's factor {factor}; "
                             "cannot crop. Use fit=pad or resize, or a larger image.")
        nh, nw = (h // factor) * factor, (w // factor) * factor
        oy, ox = (h % factor) // 2, (w % factor) // 2  # centred, like core VAEEncode's own crop
        out = pixels[:, oy:oy + nh, ox:ox + nw, :]
        return out, (nh, nw)
    if fit == "pad":
        nh, nw = math.ceil(h / factor) * factor, math.ceil(w / factor) * factor
        # replicate the last row/column (bottom/right) so the source stays at the top-left, unmoved
        x = pixels.movedim(-1, 1)
        x = torch.nn.functional.pad(x, (0, nw - w, 0, nh - h), mode="replicate")
        return x.movedim(1, -1), (h, w)
    if fit == "resize":
        import comfy.utils
        nh = max(factor, int(round(h / factor)) * factor)
        nw = max(factor, int(round(w / factor)) * factor)
        x = comfy.utils.common_upscale(pixels.movedim(-1, 1), nw, nh, "bilinear", "disabled")
        return x.movedim(1, -1).clamp(0.0, 1.0), (nh, nw)
    raise ValueError(f"VAE Encode (Inversion): unknown fit '{fit}'; use one of {', '.join(FIT_MODES)}.")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB (data range 1) over the whole batch (one MSE over all pixels), capped at PSNR_CAP_DB."""
    mse = float(torch.mean((a.float() - b.float()) ** 2))
    if not math.isfinite(mse):
        return float("nan")
    if mse <= 10 ** (-PSNR_CAP_DB / 10):
        return PSNR_CAP_DB
    return float(-10.0 * math.log10(mse))


def _as_image_batch(decoded: torch.Tensor, n: int) -> torch.Tensor:
    """decode() output -> [n,H,W,3] (video VAEs return [B,T,H,W,3])."""
    if decoded.ndim == 5:
        decoded = decoded.reshape(-1, *decoded.shape[-3:])
    return decoded[:n]


class DDIMInvVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DDIMInvVAEEncode",
            display_name="VAE Encode (Inversion)",
            category="sampling/ddim_inversion",
            description=(
                "Encodes an image to the latent DDIM Invert starts from (the posterior mean, identical to core VAE "
                "Encode for sizes that fit the VAE) and reports the VAE ceiling: the PSNR of decode(encode(image)) "
                "against the image, the best any inversion + reconstruction can reach. Alpha is dropped; sizes "
                "that are not a multiple of the VAE factor are handled per 'fit'."
            ),
            inputs=[
                io.Image.Input("pixels", tooltip="The image (batch) to encode. RGBA alpha is dropped."),
                io.Vae.Input("vae", tooltip="The VAE of the model you will invert with."),
                io.Combo.Input("fit", options=FIT_MODES, default="pad", optional=True,
                               tooltip="When width/height are not multiples of the VAE factor (usually 8): pad = "
                                       "replicate the bottom/right edge (nothing is lost; crop the decoded result "
                                       "back), crop = centre-crop like core VAE Encode, resize = scale to the nearest "
                                       "multiple, error = refuse."),
                io.Boolean.Input("tiled", default=False, optional=True,
                                 tooltip="Encode (and decode, for the ceiling) in tiles to save memory on large images. "
                                         "Tiling changes the latent slightly at tile seams."),
            ],
            outputs=[
                io.Latent.Output("latent", display_name="latent", tooltip="The posterior-mean latent (feed it to DDIM Invert)."),
                io.Float.Output("vae_ceiling", display_name="vae_ceiling",
                                tooltip="PSNR (dB) of decode(encode(image)) vs the image: the reconstruction ceiling."),
            ],
        )

    @classmethod
    def execute(cls, pixels, vae, fit="pad", tiled=False) -> io.NodeOutput:
        import comfy.model_management
        if vae is None:
            raise ValueError("VAE Encode (Inversion): no VAE connected; connect the VAE output of your checkpoint loader.")
        rgb = to_rgb(pixels)
        check_finite(rgb)
        factor = downscale_factor(vae)
        fitted, (vh, vw) = fit_pixels(rgb, factor, fit)
        n = fitted.shape[0]
        if tiled:
            latent = vae.encode_tiled(fitted)
            decoded = vae.decode_tiled(latent)
        else:
            latent = vae.encode(fitted)
            decoded = vae.decode(latent)
        decoded = _as_image_batch(decoded, n)
        ref = fitted[:, :vh, :vw, :].to(decoded.device)
        rec = decoded[:, :vh, :vw, :]
        if rec.shape != ref.shape:  # VAEs that do not round-trip the size exactly: compare the common region
            hh, ww = min(rec.shape[1], ref.shape[1]), min(rec.shape[2], ref.shape[2])
            rec, ref = rec[:, :hh, :ww], ref[:, :hh, :ww]
        ceiling = psnr(rec, ref)
        latent = latent.to(comfy.model_management.intermediate_device())
        h, w = pixels.shape[1], pixels.shape[2]
        text = (f"VAE ceiling: {ceiling:.2f} dB PSNR (decode(encode(image)) vs image, {n} image(s), "
                f"{w}x{h} -> {fitted.shape[2]}x{fitted.shape[1]}, fit={fit}{', tiled' if tiled else ''})")
        return io.NodeOutput({"samples": latent}, ceiling, ui=ui.PreviewText(text))


NODES = [DDIMInvVAEEncode]
