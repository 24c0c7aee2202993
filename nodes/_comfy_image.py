"""The pack's boundary to ComfyUI internals, image side: VAEs and latent formats (see ``nodes/_comfy.py`` for
models and sampling).

ComfyUI modules used here: ``comfy.latent_formats`` (a latent format class by the name a trajectory recorded,
for Trajectory Preview). ComfyUI objects read: a VAE (``encode``/``decode`` and their ``_tiled`` variants,
``spacial_compression_encode``) and a ``LatentFormat`` (``process_out``, ``latent_rgb_factors`` and its bias and
reshape).
"""
from __future__ import annotations

import torch

import comfy.latent_formats

from ..inversion.errors import InversionInputError


def downscale_factor(vae) -> int:
    """The VAE's spatial compression (8 for SD/SDXL/Flux VAEs); 8 when the VAE does not say."""
    try:
        f = int(vae.spacial_compression_encode())
        return f if f > 0 else 8
    except Exception:
        return 8


def time_axis(vae):
    """(to_latent, to_frames, name) for a video VAE whose IMAGE batch is one clip's frames (core's
    ``downscale_ratio[0]``/``upscale_ratio[0]``), or None for an image VAE (and for VAEs core treats per image,
    ``not_video``)."""
    if getattr(vae, "latent_dim", 2) != 3 or getattr(vae, "not_video", False):
        return None
    down, up = getattr(vae, "downscale_ratio", None), getattr(vae, "upscale_ratio", None)
    if not (isinstance(down, tuple) and isinstance(up, tuple) and callable(down[0]) and callable(up[0])):
        return None
    return down[0], up[0], type(getattr(vae, "first_stage_model", None)).__name__


def encode(vae, pixels: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    return vae.encode_tiled(pixels) if tiled else vae.encode(pixels)


def encode_frames_tiled(vae, frames: torch.Tensor, tile_frames: int, tiled: bool = False) -> torch.Tensor:
    """A video VAE's clip encoded in temporal tiles of ``tile_frames`` frames through core's ``encode_tiled``
    (``tile_t``; core's default temporal overlap); spatially whole, or core's 256-px tiles with ``tiled``."""
    h, w = int(frames.shape[-3]), int(frames.shape[-2])
    tile, overlap = (256, 64) if tiled else (max(h, w), 0)
    return vae.encode_tiled(frames, tile_x=tile, tile_y=tile, overlap=overlap, tile_t=int(tile_frames))


def decode(vae, latent: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """decode() as [N,H,W,3] images (a video VAE's [B,T,H,W,3] flattened to frames). A video latent is tiled in
    h/w only (core VAE Decode (Tiled)'s 512-px tiles and 64-px overlap) with one temporal tile over the whole clip:
    the decoders are causal over time. Core's ``decode_tiled`` needs the sizes given for a 5-D latent (its
    defaults fail there: overlap None)."""
    if tiled and latent.ndim == 5:
        f = int(vae.spacial_compression_decode())
        out = vae.decode_tiled(latent, tile_x=max(1, 512 // f), tile_y=max(1, 512 // f), overlap=max(1, 64 // f),
                               tile_t=int(latent.shape[2]), overlap_t=1)
    else:
        out = vae.decode_tiled(latent) if tiled else vae.decode(latent)
    if out.ndim == 5:
        out = out.reshape(-1, *out.shape[-3:])
    return out


def latent_format_by_name(name: str):
    """The comfy.latent_formats instance a trajectory names (its ``latent_format`` field)."""
    cls = getattr(comfy.latent_formats, name, None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, comfy.latent_formats.LatentFormat)):
        raise InversionInputError(
            f"the trajectory's latent_format {name!r} is not a latent format this ComfyUI knows; re-run DDIM Invert "
            "with this ComfyUI (it records the model's latent format), or update ComfyUI")
    return cls()


def rgb_factors(fmt) -> tuple:
    """(factors, bias, reshape) for a fast Latent2RGB preview, or an error naming decode=vae."""
    if getattr(fmt, "latent_rgb_factors", None) is None:
        raise InversionInputError(f"latent format {type(fmt).__name__} has no fast RGB factors; set decode=vae and "
                                  "connect the model's VAE")
    return fmt.latent_rgb_factors, getattr(fmt, "latent_rgb_factors_bias", None), \
        getattr(fmt, "latent_rgb_factors_reshape", None)


def vae_decode_model_space(vae, fmt, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents [K,C,...] -> [K,H,W,3] in [0,1] via vae.decode(process_out(latent)) (video: frame 0)."""
    out = vae.decode(fmt.process_out(latents.float()))
    if out.ndim == 5:
        out = out[:, 0]
    return out.float().clamp(0.0, 1.0)


def vae_decode_clip(vae, fmt, latents: torch.Tensor) -> torch.Tensor:
    """Model-space video latents [K,C,T,H,W] -> every decoded frame [K,F,H,W,3] in [0,1]."""
    out = vae.decode(fmt.process_out(latents.float()))
    if out.ndim == 4:          # a VAE that decodes per image: one frame per latent frame is not promised
        out = out.unsqueeze(1)
    return out.float().clamp(0.0, 1.0)
