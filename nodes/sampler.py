"""Inverted-Latent Sampler: the paired half of DDIM Invert (reconstruction and prompt edits)."""
from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..inversion import methods
from ..inversion.trajectory import Trajectory
from . import _comfy as C
from .types import TRAJECTORY

CATEGORY = "sampling/ddim_inversion"
log = logging.getLogger("ddim_inversion")


def check_trajectory(traj) -> None:
    need = ("sigmas", "states", "denoised", "method", "replay", "options")
    if traj is None or not all(hasattr(traj, k) for k in need):
        raise C.InversionInputError("trajectory is not a DDIM_TRAJECTORY; connect DDIM Invert's trajectory output")
    if traj.method not in methods.METHODS:
        raise C.InversionInputError(f"trajectory method {traj.method!r} is unknown to this version of the pack; re-run DDIM Invert")


def compatibility_warnings(model, traj) -> list:
    """Differences between the model and the one that made the trajectory (warn, do not fail)."""
    warns = []
    lf = type(C.latent_format(model)).__name__
    if traj.latent_format and lf != traj.latent_format:
        warns.append(f"latent format differs: trajectory {traj.latent_format}, model {lf}")
    ms = C.model_sampling_name(model)
    if traj.model_sampling and ms != traj.model_sampling:
        warns.append(f"model sampling differs: trajectory {traj.model_sampling}, model {ms}")
    fam = C.family_of(model)
    if traj.family and fam != traj.family:
        warns.append(f"model family differs: trajectory {traj.family}, model {fam} (the states will not match this model)")
    return warns


class DDIMInvSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DDIMInvSampler",
            display_name="Inverted-Latent Sampler",
            category=CATEGORY,
            description=(
                "Regenerates an image from a DDIM Invert trajectory with the sampler paired to its method "
                "(DDIM for ddim/implicit, the BDIA recurrence for exact), over the trajectory's exact schedule. "
                "Same model, prompt and cfg as the inversion reconstruct the source; another prompt or cfg edits it. "
                "A noise_mask recorded by DDIM Invert keeps everything outside the mask exactly as the source."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model; use the one that made the trajectory."),
                io.Conditioning.Input("positive", tooltip="Prompt to regenerate with: the source prompt reconstructs, another edits."),
                io.Conditioning.Input("negative", tooltip="Negative prompt; only used when cfg > 1."),
                TRAJECTORY.Input("trajectory", tooltip="The trajectory from DDIM Invert."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance while regenerating. The inversion's cfg reconstructs; a larger cfg strengthens an edit."),
                io.Int.Input("start_step", default=0, min=0, max=10000, optional=True,
                             tooltip="Skip this many sampling steps and start from the trajectory's state at that noise level: a later start keeps more of the source."),
                io.Combo.Input("correction", options=["none", "source_drift"], default="none", optional=True,
                               tooltip="source_drift: add back, every step, the gap between the stored inversion state and the same step re-run "
                                       "from the stored states with the source prompt (source_positive/negative, else positive/negative) at this cfg. "
                                       "The source stays pinned even when cfg differs from the inversion's; costs one more evaluation per step."),
                io.Combo.Input("exact_replay", options=["auto", "bdia", "ddim"], default="auto", optional=True,
                               tooltip="For 'exact' trajectories: bdia replays the exact recurrence (bit-exact reconstruction, but it "
                                       "overshoots under another prompt); ddim runs the plain DDIM sampler from the inverted noise "
                                       "(stable edits). auto = bdia when prompt and cfg equal the inversion's, else ddim."),
                io.Conditioning.Input("source_positive", optional=True,
                                      tooltip="source_drift only: the prompt the source was inverted with (default: positive)."),
                io.Conditioning.Input("source_negative", optional=True,
                                      tooltip="source_drift only: the source negative prompt (default: negative)."),
            ],
            outputs=[io.Latent.Output("latent", display_name="latent", tooltip="The regenerated latent (VAE space), ready for VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, trajectory, cfg, start_step=0, correction="none",
                exact_replay="auto", source_positive=None, source_negative=None) -> io.NodeOutput:
        check_trajectory(trajectory)
        traj: Trajectory = trajectory
        if traj.method == "exact":
            if exact_replay not in ("auto", "bdia", "ddim"):
                raise C.InversionInputError(f"exact_replay must be auto, bdia or ddim; got {exact_replay!r}")
            same = traj.extra.get("guidance_fingerprint") == C.guidance_fingerprint(positive, negative, cfg)
            if exact_replay == "ddim" or (exact_replay == "auto" and not same):
                traj = traj.with_(method="ddim")   # plain DDIM from the inverted noise (stable for edits)
        B = traj.batch_size
        C.check_conditioning(positive, B, "positive")
        C.check_conditioning(negative, B, "negative")
        want = getattr(C.latent_format(model), "latent_channels", None)
        if want is not None and traj.states.shape[2] != want:
            raise C.InversionInputError(
                f"the trajectory's latents have {traj.states.shape[2]} channels but this model uses {want}: "
                "connect the model that made the trajectory")
        if not (0 <= int(start_step) < traj.steps):
            raise C.InversionInputError(
                f"start_step must be in [0, {traj.steps - 1}] for this {traj.steps}-step trajectory; got {start_step}")
        if correction not in ("none", "source_drift"):
            raise C.InversionInputError(f"correction must be 'none' or 'source_drift'; got {correction!r}")
        warns = compatibility_warnings(model, traj)
        for w in warns:
            log.warning("Inverted-Latent Sampler: %s", w)
        shape = tuple(traj.states.shape[1:])
        sched = traj.sampling_sigmas()
        store = C.storage_device()
        drift = None
        if correction == "source_drift":
            sp = source_positive if source_positive is not None else positive
            sn = source_negative if source_negative is not None else negative
            C.check_conditioning(sp, B, "source_positive")
            C.check_conditioning(sn, B, "source_negative")

            def drift_loop(model_fn, device, progress):
                return methods.source_drift(traj, model_fn, start_step=int(start_step), progress=progress, device=device)

            drift = C.run_guided(model, sp, sn, cfg, shape, sched, drift_loop, total_steps=traj.steps)
        mask = None
        if traj.noise_mask is not None:
            mask = C.prepare_mask(traj.noise_mask, shape, C.compute_device(model))

        def loop(model_fn, device, progress):
            return methods.sample(traj, model_fn, start_step=int(start_step), drift=drift, mask=mask,
                                  progress=progress, device=device)

        x = C.run_guided(model, positive, negative, cfg, shape, sched, loop, total_steps=traj.steps - int(start_step))
        out = {"samples": C.to_vae_space(model, x).to(store)}
        if traj.noise_mask is not None:
            out["noise_mask"] = traj.noise_mask
        if traj.batch_index is not None:
            out["batch_index"] = list(traj.batch_index)
        if warns:
            return io.NodeOutput(out, ui=ui.PreviewText("WARNING: " + "; ".join(warns)))
        return io.NodeOutput(out)


NODES = [DDIMInvSampler]
