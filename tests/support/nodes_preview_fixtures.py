"""Test-only V1 nodes for the encode/preview tests (never part of the pack; host.boot() registers TEST_NODES).

API prompts cannot carry Python objects, so these nodes build them inside the prompt:

* ``TestTinyVAE``   a real ``comfy.sd.VAE`` (SD-style AutoencoderKL, factor 8, 4 latent channels) with tiny,
                    seeded random weights (ch=32, one res block per level): fast on CPU, deterministic.
* ``TestTrajectory`` a ``Trajectory`` from the pack's own module with seeded random model-space states.
* ``TestNoiseImage`` a seeded random IMAGE of any size/channel count, optionally poisoned with NaN/Inf.
"""
from __future__ import annotations

import math

import torch

_VAE_CACHE: dict = {}


def tiny_vae_config(ch: int = 32) -> dict:
    return {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": ch,
        "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


def tiny_vae(seed: int = 0):
    """A cached tiny random comfy.sd.VAE (same seed -> same weights -> same object)."""
    if seed in _VAE_CACHE:
        return _VAE_CACHE[seed]
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    config = tiny_vae_config()
    model = AutoencoderKL(**config["params"])  # comfy ops skip weight init: fill every tensor ourselves
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in model.state_dict().items():
        if name.endswith("bias"):
            v = torch.zeros(t.shape)
        elif t.ndim <= 1:  # norm scales
            v = torch.ones(t.shape)
        else:
            fan_in = int(t[0].numel())
            v = torch.randn(t.shape, generator=g) / math.sqrt(fan_in)
        sd[name] = v.to(torch.float32)
    vae = comfy.sd.VAE(sd=sd, config=config, dtype=torch.float32)
    _VAE_CACHE[seed] = vae
    return vae


def trajectory_class():
    from tests.support import host
    return host.pack_submodule("inversion.trajectory").Trajectory


def make_trajectory(steps=10, batch=1, channels=4, height=8, width=8, seed=0, latent_format="SD15",
                    method="ddim", family="vp"):
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.linspace(0.0, 14.6, steps + 1, dtype=torch.float32)
    source = torch.randn(batch, channels, height, width, generator=g)
    eps = torch.randn(batch, channels, height, width, generator=g)
    states = torch.stack([source + s * eps for s in sigmas])
    drift = torch.randn(batch, channels, height, width, generator=g)
    denoised = torch.stack([source + (k + 1) / steps * 0.3 * drift for k in range(steps)])
    eval_sigmas = sigmas[:-1].to(torch.float64)
    return trajectory_class()(
        sigmas=sigmas, states=states, denoised=denoised, eval_sigmas=eval_sigmas, method=method, cfg=1.0,
        nfe=steps, nfe_per_step=tuple([1] * steps), latent_format=latent_format,
        model_sampling="ModelSamplingDiscrete+EPS", family=family)


class TestTinyVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "_test"

    def load(self, seed):
        return (tiny_vae(seed),)


class TestTrajectory:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "steps": ("INT", {"default": 10, "min": 1, "max": 1000}),
            "batch": ("INT", {"default": 1, "min": 1, "max": 16}),
            "channels": ("INT", {"default": 4, "min": 1, "max": 64}),
            "size": ("INT", {"default": 8, "min": 1, "max": 128}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 100000}),
            "latent_format": ("STRING", {"default": "SD15"}),
        }}

    RETURN_TYPES = ("DDIM_TRAJECTORY",)
    FUNCTION = "build"
    CATEGORY = "_test"

    def build(self, steps, batch, channels, size, seed, latent_format):
        return (make_trajectory(steps=steps, batch=batch, channels=channels, height=size, width=size, seed=seed,
                                latent_format=latent_format),)


class TestNoiseImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 64, "min": 1, "max": 4096}),
            "height": ("INT", {"default": 64, "min": 1, "max": 4096}),
            "batch": ("INT", {"default": 1, "min": 1, "max": 16}),
            "channels": ("INT", {"default": 3, "min": 1, "max": 4}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 100000}),
            "poison": (["none", "nan", "inf"], {"default": "none"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "_test"

    def make(self, width, height, batch, channels, seed, poison):
        g = torch.Generator().manual_seed(seed)
        img = torch.rand(batch, height, width, channels, generator=g)
        if poison == "nan":
            img[0, 0, 0, 0] = float("nan")
        elif poison == "inf":
            img[0, height // 2, width // 2, 0] = float("inf")
        return (img,)


TEST_NODES = {"TestTinyVAE": TestTinyVAE, "TestTrajectory": TestTrajectory, "TestNoiseImage": TestNoiseImage}
