"""The validation layer: every value that reaches the math core from outside passes here first (pure torch).

The nodes call these at their boundary for everything they did not compute themselves, and for what they
did (a scheduler's sigmas go through :func:`inversion.schedule.check_sampling_sigmas` like a user's):

* :func:`check_latent` -- a LATENT's ``samples`` against the model's channel count and spatial rank;
* :func:`check_mask` -- a ``noise_mask``: shape and finiteness are errors, values outside [0, 1] are clamped
  and reported (the returned note goes to the node's text output);
* :func:`check_conditioning` -- a CONDITIONING: structure, batch, and every tensor it carries (the prompt
  embedding and extras such as ``pooled_output``) finite;
* :func:`check_cfg` -- a guidance scale;
* :func:`check_trajectory` -- a DDIM_TRAJECTORY, ours or another pack's (every field the sampler and the
  preview read, ``extra`` included);
* :func:`check_finite_result` -- what a node is about to return (a NaN result is an error, never a success).

Every failure raises :class:`~inversion.errors.InversionInputError` ("what is wrong; the fix"); nothing here
modifies its input.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import InversionInputError
from .experts import check_record as check_experts_record
from .methods import METHODS
from .nulltext import MODES as NEGATIVE_MODES

_FAMILIES = ("vp", "flow")  # what inversion.families.sampling_family accepts; anything else is refused
_MAX_WALK = 64          # conditioning extras: how many nested values are inspected at most


def _count_bad(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0


# ---------------------------------------------------------------------------------------------- latents and masks
def check_latent(latent, *, channels: Optional[int] = None, spatial_dims: int = 2, format_name: str = "",
                 what: str = "latent") -> torch.Tensor:
    """The ``samples`` of a LATENT, checked: a real tensor [B,C,H,W] (``spatial_dims`` 3: [B,C,T,H,W]) with
    the model's channel count, non-empty and finite. Returns the tensor (not a copy)."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise InversionInputError(f"{what} is not a LATENT (a dict with 'samples'); connect a LATENT output "
                                  "such as VAE Encode (Inversion)")
    samples = latent["samples"]
    if not isinstance(samples, torch.Tensor):
        raise InversionInputError(f"{what} has no 'samples' tensor (got {type(samples).__name__}); connect a LATENT "
                                  "(e.g. from VAE Encode (Inversion))")
    if getattr(samples, "is_nested", False):
        raise InversionInputError(f"{what} is a nested (multi-stream) latent; DDIM inversion supports image and "
                                  "video latents only: connect the image/video part")
    if samples.is_complex() or samples.dtype == torch.bool or not samples.is_floating_point():
        raise InversionInputError(f"{what} has dtype {samples.dtype}; a latent is a float tensor: connect a "
                                  "LATENT output")
    want_ndim = 2 + int(spatial_dims)
    if samples.ndim != want_ndim:
        layout = "[B,C,H,W]" if spatial_dims == 2 else "[B,C,T,H,W]" if spatial_dims == 3 else f"{want_ndim}-D"
        kind = "an image" if spatial_dims == 2 else "a video" if spatial_dims == 3 else "this"
        raise InversionInputError(
            f"{what} has shape {tuple(samples.shape)} but {kind} model ({format_name or 'its latent format'}) "
            f"takes {layout} latents; encode with this model's own VAE (an image model cannot invert a video latent)")
    if samples.numel() == 0:
        raise InversionInputError(f"{what} is empty (shape {tuple(samples.shape)}); connect a non-empty LATENT")
    if channels is not None and int(samples.shape[1]) != int(channels):
        raise InversionInputError(
            f"{what} has {samples.shape[1]} channels but this model's latent format ({format_name}) uses "
            f"{channels}; encode the image with this model's own VAE")
    bad = _count_bad(samples)
    if bad:
        raise InversionInputError(f"{what} contains NaN or Inf values ({bad} of {samples.numel()}); re-encode the "
                                  "image (check the VAE and the image)")
    return samples


def check_mask(mask, shape, what: str = "noise_mask"):
    """A latent's optional noise mask ([H,W], [B,H,W] or [B,1,H,W], any size: it is resized to the latent).

    Returns ``(mask, note)``: the mask as float32 (clamped to [0, 1] when it was outside, with a note saying
    so) or ``(None, None)``. Malformed or non-finite masks raise."""
    if mask is None:
        return None, None
    fix = "set it with Set Latent Noise Mask (a MASK with values 0..1)"
    if not isinstance(mask, torch.Tensor) or mask.is_complex() or mask.is_nested:
        raise InversionInputError(f"{what} must be a MASK tensor (got {type(mask).__name__}); {fix}")
    if mask.ndim < 2 or mask.ndim > max(2, len(shape)) or mask.numel() == 0:
        raise InversionInputError(f"{what} must be [H,W], [B,H,W] or [B,1,H,W] (got shape {tuple(mask.shape)}); {fix}")
    m = mask.detach().to(torch.float32)
    if not bool(torch.isfinite(m).all()):
        raise InversionInputError(f"{what} contains NaN or Inf values; {fix}")
    lo, hi = float(m.min()), float(m.max())
    if lo < 0.0 or hi > 1.0:
        note = (f"{what} values spanned [{lo:.4g}, {hi:.4g}]; clamped to [0, 1] (1 = regenerate, 0 = keep the "
                "source)")
        return m.clamp(0.0, 1.0), note
    return m, None


# ---------------------------------------------------------------------------------------------- conditioning
def _walk_tensors(value, path: str, out: list, depth: int = 0):
    if len(out) >= _MAX_WALK or depth > 4:
        return
    if isinstance(value, torch.Tensor):
        out.append((path, value))
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk_tensors(v, f"{path}.{k}", out, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk_tensors(v, f"{path}[{i}]", out, depth + 1)


def check_conditioning(cond, batch: int, name: str) -> None:
    """A CONDITIONING: a non-empty list of [tensor, dict]; the tensor finite with batch 1 or ``batch``; every
    tensor in the dict (``pooled_output``, ``guidance`` tensors, masks, ...) finite, ``pooled_output`` with
    batch 1 or ``batch``. Objects ComfyUI attaches (ControlNets, hooks) are left to ComfyUI."""
    if not isinstance(cond, list) or len(cond) == 0:
        raise InversionInputError(f"{name} is empty; connect a CONDITIONING (e.g. CLIP Text Encode)")
    for i, c in enumerate(cond):
        if not (isinstance(c, (list, tuple)) and len(c) >= 2 and isinstance(c[1], dict)):
            raise InversionInputError(f"{name}[{i}] is not a ComfyUI conditioning entry; connect a CONDITIONING output")
        t = c[0]
        if isinstance(t, torch.Tensor):
            if _count_bad(t):
                raise InversionInputError(f"{name} contains NaN or Inf values; re-encode the prompt")
            b = int(t.shape[0]) if t.ndim else 1
            if b not in (1, batch):
                raise InversionInputError(
                    f"{name} has batch {b} but the latent has batch {batch}; use one conditioning (batch 1, "
                    f"shared) or exactly one per latent")
        found: list = []
        _walk_tensors(c[1], name, found)
        for path, v in found:
            if _count_bad(v):
                raise InversionInputError(f"{path} contains NaN or Inf values; re-encode the prompt (or fix the node "
                                          "that added it)")
        pooled = c[1].get("pooled_output")
        if isinstance(pooled, torch.Tensor) and pooled.ndim and int(pooled.shape[0]) not in (1, batch):
            raise InversionInputError(
                f"{name}.pooled_output has batch {pooled.shape[0]} but the latent has batch {batch}; use one "
                "conditioning per latent or a shared one (batch 1)")


def check_cfg(cfg, name: str = "cfg") -> float:
    """A finite guidance scale (NaN passes ComfyUI's min/max widget check and would give a NaN latent)."""
    try:
        v = float(cfg)
    except (TypeError, ValueError):
        raise InversionInputError(f"{name} must be a number (got {cfg!r}); use e.g. 1.0") from None
    if not math.isfinite(v):
        raise InversionInputError(f"{name} must be a finite number (got {cfg!r}); use e.g. 1.0")
    return v


# ---------------------------------------------------------------------------------------------- trajectories
_NEED = ("sigmas", "states", "denoised", "method", "options", "replay")


def check_trajectory(traj) -> None:
    """Everything the sampler and the preview read from a DDIM_TRAJECTORY (ours or another pack's)."""
    fix = "connect DDIM Invert's trajectory output (or re-run DDIM Invert)"
    if traj is None or not all(hasattr(traj, k) for k in _NEED):
        raise InversionInputError(f"trajectory is not a DDIM_TRAJECTORY; {fix}")
    if traj.method not in METHODS:
        raise InversionInputError(f"trajectory method {traj.method!r} is unknown to this version of the pack; {fix}")
    sig, st, dn = traj.sigmas, traj.states, traj.denoised
    if not all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in (sig, st, dn)):
        raise InversionInputError(f"trajectory sigmas/states/denoised must be float tensors; {fix}")
    if sig.ndim != 1 or sig.numel() < 2:
        raise InversionInputError(f"trajectory has {sig.numel()} sigmas (shape {tuple(sig.shape)}) but needs at least "
                                  f"2, 1-D; {fix}")
    N = int(sig.numel()) - 1
    if st.ndim < 4 or st.shape[0] != N + 1 or dn.shape != (N,) + tuple(st.shape[1:]) or st.shape[1] < 1:
        raise InversionInputError(f"trajectory is malformed (states {tuple(st.shape)}, denoised {tuple(dn.shape)}, "
                                  f"{N + 1} sigmas); {fix}")
    s64 = sig.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(s64).all()) or bool((s64 < 0).any()) or not bool((s64[1:] > s64[:-1]).all()):
        raise InversionInputError(f"trajectory sigmas must be finite, >= 0 and strictly increasing; {fix}")
    family = getattr(traj, "family", "") or ""
    if family and family not in _FAMILIES:
        raise InversionInputError(f"trajectory family {family!r} is unknown (vp or flow); {fix}")
    if family == "flow" and float(s64[-1]) > 1.0 + 1e-5:
        raise InversionInputError(f"trajectory is a flow trajectory but reaches sigma {float(s64[-1]):.7g} > 1; {fix}")
    for label, t in (("states", st), ("denoised", dn)):
        if _count_bad(t):
            raise InversionInputError(f"trajectory {label} contain NaN or Inf values; re-run DDIM Invert (for method "
                                      "exact use gamma 1.0)")
    ev = getattr(traj, "eval_sigmas", None)
    if ev is not None and (not isinstance(ev, torch.Tensor) or ev.numel() != N or _count_bad(ev.to(torch.float64))):
        raise InversionInputError(f"trajectory eval_sigmas must be {N} finite values; {fix}")
    if not isinstance(traj.options, dict) or not isinstance(traj.replay, dict):
        raise InversionInputError(f"trajectory options/replay must be dicts; {fix}")
    if traj.method == "exact":
        g = traj.options.get("gamma", 1.0)
        if not isinstance(g, (int, float)) or not (0 < float(g) <= 1):
            raise InversionInputError(f"trajectory gamma {g!r} is not in (0, 1]; {fix}")
        pair = traj.replay.get("pair")
        if pair is not None and (not isinstance(pair, torch.Tensor) or tuple(pair.shape) != (2,) + tuple(st.shape[1:])
                                 or _count_bad(pair)):
            raise InversionInputError(f"trajectory replay pair must be 2 finite states of shape "
                                      f"{tuple(st.shape[1:])}; {fix}")
    extra = getattr(traj, "extra", {})
    if not isinstance(extra, dict):
        raise InversionInputError(f"trajectory extra must be a dict (got {type(extra).__name__}); {fix}")
    fp = extra.get("guidance_fingerprint")
    if fp is not None and not isinstance(fp, str):
        raise InversionInputError(f"trajectory extra['guidance_fingerprint'] must be a string or None; {fix}")
    check_experts_record(extra.get("experts"))
    opt = getattr(traj, "optimized_negative", None)
    if opt is not None and not (isinstance(opt, dict) and opt.get("mode") in NEGATIVE_MODES
                                and isinstance(opt.get("conditioning"), list) and opt["conditioning"]):
        raise InversionInputError("trajectory optimized_negative must be a dict with mode null_text or "
                                  "negative_prompt and a non-empty conditioning list; re-run Null-Text Inversion")
    bi = getattr(traj, "batch_index", None)
    if bi is not None and not (isinstance(bi, (list, tuple)) and all(isinstance(v, int) for v in bi)):
        raise InversionInputError(f"trajectory batch_index must be a list of ints; {fix}")


# ---------------------------------------------------------------------------------------------- results
def check_finite_result(x: torch.Tensor, what: str, fix: str) -> None:
    """A node's result must be finite: a NaN latent is an error, never a success."""
    bad = _count_bad(x)
    if bad:
        raise InversionInputError(f"{what} contains NaN or Inf ({bad} of {x.numel()} values); {fix}")


# ---------------------------------------------------------------------------------------------- model vs trajectory
def compatibility_warnings(traj, latent_format: str, sampling: dict, family: str) -> list:
    """Differences between a model (its latent format name, ``sampling`` facts {prediction, table, sigma_min,
    sigma_max}, family) and the one that made ``traj``: warnings, not errors. Model sampling is compared by what
    decides the noise schedule -- the prediction type and the sigma table -- not by class name (core
    ModelSamplingDiscrete wraps the same EPS sampling in a new class). A fact the trajectory lacks is not compared."""
    warns = []
    if traj.latent_format and latent_format != traj.latent_format:
        warns.append(f"latent format differs: trajectory {traj.latent_format}, model {latent_format}")
    rec = getattr(traj, "sampling", None) or {}
    if rec:
        if rec.get("prediction") != sampling.get("prediction"):
            warns.append(f"model sampling differs: trajectory {rec.get('prediction')} prediction, model "
                         f"{sampling.get('prediction')}")
        elif rec.get("table") != sampling.get("table"):
            warns.append(f"model sampling differs: another sigma table (trajectory sigma {rec.get('sigma_min', 0):.4g}"
                         f"..{rec.get('sigma_max', 0):.4g}, model {sampling['sigma_min']:.4g}.."
                         f"{sampling['sigma_max']:.4g}; e.g. another shift)")
    if traj.family and family != traj.family:
        warns.append(f"model family differs: trajectory {traj.family}, model {family} (the states will not match "
                     "this model)")
    return warns
