"""Inverted-Latent Sampler: the paired half of DDIM Invert (reconstruction and prompt edits)."""
from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..inversion import checks, methods
from ..inversion.errors import InversionInputError, node_boundary
from ..inversion.trajectory import Trajectory
from . import _comfy as C
from .types import CATEGORY, TRAJECTORY

DISPLAY = "Inverted-Latent Sampler"
CORRECTIONS = ("none", "source_drift")
EXACT_REPLAYS = ("auto", "bdia", "ddim")
NULL_TEXT = ("auto", "off")
log = logging.getLogger("ddim_inversion")


def compatibility_warnings(model, traj) -> list:
    """Differences between the model and the one that made the trajectory (warn, do not fail).

    Model sampling is compared by what decides the noise schedule -- the prediction type and the sigma table
    -- not by class name (core ModelSamplingDiscrete wraps the same EPS sampling in a new class)."""
    warns = []
    fmt = C.latent_facts(model)["format"]
    if traj.latent_format and fmt != traj.latent_format:
        warns.append(f"latent format differs: trajectory {traj.latent_format}, model {fmt}")
    rec = getattr(traj, "sampling", None) or {}
    if rec:
        now = C.sampling_facts(model)
        if rec.get("prediction") != now.get("prediction"):
            warns.append(f"model sampling differs: trajectory {rec.get('prediction')} prediction, model "
                         f"{now.get('prediction')}")
        elif rec.get("table") != now.get("table"):
            warns.append(f"model sampling differs: another sigma table (trajectory sigma {rec.get('sigma_min', 0):.4g}"
                         f"..{rec.get('sigma_max', 0):.4g}, model {now['sigma_min']:.4g}..{now['sigma_max']:.4g}; "
                         "e.g. another shift)")
    fam = C.family_of(model)
    if traj.family and fam != traj.family:
        warns.append(f"model family differs: trajectory {traj.family}, model {fam} (the states will not match this "
                     "model)")
    return warns


class DDIMInvSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DDIMInvSampler",
            display_name=DISPLAY,
            category=CATEGORY,
            description=(
                "Regenerates an image from a DDIM Invert trajectory with the sampler paired to its method "
                "(DDIM for ddim/implicit, the BDIA recurrence for exact), over the trajectory's exact schedule. "
                "Same model, prompt and cfg as the inversion reconstruct the source; another prompt or cfg edits it. "
                "A noise_mask recorded by DDIM Invert keeps everything outside the mask exactly as the source. "
                "Its text output says which replay ran and warns when the model differs from the inversion's."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model; use the one that made the trajectory."),
                io.Conditioning.Input("positive", tooltip="Prompt to regenerate with: the source prompt reconstructs, "
                                                          "another edits."),
                io.Conditioning.Input("negative", tooltip="Negative prompt; only used when cfg > 1."),
                TRAJECTORY.Input("trajectory", tooltip="The trajectory from DDIM Invert."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance while regenerating. The inversion's cfg reconstructs; a larger cfg "
                                       "strengthens an edit."),
                io.Int.Input("start_step", default=0, min=0, max=10000, optional=True,
                             tooltip="Skip this many sampling steps and start from the trajectory's state at that "
                                     "noise level: a later start keeps more of the source."),
                io.Combo.Input("correction", options=list(CORRECTIONS), default="none", optional=True,
                               tooltip="source_drift: add back, every step, the gap between the stored inversion "
                                       "state and the same step re-run "
                                       "from the stored states with the source prompt (source_positive/negative, else "
                                       "positive/negative) at this cfg. "
                                       "The source stays pinned even when cfg differs from the inversion's; costs one "
                                       "more evaluation per step."),
                io.Combo.Input("exact_replay", options=list(EXACT_REPLAYS), default="auto", optional=True,
                               tooltip="For 'exact' trajectories: bdia replays the exact recurrence (bit-exact "
                                       "reconstruction, but it "
                                       "overshoots under another prompt); ddim runs the plain DDIM sampler from the "
                                       "inverted noise "
                                       "(stable edits). auto = bdia when the model (weights, LoRA and other patches), "
                                       "prompts and "
                                       "cfg provably equal the inversion's, else ddim (a ControlNet or hook counts as "
                                       "different). "
                                       "A BDIA replay needs start_step <= steps-2."),
                io.Combo.Input("null_text", options=list(NULL_TEXT), default="auto", optional=True,
                               tooltip="auto: when the trajectory comes from Null-Text Inversion, sample with its "
                                       "optimised per-step negative in place of 'negative' (reconstruct with the "
                                       "source prompt, edit with another; use the cfg it was optimised for). "
                                       "off: always use 'negative'."),
                io.Conditioning.Input("source_positive", optional=True,
                                      tooltip="source_drift only: the prompt the source was inverted with (default: "
                                              "positive)."),
                io.Conditioning.Input("source_negative", optional=True,
                                      tooltip="source_drift only: the source negative prompt (default: negative)."),
            ],
            outputs=[io.Latent.Output("latent", display_name="latent", tooltip="The regenerated latent (VAE space), "
                                                                               "ready for VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, trajectory, cfg, start_step=0, correction="none",
                exact_replay="auto", null_text="auto", source_positive=None,
                source_negative=None) -> io.NodeOutput:
        with node_boundary(DISPLAY):
            return cls._run(model, positive, negative, trajectory, cfg, start_step, correction, exact_replay,
                            null_text, source_positive, source_negative)

    @classmethod
    def _run(cls, model, positive, negative, trajectory, cfg, start_step, correction, exact_replay, null_text,
             source_positive, source_negative) -> io.NodeOutput:
        checks.check_trajectory(trajectory)
        traj: Trajectory = trajectory
        cfg = checks.check_cfg(cfg)
        B, N, k = traj.batch_size, traj.steps, int(start_step)
        checks.check_conditioning(positive, B, "positive")
        checks.check_conditioning(negative, B, "negative")
        facts = C.latent_facts(model)
        if facts["channels"] is not None and traj.states.shape[2] != facts["channels"]:
            raise InversionInputError(
                f"the trajectory's latents have {traj.states.shape[2]} channels but this model uses "
                f"{facts['channels']}; connect the model that made the trajectory")
        if traj.states.ndim - 1 != 2 + facts["spatial_dims"]:
            raise InversionInputError(
                f"the trajectory's latents have shape {tuple(traj.states.shape[1:])} but this model "
                f"({facts['format']}) takes {2 + facts['spatial_dims']}-D latents; connect the model that made it")
        if not (0 <= k < N):
            raise InversionInputError(f"start_step must be in [0, {N - 1}] for this {N}-step trajectory (got "
                                      f"{start_step}); choose a step inside the trajectory")
        if correction not in CORRECTIONS:
            raise InversionInputError(f"correction {correction!r} is unknown; use one of {', '.join(CORRECTIONS)}")
        if exact_replay not in EXACT_REPLAYS:
            raise InversionInputError(f"exact_replay {exact_replay!r} is unknown; use one of "
                                      f"{', '.join(EXACT_REPLAYS)}")
        if null_text not in NULL_TEXT:
            raise InversionInputError(f"null_text {null_text!r} is unknown; use one of {', '.join(NULL_TEXT)}")
        notes = []
        optimized = traj.optimized_negative if null_text == "auto" else None
        if optimized is not None:
            if source_negative is None and correction == "source_drift":
                source_negative = negative  # source_drift keeps the plain source pair unless told otherwise
            negative = optimized["conditioning"]
            checks.check_conditioning(negative, B, "the trajectory's optimised negative")
            how = "null-text" if optimized["mode"] == "null_text" else "negative-prompt"
            notes.append(f"negative: the trajectory's {how} negative ({len(negative)} entries)")
            if optimized.get("cfg") is not None and abs(float(optimized["cfg"]) - cfg) > 1e-6:
                notes.append(f"WARNING: the negative was optimised for cfg {optimized['cfg']:g}; at cfg {cfg:g} "
                             "the sampler does not retrace the pivot")
        replay = "ddim"
        if traj.method == "exact":
            if exact_replay == "auto":
                same = C.same_guidance(traj.extra.get("guidance_fingerprint"),
                                       C.guidance_fingerprint(model, positive, negative, cfg))
                replay = "bdia" if same else "ddim"
                why = "the inversion's model, prompts and cfg" if same else "guidance differs from the inversion's"
                if same and methods.bdia_steps(traj, k) < 1:
                    replay = "ddim"
                    why = f"start_step {k} leaves no BDIA step: one plain DDIM step from the stored state"
                notes.append(f"exact_replay auto -> {replay} ({why})")
            else:
                replay = exact_replay    # an explicit bdia with no step left is refused by methods.sample
        warns = compatibility_warnings(model, traj)
        for w in warns:
            log.warning("%s: %s", DISPLAY, w)
        mask, mask_note = checks.check_mask(traj.noise_mask, traj.states.shape[1:], "the trajectory's noise_mask")
        if mask_note:
            warns.append(mask_note)
        shape = tuple(traj.states.shape[1:])
        sched = traj.sampling_sigmas()
        store = C.output_device()
        # validate the plan (start_step, replay) before any model evaluation
        methods.check_replay(traj, replay, k)
        drift = None
        if correction == "source_drift":
            sp = source_positive if source_positive is not None else positive
            sn = source_negative if source_negative is not None else negative
            checks.check_conditioning(sp, B, "source_positive")
            checks.check_conditioning(sn, B, "source_negative")

            def drift_loop(model_fn, device, progress):
                return methods.source_drift(traj, model_fn, replay=replay, start_step=k, progress=progress,
                                            device=device)

            drift = C.run_guided(model, sp, sn, cfg, shape, sched, drift_loop, steps=N - k,
                                 label=DISPLAY + " (source_drift)")
        prepared = None if mask is None else C.prepare_mask(mask, shape, model)

        def loop(model_fn, device, progress):
            return methods.sample(traj, model_fn, replay=replay, start_step=k, drift=drift, mask=prepared,
                                  progress=progress, device=device)

        steps_run = methods.bdia_steps(traj, k) if replay == "bdia" else N - k
        x = C.run_guided(model, positive, negative, cfg, shape, sched, loop, steps=steps_run, label=DISPLAY)
        gamma = float(traj.options.get("gamma", 1.0))
        where = f"replay {replay}, {steps_run} steps, cfg {cfg:g}" + (f", gamma {gamma:g}" if replay == "bdia" else "")
        fix = ("the BDIA recurrence amplifies a gamma < 1 or another guidance: use exact_replay=ddim, or invert with "
               "gamma 1.0" if replay == "bdia" else "lower cfg, or check the model and the trajectory")
        checks.check_finite_result(x, f"the regenerated latent ({where})", fix)
        out = {"samples": C.to_vae_space(model, x).to(store)}
        if mask is not None:
            out["noise_mask"] = mask
        if traj.batch_index is not None:
            out["batch_index"] = list(traj.batch_index)
        lines = [f"{DISPLAY}: {where}, from start_step {k} of {N}" + (", source_drift" if drift is not None else "")]
        lines += notes + ["WARNING: " + w for w in warns]
        return io.NodeOutput(out, ui=ui.PreviewText("\n".join(lines)))


NODES = [DDIMInvSampler]
