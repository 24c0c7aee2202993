"""The pack's boundary to ComfyUI internals (models and sampling). The adapters -- this module,
``nodes/_comfy_image.py`` (VAEs, latent formats), ``nodes/_comfy_grad.py`` (null-text's autograd branches),
``nodes/_comfy_vae_grad.py`` (the VAE decoder's autograd view for refine) and ``nodes/_comfy_attention.py``
(attention control's patches on a clone) -- are the only code that imports
ComfyUI modules or reads ComfyUI objects' internals (tests/unit/test_package.py checks the imports).
:func:`drive` is the one place a ``CFGGuider`` is set up and run (for our loop sampler here and the null-text
branch sampler).

ComfyUI modules used here:

* ``comfy.samplers``: ``CFGGuider`` (model loading/offload, LoRA, ControlNet, hooks, model patches and CFG all
  apply) driving our own ``Sampler`` subclass, whose ``sample()`` runs a math-core loop and applies none of
  KSAMPLER's noise scaling; ``calculate_sigmas`` and ``SCHEDULER_NAMES`` for the schedule;
* ``comfy.sampler_helpers.prepare_mask``: a noise mask resized to the latent;
* ``comfy.model_management``: ``intermediate_device`` (where outputs live) and
  ``throw_exception_if_processing_interrupted`` (before every model evaluation);
* ``comfy.utils.PROGRESS_BAR_ENABLED``: ComfyUI's switch for console progress bars (KSampler's convention);
* ``latent_preview.prepare_callback``: the UI progress bar with a live x0 preview per step.

ComfyUI objects read: a MODEL (``ModelPatcher``: ``get_model_object("model_sampling" | "latent_format")``,
the class of ``model.model.model_config`` -- its ``comfy.supported_models`` family, judged by ``inversion.families``,
``model.model`` and its patch state -- ``patches_uuid``, ``object_patches``, ``model_options``, hooks,
wrappers, callbacks -- for the guidance fingerprint), CONDITIONING lists, and the NOISE protocol (``seed``,
``generate_noise``). ``tqdm`` (a ComfyUI dependency) draws the console bar.
"""
from __future__ import annotations

import hashlib
import logging
import math
import uuid
import weakref
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import latent_preview

from ..inversion import checks, experts, families
from ..inversion.errors import InversionInputError

log = logging.getLogger("ddim_inversion")


# ---------------------------------------------------------------------------------------------- model facts
def model_sampling(model):
    return model.get_model_object("model_sampling")


def latent_format(model):
    return model.get_model_object("latent_format")


def latent_facts(model, family_checked: bool = False) -> dict:
    """What a latent for this model must look like: channels, spatial rank (1 audio, 2 image, 3 video), format
    name. A refused family (``inversion.families``) is refused here already, before its latent is checked (unless
    ``family_checked``: the caller ran :func:`family_of` on this model already)."""
    if not family_checked:
        family_of(model)
    fmt = latent_format(model)
    return {"channels": getattr(fmt, "latent_channels", None),
            "spatial_dims": int(getattr(fmt, "latent_dimensions", 2)), "format": type(fmt).__name__}


def family_name(model) -> Optional[str]:
    """The model's ``comfy.supported_models`` class name (its family), None when it has no config."""
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    return type(cfg).__name__ if cfg is not None else None


def noise_probe(model) -> list:
    """(sigma, a, b) with ``noise_scaling(sigma, noise, x0) = a*x0 + b*noise`` at ``families.PROBE_SIGMAS``,
    read from the model's own (possibly patched) model_sampling."""
    ms = model_sampling(model)
    out = []
    for sig in families.PROBE_SIGMAS:
        s = torch.tensor([float(sig)])
        a = float(ms.noise_scaling(s, torch.zeros(1), torch.ones(1)))
        b = float(ms.noise_scaling(s, torch.ones(1), torch.zeros(1)))
        out.append((float(sig), a, b))
    return out


_WARNED: set = set()


def family_notes(model, family_checked: bool = False) -> list:
    """Warnings for the node's text output (a family outside the tested matrix); raises for a refused one (unless
    ``family_checked``: the caller ran :func:`family_of` on this model already)."""
    if not family_checked:
        family_of(model)
    note = families.check_family(family_name(model))
    return [note] if note else []


def family_of(model) -> str:
    """'vp' when x = x0 + sigma*eps (EPS, V, EDM, X0, ...), 'flow' when x = (1-sigma)x0 + sigma*eps (CONST).

    Probed from the model's own ``noise_scaling`` (so patched or new model_sampling classes work); an
    image-to-image predictor, an unknown noise scaling or a refused family (``inversion.families``) raises
    InversionInputError; a family outside the tested matrix is logged once as a warning.
    """
    name = family_name(model)
    note = families.check_family(name)
    ms = model_sampling(model)
    # IMG_TO_IMG only overrides calculate_input (it inherits X0's calculate_denoised): look at the whole MRO
    refused = [c.__name__ for c in type(ms).__mro__ if c.__name__ in families.REFUSED_PREDICTIONS]
    fam = families.sampling_family(noise_probe(model), refused[0] if refused else prediction_type(ms))
    if note and name not in _WARNED:
        _WARNED.add(name)
        log.warning("ddim-inversion: %s", note)
    return fam


def input_scale(model) -> Callable[[float], float]:
    """c_in(sigma): the factor ComfyUI's ``calculate_input`` applies to the state before the network."""
    ms = model_sampling(model)

    def cin(sigma: float) -> float:
        return float(ms.calculate_input(torch.tensor([float(sigma)]), torch.ones(1)))
    return cin


def model_sampling_name(model) -> str:
    ms = model_sampling(model)
    bases = type(ms).__bases__ if type(ms).__name__ in ("ModelSampling", "ModelSamplingAdvanced") else (type(ms),)
    return "+".join(c.__name__ for c in bases)


def prediction_type(ms) -> str:
    """The class that defines ``calculate_denoised`` (EPS, V_PREDICTION, CONST, X0, ...), whatever the wrapper
    class is called (core ModelSamplingDiscrete makes a ``ModelSamplingAdvanced`` on the fly)."""
    for c in type(ms).__mro__:
        if "calculate_denoised" in c.__dict__:
            return c.__name__
    return type(ms).__name__


def sampling_facts(model) -> dict:
    """Prediction type and sigma table of the model's sampling: equal facts = the same noise schedule."""
    ms = model_sampling(model)
    table = getattr(ms, "sigmas", None)
    facts = {"prediction": prediction_type(ms), "sigma_min": float(ms.sigma_min), "sigma_max": float(ms.sigma_max)}
    if isinstance(table, torch.Tensor):
        t = table.detach().to("cpu", torch.float32).contiguous()
        facts["table"] = hashlib.blake2b(t.numpy().tobytes(), digest_size=8).hexdigest()
        facts["table_size"] = int(t.numel())
    return facts


def compatibility_warnings(model, traj) -> list:
    """inversion.checks.compatibility_warnings with this model's facts (latent format, sampling, family)."""
    return checks.compatibility_warnings(traj, latent_facts(model)["format"], sampling_facts(model), family_of(model))


def sampling_sigmas(model, scheduler: str, steps: int) -> torch.Tensor:
    """The sigmas KSampler uses for (scheduler, steps) on this model, unvalidated (the caller checks them)."""
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise InversionInputError(f"scheduler {scheduler!r} is unknown; use one of ComfyUI's schedulers "
                                  f"({', '.join(comfy.samplers.SCHEDULER_NAMES)})")
    with torch.no_grad():
        return comfy.samplers.calculate_sigmas(model_sampling(model), scheduler, int(steps)).cpu().float()


def scheduler_names() -> list:
    return list(comfy.samplers.SCHEDULER_NAMES)


def to_model_space(model, samples: torch.Tensor) -> torch.Tensor:
    return latent_format(model).process_in(samples.detach().clone().float())


def to_vae_space(model, x: torch.Tensor) -> torch.Tensor:
    return latent_format(model).process_out(x.detach().clone().float())


def output_device() -> torch.device:
    """Where node outputs live: ComfyUI's intermediate device (the CPU unless --gpu-only)."""
    return comfy.model_management.intermediate_device()


def prepare_mask(mask: torch.Tensor, shape, model) -> torch.Tensor:
    """A (checked) noise mask resized to a latent of ``shape`` on the model's device, as core samplers do."""
    return comfy.sampler_helpers.prepare_mask(mask, shape, model.load_device)


# ---------------------------------------------------------------------------------------------- guidance fingerprint
class _Unhashable(Exception):
    """A value the fingerprint cannot describe by content: the guidance is treated as different."""


_MODEL_TOKENS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _model_token(obj) -> str:
    """A per-object identity that is never reused (unlike ``id``): kept in a weak map, nothing is written on
    the model."""
    try:
        tok = _MODEL_TOKENS.get(obj)
        if tok is None:
            tok = _MODEL_TOKENS[obj] = uuid.uuid4().hex
        return tok
    except TypeError:
        raise _Unhashable(type(obj).__name__) from None


class _Hasher:
    def __init__(self):
        self.h = hashlib.blake2b(digest_size=20)

    def text(self, s: str) -> None:
        self.h.update(s.encode())
        self.h.update(b"\0")

    def feed(self, v, depth: int = 0) -> None:
        if depth > 12:
            raise _Unhashable("too deep")
        if isinstance(v, torch.Tensor):
            t = v.detach().to("cpu").contiguous()
            self.text(f"T{tuple(t.shape)}{t.dtype}")
            self.h.update(t.float().numpy().tobytes() if t.is_floating_point() else t.numpy().tobytes())
        elif v is None or isinstance(v, (bool, int, float, str)):
            self.text(f"{type(v).__name__}:{v!r}")
        elif isinstance(v, (list, tuple)):
            self.text(f"{type(v).__name__}[{len(v)}")
            for x in v:
                self.feed(x, depth + 1)
            self.text("]")
        elif isinstance(v, dict):
            self.text(f"dict{{{len(v)}")
            for k in sorted(v, key=str):
                self.text(str(k))
                self.feed(v[k], depth + 1)
            self.text("}")
        else:  # a ControlNet, a hook group, a function, an object patch...: not comparable by content
            raise _Unhashable(type(v).__name__)

    def feed_sampling(self, ms) -> None:
        t = getattr(ms, "sigmas", None)
        self.text(f"ms:{prediction_type(ms)}")
        if isinstance(t, torch.Tensor):
            self.feed(t)
        for k, v in sorted(vars(ms).items()):
            if isinstance(v, (bool, int, float, str)):
                self.text(f"{k}={v!r}")


def _feed_model(h: _Hasher, model) -> None:
    """The model's identity and every patch that changes its predictions."""
    h.text("model:" + _model_token(model.model))
    h.text("weights:" + str(getattr(model, "patches_uuid", "")))
    for name in sorted(getattr(model, "object_patches", {}) or {}):
        obj = model.object_patches[name]
        h.text("object_patch:" + name)
        if name == "model_sampling":
            h.feed_sampling(obj)
        else:
            h.feed(obj)
    h.feed(getattr(model, "model_options", {}))
    for attr in ("wrappers", "callbacks"):
        groups = getattr(model, attr, {}) or {}
        for key in sorted(groups, key=str):
            for sub in (groups[key] or {}).values():
                if sub:
                    raise _Unhashable(f"{attr}[{key}]")
    for attr in ("hook_patches", "additional_models", "injections", "attachments"):
        if getattr(model, attr, None):
            raise _Unhashable(attr)
    for attr in ("current_hooks", "forced_hooks"):
        if getattr(model, attr, None) is not None:
            raise _Unhashable(attr)


def guidance_fingerprint(model, positive, negative, cfg: float) -> Optional[str]:
    """A hash of everything that decides the guided prediction: the model (identity, weight patches such as
    LoRA, object patches, model_options), both conditionings (tensors and options) and the cfg.

    Conservative: anything it cannot describe by content (a ControlNet or hook in the conditioning, a
    function in model_options, a wrapper/callback/hook on the model) makes it return None, which never
    equals another fingerprint, so ``exact_replay=auto`` picks the ddim replay.
    """
    h = _Hasher()
    try:
        h.text(repr(round(float(cfg), 8)))
        _feed_model(h, model)
        for cond in (positive, negative):
            h.text("|cond")
            h.feed(cond)
    except _Unhashable as e:
        log.debug("guidance fingerprint: %s is not comparable; exact_replay=auto will use ddim", e)
        return None
    except Exception as e:  # anything unexpected: "not the same", never a crash
        log.debug("guidance fingerprint failed (%r); exact_replay=auto will use ddim", e)
        return None
    return h.h.hexdigest()


def same_guidance(recorded: Optional[str], now: Optional[str]) -> bool:
    return recorded is not None and now is not None and recorded == now


# ---------------------------------------------------------------------------------------------- the sampler seam
class _Progress:
    """One step of work done: ComfyUI's UI progress/preview callback and, unless ComfyUI disabled progress bars,
    a console bar (opened at the first step, closed by ``close``)."""

    def __init__(self, label: str, callback, disable_pbar: bool):
        self.label, self.callback, self.disable, self.bar = label, callback, disable_pbar, None

    def __call__(self, i: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if self.bar is None:   # initial: a second expert's segment takes over at step i
            self.bar = tqdm(total=total, initial=i, disable=self.disable, desc=self.label, leave=True)
        self.bar.update(1)
        if self.callback is not None:
            self.callback(i, denoised.detach().to(torch.float32), x.detach().to(torch.float32), total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _LoopSampler(comfy.samplers.Sampler):
    """A ``comfy.samplers.Sampler`` that runs ``loop(model_fn, device, progress)`` inside CFGGuider.

    ``model_fn(x, sigma)`` evaluates the guided denoiser (CFG, patches, ControlNet) at a python-float sigma,
    after checking for an interrupt. No noise scaling is applied before or after the loop. ``progress`` feeds
    ComfyUI's UI progress/preview callback and, unless ComfyUI disabled progress bars, a console bar.
    """

    def __init__(self, loop: Callable, label: str):
        self.loop = loop
        self.label = label
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        model_options = extra_args.get("model_options", {})
        seed = extra_args.get("seed", None)
        def model_fn(x: torch.Tensor, sigma: float) -> torch.Tensor:
            comfy.model_management.throw_exception_if_processing_interrupted()
            s = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
            return model_wrap(x.to(noise.device), s, model_options=model_options, seed=seed)

        progress = _Progress(self.label, callback, disable_pbar)
        try:
            with torch.no_grad():
                self.result = self.loop(model_fn, noise.device, progress)
        finally:
            progress.close()
        # CFGGuider post-processes what we return; our caller reads self.result instead
        if isinstance(self.result, torch.Tensor) and tuple(self.result.shape) == tuple(noise.shape):
            return self.result.to(noise.device, torch.float32)
        return torch.zeros_like(noise, dtype=torch.float32)


def run_guided(model, positive, negative, cfg: float, shape, sigmas: torch.Tensor, loop: Callable, steps: int,
               label: str):
    """Run ``loop`` with the guided model of (model, positive, negative, cfg); returns the loop's result.

    ``sigmas`` (descending) is what CFGGuider sees for model loading, memory estimates and
    transformer_options['sample_sigmas']; the loop decides the sigma of each evaluation itself. ``steps`` is
    the UI progress bar's length.
    """
    return drive(model, positive, negative, cfg, shape, sigmas, _LoopSampler(loop, label), steps)


def model_id(model) -> str:
    """An identity of the network a MODEL wraps (``model.model``), never reused in this process; clones (LoRA,
    patches) of one loaded model share it. What a two-expert trajectory records of each expert."""
    return _model_token(model.model)


def check_experts(low, high) -> None:
    """Two experts must sample one latent on one noise schedule: the same family, latent format and sampling
    (prediction type, sigma table: e.g. the same ModelSamplingSD3 shift on both)."""
    fam_low, fam_high = family_of(low), family_of(high)
    fl, fh = latent_facts(low, family_checked=True), latent_facts(high, family_checked=True)
    if (fam_low, fl["format"], fl["channels"]) != (fam_high, fh["format"], fh["channels"]):
        raise InversionInputError(
            f"the two experts take different latents (model: {fl['format']}, {fl['channels']} channels, {fam_low}; "
            f"model_high_noise: {fh['format']}, {fh['channels']} channels, {fam_high}); connect the two experts of "
            "one model (e.g. Wan 2.2 A14B's low-noise and high-noise models)")
    sl, sh = sampling_facts(low), sampling_facts(high)
    if sl != sh:
        raise InversionInputError(
            f"the two experts sample on different noise schedules (model: {sl['prediction']} sigma "
            f"{sl['sigma_min']:.4g}..{sl['sigma_max']:.4g}; model_high_noise: {sh['prediction']} sigma "
            f"{sh['sigma_min']:.4g}..{sh['sigma_max']:.4g}); give both the same sampling (e.g. the same "
            "ModelSamplingSD3 shift)")


def run_experts(models: dict, positive, negative, cfg: float, shape, sigmas: torch.Tensor, loop: Callable,
                steps: int, label: str, boundary: float, first: str):
    """:func:`run_guided` with two experts (``models``: {'low': MODEL, 'high': MODEL}): one CFGGuider per expert
    segment, the evaluations dispatched on their sigma at ``boundary`` (``inversion.experts.run_segments``)."""
    def run_with(expert, seg_loop):
        return run_guided(models[expert], positive, negative, cfg, shape, sigmas, seg_loop, steps,
                          f"{label} ({expert}-noise expert)")
    return experts.run_segments(loop, run_with, boundary, first)[0]


def drive(model, positive, negative, cfg: float, shape, sigmas: torch.Tensor, sampler, total: int):
    """Run ``sampler`` (a ``comfy.samplers.Sampler`` that stores its work in ``.result``) inside a ``CFGGuider``
    of (model, positive, negative, cfg), on a zero latent of ``shape``, with ComfyUI's UI progress/preview
    callback of ``total`` steps and its console-bar switch; returns ``sampler.result``."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(float(cfg))
    return drive_guider(guider, model, shape, sigmas, sampler, total)


def drive_guider(guider, model, shape, sigmas: torch.Tensor, sampler, total: int):
    """:func:`drive` with a guider already set up (conds, cfg): attention control's two-branch guider."""
    zeros = torch.zeros(shape, dtype=torch.float32)
    callback = latent_preview.prepare_callback(model, int(total))
    with torch.no_grad():   # seed: nothing here draws noise; CFGGuider passes it on to model_options users
        guider.sample(zeros, zeros.clone(), sampler, sigmas.to(torch.float32), denoise_mask=None,
                      callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=0)
    return sampler.result


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
                f"DDIM Invert (noise): the latent given to the sampler has shape {tuple(samples.shape)} but the "
                f"inverted noise has {tuple(self.state.shape)}; connect DDIM Invert's noise_latent (or an empty "
                "latent of the same size and batch)")
        scale, a = self._coefficients()
        if torch.count_nonzero(samples) > 0:  # as CFGGuider.inner_sample: only a non-zero latent is processed
            li = self.latent_format.process_in(samples.detach().clone().float())
        else:
            li = torch.zeros_like(self.state)
        return ((self.state.float() - a * li.to(self.state.device)) / scale).cpu()
