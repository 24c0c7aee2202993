"""Test-only nodes for the hardening tests (tests/host/test_errors.py, test_fuzz.py, tests/server/...).

Never part of the pack: ``tests.support.host.boot()`` merges ``TEST_NODES`` into ``NODE_CLASS_MAPPINGS``.

* ``TestHardModel``: a real ComfyUI MODEL (``comfy.model_base.BaseModel`` + a real ModelPatcher) whose
  diffusion_model is the exact denoiser of a Gaussian prior ``x0 ~ N(m, I)``, for ANY latent shape: the
  prompt's mean ``m`` is carried in the conditioning tensor, so CFG is non-trivial. Cheap (no weights), so
  fuzzing with random shapes/dtypes/batches is fast. ``latent`` picks the latent format (SD15 4 channels or
  SD3 16 channels) so channel mismatches can be provoked without a real checkpoint.
* ``TestHardLatent``: a seeded LATENT with chosen batch/channels/size/dtype, optional poison (NaN/Inf/huge)
  and optional ``noise_mask`` of several shapes.
* ``TestHardCond``: a CONDITIONING of a chosen batch with prior mean ``m``; ``empty`` gives ``[]``;
  ``poison`` puts a NaN in the tensor.
* ``TestHardSigmas``: valid and invalid SIGMAS (ascending, duplicate, NaN, negative, single value, ...).
* ``TestHardSink``: an output node taking any LATENT (so a prompt ending in DDIMInvert executes).
"""
from __future__ import annotations

import math

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

FAMILIES = ("eps", "v", "flow")
LATENT_FORMATS = ("sd15", "sd3")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
POISONS = ("none", "nan", "inf", "neg_inf", "huge", "all_nan")
MASKS = ("none", "hw", "1hw", "bhw", "b1hw", "other_size", "wrong_batch", "ones", "zeros", "nan", "one_d")
SIGMA_KINDS = ("valid", "ascending", "duplicate", "nan", "inf", "negative", "single", "empty",
               "unsorted", "two_d_valid")


class GaussNet(torch.nn.Module):
    """Exact posterior-mean denoiser of x0 ~ N(m, I), any shape; m = context[b, 0, 0]."""

    def __init__(self, family: str):
        super().__init__()
        self.family = family
        self.dtype = torch.float32
        self.register_buffer("_anchor", torch.zeros(1))   # so the patcher has something to move
        self.calls = 0

    def forward(self, xc, timesteps, context=None, transformer_options={}, **kwargs):
        self.calls += 1
        sigma = transformer_options["sigmas"].to(torch.float64).reshape(-1)
        B = xc.shape[0]
        if sigma.numel() != B:  # cond and uncond chunks are batched together
            sigma = sigma.repeat(B // sigma.numel())
        s = sigma.view(B, *([1] * (xc.ndim - 1)))
        xc64 = xc.to(torch.float64)
        flow = self.family == "flow"
        x = xc64 if flow else xc64 * torch.sqrt(s ** 2 + 1.0)
        if context is not None:
            m = context[:, 0, 0].to(torch.float64).view(B, *([1] * (xc.ndim - 1)))
        else:
            m = torch.zeros_like(s)
        if flow:   # x = (1-s) x0 + s eps
            a = 1.0 - s
            D = m + a / (a ** 2 + s ** 2) * (x - a * m)
        else:      # x = x0 + s eps
            D = m + (x - m) / (1.0 + s ** 2)
        if self.family == "v":
            pred = (x / (s ** 2 + 1.0) - D) * torch.sqrt(s ** 2 + 1.0) / s
        else:  # eps, or flow velocity: D = x - sigma * pred
            pred = (x - D) / s
        return pred.to(xc.dtype)


def hard_model(family: str = "eps", latent: str = "sd15"):
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    cfg = comfy.supported_models.SD15({"disable_unet_model_creation": True})
    if family == "flow":
        cfg.sampling_settings = {"shift": 3.0, "multiplier": 1000}
    if latent == "sd3":
        cfg.latent_format = comfy.latent_formats.SD3()
    mtype = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION,
             "flow": comfy.model_base.ModelType.FLOW}[family]
    model = comfy.model_base.BaseModel(cfg, model_type=mtype, device=torch.device("cpu"))
    model.diffusion_model = GaussNet(family)
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))


def hard_latent(batch=1, channels=4, height=8, width=8, seed=0, dtype="float32", poison="none",
                mask="none", scale=1.0) -> dict:
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(int(batch), int(channels), int(height), int(width), generator=g) * float(scale)
    if poison == "nan":
        x[0, 0, 0, 0] = float("nan")
    elif poison == "inf":
        x.view(-1)[-1] = float("inf")
    elif poison == "neg_inf":
        x.view(-1)[x.numel() // 2] = float("-inf")
    elif poison == "huge":
        x = x * 1e30
    elif poison == "all_nan":
        x = torch.full_like(x, float("nan"))
    out = {"samples": x.to(DTYPES[dtype])}
    B, H, W = int(batch), int(height), int(width)
    m = None
    if mask == "hw":
        m = torch.rand(H, W, generator=g)
    elif mask == "1hw":
        m = torch.rand(1, H, W, generator=g)
    elif mask == "bhw":
        m = torch.rand(B, H, W, generator=g)
    elif mask == "b1hw":
        m = torch.rand(B, 1, H, W, generator=g)
    elif mask == "other_size":
        m = torch.rand(1, H * 8, W * 8, generator=g)      # pixel-space mask, as core nodes give
    elif mask == "wrong_batch":
        m = torch.rand(B + 1, H, W, generator=g)
    elif mask == "ones":
        m = torch.ones(1, H, W)
    elif mask == "zeros":
        m = torch.zeros(1, H, W)
    elif mask == "nan":
        m = torch.rand(1, H, W, generator=g)
        m[0, 0, 0] = float("nan")
    elif mask == "one_d":
        m = torch.rand(W, generator=g)
    if m is not None:
        out["noise_mask"] = m
    return out


def hard_cond(mean=0.5, batch=1, empty=False, poison=False) -> list:
    if empty:
        return []
    t = torch.full((int(batch), 1, 4), float(mean))
    if int(batch) > 1:
        t = t + torch.arange(int(batch), dtype=torch.float32).view(-1, 1, 1) * 0.1
    if poison:
        t[0, 0, 1] = float("nan")
    return [[t, {}]]


def hard_sigmas(kind="valid", steps=4) -> torch.Tensor:
    n = max(1, int(steps))
    valid = torch.linspace(10.0, 0.0, n + 1)
    if kind == "valid":
        return valid
    if kind == "ascending":
        return valid.flip(0)
    if kind == "duplicate":
        return torch.cat([valid[:1], valid])
    if kind == "nan":
        v = valid.clone(); v[min(1, n)] = float("nan"); return v
    if kind == "inf":
        v = valid.clone(); v[0] = float("inf"); return v
    if kind == "negative":
        return torch.cat([valid[:-1], torch.tensor([-1.0])])
    if kind == "single":
        return valid[:1].clone()
    if kind == "empty":
        return valid[:0].clone()
    if kind == "unsorted":
        v = valid.clone()
        if n >= 2:
            v[1], v[2] = float(v[2]), float(v[1])
        return v
    if kind == "two_d_valid":
        return valid.view(1, -1)
    raise ValueError(kind)


class _Base:
    __test__ = False
    CATEGORY = "testing/ddim-inversion/hardening"


class TestHardModel(_Base):
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(FAMILIES),), "latent": (list(LATENT_FORMATS),)}}

    def build(self, family, latent):
        return (hard_model(family, latent),)


class TestHardLatent(_Base):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "batch": ("INT", {"default": 1, "min": 1, "max": 16}),
            "channels": ("INT", {"default": 4, "min": 1, "max": 64}),
            "height": ("INT", {"default": 8, "min": 1, "max": 256}),
            "width": ("INT", {"default": 8, "min": 1, "max": 256}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "dtype": (list(DTYPES),),
            "poison": (list(POISONS),),
            "mask": (list(MASKS),),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1e6}),
        }}

    def build(self, batch, channels, height, width, seed, dtype, poison, mask, scale):
        return (hard_latent(batch, channels, height, width, seed, dtype, poison, mask, scale),)


class TestHardCond(_Base):
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mean": ("FLOAT", {"default": 0.5, "min": -100.0, "max": 100.0}),
            "batch": ("INT", {"default": 1, "min": 1, "max": 16}),
            "empty": ("BOOLEAN", {"default": False}),
            "poison": ("BOOLEAN", {"default": False}),
        }}

    def build(self, mean, batch, empty, poison):
        return (hard_cond(mean, batch, empty, poison),)


class TestHardSigmas(_Base):
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (list(SIGMA_KINDS),), "steps": ("INT", {"default": 4, "min": 1, "max": 1000})}}

    def build(self, kind, steps):
        return (hard_sigmas(kind, steps),)


class TestHardSink(_Base):
    RETURN_TYPES = ("LATENT",)
    OUTPUT_NODE = True
    FUNCTION = "sink"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def sink(self, samples):
        return {"ui": {"shape": [list(samples["samples"].shape)]}, "result": (samples,)}


TEST_NODES = {
    "TestHardModel": TestHardModel,
    "TestHardLatent": TestHardLatent,
    "TestHardCond": TestHardCond,
    "TestHardSigmas": TestHardSigmas,
    "TestHardSink": TestHardSink,
}

