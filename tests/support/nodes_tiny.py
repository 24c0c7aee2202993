"""Test-only V1 nodes exposing the tiny in-code models to API prompts (never part of the pack).

``tests.support.host.boot()`` merges ``TEST_NODES`` into ``nodes.NODE_CLASS_MAPPINGS``.
"""
from __future__ import annotations

from . import tiny_models as tm

_FAMILIES = list(tm.FAMILIES)


class TestTinyModel:
    """A tiny real ComfyUI model (eps / v / flow / flux), seeded, CPU, fp32."""

    __test__ = False  # not a pytest class
    CATEGORY = "testing/ddim-inversion"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    DESCRIPTION = "Tiny real ComfyUI diffusion model built in code (tests only)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (_FAMILIES, {"default": "eps", "tooltip": "eps (SD1.5-style), v (SD2-v), flow (SD3 MMDiT), flux"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "weight seed"}),
        }}

    def load(self, family, seed=0):
        return (tm.tiny_model(family, seed=seed),)


class TestTinyConditioning:
    """CONDITIONING with the context (and pooled/guidance) sizes of the tiny model family."""

    __test__ = False  # not a pytest class
    CATEGORY = "testing/ddim-inversion"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    DESCRIPTION = "Seeded random conditioning matching a tiny model family (tests only)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (_FAMILIES, {"default": "eps", "tooltip": "model family the conditioning is for"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "conditioning seed"}),
        }}

    def make(self, family, seed):
        return (tm.tiny_conditioning(family, seed),)


class TestRandomLatent:
    """A seeded float32 LATENT in VAE space; width/height in pixels like EmptyLatentImage."""

    __test__ = False  # not a pytest class
    CATEGORY = "testing/ddim-inversion"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    DESCRIPTION = "Seeded random latent in VAE space for a tiny model family (tests only)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (_FAMILIES, {"default": "eps", "tooltip": "latent format (eps/v: SD15 4ch; flow: SD3 16ch; flux: Flux 16ch)"}),
            "batch": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "batch size"}),
            "height": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 8, "tooltip": "pixels (latent = /8)"}),
            "width": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 8, "tooltip": "pixels (latent = /8)"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "latent seed"}),
        }, "optional": {
            "channels": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "0: the family's channel count"}),
        }}

    def make(self, family, batch, height, width, seed, channels=0):
        return (tm.random_latent(family, batch, height, width, seed, channels=channels or None),)


class TestLatentSink:
    """Output node that consumes a LATENT (so prompts ending in e.g. KSampler have an output)."""

    __test__ = False  # not a pytest class
    CATEGORY = "testing/ddim-inversion"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_NODE = True
    FUNCTION = "sink"
    DESCRIPTION = "Passes a LATENT through and reports its shape (tests only)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT", {"tooltip": "latent to keep"})}}

    def sink(self, samples):
        shape = list(samples["samples"].shape)
        return {"ui": {"shape": shape}, "result": (samples,)}


TEST_NODES = {
    "TestTinyModel": TestTinyModel,
    "TestTinyConditioning": TestTinyConditioning,
    "TestRandomLatent": TestRandomLatent,
    "TestLatentSink": TestLatentSink,
}
TEST_DISPLAY_NAMES = {k: k for k in TEST_NODES}
