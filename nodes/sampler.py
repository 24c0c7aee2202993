"""Inverted-Latent Sampler: the paired half of DDIM Invert (reconstruction and prompt edits)."""
from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..inversion import checks
from ..inversion import experts as X
from ..inversion import regenerate as R
from ..inversion.errors import InversionInputError, node_boundary
from ..inversion.trajectory import Trajectory
from . import _comfy as C
from . import _comfy_attention as CA
from .types import ATTENTION_CONTROL, CATEGORY, TRAJECTORY

DISPLAY = "Inverted-Latent Sampler"
log = logging.getLogger("ddim_inversion")


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
                "A two-expert trajectory (Wan 2.2) needs the same pair: model_high_noise. "
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
                io.Combo.Input("correction", options=list(R.CORRECTIONS), default="none", optional=True,
                               tooltip="source_drift: add back, every step, the gap between the stored inversion "
                                       "state and the same step re-run from the stored states with the source prompt "
                                       "(source_positive, else positive) and the negative this sampler samples with "
                                       "(the trajectory's optimised negative under null_text auto, else "
                                       "source_negative, else negative) at this cfg. With the source prompt the "
                                       "source stays pinned at any cfg and start_step; costs one more evaluation per "
                                       "step."),
                io.Combo.Input("exact_replay", options=list(R.EXACT_REPLAYS), default="auto", optional=True,
                               tooltip="For 'exact' trajectories: bdia replays the exact recurrence (bit-exact "
                                       "reconstruction, but it "
                                       "overshoots under another prompt); ddim runs the plain DDIM sampler from the "
                                       "inverted noise "
                                       "(stable edits). auto = bdia when the model (weights, LoRA and other patches), "
                                       "prompts and "
                                       "cfg provably equal the inversion's, else ddim (a ControlNet or hook counts as "
                                       "different). "
                                       "A BDIA replay needs start_step <= steps-2."),
                io.Combo.Input("null_text", options=list(R.NULL_TEXT), default="auto", optional=True,
                               tooltip="auto: when the trajectory comes from Null-Text Inversion, sample with its "
                                       "optimised per-step negative in place of 'negative' (reconstruct with the "
                                       "source prompt, edit with another; use the cfg it was optimised for). "
                                       "off: always use 'negative'. With source_drift the source stays pinned at "
                                       "any cfg."),
                io.Conditioning.Input("source_positive", optional=True,
                                      tooltip="source_drift and attention_control: the prompt the source was "
                                              "inverted with (source_drift's default: positive; attention control "
                                              "needs it)."),
                io.Conditioning.Input("source_negative", optional=True,
                                      tooltip="source_drift and attention_control: the source negative prompt "
                                              "(default: negative). Ignored while the trajectory's optimised negative "
                                              "is used: the source branch then uses that one."),
                ATTENTION_CONTROL.Input("attention_control", optional=True,
                                        tooltip="From Attention Control: every step also evaluates the source "
                                                "branch (the stored state, source_positive) and injects its "
                                                "attention into the edit (p2p, pnp, masactrl on "
                                                "SD1.x/SD2/SDXL; v_inject, kv_edit on Flux, Chroma, SD3). Two "
                                                "evaluations per step."),
                io.Model.Input("model_high_noise", optional=True,
                               tooltip="Two experts (Wan 2.2 A14B): the high-noise model, when DDIM Invert ran "
                                       "with one ('model' is then the low-noise one). The switch is the "
                                       "trajectory's; regenerating runs the high-noise expert first. A trajectory "
                                       "of two experts needs both, connected as in DDIM Invert."),
                io.Float.Input("boundary", default=X.TRAJECTORY_SWITCH, min=0.0, max=1000.0, step=0.005,
                               round=False, optional=True,
                               tooltip="Two experts only: the sigma at which the high-noise expert takes over "
                                       "while regenerating (sigma >= boundary). 0 = the trajectory's own switch "
                                       "(DDIM Invert's boundary, Wan 2.2's by default), which reconstructs. "
                                       "Another boundary moving the switch to another step regenerates with "
                                       "the other expert on the steps in between: an edit, not a reconstruction "
                                       "(refused for the exact BDIA replay; source_drift still pins the source)."),
            ],
            outputs=[io.Latent.Output("latent", display_name="latent", tooltip="The regenerated latent (VAE space), "
                                                                               "ready for VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, trajectory, cfg, start_step=0, correction="none",
                exact_replay="auto", null_text="auto", source_positive=None,
                source_negative=None, attention_control=None, model_high_noise=None,
                boundary=X.TRAJECTORY_SWITCH) -> io.NodeOutput:
        with node_boundary(DISPLAY):
            return cls._run(model, trajectory, R.Prompts(positive, negative, source_positive, source_negative),
                            R.Choices(cfg=cfg, start_step=int(start_step), correction=correction,
                                      exact_replay=exact_replay, null_text=null_text), attention_control,
                            model_high_noise, boundary)

    @classmethod
    def _run(cls, model, traj: Trajectory, prompts: R.Prompts, choices: R.Choices,
             control=None, high=None, boundary=X.TRAJECTORY_SWITCH) -> io.NodeOutput:
        """Validate what depends on the model, ask the plan, run it, report. ``high``: the high-noise expert,
        ``boundary``: its switch (0: the trajectory's)."""
        checks.check_trajectory(traj)
        rec = X.check_record(traj.extra.get("experts"))
        sched = traj.sampling_sigmas()
        regen = X.regeneration_switch(sched, rec, boundary)
        pair_warns = X.check_pair(rec, C.model_id(model), None if high is None else C.model_id(high))
        if high is not None:
            C.check_experts(model, high)
            if control is not None:
                raise InversionInputError("attention_control does not run with two experts; disconnect "
                                          "attention_control (or regenerate with one model)")
        facts = C.latent_facts(model)
        if facts["channels"] is not None and traj.states.shape[2] != facts["channels"]:
            raise InversionInputError(
                f"the trajectory's latents have {traj.states.shape[2]} channels but this model uses "
                f"{facts['channels']}; connect the model that made the trajectory")
        if traj.states.ndim - 1 != 2 + facts["spatial_dims"]:
            raise InversionInputError(
                f"the trajectory's latents have shape {tuple(traj.states.shape[1:])} but this model "
                f"({facts['format']}) takes {2 + facts['spatial_dims']}-D latents; connect the model that made it")
        recorded = traj.extra.get("guidance_fingerprint")

        def same_guidance(negative) -> bool:
            now = C.guidance_fingerprint(model, prompts.positive, negative, choices.cfg)
            if rec is not None:
                now = X.pair_fingerprint(now, C.guidance_fingerprint(high, prompts.positive, negative, choices.cfg),
                                         rec["boundary"])
                if X.changed_steps(regen, R.run_steps(traj, "bdia", choices.start_step)):
                    return False     # another switch on a step the BDIA replay evaluates: another guidance
            return C.same_guidance(recorded, now)

        attention = None
        if control is not None:
            attention = R.Attention(control, tuple(CA.model_layers(model)), CA.chunks_that_run(model, choices.cfg),
                                    C.family_name(model))
        plan = R.plan(traj, choices, prompts, same_guidance, attention)
        switch_notes = X.check_regeneration(regen, plan.replay, R.run_steps(traj, plan.replay, plan.start_step),
                                            plan.drift is not None)
        warns = list(plan.warnings) + C.compatibility_warnings(model, traj) + pair_warns
        for w in warns:
            log.warning("%s: %s", DISPLAY, w)
        mask, mask_note = checks.check_mask(traj.noise_mask, traj.states.shape[1:], "the trajectory's noise_mask")
        if mask_note:
            warns.append(mask_note)
        shape = tuple(traj.states.shape[1:])

        def guided(positive, negative, loop, steps, label):
            name = DISPLAY + (f" ({label})" if label else "")
            if rec is None:
                return C.run_guided(model, positive, negative, plan.cfg, shape, sched, loop, steps=steps, label=name)
            return C.run_experts({X.LOW: model, X.HIGH: high}, positive, negative, plan.cfg, shape, sched, loop,
                                 steps, name, regen.boundary,
                                 first=X.expert_of(float(sched[plan.start_step]), regen.boundary))

        ctl = _controller(plan, model, shape)

        def controlled(edit, source, loop, steps, label):
            return CA.run_controlled(model, (edit.positive, edit.negative), (source.positive, source.negative),
                                     plan.cfg, shape, sched, loop, steps, f"{DISPLAY} ({label})", ctl,
                                     attention.layers)

        x = R.run(plan, traj, guided, None if mask is None else C.prepare_mask(mask, shape, model), controlled)
        where = R.describe(plan, traj)
        fix = ("the BDIA recurrence amplifies a gamma < 1 or another guidance: use exact_replay=ddim, or invert with "
               "gamma 1.0" if plan.replay == "bdia" else "lower cfg, or check the model and the trajectory")
        checks.check_finite_result(x, f"the regenerated latent ({where})", fix)
        out = {"samples": C.to_vae_space(model, x).to(C.output_device())}
        if mask is not None:
            out["noise_mask"] = mask
        if traj.batch_index is not None:
            out["batch_index"] = list(traj.batch_index)
        lines = [f"{DISPLAY}: {where}, from start_step {plan.start_step} of {traj.steps}"
                 + (", source_drift" if plan.drift is not None else "")]
        if rec is not None:
            lines.append(X.describe({**rec, "boundary": regen.boundary, "switch_step": regen.step}, traj.steps))
        lines += switch_notes
        if ctl is not None:
            lines.append(plan.attention.describe() + f"; done: {ctl.totals['records']} records, "
                         f"{ctl.totals['injections']} injections")
        lines += list(plan.notes) + ["WARNING: " + w for w in warns]
        return io.NodeOutput(out, ui=ui.PreviewText("\n".join(lines)))


def _controller(plan: R.Plan, model, shape):
    """The adapter's controller of an attention plan (None without one): the alignment, the blend words'
    columns and a blend MASK resized to the latent."""
    ap = plan.attention
    if ap is None:
        return None
    mask = None
    if ap.control.mask is not None:
        m = ap.control.mask
        mask = C.prepare_mask(m.reshape((-1,) + tuple(m.shape[-2:])), shape, model)
    return CA.Controller(ap.control, ap.schedule, ap.alignment, ap.blend_cols, mask, ap.source_runs)


NODES = [DDIMInvSampler]
