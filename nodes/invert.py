"""DDIM Invert: image latent -> inverted noise, a core NOISE object and the recorded trajectory."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..inversion import checks, implicit, methods, schedule
from ..inversion import experts as X
from ..inversion.errors import InversionInputError, node_boundary
from . import _comfy as C
from .types import CATEGORY, TRAJECTORY

DISPLAY = "DDIM Invert"
WORST_EVALS = implicit.RUN_BUDGET_FACTOR   # implicit: at most this x steps x max_iters evaluations per sample


def _implicit_text(traj) -> str:
    o = traj.options
    per = traj.nfe / max(1, traj.steps)
    txt = (f"implicit: {traj.nfe} evaluations ({per:.1f}/step, most in one step {max(traj.nfe_per_step)}; budget "
           f"{o['budget_per_sample']} per sample), max residual {o['max_residual']:.2g} (tolerance {o['tolerance']:g})")
    if o.get("steps_unsolved"):
        why = ("a strong cfg folds some steps; use more steps, a lower cfg, or more restarts/max_iters"
               if traj.cfg > 1 else "the solver's budget is too small; use more restarts/max_iters, or more steps")
        txt += f"; {o['steps_unsolved']} of {traj.steps} steps unsolved (residual above 10 x tolerance: {why})"
    elif o["steps_above_tolerance"]:
        txt += (f"; {o['steps_above_tolerance']} of {traj.steps} steps ended within 10 x tolerance, at float32's "
                "precision for these values")
    return txt


def _non_finite_fix(method: str, gamma: float) -> str:
    if method == "exact" and gamma < 1:
        return ("BDIA with gamma < 1 divides by gamma at every step and overflows over many steps: use gamma 1.0 "
                "(exact and stable) or fewer steps")
    return "lower cfg or the number of steps, or check the model and the latent (its scale, its VAE)"


class DDIMInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DDIMInvert",
            display_name=DISPLAY,
            category=CATEGORY,
            description=(
                "Runs the deterministic DDIM sampler backwards from an image latent to the noise that "
                "regenerates it, over exactly the sigmas a sampler with the same steps/scheduler uses. "
                "Methods: ddim (1 evaluation/step), implicit (exact inverse of each DDIM step by a "
                "safeguarded fixed-point solve, a few evaluations/step), exact (BDIA-DDIM: bit-for-bit round trip "
                "at any CFG, 1 evaluation/step; regenerate with Inverted-Latent Sampler). Works for EPS, "
                "V-prediction and flow (SD3/Flux) models, and Wan 2.2's two experts (model_high_noise). Its text "
                "output reports the evaluations used."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (LoRAs, patches and ControlNets apply)."),
                io.Conditioning.Input("positive", tooltip="Prompt describing the source image (the inversion's "
                                                          "condition)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt; only used when cfg > 1."),
                io.Latent.Input("latent", tooltip="The image latent in VAE space, e.g. from VAE Encode (Inversion). A "
                                                  "noise_mask is recorded in the trajectory (values clamped to 0..1) "
                                                  "for the Inverted-Latent Sampler; noise_latent does not carry it."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Sampling steps of the schedule to invert; regenerate with the same number."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance while inverting. 1.0 = one evaluation per step (the usual choice); "
                                       "with 'exact' any value round-trips exactly when regenerated with the same "
                                       "cfg."),
                io.Combo.Input("scheduler", options=C.scheduler_names(), default="ddim_uniform",
                               tooltip="ComfyUI scheduler that makes the sigmas (ignored when 'sigmas' is connected). "
                                       "Its output is checked like a connected schedule (e.g. kl_optimal at 1 step "
                                       "makes NaN sigmas: choose another scheduler or more steps)."),
                io.Combo.Input("method", options=list(methods.METHODS), default="ddim",
                               tooltip="ddim: classic inversion, 1 evaluation/step. implicit: solves each step so the "
                                       "DDIM sampler retraces it (a few evaluations/step, near-exact). exact: "
                                       "BDIA-DDIM, "
                                       "exact round trip with the Inverted-Latent Sampler, 1 evaluation/step."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Optional sampling schedule (descending, as BasicScheduler emits). Overrides "
                                        "steps/scheduler. Do not flip it. Flow models need every sigma <= 1."),
                io.Int.Input("start_step", default=0, min=0, max=10000, optional=True,
                             tooltip="Partial inversion (SDEdit-style): stop at the noise level of this sampling step. "
                                     "Regenerate with KSamplerAdvanced start_at_step = this value."),
                io.Int.Input("end_step", default=10000, min=1, max=10000, optional=True,
                             tooltip="Sampling step at which the source latent sits (10000 = the end: a clean image)."),
                io.Combo.Input("eval_sigma", options=list(methods.EVAL_SIGMAS), default="auto", optional=True,
                               tooltip="ddim: where each step evaluates the model. predicted (auto): at the next "
                                       "noise level, on the state "
                                       "the previous step's slope predicts (1 evaluation/step, 5-10x more accurate at "
                                       "50 steps). "
                                       "destination: at the next level on the current input (prompt-to-prompt). "
                                       "current: at the "
                                       "current level (Song et al.)."),
                io.Float.Input("tolerance", default=1e-6, min=1e-12, max=0.1, step=1e-7, round=False, optional=True,
                               tooltip="implicit only: a step is solved when the regenerating step misses by less than "
                                       "this (relative RMS). Below ~1e-7 float32 cannot get there."),
                io.Int.Input("max_iters", default=30, min=1, max=500, optional=True,
                             tooltip="implicit only: most model evaluations of one solve attempt. Worst case of a "
                                     f"whole inversion: {WORST_EVALS} x steps x max_iters evaluations (each two "
                                     "forwards when cfg != 1); a step that stalls spends what earlier steps left "
                                     "unused; typical: 3-5 per step at cfg 1."),
                io.Int.Input("restarts", default=6, min=0, max=64, optional=True,
                             tooltip="implicit only: extra attempts for a step whose first solve stalls (strong "
                                     "guidance "
                                     "can fold a step's map; a preimage often exists across the fold), within the "
                                     "budget of max_iters. 0 = first solve only."),
                io.Float.Input("damping", default=1.0, min=0.01, max=1.0, step=0.01, optional=True,
                               tooltip="implicit only: initial fixed-point mixing; halved for a sample whenever an "
                                       "iterate does not improve."),
                io.Float.Input("gamma", default=1.0, min=0.05, max=1.0, step=0.05, optional=True,
                               tooltip="exact only: BDIA gamma. 1.0 is the exact, stable choice; smaller values "
                                       "divide by "
                                       "gamma while inverting and overflow at many steps (reported as an error)."),
                io.Model.Input("model_high_noise", optional=True,
                               tooltip="Two experts (Wan 2.2 A14B): the high-noise model; 'model' is then the "
                                       "low-noise one. Steps whose sampling level is at or above 'boundary' use "
                                       "this model, the others 'model' (inverting: low-noise first). Regenerate "
                                       "with the same pair on the Inverted-Latent Sampler, or feed 'noise' to the "
                                       "two-sampler workflow (the text output names the switch step)."),
                io.Float.Input("boundary", default=X.DEFAULT_BOUNDARY, min=0.001, max=1000.0, step=0.005,
                               round=False, optional=True,
                               tooltip="Two experts only: the sigma at which the high-noise expert takes over "
                                       f"(sigma >= boundary). Wan 2.2's own: {X.WAN22_BOUNDARY['t2v']} text-to-"
                                       f"video, {X.WAN22_BOUNDARY['i2v']} image-to-video (flow sigma = "
                                       "timestep / 1000)."),
            ],
            outputs=[
                io.Latent.Output("noise_latent", display_name="noise_latent", tooltip="The inverted noise as a LATENT "
                                                                                      "(VAE space, no noise_mask). On "
                                                                                      "EPS/V models KSamplerAdvanced "
                                                                                      "with add_noise disabled and "
                                                                                      "the same steps/scheduler "
                                                                                      "regenerates the image."),
                io.Noise.Output("noise", display_name="noise", tooltip="A NOISE for SamplerCustomAdvanced: it yields "
                                                                       "exactly the inverted state for this model's "
                                                                       "noise scaling (flow models included)."),
                TRAJECTORY.Output("trajectory", display_name="trajectory", tooltip="Every state and x0 estimate of "
                                                                                   "the inversion, its schedule and "
                                                                                   "method: feed Inverted-Latent "
                                                                                   "Sampler and Trajectory Preview."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, steps, cfg, scheduler, method, sigmas=None,
                start_step=0, end_step=10000, eval_sigma="auto", tolerance=1e-6, max_iters=30, restarts=6,
                damping=1.0, gamma=1.0, model_high_noise=None, boundary=X.DEFAULT_BOUNDARY) -> io.NodeOutput:
        with node_boundary(DISPLAY):
            opts = methods.Options(method=method, eval_sigma=eval_sigma, tolerance=float(tolerance),
                                   max_iters=int(max_iters), damping=float(damping), gamma=float(gamma),
                                   restarts=int(restarts)).check()
            family = C.family_of(model)  # probed once per call: refuses a refused family or sampling first
            pair = None
            if model_high_noise is not None:
                C.check_experts(model, model_high_noise)
                pair = (model_high_noise, float(boundary), int(start_step))
            seg = cls._schedule(model, family, steps, scheduler, sigmas, int(start_step), int(end_step))
            return cls._run(model, family, positive, negative, latent, cfg, seg, opts, pair)

    @classmethod
    def _schedule(cls, model, family: str, steps, scheduler, sigmas, start_step: int, end_step: int):
        """The checked sampling segment to invert: the connected sigmas, else (scheduler, steps)."""
        if int(steps) < 1:
            raise InversionInputError(f"steps must be >= 1 (got {steps}); set steps to 1 or more")
        if sigmas is not None:
            full = schedule.check_sampling_sigmas(sigmas, family=family)
        else:
            full = schedule.check_sampling_sigmas(
                C.sampling_sigmas(model, scheduler, steps), family=family,
                source=f"the {scheduler} scheduler at {int(steps)} step{'s' if int(steps) != 1 else ''}")
        return schedule.segment(full, start_step, end_step)

    @classmethod
    def _run(cls, model, family: str, positive, negative, latent, cfg, seg, opts: methods.Options,
             pair=None) -> io.NodeOutput:
        """``pair``: (the high-noise expert, the boundary, start_step) with two experts, else None."""
        method = opts.method
        facts = C.latent_facts(model, family_checked=True)
        samples = checks.check_latent(latent, channels=facts["channels"], spatial_dims=facts["spatial_dims"],
                                      format_name=facts["format"])
        mask, mask_note = checks.check_mask(latent.get("noise_mask"), samples.shape)
        B = int(samples.shape[0])
        checks.check_conditioning(positive, B, "positive")
        checks.check_conditioning(negative, B, "negative")
        cfg = checks.check_cfg(cfg)
        asc = schedule.inversion_order(seg)
        cin = C.input_scale(model)
        x0 = C.to_model_space(model, samples)
        store = C.output_device()

        def loop(model_fn, device, progress):
            return methods.invert(x0.to(device), asc, model_fn, opts, family=family, progress=progress,
                                  store_device=store, input_scale=cin)

        fingerprint = C.guidance_fingerprint(model, positive, negative, cfg)
        extra = {}
        if pair is None:
            traj = C.run_guided(model, positive, negative, cfg, tuple(samples.shape), seg, loop,
                                steps=int(asc.shape[0]) - 1, label=DISPLAY)
        else:
            high, boundary, _ = pair
            extra["experts"] = X.record(seg, boundary, C.model_id(model), C.model_id(high))
            fingerprint = X.pair_fingerprint(fingerprint, C.guidance_fingerprint(high, positive, negative, cfg),
                                             boundary)
            traj = C.run_experts({X.LOW: model, X.HIGH: high}, positive, negative, cfg, tuple(samples.shape), seg,
                                 loop, int(asc.shape[0]) - 1, DISPLAY, boundary,
                                 first=X.expert_of(float(asc[1]), boundary))
        where = f"method {method}, {traj.steps} steps, cfg {cfg:g}"
        if method == "exact":
            where += f", gamma {opts.gamma:g}"
        checks.check_finite_result(traj.states, f"the inversion ({where})", _non_finite_fix(method, opts.gamma))
        traj = traj.with_(cfg=cfg, latent_format=facts["format"], model_sampling=C.model_sampling_name(model),
                          sampling=C.sampling_facts(model), noise_mask=mask, batch_index=latent.get("batch_index"),
                          extra={"guidance_fingerprint": fingerprint, **extra})
        # noise_latent carries no noise_mask: core KSamplerAdvanced would keep the unmasked area at the inverted
        # noise instead of regenerating it (the trajectory keeps the mask for the Inverted-Latent Sampler)
        drop = ("downscale_ratio_spacial", "downscale_ratio_temporal", "noise_mask")
        out = {k: v for k, v in latent.items() if k not in drop}
        out["samples"] = C.to_vae_space(model, traj.noise).to(store)
        checks.check_finite_result(out["samples"], f"noise_latent ({where})", _non_finite_fix(method, opts.gamma))
        noise = C.InvertedNoise(traj.noise, float(asc[-1]), C.model_sampling(model), C.latent_format(model))
        lines = [f"{DISPLAY}: {method}, {traj.steps} steps, sigma {float(asc[0]):.4g} -> {float(asc[-1]):.4g}, "
                 f"cfg {cfg:g}, {traj.nfe} model evaluations"]
        if pair is not None:
            lines.append(X.describe(extra["experts"], traj.steps, offset=pair[2]))
        if method == "implicit":
            lines.append(_implicit_text(traj))
        if mask_note:
            lines.append("WARNING: " + mask_note)
        lines += ["WARNING: " + n for n in C.family_notes(model, family_checked=True)]  # outside the tested matrix
        return io.NodeOutput(out, noise, traj, ui=ui.PreviewText("\n".join(lines)))


NODES = [DDIMInvert]
