"""DDIM Invert: image latent -> inverted noise, a core NOISE object and the recorded trajectory."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..inversion import methods, schedule
from . import _comfy as C
from .types import TRAJECTORY

CATEGORY = "sampling/ddim_inversion"


class DDIMInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DDIMInvert",
            display_name="DDIM Invert",
            category=CATEGORY,
            description=(
                "Runs the deterministic DDIM sampler backwards from an image latent to the noise that "
                "regenerates it, over exactly the sigmas a sampler with the same steps/scheduler uses. "
                "Methods: ddim (1 evaluation/step), implicit (exact inverse of each DDIM step by a "
                "safeguarded fixed-point solve), exact (BDIA-DDIM: bit-for-bit round trip at any CFG, "
                "1 evaluation/step; regenerate with Inverted-Latent Sampler). Works for EPS, V-prediction "
                "and flow (SD3/Flux) models."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (LoRAs, patches and ControlNets apply)."),
                io.Conditioning.Input("positive", tooltip="Prompt describing the source image (the inversion's condition)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt; only used when cfg > 1."),
                io.Latent.Input("latent", tooltip="The image latent in VAE space, e.g. from VAE Encode (Inversion). A noise_mask is kept and recorded."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Sampling steps of the schedule to invert; regenerate with the same number."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance while inverting. 1.0 = one evaluation per step (the usual choice); "
                                       "with 'exact' any value round-trips exactly when regenerated with the same cfg."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="ddim_uniform",
                               tooltip="ComfyUI scheduler that makes the sigmas (ignored when 'sigmas' is connected)."),
                io.Combo.Input("method", options=list(methods.METHODS), default="ddim",
                               tooltip="ddim: classic inversion, 1 evaluation/step. implicit: solves each step so the "
                                       "DDIM sampler retraces it (a few evaluations/step, near-exact). exact: BDIA-DDIM, "
                                       "exact round trip with the Inverted-Latent Sampler, 1 evaluation/step."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Optional sampling schedule (descending, as BasicScheduler emits). Overrides steps/scheduler. Do not flip it."),
                io.Int.Input("start_step", default=0, min=0, max=10000, optional=True,
                             tooltip="Partial inversion (SDEdit-style): stop at the noise level of this sampling step. "
                                     "Regenerate with KSamplerAdvanced start_at_step = this value."),
                io.Int.Input("end_step", default=10000, min=1, max=10000, optional=True,
                             tooltip="Sampling step at which the source latent sits (10000 = the end: a clean image)."),
                io.Combo.Input("eval_sigma", options=list(methods.EVAL_SIGMAS), default="auto", optional=True,
                               tooltip="ddim: where each step evaluates the model. predicted (auto): at the next noise level, on the state "
                                       "the previous step's slope predicts (1 evaluation/step, 5-10x more accurate at 50 steps). "
                                       "destination: at the next level on the current input (prompt-to-prompt). current: at the "
                                       "current level (Song et al.)."),
                io.Float.Input("tolerance", default=1e-6, min=1e-12, max=0.1, step=1e-7, round=False, optional=True,
                               tooltip="implicit only: stop a step when the regenerating step misses by less than this (relative RMS)."),
                io.Int.Input("max_iters", default=30, min=1, max=500, optional=True,
                             tooltip="implicit only: most model evaluations per step."),
                io.Int.Input("restarts", default=6, min=0, max=64, optional=True,
                             tooltip="implicit only: extra seeded starts for a step whose local solve stalls (strong guidance can "
                                     "fold a step's map; a preimage often exists elsewhere). 0 = local solve only."),
                io.Float.Input("damping", default=1.0, min=0.01, max=1.0, step=0.01, optional=True,
                               tooltip="implicit only: initial fixed-point mixing; halved for a sample whenever an iterate does not improve."),
                io.Float.Input("gamma", default=1.0, min=0.05, max=1.0, step=0.05, optional=True,
                               tooltip="exact only: BDIA gamma. 1.0 is the exact, most stable choice; smaller values divide by gamma while inverting."),
            ],
            outputs=[
                io.Latent.Output("noise_latent", display_name="noise_latent", tooltip="The inverted noise as a LATENT (VAE space). On EPS/V models KSamplerAdvanced with add_noise disabled and the same steps/scheduler regenerates the image."),
                io.Noise.Output("noise", display_name="noise", tooltip="A NOISE for SamplerCustomAdvanced: it yields exactly the inverted state for this model's noise scaling (flow models included)."),
                TRAJECTORY.Output("trajectory", display_name="trajectory", tooltip="Every state and x0 estimate of the inversion, its schedule and method: feed Inverted-Latent Sampler and Trajectory Preview."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, steps, cfg, scheduler, method, sigmas=None,
                start_step=0, end_step=10000, eval_sigma="auto", tolerance=1e-6, max_iters=30, restarts=6,
                damping=1.0, gamma=1.0) -> io.NodeOutput:
        if not isinstance(latent, dict) or "samples" not in latent:
            raise C.InversionInputError("latent must be a LATENT dict with 'samples'; connect VAE Encode (Inversion)")
        samples = latent["samples"]
        C.check_latent(model, samples)
        C.check_noise_mask(latent.get("noise_mask"), samples.shape)
        B = int(samples.shape[0])
        C.check_conditioning(positive, B, "positive")
        C.check_conditioning(negative, B, "negative")
        if int(steps) < 1:
            raise C.InversionInputError(f"steps must be >= 1; got {steps}")
        opts = methods.Options(method=method, eval_sigma=eval_sigma, tolerance=float(tolerance),
                               max_iters=int(max_iters), damping=float(damping), gamma=float(gamma),
                               restarts=int(restarts))
        try:
            opts.check()
            full = (schedule.check_sampling_sigmas(sigmas) if sigmas is not None
                    else C.sampling_sigmas(model, scheduler, steps))
            seg = schedule.segment(full, int(start_step), int(end_step))
        except (methods.MethodError, schedule.ScheduleError) as e:
            raise C.InversionInputError(str(e)) from None
        asc = schedule.inversion_order(seg)
        family = C.family_of(model)
        cin = C.input_scale(model)
        x0 = C.to_model_space(model, samples)
        store = C.storage_device()

        def loop(model_fn, device, progress):
            return methods.invert(x0.to(device), asc, model_fn, opts, family=family, progress=progress,
                                  store_device=store, input_scale=cin)

        traj = C.run_guided(model, positive, negative, cfg, tuple(samples.shape), seg, loop,
                            total_steps=int(asc.shape[0]) - 1)
        traj = traj.with_(cfg=float(cfg), latent_format=type(C.latent_format(model)).__name__,
                          model_sampling=C.model_sampling_name(model),
                          noise_mask=latent.get("noise_mask"), batch_index=latent.get("batch_index"),
                          extra={"guidance_fingerprint": C.guidance_fingerprint(positive, negative, cfg)})
        out = {k: v for k, v in latent.items() if k not in ("downscale_ratio_spacial", "downscale_ratio_temporal")}
        out["samples"] = C.to_vae_space(model, traj.noise).to(store)
        noise = C.InvertedNoise(traj.noise, float(asc[-1]), C.model_sampling(model), C.latent_format(model))
        return io.NodeOutput(out, noise, traj)


NODES = [DDIMInvert]
