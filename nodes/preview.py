"""Trajectory Preview: look at a DDIM_TRAJECTORY step by step.

Frames are chosen evenly over the trajectory, always including both ends (the source latent and the
inverted noise for ``states``; the first and last step's x0 estimate for ``denoised``).

The per-step figure sent to the in-node viewer (``figure_name`` = "x0 drift (RMS)") is the root-mean-square
difference, in model space, between the x0 estimate associated with the frame and the source latent
``states[0]`` (batch item shown only). A state frame ``i`` is associated with ``denoised[min(i, N-1)]``, the
estimate of the step that leaves it (the last state uses the last step's estimate). It is 0 for a perfect
denoiser at low noise and grows as the model's notion of the clean image drifts away from the source,
which is where an inversion starts to lose fidelity.

A trajectory from Null-Text Inversion also carries what its optimised negative reconstructs: the states and
guided x0 estimates of the sampler at the cfg it was optimised for (recorded by the optimisation, nothing is
re-run). Each frame then shows the pivot on top and that reconstruction below it, at the same level, and the
frame's ``miss`` is the RMS difference between the two states (where the guided sampler leaves the pivot).
A negative-prompt trajectory records no reconstruction (nothing was evaluated): the pivot alone is shown.

Video trajectories (states [N+1, B, C, T, H, W]) have a time axis: each kept state becomes a strip of ``keep``
clip frames side by side (evenly spaced, first and last always; latent frames with decode=fast, decoded frames
with decode=vae), and each frame also carries ``figure_frames``: the x0 drift per latent frame, so the frame of
the clip where the inversion drifts shows. The viewer steps through the strip's frames.
"""
from __future__ import annotations

import math
import numbers

import torch
from comfy_api.latest import io, ui

from ..inversion import checks, imaging
from ..inversion.errors import InversionInputError, node_boundary
from . import _comfy as C
from . import _comfy_image as CV
from .types import CATEGORY, TRAJECTORY

DISPLAY = "Trajectory Preview"
SHOW_MODES = ["states", "denoised", "both"]
DECODE_MODES = ["fast", "vae"]
FIGURE_NAME = "x0 drift (RMS)"
MAX_BATCH_INDEX = 2**31 - 1   # no widget cap below it: an out-of-range value reaches the node's own check
MAX_FRAMES = 2**31 - 1
KEEP_DEFAULT = 8


def _finite(x: float):
    x = float(x)
    return x if math.isfinite(x) else None


def _reconstruction(traj):
    """(states [N+1, B, ...], denoised [N, B, ...]) in the trajectory's order that the trajectory's optimised
    negative reconstructs (Null-Text Inversion records them), or None."""
    info = getattr(traj, "optimized_negative", None) or {}
    st, dn = info.get("states"), info.get("denoised")
    if not (isinstance(st, torch.Tensor) and isinstance(dn, torch.Tensor)):
        return None
    if tuple(st.shape) != tuple(traj.states.shape) or tuple(dn.shape) != tuple(traj.denoised.shape):
        raise InversionInputError(
            f"the trajectory's null-text reconstruction has shape {tuple(st.shape)} but its states "
            f"{tuple(traj.states.shape)}; connect Null-Text Inversion's trajectory output unmodified")
    return st, dn


def _check_inputs(trajectory, vae, show, frames, decode, batch_index, keep) -> None:
    checks.check_trajectory(trajectory)
    if show not in SHOW_MODES:
        raise InversionInputError(f"show {show!r} is unknown; use one of {', '.join(SHOW_MODES)}")
    if decode not in DECODE_MODES:
        raise InversionInputError(f"decode {decode!r} is unknown; use one of {', '.join(DECODE_MODES)}")
    if decode == "vae" and vae is None:
        raise InversionInputError("decode=vae needs a VAE; connect the model's VAE to the 'vae' input or set "
                                  "decode=fast")
    if isinstance(frames, bool) or not isinstance(frames, numbers.Integral) or frames < 2:
        raise InversionInputError(f"frames must be an integer >= 2 (got {frames!r}); use e.g. 8")
    if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or keep < 2:
        raise InversionInputError(f"keep must be an integer >= 2 (got {keep!r}); use e.g. {KEEP_DEFAULT}")
    b = int(trajectory.states.shape[1])
    if isinstance(batch_index, bool) or not isinstance(batch_index, numbers.Integral) or not 0 <= batch_index < b:
        raise InversionInputError(f"batch_index {batch_index!r} is out of range: the trajectory has {b} image(s); "
                                  f"use 0..{b - 1}")


def _frame_rows(trajectory, show: str, frames: int) -> list:
    """The frames shown: (trajectory index, step, sigma, denoised index) each."""
    sigmas = trajectory.sigmas
    n_steps = int(sigmas.shape[0]) - 1
    eval_sigmas = getattr(trajectory, "eval_sigmas", None)
    if show == "denoised":
        idx = imaging.select_frames(n_steps, int(frames))
        return [(i, i, float(eval_sigmas[i]) if eval_sigmas is not None else float(sigmas[i + 1]), i) for i in idx]
    idx = imaging.select_frames(n_steps + 1, int(frames))
    return [(i, i, float(sigmas[i]), min(i, n_steps - 1)) for i in idx]


class _Renderer:
    """Latents [K,C,H,W] (video [K,C,T,H,W]: ``keep`` clip frames side by side) -> images [K,H,W,3], fast
    (the format's RGB factors) or through the VAE; ``clip`` says which clip frames a video strip shows."""

    def __init__(self, vae, fmt, decode: str, keep: int, video: bool):
        self.vae, self.fmt, self.decode, self.keep, self.video = vae, fmt, decode, int(keep), video
        self.clip: dict = {}

    def __call__(self, lat):
        if self.video:
            return self._clip(lat)
        if self.decode == "vae":
            return CV.vae_decode_model_space(self.vae, self.fmt, lat)
        factors, bias, reshape = CV.rgb_factors(self.fmt)
        return imaging.fast_rgb(lat, factors, bias, reshape, type(self.fmt).__name__)

    def _clip(self, lat):      # [K,C,T,H,W] -> [K,H,keep*W,3]
        if self.decode == "vae":
            decoded = CV.vae_decode_clip(self.vae, self.fmt, lat)
            pick = imaging.select_frames(int(decoded.shape[1]), self.keep)
            self.clip.update(unit="frame", count=int(decoded.shape[1]), frames=pick)
            return imaging.strip(decoded[:, pick])
        factors, bias, reshape = CV.rgb_factors(self.fmt)
        k, c, t = lat.shape[:3]
        pick = imaging.select_frames(int(t), self.keep)
        self.clip.update(unit="latent frame", count=int(t), frames=pick)
        flat = lat[:, :, pick].movedim(2, 1).reshape(k * len(pick), c, *lat.shape[3:])
        rgb = imaging.fast_rgb(flat, factors, bias, reshape, type(self.fmt).__name__)
        return imaging.strip(rgb.reshape(k, len(pick), *rgb.shape[1:]))

    def panel(self, show: str, states, denoised):
        if show == "states":
            return self(states)
        if show == "denoised":
            return self(denoised)
        return torch.cat([self(states), self(denoised)], dim=2)


def _frame_info(rows: list, trajectory, bi: int, rec, video: bool) -> list:
    """Per shown frame: step, sigma, the x0 drift from the source (per latent frame for video) and, with a
    null-text reconstruction, its miss."""
    states, denoised = trajectory.states, trajectory.denoised
    source = states[0, bi]
    out = []
    for j, (i, step, sigma, d) in enumerate(rows):
        info = {"index": j, "step": int(step), "sigma": _finite(sigma),
                "figure": _finite(imaging.rms(denoised[d, bi], source))}
        if rec is not None:   # state frame i: level i; denoised frame i: the level its step lands on
            info["miss"] = _finite(imaging.rms(rec[0][i, bi], states[i, bi]))
        if video:             # the x0 drift of each latent frame of the clip
            info["figure_frames"] = [_finite(v) for v in imaging.rms_per_frame(denoised[d, bi], source)]
        out.append(info)
    return out


class DDIMInvTrajectoryPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DDIMInvTrajectoryPreview",
            display_name=DISPLAY,
            category=CATEGORY,
            description=(
                "Shows an inversion trajectory frame by frame: the noisy states and/or the model's x0 estimates, "
                "evenly spaced over the steps (both ends always included), with a scrubber, the step and sigma of "
                "each frame and a plot of the x0 drift from the source. For a Null-Text Inversion trajectory, "
                "what its optimised negative reconstructs is shown below the pivot, with the miss between them."
            ),
            is_output_node=True,
            inputs=[
                TRAJECTORY.Input("trajectory", tooltip="The DDIM_TRAJECTORY from DDIM Invert."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The model's VAE; needed only for decode=vae (full-resolution frames)."),
                io.Combo.Input("show", options=SHOW_MODES, default="states", optional=True,
                               tooltip="states = the latent at each noise level (source ... inverted noise); "
                                       "denoised = the model's x0 estimate at each step; both = side by side."),
                io.Int.Input("frames", default=8, min=2, max=MAX_FRAMES, optional=True,
                             tooltip="Maximum number of frames, evenly spaced; the first and last are always shown "
                                     "(more than the trajectory has shows every frame)."),
                io.Combo.Input("decode", options=DECODE_MODES, default="fast", optional=True,
                               tooltip="fast = ComfyUI's latent-to-RGB approximation (latent resolution, no VAE); "
                                       "vae = decode each frame with the connected VAE (slow, exact)."),
                io.Int.Input("batch_index", default=0, min=0, max=MAX_BATCH_INDEX, optional=True,
                             tooltip="Which image of the trajectory's batch to show (0 .. batch size - 1; any value "
                                     "outside the batch is this node's error, whether typed or connected)."),
                # last in the list: saved workflows' positional widget values stay aligned
                io.Int.Input("keep", default=KEEP_DEFAULT, min=2, max=MAX_FRAMES, optional=True,
                             tooltip="Video trajectories only: clip frames per strip, evenly spaced over the clip "
                                     "(first and last always; latent frames with decode=fast, decoded frames with "
                                     "decode=vae). Bounds the preview's size: a 5-second clip at 8 shows 8 of its "
                                     "81 frames per state."),
            ],
            outputs=[
                io.Image.Output("images", display_name="images", tooltip="One image per chosen frame (both: states "
                                                                         "left, x0 estimate right; a null-text "
                                                                         "trajectory: its reconstruction below)."),
            ],
        )

    @classmethod
    def execute(cls, trajectory, vae=None, show="states", frames=8, decode="fast", batch_index=0,
                keep=KEEP_DEFAULT) -> io.NodeOutput:
        with node_boundary(DISPLAY), torch.no_grad():
            return cls._run(trajectory, vae, show, frames, decode, batch_index, keep)

    @classmethod
    def _run(cls, trajectory, vae, show, frames, decode, batch_index, keep=KEEP_DEFAULT) -> io.NodeOutput:
        _check_inputs(trajectory, vae, show, frames, decode, batch_index, keep)
        states, denoised, sigmas = trajectory.states, trajectory.denoised, trajectory.sigmas
        bi = int(batch_index)
        rows = _frame_rows(trajectory, show, frames)
        video = states.ndim == 6
        render = _Renderer(vae, CV.latent_format_by_name(trajectory.latent_format), decode, keep, video)

        def pick(st, dn):   # the shown frames of (states, denoised), each stacked only when shown
            return (torch.stack([st[i, bi] for i, *_ in rows]) if show != "denoised" else None,
                    torch.stack([dn[d, bi] for *_, d in rows]) if show != "states" else None)
        rec = _reconstruction(trajectory)
        images = render.panel(show, *pick(states, denoised))
        if rec is not None:     # the reconstruction below the pivot
            images = torch.cat([images, render.panel(show, *pick(*rec))], dim=1)
        images = images.to(C.output_device()).contiguous()

        data = {
            "frames": _frame_info(rows, trajectory, bi, rec, video),
            "figure_name": FIGURE_NAME,
            "show": show,
            "method": str(trajectory.method),
            "steps": int(sigmas.shape[0]) - 1,
            "sigma_max": _finite(sigmas[-1]),
            "sigma_min": _finite(sigmas[0]),
        }
        if video:
            data["clip"] = render.clip
        if rec is not None:
            cfg = trajectory.optimized_negative.get("cfg")
            data["reconstruction"] = f"below: null-text reconstruction at cfg {float(cfg):g}"
        preview = ui.PreviewImage(images, cls=cls).as_dict()
        preview["ddim_trajectory"] = [data]
        return io.NodeOutput(images, ui=preview)


NODES = [DDIMInvTrajectoryPreview]
