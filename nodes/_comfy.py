"""The only module that talks to ComfyUI internals.

* Model evaluation goes through ``comfy.samplers.CFGGuider`` (model loading/offload, LoRA, ControlNet,
  hooks, model patches and CFG all apply) with our own ``comfy.samplers.Sampler`` subclass, whose
  ``sample()`` runs a math-core loop and applies none of KSAMPLER's noise scaling.
* ``model.get_model_object("model_sampling")`` / ``("latent_format")`` give the family and the
  VAE-space <-> model-space maps.
* Progress bar + live preview (``latent_preview.prepare_callback``) and an interrupt check before every
  model evaluation.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import latent_preview

log = logging.getLogger("ddim_inversion")


class InversionInputError(ValueError):
    """Bad node input; the message names the input and the fix."""


# ---------------------------------------------------------------------------------------------- model facts
def model_sampling(model):
    return model.get_model_object("model_sampling")


def latent_format(model):
    return model.get_model_object("latent_format")


def family_of(model) -> str:
    """'vp' when x = x0 + sigma*eps (EPS, V, EDM), 'flow' when x = (1-sigma)x0 + sigma*eps (CONST).

    Probed from the model's own ``noise_scaling`` (so patched or new model_sampling classes work).
    """
    ms = model_sampling(model)
    s = torch.tensor([0.5])
    a = float(ms.noise_scaling(s, torch.zeros(1), torch.ones(1)))
    if math.isclose(a, 1.0, abs_tol=1e-6):
        return "vp"
    if math.isclose(a, 0.5, abs_tol=1e-6):
        return "flow"
    return "other"


def input_scale(model) -> Callable[[float], float]:
    """c_in(sigma): the factor ComfyUI's ``calculate_input`` applies to the state before the network."""
    ms = model_sampling(model)

    def cin(sigma: float) -> float:
        return float(ms.calculate_input(torch.tensor([float(sigma)]), torch.ones(1)))
    return cin


def model_sampling_name(model) -> str:
    ms = model_sampling(model)
    bases = type(ms).__bases__ if type(ms).__name__ == "ModelSampling" else (type(ms),)
    return "+".join(c.__name__ for c in bases)


def sampling_sigmas(model, scheduler: str, steps: int) -> torch.Tensor:
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise InversionInputError(
            f"scheduler {scheduler!r} is not one of ComfyUI's schedulers {comfy.samplers.SCHEDULER_NAMES}")
    return comfy.samplers.calculate_sigmas(model_sampling(model), scheduler, int(steps)).cpu().float()


def to_model_space(model, samples: torch.Tensor) -> torch.Tensor:
    return latent_format(model).process_in(samples.detach().clone().float())


def to_vae_space(model_or_format, x: torch.Tensor) -> torch.Tensor:
    fmt = model_or_format if hasattr(model_or_format, "process_out") else latent_format(model_or_format)
    return fmt.process_out(x.detach().clone().float())


def check_latent(model, samples, what: str = "latent") -> None:
    if not isinstance(samples, torch.Tensor):
        raise InversionInputError(f"{what} has no 'samples' tensor; connect a LATENT (e.g. from VAE Encode (Inversion))")
    if getattr(samples, "is_nested", False):
        raise InversionInputError(f"{what} is a nested (multi-stream) latent; DDIM inversion supports image latents only")
    if samples.ndim not in (4, 5):
        raise InversionInputError(f"{what} must be [B,C,H,W] (or [B,C,T,H,W]); got shape {tuple(samples.shape)}")
    want = getattr(latent_format(model), "latent_channels", None)
    if want is not None and samples.shape[1] != want:
        raise InversionInputError(
            f"{what} has {samples.shape[1]} channels but this model's latent format "
            f"({type(latent_format(model)).__name__}) uses {want}: encode the image with this model's own VAE")
    if not torch.isfinite(samples).all():
        raise InversionInputError(f"{what} contains NaN or Inf values; re-encode the image (check the VAE and the image)")


def check_conditioning(cond, batch: int, name: str) -> None:
    if not isinstance(cond, list) or len(cond) == 0:
        raise InversionInputError(f"{name} is empty; connect a CONDITIONING (e.g. CLIP Text Encode)")
    for i, c in enumerate(cond):
        if not (isinstance(c, (list, tuple)) and len(c) >= 2 and isinstance(c[1], dict)):
            raise InversionInputError(f"{name}[{i}] is not a ComfyUI conditioning entry; connect a CONDITIONING output")
        t = c[0]
        if isinstance(t, torch.Tensor):
            if not torch.isfinite(t).all():
                raise InversionInputError(f"{name} contains NaN or Inf values; re-encode the prompt")
            b = t.shape[0]
            if b not in (1, batch):
                raise InversionInputError(
                    f"{name} has batch {b} but the latent has batch {batch}: use one conditioning (batch 1, "
                    f"shared) or exactly one per latent")


def check_cfg(cfg, name: str = "cfg") -> float:
    """cfg must be a finite number (a NaN passes ComfyUI's min/max widget check and would silently give a
    NaN latent)."""
    try:
        v = float(cfg)
    except (TypeError, ValueError):
        raise InversionInputError(f"{name} must be a number (e.g. 1.0); got {cfg!r}") from None
    if not math.isfinite(v):
        raise InversionInputError(f"{name} must be a finite number (e.g. 1.0); got {cfg!r}")
    return v


def check_noise_mask(mask, shape, name: str = "noise_mask") -> None:
    """A latent's optional noise_mask: a finite tensor [H,W], [B,H,W] or [B,1,H,W] (any size: it is resized)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise InversionInputError(f"latent {name} must be a MASK tensor; got {type(mask).__name__}: "
                                  "set it with Set Latent Noise Mask")
    if mask.ndim < 2 or mask.ndim > len(shape) or mask.numel() == 0:
        raise InversionInputError(f"latent {name} must be [H,W], [B,H,W] or [B,1,H,W]; got shape {tuple(mask.shape)}: "
                                  "set it with Set Latent Noise Mask")
    if not torch.isfinite(mask).all():
        raise InversionInputError(f"latent {name} contains NaN or Inf values; use a mask with values in [0, 1]")


def guidance_fingerprint(positive, negative, cfg: float) -> str:
    """A hash of the conditioning tensors (and their tensor/scalar options) and the cfg: tells the sampler
    whether it regenerates with exactly the inversion's guidance."""
    import hashlib
    h = hashlib.sha1()
    h.update(repr(round(float(cfg), 8)).encode())

    def feed(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().to("cpu", torch.float32).contiguous()
            h.update(repr(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        elif isinstance(v, (int, float, str, bool)) or v is None:
            h.update(repr(v).encode())
        elif isinstance(v, (list, tuple)):
            for x in v:
                feed(x)
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(str(k).encode())
                feed(v[k])
        else:
            h.update(type(v).__name__.encode())

    for cond in (positive, negative):
        h.update(b"|")
        feed(cond)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- the sampler seam
class _LoopSampler(comfy.samplers.Sampler):
    """A ``comfy.samplers.Sampler`` that runs ``loop(model_fn, device, progress)`` inside CFGGuider.

    ``model_fn(x, sigma)`` evaluates the guided denoiser (CFG, patches, ControlNet) at a python-float sigma,
    after checking for an interrupt. No noise scaling is applied before or after the loop.
    """

    def __init__(self, loop: Callable, total_steps: int):
        self.loop = loop
        self.total_steps = total_steps
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        model_options = extra_args.get("model_options", {})
        seed = extra_args.get("seed", None)

        def model_fn(x: torch.Tensor, sigma: float) -> torch.Tensor:
            comfy.model_management.throw_exception_if_processing_interrupted()
            s = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
            return model_wrap(x.to(noise.device), s, model_options=model_options, seed=seed)

        def progress(i: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
            if callback is not None:
                callback(i, denoised.to(torch.float32), x.to(torch.float32), total)

        with torch.no_grad():
            self.result = self.loop(model_fn, noise.device, progress)
        # CFGGuider post-processes what we return; our caller reads self.result instead
        if isinstance(self.result, torch.Tensor):
            return self.result.to(noise.device, torch.float32)
        return torch.zeros_like(noise, dtype=torch.float32)


def run_guided(model, positive, negative, cfg: float, shape, sigmas: torch.Tensor, loop: Callable,
               total_steps: int, seed: int = 0, preview: bool = True):
    """Run ``loop`` with the guided model of (model, positive, negative, cfg). Returns the loop's result.

    ``sigmas`` (descending) is what CFGGuider sees for model loading, memory estimates and
    transformer_options['sample_sigmas']; the loop decides the sigma of each evaluation itself.
    """
    cfg = check_cfg(cfg)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(float(cfg))
    sampler = _LoopSampler(loop, total_steps)
    zeros = torch.zeros(shape, dtype=torch.float32)
    callback = latent_preview.prepare_callback(model, total_steps) if preview else None
    with torch.no_grad():
        guider.sample(zeros, zeros.clone(), sampler, sigmas.to(torch.float32), denoise_mask=None,
                      callback=callback, disable_pbar=True, seed=seed)
    return sampler.result


def storage_device() -> torch.device:
    return comfy.model_management.intermediate_device()


def compute_device(model) -> torch.device:
    return model.load_device


def prepare_mask(mask: Optional[torch.Tensor], shape, device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    check_noise_mask(mask, shape)
    return comfy.sampler_helpers.prepare_mask(mask, shape, device)


# ---------------------------------------------------------------------------------------------- NOISE for core samplers
class InvertedNoise:
    """A core NOISE object (like ``Noise_RandomNoise``) whose ``generate_noise`` returns what
    SamplerCustomAdvanced needs so that KSAMPLER's ``noise_scaling(sigmas[0], noise, latent_image)`` yields
    exactly the inverted state, for every family (flow included: no division by 1 - sigma)."""

    def __init__(self, state: torch.Tensor, sigma: float, model_sampling_obj, latent_format_obj, seed: int = 0):
        self.state = state
        self.sigma = float(sigma)
        self.model_sampling = model_sampling_obj
        self.latent_format = latent_format_obj
        self.seed = seed

    def _coefficients(self):
        ms = self.model_sampling
        s = torch.tensor([self.sigma], dtype=torch.float32)
        max_sigma = float(ms.sigma_max)
        max_denoise = math.isclose(max_sigma, self.sigma, rel_tol=1e-05) or self.sigma > max_sigma
        scale = float(ms.noise_scaling(s, torch.ones(1), torch.zeros(1), max_denoise))
        a = float(ms.noise_scaling(s, torch.zeros(1), torch.ones(1), False))
        return scale, a

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        if tuple(samples.shape) != tuple(self.state.shape):
            raise InversionInputError(
                f"the latent given to the sampler has shape {tuple(samples.shape)} but the inverted noise has "
                f"{tuple(self.state.shape)}: connect DDIM Invert's noise_latent (or an empty latent of the same size)")
        scale, a = self._coefficients()
        if torch.count_nonzero(samples) > 0:  # as CFGGuider.inner_sample: only a non-zero latent is processed
            li = self.latent_format.process_in(samples.detach().clone().float())
        else:
            li = torch.zeros_like(self.state)
        return ((self.state.float() - a * li.to(self.state.device)) / scale).cpu()
