"""The analytic Gaussian-mixture oracle as a *real* ComfyUI MODEL (test-only nodes, not part of the pack).

``comfy.model_base.BaseModel`` with a real ``model_sampling`` (SD1.5 discrete EPS / V-prediction, or
discrete flow with shift 3) whose diffusion_model returns the eps / v prediction that makes ComfyUI's own
``calculate_denoised`` equal the exact posterior mean of a Gaussian mixture. The "prompt" is a set of
mixture components, carried in the conditioning tensor as 0/1 flags, so CFG is non-trivial.
"""
from __future__ import annotations

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

from ddiminv_dev.gmm import GMM

DEFAULT_SEED = 4      # the oracle used by the fidelity tests (see tests/host/test_fidelity.py)
FAMILIES = ("eps", "v", "flow")


class GMMNet(torch.nn.Module):
    def __init__(self, gmm: GMM, family: str):
        super().__init__()
        self.gmm = gmm
        self.family = family
        self.dtype = torch.float32
        self.register_buffer("_anchor", torch.zeros(1))   # so the patcher has something to move

    def forward(self, xc, timesteps, context=None, transformer_options={}, **kwargs):
        sigma = transformer_options["sigmas"].to(torch.float64).reshape(-1)
        B = xc.shape[0]
        if sigma.numel() != B:  # cond and uncond chunks are batched together; sigmas holds one chunk's
            sigma = sigma.repeat(B // sigma.numel())
        s = sigma.view(B, *([1] * (xc.ndim - 1)))
        xc64 = xc.to(torch.float64)
        flow = self.family == "flow"
        x = xc64 if flow else xc64 * torch.sqrt(s ** 2 + 1.0)
        flags = context[:, 0, :] > 0.5 if context is not None else torch.ones(B, self.gmm.means.shape[0], dtype=torch.bool)
        out = torch.empty_like(x)
        for key in {tuple(f.tolist()) for f in flags}:
            rows = [i for i in range(B) if tuple(flags[i].tolist()) == key]
            subset = [k for k, on in enumerate(key) if on]
            out[rows] = self.gmm.denoise(x[rows], sigma[rows], flow=flow, subset=subset).to(torch.float64)
        D = out
        if self.family == "v":
            pred = (x / (s ** 2 + 1.0) - D) * torch.sqrt(s ** 2 + 1.0) / s
        else:  # eps, or flow velocity: D = x - sigma * pred
            pred = (x - D) / s
        return pred.to(xc.dtype)


def _config(family: str):
    cfg = comfy.supported_models.SD15({"disable_unet_model_creation": True})
    if family == "flow":
        cfg.sampling_settings = {"shift": 3.0, "multiplier": 1000}
    return cfg


def gmm_model(family: str = "eps", seed: int = DEFAULT_SEED, k: int = 4, std: float = 0.3):
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    gmm = GMM.make(k=k, std=std, seed=seed)
    mtype = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION,
             "flow": comfy.model_base.ModelType.FLOW}[family]
    model = comfy.model_base.BaseModel(_config(family), model_type=mtype, device=torch.device("cpu"))
    model.diffusion_model = GMMNet(gmm, family)
    model.gmm = gmm
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))


def gmm_cond(subset, k: int = 4):
    flags = torch.zeros(1, 1, k)
    for c in subset:
        flags[0, 0, int(c)] = 1.0
    return [[flags, {}]]


def parse_subset(text: str, k: int = 4):
    text = (text or "").strip()
    return list(range(k)) if not text else [int(v) for v in text.split(",")]


def gmm_latent(comps, seed: int = DEFAULT_SEED, sample_seed: int = 1, k: int = 4, std: float = 0.3):
    """Clean GMM samples, returned in VAE space (SD15 latent format), as VAEEncode would give."""
    gmm = GMM.make(k=k, std=std, seed=seed)
    x0 = gmm.sample_x0(comps, seed=sample_seed)
    return comfy.latent_formats.SD15().process_out(x0.clone()), x0


class TestGMMModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(FAMILIES),), "seed": ("INT", {"default": DEFAULT_SEED, "min": 0, "max": 10**6})}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, family, seed):
        return (gmm_model(family, seed),)


class TestGMMCond:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"subset": ("STRING", {"default": "0,1,2"})}}
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, subset):
        return (gmm_cond(parse_subset(subset)),)


class TestGMMLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"comps": ("STRING", {"default": "0,1,2"}),
                             "seed": ("INT", {"default": DEFAULT_SEED, "min": 0, "max": 10**6}),
                             "sample_seed": ("INT", {"default": 1, "min": 0, "max": 10**6})}}
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, comps, seed, sample_seed):
        samples, _ = gmm_latent(parse_subset(comps), seed, sample_seed)
        return ({"samples": samples},)


TEST_NODES = {"TestGMMModel": TestGMMModel, "TestGMMCond": TestGMMCond, "TestGMMLatent": TestGMMLatent}
