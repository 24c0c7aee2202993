"""Pure image/latent arithmetic used by VAE Encode (Inversion) and Trajectory Preview (torch only, no ComfyUI).

* :func:`to_rgb`, :func:`fit_pixels`: the image an encoder may take (channels, a multiple of the VAE factor);
* :func:`frame_counts`, :func:`fit_frames`: a video VAE's time axis (frame counts it encodes without dropping any);
* :func:`psnr` and :func:`ceiling_windows`: the VAE ceiling, measured on a few latent windows of a large image;
* :func:`select_frames`, :func:`fast_rgb`, :func:`rms`: the preview's frame choice and Latent2RGB arithmetic;
  :func:`strip`, :func:`rms_per_frame`, :func:`trajectory_bytes`: its time axis (video latents).

Errors are :class:`~inversion.errors.InversionInputError` ("what is wrong; the fix"); the node adds its name.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .errors import InversionInputError

FIT_MODES = ("pad", "crop", "resize", "error")
PSNR_CAP_DB = 100.0  # a perfect reconstruction reports this instead of +inf (JSON has no inf)
IMAGE_CHANNELS = {1: "grey", 3: "RGB", 4: "RGBA (alpha dropped)"}


# ---------------------------------------------------------------------------------------------- encode side
def to_rgb(pixels) -> torch.Tensor:
    """[B,H,W,C] image -> [B,H,W,3]: grey (1 channel) repeated, RGB kept, RGBA's alpha dropped.

    Any other channel count (2, 5, ...) is not an image ComfyUI makes (IMAGE is RGB, MASK carries alpha), so it
    is refused rather than guessed at."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise InversionInputError(f"pixels must be an IMAGE batch [B,H,W,C] (got {shape}); "
                                  "connect an IMAGE output (e.g. Load Image)")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0 or pixels.shape[2] == 0:
        raise InversionInputError(f"the image is empty (shape {tuple(pixels.shape)}); connect a non-empty IMAGE")
    c = int(pixels.shape[-1])
    if c == 1:
        return pixels.repeat(1, 1, 1, 3)
    if c == 3:
        return pixels
    if c == 4:
        return pixels[..., :3]
    raise InversionInputError(
        f"the image has {c} channels but an IMAGE is grey (1), RGB (3) or RGBA (4, alpha dropped); "
        "convert it to RGB before encoding")


def check_finite_image(pixels: torch.Tensor) -> None:
    bad = ~torch.isfinite(pixels)
    if bool(bad.any()):
        raise InversionInputError(
            f"the image contains {int(bad.sum())} NaN/Inf values; fix the node that produced it (or clamp/replace "
            "the values) before encoding: a VAE would turn them into a NaN latent")


def fit_pixels(pixels: torch.Tensor, factor: int, fit: str):
    """Make H and W multiples of ``factor``. Returns (fitted_pixels, valid_hw) where ``valid_hw`` is the
    (h, w) region at the top-left of the fitted image that holds source pixels (for the ceiling)."""
    if fit not in FIT_MODES:
        raise InversionInputError(f"unknown fit {fit!r}; use one of {', '.join(FIT_MODES)}")
    _, h, w, _ = pixels.shape
    if h % factor == 0 and w % factor == 0:
        return pixels, (h, w)
    if fit == "error":
        raise InversionInputError(
            f"the image is {w}x{h}, not a multiple of the VAE's factor {factor}; set 'fit' to pad, crop or resize, "
            f"or resize the image to {(w // factor) * factor or factor}x{(h // factor) * factor or factor} first")
    if fit == "crop":
        if h < factor or w < factor:
            raise InversionInputError(f"the image ({w}x{h}) is smaller than the VAE's factor {factor}, so it cannot "
                                      "be cropped; use fit=pad or resize, or a larger image")
        nh, nw = (h // factor) * factor, (w // factor) * factor
        oy, ox = (h % factor) // 2, (w % factor) // 2  # centred, like core VAEEncode's own crop
        return pixels[:, oy:oy + nh, ox:ox + nw, :], (nh, nw)
    if fit == "pad":
        nh, nw = math.ceil(h / factor) * factor, math.ceil(w / factor) * factor
        # replicate the last row/column (bottom/right) so the source stays at the top-left, unmoved
        x = torch.nn.functional.pad(pixels.movedim(-1, 1), (0, nw - w, 0, nh - h), mode="replicate")
        return x.movedim(1, -1), (h, w)
    nh = max(factor, int(round(h / factor)) * factor)   # resize (bilinear, as comfy.utils.common_upscale)
    nw = max(factor, int(round(w / factor)) * factor)
    x = torch.nn.functional.interpolate(pixels.movedim(-1, 1), size=(nh, nw), mode="bilinear")
    return x.movedim(1, -1).clamp(0.0, 1.0), (nh, nw)


def frame_counts(frames: int, to_latent, to_frames) -> tuple:
    """(fewer, more): the largest frame count <= ``frames`` and the smallest >= ``frames`` that a video VAE encodes
    without dropping a frame. ``to_latent(T)`` is its latent frame count for T frames and ``to_frames(t)`` the
    frames t latent frames decode to (core's ``downscale_ratio[0]``/``upscale_ratio[0]``, e.g. Wan: 1 + 4k)."""
    t = int(to_latent(frames))
    fewer = int(to_frames(t)) if t >= 1 else 0
    if fewer == frames:
        return frames, frames
    more = int(to_frames(t + 1))
    return fewer, more


def fit_frames(pixels: torch.Tensor, fewer: int, more: int, fit: str):
    """[T,H,W,3] frames -> (frames a video VAE encodes whole, number of source frames kept). Frames are never
    resampled in time: ``pad`` and ``resize`` repeat the last frame up to ``more``, ``crop`` keeps the first
    ``fewer``, ``error`` refuses a count the VAE cannot take."""
    if fit not in FIT_MODES:
        raise InversionInputError(f"unknown fit {fit!r}; use one of {', '.join(FIT_MODES)}")
    t = int(pixels.shape[0])
    if fewer == t:
        return pixels, t
    if fit == "error":
        raise InversionInputError(
            f"the clip has {t} frames but this video VAE encodes {fewer} or {more} frames without dropping any; "
            "set 'fit' to pad (repeat the last frame) or crop (drop the extra frames), or trim the clip")
    if fit == "crop":
        if fewer < 1:
            raise InversionInputError(f"the clip has {t} frames, fewer than this video VAE's smallest clip "
                                      f"({more}); use fit=pad or a longer clip")
        return pixels[:fewer], fewer
    return torch.cat([pixels, pixels[-1:].expand(more - t, *pixels.shape[1:])], dim=0), t


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB (data range 1) over the whole batch (one MSE over all pixels), capped at PSNR_CAP_DB."""
    mse = float(torch.mean((a.float() - b.float()) ** 2))
    if not math.isfinite(mse):
        return float("nan")
    if mse <= 10 ** (-PSNR_CAP_DB / 10):
        return PSNR_CAP_DB
    return float(-10.0 * math.log10(mse))


def psnr_from_sse(sse: float, count: int) -> float:
    """PSNR of a summed squared error over ``count`` values (the windows of :func:`ceiling_windows`)."""
    if count <= 0 or not math.isfinite(sse):
        return float("nan")
    mse = sse / count
    if mse <= 10 ** (-PSNR_CAP_DB / 10):
        return PSNR_CAP_DB
    return float(-10.0 * math.log10(mse))


def ceiling_windows(h: int, w: int, *, fraction: float = 0.04, max_windows: int = 4,
                    whole_below: int = 32 * 32) -> Optional[list]:
    """Latent windows to decode for a cheap VAE ceiling, or None to decode the whole latent.

    A latent of at most ``whole_below`` pixels (256x256 image pixels at factor 8), or one too narrow for a
    window, is decoded whole. Otherwise about ``fraction`` of its area is decoded: up to ``max_windows`` square
    windows (side 24 latent pixels, smaller for smaller images, at least 12), spread over the image; a margin of
    ``side // 6`` on every inner side is decoded for context but not measured. Returns
    ``[(y0, y1, x0, x1, my0, my1, mx0, mx1), ...]``: each decoded window and its measured core, in latent pixels.
    """
    area = h * w
    if area <= whole_below:
        return None
    budget = fraction * area
    side = 24 if budget >= 24 * 24 else max(12, int(math.sqrt(budget)) // 2 * 2)
    if h < 2 * side or w < 2 * side:
        return None
    n = int(max(1, min(max_windows, budget // (side * side))))
    margin = max(2, side // 6)
    # spread the columns over the rows, each column once: the odd columns, then the even ones (n 3: 1 0 2; n 4:
    # 1 3 0 2; (2k + 1) % n gave 1 3 1 3 at n 4, and the left quarter of a large latent was never measured)
    order = [*range(1, n, 2), *range(0, n, 2)] if n > 2 else list(range(n))
    out = []
    for k in range(n):
        cy = int((k + 0.5) / n * h)
        cx = int((order[k] + 0.5) / n * w)
        y0 = min(max(0, cy - side // 2), h - side)
        x0 = min(max(0, cx - side // 2), w - side)
        my0, mx0 = (y0 if y0 == 0 else y0 + margin), (x0 if x0 == 0 else x0 + margin)
        my1 = y0 + side if y0 + side == h else y0 + side - margin
        mx1 = x0 + side if x0 + side == w else x0 + side - margin
        out.append((y0, y0 + side, x0, x0 + side, my0, my1, mx0, mx1))
    return out


# ---------------------------------------------------------------------------------------------- preview side
def select_frames(count: int, frames: int) -> list:
    """Up to ``frames`` indices in [0, count), evenly spaced, always including 0 and count-1, ascending, unique."""
    if count <= 0:
        return []
    if count == 1:
        return [0]
    k = max(2, min(int(frames), count))
    return sorted({int(round(j * (count - 1) / (k - 1))) for j in range(k)})


def fast_rgb(latents: torch.Tensor, factors: Sequence, bias: Optional[Sequence] = None, reshape=None,
             format_name: str = "") -> torch.Tensor:
    """Model-space latents [K,C,H,W] (or [K,C,T,H,W]: first frame) -> [K,H,W,3] in [0,1] with a latent
    format's ``latent_rgb_factors`` [C][3] (+ bias), as ComfyUI's Latent2RGB previewer does."""
    x = latents.float()
    if x.ndim == 5:
        x = x[:, :, 0]
    f = torch.tensor(factors, dtype=x.dtype, device=x.device).transpose(0, 1)  # [3, C]
    b = torch.tensor(bias, dtype=x.dtype, device=x.device) if bias is not None else None
    if reshape is not None:
        x = reshape(x)
    if x.shape[1] != f.shape[1]:
        raise InversionInputError(f"the trajectory has {x.shape[1]} latent channels but {format_name}'s fast RGB "
                                  f"factors expect {f.shape[1]}; set decode=vae and connect the model's VAE")
    rgb = torch.nn.functional.linear(x.movedim(1, -1), f, bias=b)
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


def strip(frames: torch.Tensor) -> torch.Tensor:
    """[K,F,H,W,3] -> [K,H,F*W,3]: each item's frames side by side, left to right in time."""
    k, f, h, w, c = frames.shape
    return frames.permute(0, 2, 1, 3, 4).reshape(k, h, f * w, c)


def rms_per_frame(a: torch.Tensor, b: torch.Tensor) -> list:
    """RMS of a - b for [C,T,H,W] latents, one value per frame t (over C, H, W)."""
    d = (a.float() - b.float()) ** 2
    return [float(v) for v in torch.sqrt(d.mean(dim=(0, 2, 3)))]


def trajectory_bytes(states_shape, steps: int, bytes_per_value: int = 4) -> int:
    """Bytes a trajectory holds in states [N+1, ...] and x0 estimates [N, ...] (float32 by default) for latents of
    ``states_shape`` = [B, C, ...] over ``steps`` steps."""
    n = 1
    for d in states_shape:
        n *= int(d)
    return (2 * int(steps) + 1) * n * int(bytes_per_value)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((a.float() - b.float()) ** 2)))
