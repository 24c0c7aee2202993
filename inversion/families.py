"""Which model families the inversion handles: the tested matrix, the refusals and the sampling rule (pure python).

A model is judged by two facts the adapter reads from ComfyUI (``nodes/_comfy.py``):

* its ``comfy.supported_models`` class name (``model.model.model_config``): :data:`TESTED` families run in the
  family matrix (tests/host/test_families.py); :data:`REFUSED` families cannot be inverted meaningfully and are
  refused with the reason; any other name is inverted with a warning that it is not in the tested matrix;
* its sampling: the prediction class (``calculate_denoised``'s owner) and the state its ``noise_scaling`` makes,
  ``x = a(sigma) x0 + b(sigma) noise``. The DDIM step ``x_t = (t/s) x_s + (1 - t/s) D`` is exact for any
  ``b = k sigma`` (k > 0: a noise scale only rescales the noise) with ``a = 1`` ("vp": EPS, V, EDM, X0,
  V_PREDICTION_DDPM, COSMOS_RFLOW) or ``a = 1 - sigma`` ("flow": CONST, with or without a noise scale). Anything
  else is refused: an unknown sampling is never inverted with a guessed one.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from .errors import InversionInputError

# supported_models classes with a tiny instance in the family matrix (ddiminv_dev/tiny_families.py SPECS)
TESTED = frozenset({
    # UNet images
    "SD15", "SD20", "SD21UnclipL", "SDXL", "SDXLRefiner", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B",
    "Stable_Cascade_C",
    # DiT / flow images
    "SD3", "Flux", "FluxSchnell", "FluxInpaint", "Flux2", "Chroma", "AuraFlow", "PixArtAlpha", "PixArtSigma",
    "HunyuanDiT", "HunyuanDiT1", "HunyuanImage21", "HiDream", "Lumina2", "ZImage", "Omnigen2", "QwenImage",
    "CosmosT2IPredict2",
    # video (5-D latents)
    "WAN21_T2V", "WAN21_I2V", "WAN22_T2V", "HunyuanVideo", "HunyuanVideoI2V", "HunyuanVideoSkyreelsI2V", "LTXV",
    "GenmoMochi", "CosmosT2V", "CosmosI2V", "CosmosI2VPredict2", "SVD_img2vid",
    # audio (3-D latent)
    "StableAudio",
})
# Only what the pinned host (ComfyUI 0.3.75) runs in CI is claimed: 0.33's CogVideoX_T2V is in the matrix and passed
# there by hand, but is inverted with the untested-family warning (README's family table says which host ran what).

_NOT_DIFFUSION = "it is not a diffusion model (there is no noise schedule to invert)"
_THREE_D = ("a 3-D shape model: its latent is a shape code decoded to a mesh or splats, not an image an image "
            "VAE made")
REFUSED = {
    "LotusD": "Lotus is a depth/normal predictor (an image-to-image map run in one step), not a generator: there "
              "is no noise that regenerates its input",
    "SD_X4Upscaler": "an upscaler: every step needs the low-resolution image and its noise augmentation level; "
                     "invert the base model's latent instead",
    "HunyuanVideo15_SR_Distilled": "a super-resolution stage conditioned on the low-resolution video; invert the "
                                   "HunyuanVideo 1.5 base model's latent instead",
    "SeedVR2": "a restoration model conditioned on the degraded video; invert a generator's latent instead",
    "Stable_Cascade_B": "Stage B decodes Stage C's latent (its conditioning); invert with Stage C instead",
    "Hunyuan3Dv2mini": _THREE_D, "Hunyuan3Dv2": _THREE_D, "Hunyuan3Dv2_1": _THREE_D, "Trellis2": _THREE_D,
    "TripoSplat": _THREE_D,
    "WAN21_FlowRVS": "an image-to-image predictor (IMG_TO_IMG_FLOW: its output does not depend on noise)",
    "LTXAV": "its latent packs video and audio in a NestedTensor, which the inversion does not support; split it "
             "with LTXVSeparateAVLatent and invert the video latent with an LTXV video model",
    "MiniMaxH3": "its latent packs video and audio in a NestedTensor, which the inversion does not support",
    "RT_DETR_v4": _NOT_DIFFUSION, "SAM3": _NOT_DIFFUSION, "SAM31": _NOT_DIFFUSION,
    "DepthAnything3": _NOT_DIFFUSION,
}

# prediction classes whose output ignores the noise: image-to-image predictors (Lotus, core ModelSamplingDiscrete's
# img_to_img, 0.33's IMG_TO_IMG_FLOW)
REFUSED_PREDICTIONS = {
    "IMG_TO_IMG": "an image-to-image predictor (IMG_TO_IMG sampling: the model maps its input to the output in one "
                  "step, as Lotus does)",
    "IMG_TO_IMG_FLOW": "an image-to-image predictor (IMG_TO_IMG_FLOW sampling: its noise scaling returns the input "
                       "unchanged)",
}

PROBE_SIGMAS = (0.25, 0.5)
_TOL = 1e-5

Probe = Sequence[Tuple[float, float, float]]   # (sigma, a, b): noise_scaling(sigma, noise, x0) = a x0 + b noise


def sampling_family(probe: Probe, prediction: str = "") -> str:
    """'vp' or 'flow' from the noise-scaling probe; raises InversionInputError for any other sampling."""
    if prediction in REFUSED_PREDICTIONS:
        raise InversionInputError(f"this model's sampling is {REFUSED_PREDICTIONS[prediction]}; it cannot be "
                                  "inverted: use a generative model (or core ModelSamplingDiscrete with eps, "
                                  "v_prediction or x0)")
    ks = [b / s for s, _, b in probe]
    if min(ks) > _TOL and max(ks) - min(ks) <= _TOL * max(ks):
        if all(abs(a - 1.0) <= _TOL for _, a, _ in probe):
            return "vp"
        if all(abs(a - (1.0 - s)) <= _TOL for s, a, _ in probe):
            return "flow"
    where = ", ".join(f"sigma {s:g}: x = {a:.4g} x0 + {b:.4g} noise" for s, a, b in probe)
    name = f" ({prediction})" if prediction else ""
    if max(abs(b) for _, _, b in probe) <= _TOL:
        what = "adds no noise (an image-to-image predictor)"
    else:
        what = "is neither x0 + sigma*noise (EPS, V, EDM) nor (1 - sigma)*x0 + sigma*noise (flow)"
    raise InversionInputError(f"this model's sampling{name} is unknown to the inversion: its noise scaling {what} "
                              f"({where}); it is refused rather than inverted with a guessed sampling: use a model "
                              "with an EPS, V-prediction, EDM or flow sampling")


def check_family(config_name: Optional[str]) -> Optional[str]:
    """Refuse a family that cannot be inverted (InversionInputError naming it and why); return a warning for a
    family outside the tested matrix, None for a tested one."""
    if config_name in REFUSED:
        raise InversionInputError(f"model family {config_name} cannot be inverted: {REFUSED[config_name]}")
    if config_name in TESTED:
        return None
    name = config_name or "unknown (no supported_models config)"
    return (f"model family {name} is not in the tested family matrix; its sampling was probed and is inverted as "
            "such, but nothing checked this family's conditioning or latent: compare the reconstruction")
