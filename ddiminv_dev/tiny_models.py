"""Tiny *real* ComfyUI diffusion models, built in code (no weights on disk).

Every model is a genuine ``comfy.model_base`` model built from a genuine ``comfy.supported_models``
config class (only the sizes are tiny), wrapped in a real ``comfy.model_patcher.ModelPatcher`` with
CPU load/offload devices. Weights are drawn from a seeded generator (all parameters, including the
layers ComfyUI/LDM zero-initialise, so the networks are non-trivial functions of x, t and the
conditioning), so two calls give bit-identical models.

Families:
  * ``eps``  -- SD1.5-style UNet (supported_models.SD15, ModelType.EPS, latent_formats.SD15, 4 ch)
  * ``v``    -- SD2-v-style UNet (supported_models.SD20, ModelType.V_PREDICTION, 4 ch)
  * ``flow`` -- SD3-style MMDiT (supported_models.SD3 -> model_base.SD3, discrete flow, shift 3, 16 ch)
  * ``flux`` -- model_base.Flux with a tiny comfy.ldm.flux config (guidance_embed, 16 ch)
  * ``sdxl`` -- SDXL-style UNet (supported_models.SDXL -> model_base.SDXL: pooled output and size
                conditioning through the ADM input, linear transformers, 4 ch)

``tiny_conditioning(family, seed)`` returns a ComfyUI CONDITIONING list with the context size the model
expects (and ``pooled_output`` / ``guidance`` where the model needs them).

Call ``ddiminv_dev.host.boot()`` (or otherwise put ComfyUI on sys.path) before using this module's
functions; the ``comfy`` imports are done lazily inside them.
"""
from __future__ import annotations


import torch

from .tiny_checkpoint import SD_UNET_FLAGS, seeded_init_  # one seeded initialiser for every tiny model

FAMILIES = ("eps", "v", "flow", "flux", "sdxl")

# conditioning sizes of the tiny models
CONTEXT_DIM = {"eps": 64, "v": 64, "flow": 64, "flux": 64, "sdxl": 64}
POOLED_DIM = {"eps": None, "v": None, "flow": 32, "flux": 768, "sdxl": 32}
SDXL_SIZE_EMBED = 6 * 256  # SDXL's ADM input: pooled output + 6 Fourier-embedded sizes (comfy.model_base.SDXL)
TOKENS = 8
LATENT_CHANNELS = {"eps": 4, "v": 4, "flow": 16, "flux": 16, "sdxl": 4}
DEFAULT_SEED = 0


def _check(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {FAMILIES}")
    return family


def _unet_config(context_dim: int) -> dict:
    return {
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "context_dim": context_dim,
        **SD_UNET_FLAGS,
    }


def _flux_extra_params() -> dict:
    """Fields newer ComfyUI requires of ``FluxParams`` (0.33: ``txt_ids_dims``; [] is classic Flux's value, as
    ``model_detection`` sets it); 0.3.75's dataclass has no such field and would reject it."""
    from comfy.ldm.flux.model import FluxParams
    fields = getattr(FluxParams, "__dataclass_fields__", {})
    return {"txt_ids_dims": []} if "txt_ids_dims" in fields else {}


def _model_config(family: str):
    import comfy.supported_models as sm

    if family == "eps":
        cfg = sm.SD15(_unet_config(CONTEXT_DIM[family]))
        cfg.unet_config.update({"num_heads": 2, "num_head_channels": -1})
    elif family == "sdxl":
        cfg = sm.SDXL(dict(_unet_config(CONTEXT_DIM[family]), num_classes="sequential",
                           adm_in_channels=POOLED_DIM[family] + SDXL_SIZE_EMBED, use_linear_in_transformer=True,
                           transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1]))
        cfg.unet_config.update({"num_heads": -1, "num_head_channels": 16})
    elif family == "v":
        cfg = sm.SD20(_unet_config(CONTEXT_DIM[family]))
        cfg.unet_config.update({"num_heads": -1, "num_head_channels": 16})
    elif family == "flow":
        num_patches = 32 * 32  # pos-embed table for latents up to 64x64 (patch 2)
        cfg = sm.SD3({
            "in_channels": 16,
            "out_channels": 16,
            "patch_size": 2,
            "depth": 1,  # MMDiT: hidden size = 64 * depth, heads = depth
            "input_size": None,
            "adm_in_channels": POOLED_DIM[family],
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": CONTEXT_DIM[family], "out_features": 64}},
            "num_patches": num_patches,
            "pos_embed_max_size": 32,
            "pos_embed_scaling_factor": None,
            "x_block_self_attn_layers": [],
        })
    else:  # flux
        cfg = sm.Flux({
            "image_model": "flux",
            "guidance_embed": True,
            "in_channels": 16,
            "out_channels": 16,
            "vec_in_dim": POOLED_DIM[family],
            "context_in_dim": CONTEXT_DIM[family],
            "hidden_size": 64,
            "mlp_ratio": 4.0,
            "num_heads": 2,
            "depth": 1,
            "depth_single_blocks": 1,
            "axes_dim": [4, 14, 14],  # sums to hidden_size // num_heads
            "theta": 10000,
            "patch_size": 2,
            "qkv_bias": True,
            **_flux_extra_params(),
        })
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def tiny_model(family: str = "eps", seed: int = DEFAULT_SEED):
    """A ``comfy.model_patcher.ModelPatcher`` around a tiny real model of ``family`` (CPU, fp32, seeded)."""
    _check(family)
    import comfy.model_base as mb
    import comfy.model_patcher

    cfg = _model_config(family)
    cpu = torch.device("cpu")
    fork_devices = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        if family == "eps":
            model = mb.BaseModel(cfg, model_type=mb.ModelType.EPS, device=cpu)
        elif family == "sdxl":
            model = mb.SDXL(cfg, model_type=mb.ModelType.EPS, device=cpu)
        elif family == "v":
            model = mb.BaseModel(cfg, model_type=mb.ModelType.V_PREDICTION, device=cpu)
        elif family == "flow":
            model = mb.SD3(cfg, device=cpu)  # ModelType.FLOW, shift 3 from SD3.sampling_settings
        else:
            model = mb.Flux(cfg, device=cpu)  # ModelType.FLUX
    seeded_init_(model.diffusion_model, seed=1000 + seed + FAMILIES.index(family))
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def tiny_conditioning(family: str = "eps", seed: int = 0, tokens: int = TOKENS, guidance: float = 3.5,
                      near_seed: int | None = None, distance: float = 0.3) -> list:
    """CONDITIONING for the tiny model of ``family``: ``[[cross_attn (1, tokens, ctx), extras]]``.

    ``flow`` adds ``pooled_output`` (1, 32); ``flux`` adds ``pooled_output`` (1, 768) and ``guidance``.
    With ``near_seed``: the conditioning of ``near_seed`` plus ``distance`` times this seed's draw, i.e. a
    prompt close to that one (real CLIP encodings of two prompts share most tokens); the extras are
    ``near_seed``'s.
    """
    _check(family)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    cond = torch.randn((1, tokens, CONTEXT_DIM[family]), generator=g, dtype=torch.float32)
    extra: dict = {}
    if POOLED_DIM[family] is not None:
        extra["pooled_output"] = torch.randn((1, POOLED_DIM[family]), generator=g, dtype=torch.float32)
    if family == "flux":
        extra["guidance"] = float(guidance)
    if family == "sdxl":  # the size conditioning SDXL's CLIPTextEncodeSDXL adds
        extra.update(width=64, height=64, crop_w=0, crop_h=0, target_width=64, target_height=64)
    if near_seed is not None:
        base, base_extra = tiny_conditioning(family, near_seed, tokens, guidance)[0]
        return [[base + float(distance) * cond, base_extra]]
    return [[cond, extra]]


def latent_format(family: str):
    """The latent format object of ``family`` (SD15 / SD3 / Flux), without building a model."""
    _check(family)
    import comfy.latent_formats as lf
    return {"eps": lf.SD15, "v": lf.SD15, "flow": lf.SD3, "flux": lf.Flux, "sdxl": lf.SDXL}[family]()


def random_latent(family: str = "eps", batch: int = 1, height: int = 64, width: int = 64, seed: int = 0,
                  channels: int | None = None) -> dict:
    """A seeded float32 LATENT in VAE space for ``family``; ``height``/``width`` in pixels (latent = /8).

    Values are N(0,1) in the model's space mapped back through the latent format
    (``x / scale_factor + shift_factor``), i.e. what a VAE encode of an image would look like.
    """
    fmt = latent_format(family)
    c = int(channels or fmt.latent_channels)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    z = torch.randn((int(batch), c, max(1, int(height) // 8), max(1, int(width) // 8)), generator=g,
                    dtype=torch.float32)
    shift = getattr(fmt, "shift_factor", 0.0) or 0.0
    return {"samples": z / fmt.scale_factor + shift}


def split_cond_batches(model):
    """A clone of ``model`` whose cond and uncond always run as separate calls: what ComfyUI does when memory is
    short (``model_options["sampler_calc_cond_batch_function"]``). A missing cond (the uncond at cfg 1) gives
    zeros, as core's ``calc_cond_batch`` does."""
    import comfy.samplers
    m = model.clone()

    def split(args):
        cond, uncond = args["conds"]
        x, s, mo, net = args["input"], args["sigma"], args["model_options"], args["model"]
        out = [comfy.samplers.calc_cond_batch(net, [cond, None], x, s, mo)[0]]
        return out + [comfy.samplers.calc_cond_batch(net, [None, uncond], x, s, mo)[1]]
    m.model_options["sampler_calc_cond_batch_function"] = split
    return m
