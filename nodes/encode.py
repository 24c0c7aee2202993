"""VAE Encode (Inversion): the source latent for DDIM inversion, plus the VAE's own reconstruction ceiling.

The latent is the posterior mean (what core ``VAEEncode`` returns: ``vae.encode`` takes the mode of the
diagonal Gaussian), so inverting it and sampling back can at best reproduce ``decode(encode(image))``.
``vae_ceiling`` measures that bound: the PSNR (dB, data range 1) of ``decode(encode(image))`` against the image
that was encoded, over the pixels that came from the source image (padding excluded). By default
(``ceiling = sampled``) a large image is measured on a few latent windows (about 5% of its area, decoded with
a margin of context), so the node costs about what core VAE Encode costs; ``full`` decodes everything.

``refine`` > 0 goes past that ceiling: decoder inversion (``inversion/refine.py``) optimises the latent so that
``decode(latent)`` matches the image, starting at the mean, with ``refine_anchor`` keeping it near the mean. The
node returns, per image, the best iterate (never a worse pixel error than the mean) and reports the ceiling
before and after. A VAE whose decoder gives no gradient falls back to the mean and says so. A video VAE's clip
latent [1,C,T,h,w] is refined as one unknown against all the clip's frames (Wan and LTXV decoders are causal
over time, so a later frame depends on every earlier latent frame; cutting time would change the decode).
"""
from __future__ import annotations

import time

import torch
from comfy_api.latest import io, ui

from ..inversion import checks, imaging
from ..inversion import refine as R
from ..inversion.errors import InversionInputError, node_boundary
from . import _comfy as C
from . import _comfy_image as CV
from . import _comfy_vae_grad as VG
from .types import CATEGORY

DISPLAY = "VAE Encode (Inversion)"
CEILING_MODES = ("sampled", "full")
REFINE_MAX = 5000
TILE_FRAMES_MAX = 4096


def measure_ceiling(vae, latent, fitted, valid_hw, factor: int, mode: str, tiled: bool, frames=None, per_frame=None):
    """(PSNR dB, fraction of the image measured, number of windows or 0 for a full decode). A video (``frames``:
    how many leading frames of ``fitted`` came from the clip) is always decoded whole and measured over those
    frames; ``per_frame`` (a list) then receives each frame's PSNR."""
    n = fitted.shape[0] if frames is None else int(frames)
    vh, vw = valid_hw
    windows = None
    if mode == "sampled" and latent.ndim == 4:
        windows = imaging.ceiling_windows(int(latent.shape[-2]), int(latent.shape[-1]))
    if windows is None:
        decoded = CV.decode(vae, latent, tiled)[:n]
        ref = fitted[:, :vh, :vw, :].to(decoded.device)
        rec = decoded[:, :vh, :vw, :]
        ref = ref[:n]
        if rec.shape != ref.shape:  # VAEs that do not round-trip the size exactly: compare the common region
            hh, ww = min(rec.shape[1], ref.shape[1]), min(rec.shape[2], ref.shape[2])
            rec, ref = rec[:, :hh, :ww], ref[:, :hh, :ww]
        if per_frame is not None:
            per_frame.extend(imaging.psnr(rec[i:i + 1], ref[i:i + 1]) for i in range(rec.shape[0]))
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
                                                 "other channel counts are refused. With a video VAE (Wan, "
                                                 "HunyuanVideo, LTXV, ...) the batch is one clip's frames in order "
                                                 "and the latent is 5-D [1,C,T,H,W]."),
                io.Vae.Input("vae", tooltip="The VAE of the model you will invert with."),
                io.Combo.Input("fit", options=list(imaging.FIT_MODES), default="pad", optional=True,
                               tooltip="When width/height are not multiples of the VAE factor (usually 8): pad = "
                                       "replicate the bottom/right edge (nothing is lost; crop the decoded result "
                                       "back), crop = centre-crop like core VAE Encode, resize = scale to the nearest "
                                       "multiple, error = refuse. A video VAE also needs a frame count it encodes "
                                       "whole (Wan: 1, 5, 9, ...): pad/resize repeat the last frame, crop drops the "
                                       "extra frames, error refuses (frames are never resampled)."),
                io.Boolean.Input("tiled", default=False, optional=True,
                                 tooltip="Encode (and decode, for a full ceiling) in tiles to save memory on large "
                                         "images. Tiling changes the latent slightly at tile seams."),
                io.Combo.Input("ceiling", options=list(CEILING_MODES), default="sampled", optional=True,
                               tooltip="How vae_ceiling is measured. sampled: decode up to 4 latent windows (about 5% "
                                       "of a large image, with context margins; small images are decoded whole), "
                                       "an estimate that keeps the node within ~1.2x of core VAE Encode. full: "
                                       "decode the whole image (exact; about 3x the time of VAE Encode)."),
                io.Int.Input("refine", default=0, min=0, max=REFINE_MAX, optional=True,
                             tooltip="Decoder inversion: iterations of gradient descent on the latent so that "
                                     "decode(latent) matches the image (0 = the posterior mean, core VAE Encode's "
                                     "latent). Raises the VAE ceiling (see bench/RESULTS.md: ~100 iterations "
                                     "is a good trade); stops early when it no longer improves; never returns a "
                                     "worse ceiling than 0. Each iteration costs about one decode + backward; "
                                     "images over 512x512 (or tiled=true) are refined in 256-px windows, otherwise "
                                     "the backward pass needs about 3x the memory of one VAE decode. A video "
                                     "VAE's clip is refined as one latent against all its frames (never cut in "
                                     "time: the decoder is causal over time)."),
                io.Float.Input("refine_lr", default=R.DEFAULT_LR, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="Refine's learning rate (Adam, in units of the latent's standard deviation; "
                                       "cosine decay to a tenth). Lower it if the node reports a non-finite loss."),
                io.Float.Input("refine_anchor", default=R.DEFAULT_ANCHOR, min=0.0, max=100.0, step=0.001,
                               optional=True,
                               tooltip="Keeps the refined latent near the encoder's mean (weight of the mean "
                                       "squared drift in latent standard deviations, against the pixel MSE): higher "
                                       "= closer to what the diffusion model knows, less pixel gain. 0 = pixels only."),
                io.Int.Input("tile_frames", default=0, min=0, max=TILE_FRAMES_MAX, optional=True,
                             tooltip="Video VAEs only: encode the clip in temporal tiles of about this many frames "
                                     "(core's encode_tiled over time; 0 = off, the whole clip at once) to bound "
                                     "the encoder's memory on long clips. The encoder is causal over time and "
                                     "restarts at each tile, so a tile shorter than the clip gives a different "
                                     "latent than the whole-clip encode (vae_ceiling reports its cost); a tile "
                                     "covering the clip is the untiled latent. Refused for image VAEs."),
            ],
            outputs=[
                io.Latent.Output("latent", display_name="latent",
                                 tooltip="The posterior-mean latent, or the refined one with refine > 0 (feed it to "
                                         "DDIM Invert)."),
                io.Float.Output("vae_ceiling", display_name="vae_ceiling",
                                tooltip="PSNR (dB) of decode(latent) vs the image: the reconstruction ceiling of the "
                                        "returned latent (sampled or full, see 'ceiling'; the text output says which "
                                        "and, with refine, the ceiling of the mean)."),
            ],
        )

    @classmethod
    def execute(cls, pixels, vae, fit="pad", tiled=False, ceiling="sampled", refine=0, refine_lr=R.DEFAULT_LR,
                refine_anchor=R.DEFAULT_ANCHOR, tile_frames=0) -> io.NodeOutput:
        with node_boundary(DISPLAY), torch.no_grad():
            return cls._run(pixels, vae, fit, tiled, ceiling, refine, refine_lr, refine_anchor, tile_frames)

    @classmethod
    def _run(cls, pixels, vae, fit, tiled, ceiling, refine=0, refine_lr=R.DEFAULT_LR,
             refine_anchor=R.DEFAULT_ANCHOR, tile_frames=0) -> io.NodeOutput:
        if vae is None:
            raise InversionInputError("no VAE is connected; connect the VAE output of your checkpoint loader")
        if ceiling not in CEILING_MODES:
            raise InversionInputError(f"ceiling {ceiling!r} is unknown; use one of {', '.join(CEILING_MODES)}")
        refine = _check_refine(refine, refine_lr, refine_anchor)
        rgb = imaging.to_rgb(pixels)
        imaging.check_finite_image(rgb)
        factor = CV.downscale_factor(vae)
        fitted, valid = imaging.fit_pixels(rgb, factor, fit)
        video = CV.time_axis(vae)
        kept = None
        if video is not None:       # the IMAGE batch is one clip's frames: a count the VAE encodes whole
            fewer, more = imaging.frame_counts(int(fitted.shape[0]), video[0], video[1])
            fitted, kept = imaging.fit_frames(fitted, fewer, more, fit)
        tile_frames = _check_tile_frames(tile_frames, video)
        if tile_frames:
            latent = CV.encode_frames_tiled(vae, fitted, tile_frames, bool(tiled))
        else:
            latent = CV.encode(vae, fitted, bool(tiled))
        checks.check_finite_result(latent, "the VAE's latent", "run the VAE in float32 (--fp32-vae) or check the VAE "
                                                            "file")
        per_frame = [] if video is not None else None
        db, frac, nwin = measure_ceiling(vae, latent, fitted, valid, factor, ceiling, bool(tiled), kept, per_frame)
        note = ""
        if refine:
            latent, db, note = cls._refine(vae, latent, fitted, valid, factor, ceiling, bool(tiled), db,
                                           refine, float(refine_lr), float(refine_anchor), video, kept, per_frame)
        latent = latent.to(C.output_device())
        h, w = pixels.shape[1], pixels.shape[2]
        how = (f"measured on {nwin} latent windows = {100 * frac:.1f}% of the image (ceiling=full measures all)"
               if nwin else "measured on the whole image")
        if video is None:
            what = f"{fitted.shape[0]} image(s)"
        else:
            how = f"measured on the whole clip, worst frame {min(per_frame):.2f} dB"
            t_in = int(pixels.shape[0])
            what = (f"a {t_in}-frame clip -> {int(latent.shape[2])} latent frames"
                    + (f" (encoded as {int(fitted.shape[0])} frames, fit={fit})" if int(fitted.shape[0]) != t_in
                       else ""))
        if tile_frames:
            what += (f", temporal tiles of {tile_frames} frames"
                     + (" (shorter than the clip: the latent differs from the whole-clip encode)"
                        if tile_frames < int(fitted.shape[0]) else " (covering the clip: the untiled latent)"))
        text = (f"VAE ceiling: {db:.2f} dB PSNR (decode(encode(image)) vs image, {how}; {what}, "
                f"{w}x{h} -> {fitted.shape[2]}x{fitted.shape[1]}, fit={fit}{', tiled' if tiled else ''})" + note)
        return io.NodeOutput({"samples": latent}, db, ui=ui.PreviewText(text))

    @classmethod
    def _refine(cls, vae, mean, fitted, valid, factor, ceiling, tiled, db0, steps, lr, anchor, video=None,
                kept=None, per_frame=None):
        """(latent, ceiling dB, text) after decoder inversion; the mean (and its ceiling) whenever refining
        does not improve the measured ceiling or the decoder gives no gradient. A clip (``video``) is refined as
        one latent against all its frames (the decoder is causal over time: every latent frame shapes the frames
        after it, so time is not cut; windows cut h/w only, each with the whole clip); ``per_frame`` is then
        replaced by the refined latent's per-frame PSNRs when it is kept."""
        target = fitted
        if video is not None:       # one clip: the whole [1,C,T,h,w] latent against all its (fitted) frames
            target = fitted.unsqueeze(0)
        elif mean.ndim != 4:
            VG.warn("refine skipped: not an image VAE")
            return mean, db0, (f"\nrefine skipped: the VAE's latent is {mean.ndim - 2}-D, decoder inversion handles "
                               "image VAEs only; returned the posterior mean (set refine to 0)")
        h, w = int(mean.shape[-2]), int(mean.shape[-1])
        windows = R.plan_windows(h, w, tiled)
        t0 = time.perf_counter()
        try:
            res = VG.refine(vae, mean, target, steps=steps, lr=lr, anchor=anchor, valid_hw=valid, windows=windows)
        except VG.NotDifferentiable as e:
            VG.warn(f"refine skipped: {e}")
            return mean, db0, (f"\nrefine skipped: this VAE cannot be refined, {e}; returned the posterior mean "
                               "(set refine to 0, or use a VAE with an ordinary torch decoder)")
        secs = time.perf_counter() - t0
        latent = res.latent
        checks.check_finite_result(latent, "the refined latent", "lower refine_lr or set refine to 0")
        frames1 = [] if per_frame is not None else None
        db1, _, _ = measure_ceiling(vae, latent, fitted, valid, factor, ceiling, tiled, kept, frames1)
        how = {"done": "", "early": ", stopped early: no further gain",
               "non-finite": "; the loss became NaN/Inf, kept the best finite iterate (lower refine_lr)"}[res.stopped]
        win = f", in {len(windows)} windows" if windows else ""
        if not R.keep_refined(db0, db1):
            return mean, db0, (f"\nrefine: no gain ({db1:.2f} dB after {res.iterations} iterations{how}{win}); "
                               f"returned the posterior mean ({secs:.1f} s)")
        if frames1 is not None:
            per_frame[:] = frames1
        return latent, db1, (f"\nrefine: {db0:.2f} dB -> {db1:.2f} dB ({db1 - db0:+.2f} dB), {res.iterations} of "
                             f"{steps} iterations{how}{win}, lr {lr:g}, anchor {anchor:g}, {secs:.1f} s")


def _check_tile_frames(tile_frames, video) -> int:
    if isinstance(tile_frames, bool) or not isinstance(tile_frames, int) or not 0 <= tile_frames <= TILE_FRAMES_MAX:
        raise InversionInputError(f"tile_frames must be an integer from 0 to {TILE_FRAMES_MAX} (got "
                                  f"{tile_frames!r}); use 0 to encode the whole clip at once")
    if tile_frames and video is None:
        raise InversionInputError(f"tile_frames is {tile_frames} but this VAE is an image VAE (no time axis to "
                                  "tile); set tile_frames to 0 (use 'tiled' for spatial tiles)")
    if tile_frames and video[0](tile_frames) < 2:
        raise InversionInputError(f"tile_frames {tile_frames} is shorter than two latent frames of this "
                                  f"{video[2]} (core's smallest temporal tile); use at least {_two_latent(video)} "
                                  "or 0")
    return int(tile_frames)


def _two_latent(video) -> int:
    return int(video[1](2))


def _check_refine(refine, lr, anchor) -> int:
    if isinstance(refine, bool) or not isinstance(refine, int) or not 0 <= refine <= REFINE_MAX:
        raise InversionInputError(f"refine must be an integer from 0 to {REFINE_MAX} (got {refine!r}); use 0 for "
                                  "the posterior mean or e.g. 100")
    for name, v in (("refine_lr", lr), ("refine_anchor", anchor)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and v < float("inf")):
            raise InversionInputError(f"{name} must be a finite number >= 0 (got {v!r}); use the default")
    return int(refine)


NODES = [DDIMInvVAEEncode]
