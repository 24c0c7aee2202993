"""A tiny, random, *real-format* SD1.5 checkpoint: the demo's built-in model and the tests' end-to-end model.

Used by the test suite's loader-level and server tests (plumbing, where speed matters) and by
``tools/demo.py --model random``; one generator and one cached file.

``tiny_checkpoint_path()`` generates it once (seeded, deterministic) and caches it under
``<repo>/.cache/models/checkpoints/ddiminv-tiny-sd15.safetensors`` (git-ignored). Layout is the original
SD1.5 (ldm) single-file layout, so ComfyUI's ``CheckpointLoaderSimple`` detects it as
``supported_models.SD15`` and returns MODEL, CLIP and VAE:

* ``model.diffusion_model.*``: SD1.5 UNet with model_channels 320 but ONE level (channel_mult [1],
  num_res_blocks 1, attention at that level, transformer depth 1, context_dim 768);
* ``cond_stage_model.transformer.text_model.*``: a full-size CLIP ViT-L/14 text encoder (12 layers,
  width 768) built with ComfyUI's own ``comfy.sd1_clip.SDClipModel``, random init;
* ``first_stage_model.*``: the full SD VAE (``comfy.ldm.models.autoencoder.AutoencoderKL``, ch 128,
  ch_mult [1,2,4,4], z 4, double_z), random init.

The weights are random: pictures made with it are meaningless, but everything the pack computes on it
(round-trip errors, NFE, timings of the graph) is real. All weights are stored fp16 (~460 MB). ComfyUI
must be importable (run inside a ComfyUI process, or put the ComfyUI folder on sys.path first).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .cache import cached_build, is_current
from .paths import MODELS

MODEL_DIR = MODELS / "checkpoints"
CKPT_NAME = "ddiminv-tiny-sd15.safetensors"
VERSION = "1"  # bump when the generator changes: the cached file is regenerated
SEED = 20240601

# what every tiny SD1.x-family UNet here shares: plain spatial transformers, no ADM/temporal parts
SD_UNET_FLAGS = {
    "use_linear_in_transformer": False,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "use_checkpoint": False,
}
UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    **SD_UNET_FLAGS,
}
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def seeded_init_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Deterministically (re)initialise every parameter and float buffer of ``module``.

    Matrices / conv kernels: N(0, gain / sqrt(fan_in)); 1-d ``weight``/``scale`` tensors (norm gains):
    1 + N(0, 0.02); biases and other 1-d tensors: N(0, 0.02). Nothing is left zero (the LDM
    ``zero_module`` outputs are randomised too), so the net is a non-trivial function of its inputs.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    tensors = list(module.named_parameters()) + [
        (n, b) for n, b in module.named_buffers() if b is not None and b.is_floating_point()
    ]
    with torch.no_grad():
        for name, p in tensors:
            shape = p.shape
            if p.ndim >= 2:
                std = gain / math.sqrt(max(math.prod(shape[1:]), 1))
                val = torch.randn(shape, generator=g, dtype=torch.float32) * std
            elif p.ndim == 1 and (name.endswith("weight") or name.endswith("scale")):
                val = 1.0 + 0.02 * torch.randn(shape, generator=g, dtype=torch.float32)
            else:
                val = 0.02 * torch.randn(shape, generator=g, dtype=torch.float32)
            p.copy_(val.to(p.dtype))
    return module


def _prefixed(module: torch.nn.Module, prefix: str, skip=()) -> dict:
    return {prefix + k: v.detach().to(torch.float16).contiguous()
            for k, v in module.state_dict().items() if not any(k.startswith(s) for s in skip)}


def build_state_dict(seed: int = SEED) -> dict:
    """The checkpoint's state dict (fp16), built with ComfyUI's own classes and seeded random weights."""
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cpu = torch.device("cpu")
    sd: dict = {}
    unet = UNetModel(**UNET_CONFIG, dtype=torch.float32, device=cpu, operations=comfy.ops.disable_weight_init)
    seeded_init_(unet, seed)
    sd.update(_prefixed(unet, "model.diffusion_model."))
    del unet

    clip = comfy.sd1_clip.SDClipModel(device=cpu, dtype=torch.float32)  # openai CLIP ViT-L/14 text config
    seeded_init_(clip.transformer, seed + 1, gain=0.5)
    # the original SD1.5 checkpoint has no text projection
    sd.update(_prefixed(clip.transformer, "cond_stage_model.transformer.", skip=("text_projection",)))
    del clip

    vae = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
    seeded_init_(vae, seed + 2)
    sd.update(_prefixed(vae, "first_stage_model."))
    del vae
    return sd


def is_built() -> bool:
    return is_current(MODEL_DIR / CKPT_NAME, VERSION)


def tiny_checkpoint_path() -> Path:
    """Path of the cached tiny SD1.5 checkpoint, generating it first if needed (process-safe)."""
    return cached_build(MODEL_DIR / CKPT_NAME, VERSION, lambda: build_state_dict(SEED),
                        "random tiny SD1.5-format test checkpoint", seed=SEED)


def register_model_dir() -> Path:
    """Add the tiny checkpoint folder to ComfyUI's "checkpoints" search path (in-process); returns the path."""
    import folder_paths
    path = tiny_checkpoint_path()
    if str(MODEL_DIR) not in folder_paths.get_folder_paths("checkpoints"):
        folder_paths.add_model_folder_path("checkpoints", str(MODEL_DIR))
    return path
