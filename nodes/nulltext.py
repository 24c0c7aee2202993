"""Null-Text Inversion: per-step negative embeddings so that guided sampling retraces a CFG-1 inversion."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..inversion import checks
from ..inversion import nulltext as NT
from ..inversion.errors import InversionInputError, node_boundary
from . import _comfy as C
from . import _comfy_grad as G
from .types import CATEGORY, TRAJECTORY

DISPLAY = "Null-Text Inversion"
MODES = list(NT.MODES)


def check_inputs(model, positive, negative, traj, cfg: float, mode: str) -> float:
    """Every reason null-text cannot run on these inputs, as one clear error naming the fix; returns cfg.

    A model that differs from the trajectory's in what the states mean but not in their shape (latent format,
    model sampling, family) is the Inverted-Latent Sampler's policy: a warning in the text output
    (:func:`inversion.checks.compatibility_warnings`), not an error. A latent of another channel count cannot
    run at all and is refused."""
    checks.check_trajectory(traj)
    if traj.method == "exact":
        raise InversionInputError("the trajectory was made with method 'exact' (BDIA), whose sampler is not the "
                                  "DDIM sampler null-text retraces; invert with method ddim (or implicit) at cfg 1 "
                                  "for the pivot")
    if mode not in MODES:
        raise InversionInputError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if G.is_guidance_distilled(model, positive):
        raise InversionInputError(
            "this is a guidance-distilled model (Flux-style: guidance is an input and there is no unconditional "
            "branch to optimise); use DDIM Invert's method 'exact' to reconstruct, or the Inverted-Latent "
            "Sampler's correction 'source_drift' to edit")
    facts = C.latent_facts(model)
    if facts["channels"] is not None and traj.states.shape[2] != facts["channels"]:
        raise InversionInputError(f"the trajectory's latents have {traj.states.shape[2]} channels but this model "
                                  f"uses {facts['channels']}; connect the model that made the trajectory")
    B = traj.batch_size
    checks.check_conditioning(positive, B, "positive")
    checks.check_conditioning(negative, B, "negative")
    cfg = checks.check_cfg(cfg)
    if mode == "negative_prompt":
        return cfg
    if len(negative) != 1:
        raise InversionInputError(f"negative has {len(negative)} entries but null-text optimises one negative "
                                  "prompt; connect a single CLIP Text Encode (e.g. of an empty prompt)")
    neg, pos = negative[0][0], positive[0][0]
    if neg.ndim != pos.ndim or neg.shape[-1] != pos.shape[-1]:
        raise InversionInputError(f"negative has shape {tuple(neg.shape)} but positive {tuple(pos.shape)}; encode "
                                  "the negative with the same text encoder (the same CLIP output) as the positive")
    if cfg <= 1.0:
        NT.NullTextOptions(cfg=cfg).check()  # raises the core's message: nothing to optimise at cfg <= 1
    return cfg


class DDIMInvNullText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DDIMInvNullText",
            display_name=DISPLAY,
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
        with node_boundary(DISPLAY):
            cfg = check_inputs(model, positive, negative, trajectory, cfg, mode)
            notes = [f"WARNING: {w}" for w in C.compatibility_warnings(model, trajectory)]
            if abs(float(trajectory.cfg) - 1.0) > 1e-6:
                notes.append(
                    f"note: the pivot was inverted at cfg {float(trajectory.cfg):g}, not 1: null-text retraces it, "
                    "so the reconstruction is that inversion's own round trip (the paper's pivot is a cfg-1 "
                    "inversion, whose path a cfg-1 sampler retraces; invert at cfg 1 for the usual setup)")
            if mode == "negative_prompt":
                return cls._negative_prompt(positive, trajectory, notes)
            if trajectory.extra.get("experts") is not None:
                raise InversionInputError(
                    "the trajectory was inverted with two experts and null-text optimises against one model; "
                    "use mode negative_prompt (no optimisation), invert with one model, or regenerate with the "
                    "Inverted-Latent Sampler's correction source_drift")
            opts = NT.NullTextOptions(cfg=cfg, iterations=int(iterations), learning_rate=float(learning_rate),
                                      early_stop=float(early_stop)).check()
            return cls._null_text(model, positive, negative, trajectory, opts, notes)

    @classmethod
    def _negative_prompt(cls, positive, traj, notes) -> io.NodeOutput:
        neg_out = [[t, dict(d)] for t, d in positive]
        info = {"mode": "negative_prompt", "cfg": None, "conditioning": neg_out, "nfe": 0, "backward": 0}
        text = (f"{DISPLAY}: negative-prompt inversion: the source prompt is the negative at every step (no "
                "optimisation); any cfg samples the cfg-1 path")
        return io.NodeOutput(neg_out, traj.with_(optimized_negative=info),
                             ui=ui.PreviewText("\n".join([text] + notes)))

    @classmethod
    def _null_text(cls, model, positive, negative, traj, opts, notes) -> io.NodeOutput:
        store = C.output_device()
        sched = traj.sampling_sigmas()
        N = traj.steps
        shape = tuple(traj.states.shape[1:])
        mask, mask_note = checks.check_mask(traj.noise_mask, shape, "the trajectory's noise_mask")
        if mask_note:
            notes.append("WARNING: " + mask_note)
        prepared = None if mask is None else C.prepare_mask(mask, shape, model)
        if mask is not None:
            notes.append("masked: the loss counts only the region the mask regenerates (outside it the sampler "
                         "keeps the source's states, as the Inverted-Latent Sampler does)")
        cin = C.input_scale(model)
        null0 = negative[0][0]
        ranges = G.step_ranges(C.model_sampling(model), sched)   # refuse a schedule it cannot bind, before the work

        def loop(cond_fn, uncond_fn, device, progress):
            return NT.optimize(traj, cond_fn, uncond_fn, null0, opts, input_scale=cin, mask=prepared,
                               progress=progress, check_interrupt=G.check_interrupt, device=device,
                               store_device=store)

        res = G.run_branches(model, positive, negative, opts.cfg, shape, sched, loop,
                             total=N * (opts.iterations + 1), label=DISPLAY)
        neg_out = G.per_step_conditioning(negative, res.embeddings, ranges, store)
        info = {"mode": "null_text", "cfg": opts.cfg, "conditioning": neg_out, "nfe": res.nfe,
                "nfe_cond": res.nfe_cond, "nfe_uncond": res.nfe_uncond, "backward": res.backward,
                "iterations_per_step": res.iterations.max(dim=1).values.tolist(),
                "loss_per_step": res.losses.max(dim=1).values.tolist(), "ranges": ranges,
                # what the sampler with this negative produces, in the trajectory's (ascending) order
                "states": res.states.flip(0), "denoised": res.denoised.flip(0)}
        text = (f"{DISPLAY}: cfg {opts.cfg:g}, {N} steps, {res.backward} backward passes, {res.nfe} evaluations "
                f"({res.nfe_cond} positive + {res.nfe_uncond} negative), {res.backward / N:.1f} updates/step; worst "
                f"final step loss {max(info['loss_per_step']):.2e}")
        if res.backward == 0:
            notes.append(f"WARNING: nothing was optimised: every step's loss was already at most early_stop "
                         f"({opts.early_stop:g}), so the negative is the input one at every step; lower early_stop "
                         "(e.g. 1e-5, or 0 to always run every iteration)")
        patches = G.cfg_patches(model)
        if patches:
            notes.append(f"WARNING: the model has CFG patches ({', '.join(patches)}); null-text optimised plain "
                         "CFG, so samplers that apply them will not retrace the pivot")
        return io.NodeOutput(neg_out, traj.with_(optimized_negative=info), ui=ui.PreviewText("\n".join([text] + notes)))


NODES = [DDIMInvNullText]
