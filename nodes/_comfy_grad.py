"""The adapter's autograd half: what null-text inversion needs from ComfyUI (one of the ``nodes/_comfy*.py``
adapters, the only modules that touch ComfyUI internals).

* ``comfy.samplers.CFGGuider`` prepares the model exactly as every core sampler does (model loading and
  offload, LoRA / model patches, ControlNet, hooks, per-step conditioning ranges); our own
  ``comfy.samplers.Sampler`` subclass then evaluates the two branches separately through
  ``comfy.samplers.calc_cond_batch``: the positive once per step without a graph, the negative with its
  cross-attention tensor replaced by the embedding being optimised (differentiable).
* ComfyUI executes nodes under ``torch.inference_mode()``, so a model loaded there holds *inference tensors*,
  which autograd refuses to save for a backward pass. :func:`autograd_view` swaps every such parameter and
  buffer of the model, for the duration of the optimisation only, for an ordinary tensor that shares its
  storage: no weight is copied, none requires grad, and the originals are put back afterwards.
* ``model_sampling.percent_to_sigma`` turns the schedule into the ``start_percent``/``end_percent`` ranges that
  bind each optimised negative to its own sampling step (:func:`step_ranges`).
* Progress: the UI bar with a live preview (``latent_preview.prepare_callback``), a console bar unless
  ComfyUI disabled them (``comfy.utils.PROGRESS_BAR_ENABLED``), and an interrupt check before every
  evaluation (``comfy.model_management.throw_exception_if_processing_interrupted``).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..inversion import schedule
from . import _comfy as C


# ---------------------------------------------------------------------------------------------- weights
@contextlib.contextmanager
def autograd_view(module: torch.nn.Module):
    """Within the block, every inference-tensor parameter/buffer of ``module`` is an ordinary tensor aliasing
    the same storage (so autograd can save it for backward); restored on exit, exceptions included."""
    swapped = []
    try:
        with torch.inference_mode(False):
            for mod in module.modules():
                for store in (mod._parameters, mod._buffers):
                    for name, t in list(store.items()):
                        if t is None or not t.is_inference():
                            continue
                        alias = torch.empty(0, dtype=t.dtype, device=t.device).set_(
                            t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
                        if isinstance(t, torch.nn.Parameter):
                            alias = torch.nn.Parameter(alias, requires_grad=False)
                        swapped.append((store, name, t))
                        store[name] = alias
        yield len(swapped)
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t


# ---------------------------------------------------------------------------------------------- schedule
def step_ranges(model_sampling, sampling_sigmas: torch.Tensor) -> list:
    """``[(start_percent, end_percent)]`` per sampling step, on this model's percent scale
    (:func:`inversion.schedule.step_ranges`; a schedule it cannot bind raises the pack's ScheduleError)."""
    return schedule.step_ranges(model_sampling.percent_to_sigma, sampling_sigmas)


def per_step_conditioning(negative: list, embeddings: torch.Tensor, ranges: list, device) -> list:
    """A CONDITIONING with one entry per sampling step: the negative's own extras (pooled output, ...) with
    the step's optimised cross-attention tensor and its ``start_percent``/``end_percent``. Nothing of
    ``negative`` is modified."""
    base = negative[0][1]
    out = []
    for emb, (p0, p1) in zip(embeddings, ranges, strict=True):
        extras = {k: v for k, v in base.items() if k not in ("start_percent", "end_percent")}
        extras.update(start_percent=float(p0), end_percent=float(p1))
        out.append([emb.detach().to(device).contiguous(), extras])
    return out


# ---------------------------------------------------------------------------------------------- branches
def _with_embedding(conds: list, emb: torch.Tensor) -> list:
    """Copies of processed conds with the cross-attention tensor replaced (same wrapper class)."""
    out = []
    for c in conds:
        c2 = dict(c)
        mc = dict(c2["model_conds"])
        mc["c_crossattn"] = mc["c_crossattn"]._copy_with(emb)
        c2["model_conds"] = mc
        out.append(c2)
    return out


class _BranchSampler(C._LoopSampler):
    """Runs ``loop(cond_fn, uncond_fn, device, progress)`` inside ``CFGGuider.sample`` with the two
    branches of the prepared guider as separate callables (see the module docstring)."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        inner = model_wrap.inner_model
        conds = model_wrap.conds
        model_options = extra_args.get("model_options", {})
        device = noise.device

        def timestep(x, sigma):
            return torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=device)

        def cond_fn(x, sigma):
            comfy.model_management.throw_exception_if_processing_interrupted()
            x = x.to(device)
            with torch.no_grad():
                return comfy.samplers.calc_cond_batch(inner, [conds["positive"], None], x, timestep(x, sigma),
                                                      model_options)[0]

        def uncond_fn(x, sigma, emb):
            comfy.model_management.throw_exception_if_processing_interrupted()
            x = x.to(device)
            neg = _with_embedding(conds["negative"], emb.to(device))
            return comfy.samplers.calc_cond_batch(inner, [None, neg], x, timestep(x, sigma), model_options)[1]

        progress = C._Progress(self.label, callback, disable_pbar)
        try:
            with autograd_view(inner):
                self.result = self.loop(cond_fn, uncond_fn, device, progress)
        finally:
            progress.close()
        return torch.zeros_like(noise, dtype=torch.float32)


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def run_branches(model, positive, negative, cfg: float, shape, sampling_sigmas: torch.Tensor, loop: Callable,
                 total: int, label: str):
    """Run ``loop(cond_fn, uncond_fn, device, progress)`` with the branches of (model, positive, negative)
    prepared by a ``CFGGuider`` at ``cfg`` (the schedule it sees for loading and memory estimates is
    ``sampling_sigmas``). Returns the loop's result."""
    return C.drive(model, positive, negative, cfg, shape, sampling_sigmas, _BranchSampler(loop, label), total)


def cfg_patches(model) -> list:
    """Names of model_options entries that change how CFG combines the branches (RescaleCFG, CFG++ ...):
    null-text optimises plain CFG, so a core sampler with these would not retrace it."""
    mo = getattr(model, "model_options", {}) or {}
    return [k for k in ("sampler_cfg_function", "sampler_pre_cfg_function", "sampler_post_cfg_function")
            if mo.get(k)]


def is_guidance_distilled(model, positive) -> bool:
    """Flux-dev style: guidance is a model input (``guidance_embed``), there is no unconditional branch."""
    unet = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    return bool(unet.get("guidance_embed")) or any("guidance" in c[1] for c in positive)
