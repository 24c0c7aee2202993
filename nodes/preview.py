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
        states, denoised, sigmas = trajectory.states, trajectory.denoised, trajectory.sigmas
        n_steps = int(sigmas.shape[0]) - 1
        b = int(states.shape[1])
        if isinstance(batch_index, bool) or not isinstance(batch_index, numbers.Integral) or not 0 <= batch_index < b:
            raise InversionInputError(f"batch_index {batch_index!r} is out of range: the trajectory has {b} image(s); "
                                      f"use 0..{b - 1}")
        fmt = CV.latent_format_by_name(trajectory.latent_format)
        eval_sigmas = getattr(trajectory, "eval_sigmas", None)

        batch_index = int(batch_index)
        source = states[0, batch_index]
        # frame j -> (trajectory index, step, sigma, denoised index)
        if show == "denoised":
            idx = imaging.select_frames(n_steps, int(frames))
            rows = [(i, i, float(eval_sigmas[i]) if eval_sigmas is not None else float(sigmas[i + 1]), i) for i in idx]
        else:
            idx = imaging.select_frames(n_steps + 1, int(frames))
            rows = [(i, i, float(sigmas[i]), min(i, n_steps - 1)) for i in idx]

        st = torch.stack([states[i, batch_index] for i, *_ in rows]) if show != "denoised" else None
        dn = torch.stack([denoised[d, batch_index] for *_, d in rows]) if show != "states" else None
        rec = _reconstruction(trajectory)
        if rec is not None:
            r_states, r_denoised = rec
            rst = torch.stack([r_states[i, batch_index] for i, *_ in rows]) if show != "denoised" else None
            rdn = torch.stack([r_denoised[d, batch_index] for *_, d in rows]) if show != "states" else None

        video = states.ndim == 6
        clip = {}

        def render(lat):
            if video:
                return render_clip(lat)
            if decode == "vae":
                return CV.vae_decode_model_space(vae, fmt, lat)
            factors, bias, reshape = CV.rgb_factors(fmt)
            return imaging.fast_rgb(lat, factors, bias, reshape, type(fmt).__name__)

        def render_clip(lat):      # [K,C,T,H,W] -> [K,H,keep*W,3]: the kept clip frames side by side
            if decode == "vae":
                decoded = CV.vae_decode_clip(vae, fmt, lat)
                pick = imaging.select_frames(int(decoded.shape[1]), int(keep))
                clip.update(unit="frame", count=int(decoded.shape[1]), frames=pick)
                return imaging.strip(decoded[:, pick])
            factors, bias, reshape = CV.rgb_factors(fmt)
            k, c, t = lat.shape[:3]
            pick = imaging.select_frames(int(t), int(keep))
            clip.update(unit="latent frame", count=int(t), frames=pick)
            flat = lat[:, :, pick].movedim(2, 1).reshape(k * len(pick), c, *lat.shape[3:])
            rgb = imaging.fast_rgb(flat, factors, bias, reshape, type(fmt).__name__)
            return imaging.strip(rgb.reshape(k, len(pick), *rgb.shape[1:]))

        def panel(s_, d_):
            if show == "states":
                return render(s_)
            if show == "denoised":
                return render(d_)
            return torch.cat([render(s_), render(d_)], dim=2)

        images = panel(st, dn)
        if rec is not None:
            images = torch.cat([images, panel(rst, rdn)], dim=1)     # the reconstruction below the pivot
        images = images.to(C.output_device()).contiguous()

        frame_info = []
        for j, (i, step, sigma, d) in enumerate(rows):
            info = {"index": j, "step": int(step), "sigma": _finite(sigma),
                    "figure": _finite(imaging.rms(denoised[d, batch_index], source))}
            if rec is not None:   # state frame i: level i; denoised frame i: the level its step lands on
                info["miss"] = _finite(imaging.rms(r_states[i, batch_index], states[i, batch_index]))
            if video:             # the x0 drift of each latent frame of the clip
                info["figure_frames"] = [_finite(v) for v in imaging.rms_per_frame(denoised[d, batch_index], source)]
            frame_info.append(info)
        data = {
            "frames": frame_info,
            "figure_name": FIGURE_NAME,
            "show": show,
            "method": str(trajectory.method),
            "steps": n_steps,
            "sigma_max": _finite(sigmas[-1]),
            "sigma_min": _finite(sigmas[0]),
        }
        if video:
            data["clip"] = clip
        if rec is not None:
            cfg = trajectory.optimized_negative.get("cfg")
            data["reconstruction"] = f"below: null-text reconstruction at cfg {float(cfg):g}"
        preview = ui.PreviewImage(images, cls=cls).as_dict()
        preview["ddim_trajectory"] = [data]
        return io.NodeOutput(images, ui=preview)


NODES = [DDIMInvTrajectoryPreview]
