"""Trajectory Preview: look at a DDIM_TRAJECTORY step by step.

Frames are chosen evenly over the trajectory, always including both ends (the source latent and the
inverted noise for ``states``; the first and last step's x0 estimate for ``denoised``).

The per-step figure sent to the in-node viewer (``figure_name`` = "x0 drift (RMS)") is the root-mean-square
difference, in model space, between the x0 estimate associated with the frame and the source latent
``states[0]`` (batch item shown only). A state frame ``i`` is associated with ``denoised[min(i, N-1)]``, the
estimate of the step that leaves it (the last state uses the last step's estimate). It is 0 for a perfect
denoiser at low noise and grows as the model's notion of the clean image drifts away from the source,
which is where an inversion starts to lose fidelity.
"""
from __future__ import annotations

import math

import torch
from comfy_api.latest import io, ui

SHOW_MODES = ["states", "denoised", "both"]
DECODE_MODES = ["fast", "vae"]
FIGURE_NAME = "x0 drift (RMS)"
TRAJECTORY = io.Custom("DDIM_TRAJECTORY")


def select_frames(count: int, frames: int) -> list[int]:
    """Up to ``frames`` indices in [0, count), evenly spaced, always including 0 and count-1, ascending, unique."""
    if count <= 0:
        return []
    if count == 1:
        return [0]
    k = max(2, min(int(frames), count))
    out = sorted({int(round(j * (count - 1) / (k - 1))) for j in range(k)})
    return out


def _finite(x: float):
    x = float(x)
    return x if math.isfinite(x) else None


def latent_format_for(name: str):
    """The comfy.latent_formats class instance named by the trajectory, or a ValueError naming the fix."""
    import comfy.latent_formats as lf
    cls = getattr(lf, name, None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, lf.LatentFormat)):
        raise ValueError(f"Trajectory Preview: the trajectory's latent_format '{name}' is not a latent format this "
                         "ComfyUI knows; re-run DDIM Invert with this ComfyUI (it records the model's latent format), "
                         "or update ComfyUI.")
    return cls()


def _spatial(x: torch.Tensor) -> torch.Tensor:
    """[C,H,W] or [C,T,H,W] (video) -> [C,H,W] (first frame)."""
    return x[:, 0] if x.ndim == 4 else x


def fast_decode(latents: torch.Tensor, fmt) -> torch.Tensor:
    """Model-space latents [K,C,H,W] -> [K,h,w,3] in [0,1] with the format's latent_rgb_factors (+ bias),
    as ComfyUI's Latent2RGB previewer does."""
    if fmt.latent_rgb_factors is None:
        raise ValueError(f"Trajectory Preview: latent format {type(fmt).__name__} has no fast RGB factors; "
                         "set decode=vae and connect the model's VAE.")
    x = latents.float()
    if x.ndim == 5:
        x = x[:, :, 0]
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=x.dtype, device=x.device).transpose(0, 1)  # [3, C]
    bias = None
    if fmt.latent_rgb_factors_bias is not None:
        bias = torch.tensor(fmt.latent_rgb_factors_bias, dtype=x.dtype, device=x.device)
    if fmt.latent_rgb_factors_reshape is not None:
        x = fmt.latent_rgb_factors_reshape(x)
    if x.shape[1] != factors.shape[1]:
        raise ValueError(f"Trajectory Preview: the trajectory has {x.shape[1]} latent channels but "
                         f"{type(fmt).__name__}'s RGB factors expect {factors.shape[1]}; set decode=vae.")
    rgb = torch.nn.functional.linear(x.movedim(1, -1), factors, bias=bias)
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


def vae_decode(latents: torch.Tensor, fmt, vae) -> torch.Tensor:
    """Model-space latents [K,C,...] -> [K,H,W,3] via vae.decode(process_out(latent))."""
    out = vae.decode(fmt.process_out(latents.float()))
    if out.ndim == 5:  # video VAE: [K,T,H,W,3] -> first frame
        out = out[:, 0]
    return out.float().clamp(0.0, 1.0)


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((a.float() - b.float()) ** 2)))


class DDIMInvTrajectoryPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DDIMInvTrajectoryPreview",
            display_name="Trajectory Preview",
            category="sampling/ddim_inversion",
            description=(
                "Shows an inversion trajectory frame by frame: the noisy states and/or the model's x0 estimates, "
                "evenly spaced over the steps (both ends always included), with a scrubber, the step and sigma of "
                "each frame and a plot of the x0 drift from the source."
            ),
            is_output_node=True,
            inputs=[
                TRAJECTORY.Input("trajectory", tooltip="The DDIM_TRAJECTORY from DDIM Invert."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The model's VAE; needed only for decode=vae (full-resolution frames)."),
                io.Combo.Input("show", options=SHOW_MODES, default="states", optional=True,
                               tooltip="states = the latent at each noise level (source ... inverted noise); "
                                       "denoised = the model's x0 estimate at each step; both = side by side."),
                io.Int.Input("frames", default=8, min=2, max=256, optional=True,
                             tooltip="Maximum number of frames, evenly spaced; the first and last are always shown."),
                io.Combo.Input("decode", options=DECODE_MODES, default="fast", optional=True,
                               tooltip="fast = ComfyUI's latent-to-RGB approximation (latent resolution, no VAE); "
                                       "vae = decode each frame with the connected VAE (slow, exact)."),
                io.Int.Input("batch_index", default=0, min=0, max=4095, optional=True,
                             tooltip="Which image of the trajectory's batch to show."),
            ],
            outputs=[
                io.Image.Output("images", display_name="images", tooltip="One image per chosen frame (both: states left, x0 estimate right)."),
            ],
        )

    @classmethod
    def execute(cls, trajectory, vae=None, show="states", frames=8, decode="fast", batch_index=0) -> io.NodeOutput:
        import comfy.model_management
        if trajectory is None or not hasattr(trajectory, "states") or not hasattr(trajectory, "sigmas"):
            raise ValueError("Trajectory Preview: 'trajectory' is not a DDIM_TRAJECTORY; connect the trajectory "
                             "output of DDIM Invert.")
        if show not in SHOW_MODES:
            raise ValueError(f"Trajectory Preview: unknown show '{show}'; use one of {', '.join(SHOW_MODES)}.")
        if decode not in DECODE_MODES:
            raise ValueError(f"Trajectory Preview: unknown decode '{decode}'; use one of {', '.join(DECODE_MODES)}.")
        if decode == "vae" and vae is None:
            raise ValueError("Trajectory Preview: decode=vae needs a VAE; connect the model's VAE to the 'vae' input "
                             "or set decode=fast.")
        states, denoised, sigmas = trajectory.states, trajectory.denoised, trajectory.sigmas
        n_steps = int(sigmas.shape[0]) - 1
        if states.shape[0] != n_steps + 1 or n_steps < 1 or denoised.shape[0] != n_steps:
            raise ValueError(f"Trajectory Preview: malformed trajectory (states {tuple(states.shape)}, denoised "
                             f"{tuple(denoised.shape)}, {n_steps + 1} sigmas); re-run DDIM Invert.")
        b = int(states.shape[1])
        if not 0 <= batch_index < b:
            raise ValueError(f"Trajectory Preview: batch_index {batch_index} is out of range; the trajectory has "
                             f"{b} image(s), so use 0..{b - 1}.")
        fmt = latent_format_for(trajectory.latent_format)
        eval_sigmas = getattr(trajectory, "eval_sigmas", None)

        source = states[0, batch_index]
        # frame j -> (trajectory index, step, sigma, denoised index)
        if show == "denoised":
            idx = select_frames(n_steps, frames)
            rows = [(i, i, float(eval_sigmas[i]) if eval_sigmas is not None else float(sigmas[i + 1]), i) for i in idx]
        else:
            idx = select_frames(n_steps + 1, frames)
            rows = [(i, i, float(sigmas[i]), min(i, n_steps - 1)) for i in idx]

        st = torch.stack([states[i, batch_index] for i, *_ in rows]) if show != "denoised" else None
        dn = torch.stack([denoised[d, batch_index] for *_, d in rows]) if show != "states" else None

        def render(lat):
            return vae_decode(lat, fmt, vae) if decode == "vae" else fast_decode(lat, fmt)

        if show == "states":
            images = render(st)
        elif show == "denoised":
            images = render(dn)
        else:
            images = torch.cat([render(st), render(dn)], dim=2)
        images = images.to(comfy.model_management.intermediate_device()).contiguous()

        frame_info = []
        for j, (i, step, sigma, d) in enumerate(rows):
            frame_info.append({"index": j, "step": int(step), "sigma": _finite(sigma),
                               "figure": _finite(_rms(denoised[d, batch_index], source))})
        data = {
            "frames": frame_info,
            "figure_name": FIGURE_NAME,
            "show": show,
            "method": str(trajectory.method),
            "steps": n_steps,
            "sigma_max": _finite(sigmas[-1]),
            "sigma_min": _finite(sigmas[0]),
        }
        preview = ui.PreviewImage(images, cls=cls).as_dict()
        preview["ddim_trajectory"] = [data]
        return io.NodeOutput(images, ui=preview)


NODES = [DDIMInvTrajectoryPreview]
