"""Tiny instances of ComfyUI's video VAEs, built through core's own ``comfy.sd.VAE`` (tests and benchmarks only).

``comfy.sd.VAE(sd=...)`` picks the VAE class from the state dict's keys and, for most video VAEs, fixes the
widths itself (the real checkpoints' sizes). Where core reads a size from the weights or from the file's
metadata, a tiny instance is made through that same route; where it does not, :data:`REFUSED` says why no
tiny instance exists (the full-size VAE would have to be built). Weights are seeded (same seed, same VAE).

* ``wan21``: Wan 2.1 VAE (``comfy.ldm.wan.vae.WanVAE``); core reads ``dim`` from ``decoder.head.0.gamma``,
  so ``dim=8`` (channels 8/16/32/32, factor 8 in space and 4 in time, 16 latent channels).
* ``ltxv``: LTX-Video's causal VAE; core takes its block config from the file's metadata (``config.vae``),
  so a one-res-block-per-level config with 128 latent channels (factor 32 in space, 8 in time).
"""
from __future__ import annotations

import json
import math

import torch

_CACHE: dict = {}

REFUSED = {   # what comfy/sd.py (0.3.75) fixes when it detects each of these from the state dict's keys
    "wan22": "core builds the Wan 2.2 VAE with dim=160 whatever the weights say (WanVAE of comfy.ldm.wan.vae2_2)",
    "hunyuan_video": "core builds the HunyuanVideo VAE (a conv3d AutoencoderKL) with ch=128 and ch_mult [1,2,4,4] "
                     "fixed; only its latent channels come from the weights",
    "mochi": "core builds the Mochi VAE with comfy.ldm.genmo.vae.model.VideoVAE()'s full default widths",
    "cosmos": "core builds the Cosmos tokenizer with channels=128 and channels_mult [2,4,4] fixed",
}
KINDS = ("wan21", "ltxv")


def _seeded(model: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            sd[name] = t.clone()
        elif name.endswith("bias"):
            sd[name] = torch.zeros(t.shape)
        elif t.ndim <= 1:    # norm scales (and gammas)
            sd[name] = torch.ones(t.shape)
        else:
            sd[name] = torch.randn(t.shape, generator=g) / math.sqrt(int(t[0].numel()))
    return sd


LTXV_CONFIG = {"_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3,
               "latent_channels": 128, "blocks": [["res_x", 1], ["compress_all", 1], ["res_x", 1],
                                                 ["compress_all", 1], ["res_x", 1], ["compress_all", 1],
                                                 ["res_x", 1]],
               "scaling_factor": 1.0, "norm_layer": "pixel_norm", "patch_size": 4, "latent_log_var": "uniform",
               "use_quant_conv": False, "causal_decoder": False}


def tiny_video_vae(kind: str = "wan21", seed: int = 0):
    """A cached tiny random ``comfy.sd.VAE`` of ``kind`` (see :data:`KINDS`; :data:`REFUSED` names the others)."""
    if kind in REFUSED:
        raise ValueError(f"no tiny {kind} VAE: {REFUSED[kind]}")
    key = (kind, seed)
    if key in _CACHE:
        return _CACHE[key]
    import comfy.sd
    if kind == "wan21":
        from comfy.ldm.wan.vae import WanVAE
        model = WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True], dropout=0.0)
        vae = comfy.sd.VAE(sd=_seeded(model, seed), dtype=torch.float32)
    elif kind == "ltxv":
        from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE
        model = VideoVAE(config=dict(LTXV_CONFIG))
        sd = _seeded(model, seed)
        vae = comfy.sd.VAE(sd=sd, dtype=torch.float32, metadata={"config": json.dumps({"vae": LTXV_CONFIG})})
    else:
        raise ValueError(f"unknown tiny video VAE {kind!r}; use one of {', '.join(KINDS)}")
    _CACHE[key] = vae
    return vae
