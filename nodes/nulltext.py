"""Null-Text Inversion: per-step negative embeddings so that guided sampling retraces a CFG-1 inversion."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..inversion import nulltext as NT
from . import _comfy as C
from . import _comfy_grad as G
from .types import TRAJECTORY

CATEGORY = "sampling/ddim_inversion"
MODES = ["null_text", "negative_prompt"]


def _tensor_of(cond, name: str):
    if not (isinstance(cond, list) and cond and isinstance(cond[0], (list, tuple)) and len(cond[0]) >= 2):
        raise C.InversionInputError(f"Null-Text Inversion: {name} is empty; connect a CONDITIONING (CLIP Text Encode)")
    return cond[0][0]


def check_inputs(model, positive, negative, traj, cfg: float, mode: str) -> None:
    """Every reason null-text cannot run on these inputs, as one clear error naming the fix."""
    if traj is None or not hasattr(traj, "states") or not hasattr(traj, "sigmas"):
        raise C.InversionInputError("Null-Text Inversion: trajectory is not a DDIM_TRAJECTORY; connect DDIM Invert's "
                                    "trajectory output (method ddim, cfg 1: the pivot)")
    if traj.method == "exact":
        raise C.InversionInputError("Null-Text Inversion: the trajectory was made with method 'exact' (BDIA), whose "
                                    "sampler is not the DDIM sampler null-text retraces; invert with method ddim "
                                    "(or implicit) at cfg 1 for the pivot")
    if mode not in MODES:
        raise C.InversionInputError(f"Null-Text Inversion: mode must be one of {MODES}; got {mode!r}")
    if G.is_guidance_distilled(model, positive):
        raise C.InversionInputError(
            "Null-Text Inversion: this is a guidance-distilled model (Flux-style: guidance is an input and there "
            "is no unconditional branch to optimise); use DDIM Invert's method 'exact' to reconstruct, or the "
            "Inverted-Latent Sampler's correction 'source_drift' to edit")
    want = getattr(C.latent_format(model), "latent_channels", None)
    if want is not None and traj.states.shape[2] != want:
        raise C.InversionInputError(
            f"Null-Text Inversion: the trajectory's latents have {traj.states.shape[2]} channels but this model "
            f"uses {want}: connect the model that made the trajectory")
    if traj.family and C.family_of(model) != traj.family:
        raise C.InversionInputError(
            f"Null-Text Inversion: the trajectory was made by a {traj.family} model, this one is "
            f"{C.family_of(model)}: connect the model that made the trajectory")
    B = traj.batch_size
    C.check_conditioning(positive, B, "positive")
    C.check_conditioning(negative, B, "negative")
    if mode == "negative_prompt":
        return
    if len(negative) != 1:
        raise C.InversionInputError(
            f"Null-Text Inversion: negative has {len(negative)} entries; null-text optimises one negative "
            "prompt: connect a single CLIP Text Encode (e.g. of an empty prompt)")
    neg, pos = _tensor_of(negative, "negative"), _tensor_of(positive, "positive")
    if neg.ndim != pos.ndim or neg.shape[-1] != pos.shape[-1]:
        raise C.InversionInputError(
            f"Null-Text Inversion: negative has shape {tuple(neg.shape)} but positive {tuple(pos.shape)}: encode "
            "the negative with the same text encoder (the same CLIP output) as the positive")
    if float(cfg) <= 1.0:
        NT.NullTextOptions(cfg=float(cfg)).check()  # raises the core's message: nothing to optimise at cfg <= 1


class DDIMInvNullText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DDIMInvNullText",
            display_name="Null-Text Inversion",
            category=CATEGORY,
            description=(
                "Null-text inversion (Mokady et al. 2023): from a CFG-1 DDIM Invert trajectory (the pivot), "
                "optimises one negative embedding per sampling step so that sampling at the given cfg lands on "
                "the pivot at every step. Outputs a per-step negative CONDITIONING (bound to its steps by "
                "start/end percent ranges) that core KSampler / KSamplerAdvanced / SamplerCustom with the same "
                "steps, scheduler and cfg use to reconstruct the source, and the trajectory annotated with it "
                "for the Inverted-Latent Sampler (reconstruct, or edit with another positive prompt). "
                "negative_prompt mode (Miyake et al. 2023) uses the source prompt as the negative: no "
                "optimisation, reconstruction as good as the CFG-1 inversion at any cfg."),
            inputs=[
                io.Model.Input("model", tooltip="The model that made the trajectory (LoRAs and patches apply)."),
                io.Conditioning.Input("positive", tooltip="The source prompt: the one the pivot was inverted with."),
                io.Conditioning.Input("negative", tooltip="The initial negative (usually an empty prompt's "
                                                          "encoding); its embedding is what gets optimised."),
                TRAJECTORY.Input("trajectory", tooltip="The pivot: DDIM Invert's trajectory, method ddim, cfg 1."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The guidance you will sample with (must be > 1; 7.5 as in the paper)."),
                io.Combo.Input("mode", options=MODES, default="null_text", optional=True,
                               tooltip="null_text: optimise the negative per step (iterations x (forward + "
                                       "backward) per step). negative_prompt: the source prompt becomes the "
                                       "negative (free; reconstructs as well as the CFG-1 inversion)."),
                io.Int.Input("iterations", default=10, min=1, max=200, optional=True,
                             tooltip="Most Adam updates per sampling step (the paper: 10). Each costs one "
                                     "forward and one backward pass of the model's negative branch."),
                io.Float.Input("learning_rate", default=1e-2, min=1e-6, max=1.0, step=1e-3, round=False,
                               optional=True, tooltip="Adam learning rate of the first step; it decays linearly "
                                                      "to half of it over the steps (the paper's schedule)."),
                io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6, round=False,
                               optional=True, tooltip="Stop a step's optimisation once its loss (mean squared "
                                                      "miss of the pivot, latent scale) is at most this; 0 = "
                                                      "always run all iterations."),
            ],
            outputs=[
                io.Conditioning.Output("optimized_negative", display_name="negative",
                                       tooltip="Use as the negative: one optimised embedding per sampling step "
                                               "(start/end percent ranges). With the same steps, scheduler "
                                               "and cfg, core samplers reconstruct the source."),
                TRAJECTORY.Output("annotated_trajectory", display_name="trajectory",
                                  tooltip="The pivot annotated with the optimised negative: the Inverted-Latent "
                                          "Sampler reconstructs with it by default, or edits with another prompt."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, trajectory, cfg, mode="null_text", iterations=10,
                learning_rate=1e-2, early_stop=1e-5) -> io.NodeOutput:
        traj = trajectory
        check_inputs(model, positive, negative, traj, cfg, mode)
        store = C.storage_device()
        sched = traj.sampling_sigmas()
        N = traj.steps
        if mode == "negative_prompt":
            neg_out = [[t, dict(d)] for t, d in positive]
            info = {"mode": mode, "cfg": None, "conditioning": neg_out, "nfe": 0, "backward": 0}
            text = ("negative-prompt inversion: the source prompt is the negative at every step (no "
                    "optimisation); any cfg samples the CFG-1 path")
            return io.NodeOutput(neg_out, traj.with_(optimized_negative=info), ui=ui.PreviewText(text))
        try:
            opts = NT.NullTextOptions(cfg=float(cfg), iterations=int(iterations), learning_rate=float(learning_rate),
                                      early_stop=float(early_stop)).check()
        except NT.NullTextError as e:
            raise C.InversionInputError(f"Null-Text Inversion: {e}") from None
        cin = C.input_scale(model)
        null0 = _tensor_of(negative, "negative")

        def loop(cond_fn, uncond_fn, device, progress):
            import comfy.model_management
            return NT.optimize(traj, cond_fn, uncond_fn, null0, opts, input_scale=cin, progress=progress,
                               check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                               device=device, store_device=store)

        res = G.run_branches(model, positive, negative, opts.cfg, tuple(traj.states.shape[1:]), sched, loop,
                             total=N * (opts.iterations + 1))
        ranges = G.step_ranges(C.model_sampling(model), sched)
        neg_out = G.per_step_conditioning(negative, res.embeddings, ranges, store)
        info = {"mode": mode, "cfg": opts.cfg, "conditioning": neg_out, "nfe": res.nfe, "nfe_cond": res.nfe_cond,
                "nfe_uncond": res.nfe_uncond, "backward": res.backward,
                "iterations_per_step": res.iterations.max(dim=1).values.tolist(),
                "loss_per_step": res.losses.max(dim=1).values.tolist(), "ranges": ranges}
        warn = G.cfg_patches(model)
        text = (f"null-text inversion at cfg {opts.cfg:g}: {N} steps, {res.backward} backward passes, "
                f"{res.nfe} evaluations ({res.nfe_cond} positive + {res.nfe_uncond} negative), "
                f"{res.backward / N:.1f} updates/step; worst final step loss {max(info['loss_per_step']):.2e}")
        if warn:
            text += (f". WARNING: the model has CFG patches ({', '.join(warn)}); null-text optimised plain CFG, "
                     "so samplers applying them will not retrace the pivot")
        return io.NodeOutput(neg_out, traj.with_(optimized_negative=info), ui=ui.PreviewText(text))


NODES = [DDIMInvNullText]
