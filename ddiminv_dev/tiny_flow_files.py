"""Tiny, random, *real-format* SD3 files: what the flow_model example workflow loads, made small.

``tiny_flow_paths()`` generates three files once (seeded, deterministic, fp16) and caches them under
``<repo>/.cache/models/`` (git-ignored), in the folders ComfyUI's loaders read:

* ``diffusion_models/ddiminv-tiny-sd3-mmdit.safetensors``: a diffusion-model-only SD3 MMDiT state dict
  (the layout of sd3.5_medium's MMDiT file: ``joint_blocks.*``, ``x_embedder.*``, ...), depth 1 (hidden
  64, one head), patch 2, 16 channels, pos-embed table 32x32, context 4096 / pooled 2048 (the SD3 text
  encoder's sizes). ``comfy.sd.load_diffusion_model`` detects it as ``supported_models.SD3`` with a
  discrete-flow (CONST) model_sampling, shift 3 -> UNETLoader.
* ``text_encoders/ddiminv-tiny-clip-l.safetensors``: the tiny SD1.5 checkpoint's random full-size CLIP-L
  text encoder (``text_model.*``, ddiminv_dev/tiny_checkpoint.py), the layout of a stand-alone clip_l file ->
  CLIPLoader type ``sd3`` (SD3's text model zero-pads the missing clip_g/T5 parts to 4096 / 2048).
* ``vae/ddiminv-tiny-sd3-vae.safetensors``: the SD VAE architecture (ch 128, ch_mult [1,2,4,4]) with 16
  latent channels and no quant convs, the layout of SD3's VAE -> VAELoader (16-channel latents).

Weights are random (``seeded_init_``): pictures are meaningless, everything the pack computes is real.
ComfyUI must be importable (run inside a ComfyUI process, or put the ComfyUI folder on sys.path first).
"""
from __future__ import annotations


import torch

from . import tiny_checkpoint
from .cache import cached_build, is_current
from .paths import MODELS as MODELS_DIR
from .tiny_checkpoint import VAE_DDCONFIG, seeded_init_

FOLDERS = ("diffusion_models", "text_encoders", "vae")  # ComfyUI folder_paths names == sub-folders here
UNET_NAME = "ddiminv-tiny-sd3-mmdit.safetensors"
CLIP_NAME = "ddiminv-tiny-clip-l.safetensors"
VAE_NAME = "ddiminv-tiny-sd3-vae.safetensors"
VERSION = "1"  # bump when a generator changes: the cached files are regenerated
SEED = 20240602

MMDIT_CONFIG = {
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "depth": 1,  # hidden size = 64 * depth (what detection reads back from x_embedder), heads = depth
    "input_size": None,
    "adm_in_channels": 2048,  # SD3 pooled: clip_l 768 + clip_g 1280
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 64}},
    "num_patches": 32 * 32,  # latents up to 64x64 (512 px)
    "pos_embed_max_size": 32,
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}


def paths() -> dict:
    return {"diffusion_models": MODELS_DIR / "diffusion_models" / UNET_NAME,
            "text_encoders": MODELS_DIR / "text_encoders" / CLIP_NAME,
            "vae": MODELS_DIR / "vae" / VAE_NAME}


def _fp16(module_sd: dict, strip: str = "") -> dict:
    return {k[len(strip):]: v.detach().to(torch.float16).contiguous() for k, v in module_sd.items()
            if k.startswith(strip)}


def build_mmdit(seed: int = SEED) -> dict:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    net = MMDiT(**MMDIT_CONFIG, dtype=torch.float32, device=torch.device("cpu"),
                operations=comfy.ops.disable_weight_init)
    seeded_init_(net, seed)
    return _fp16(net.state_dict())


def build_clip_l(seed: int = SEED) -> dict:
    """The tiny SD1.5 checkpoint's CLIP-L, built the same way with the same seed (so the same weights)."""
    import comfy.sd1_clip
    clip = comfy.sd1_clip.SDClipModel(device=torch.device("cpu"), dtype=torch.float32)
    seeded_init_(clip.transformer, tiny_checkpoint.SEED + 1, gain=0.5)
    return _fp16(clip.transformer.state_dict())  # text_model.* + text_projection.weight, as clip_l files


def build_vae(seed: int = SEED) -> dict:
    from comfy.ldm.models.autoencoder import AutoencoderKL
    vae = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG, z_channels=16), embed_dim=16)
    seeded_init_(vae, seed)
    # SD3's VAE has no quant_conv / post_quant_conv
    return {k: v for k, v in _fp16(vae.state_dict()).items() if "quant_conv" not in k}


BUILDERS = {"diffusion_models": (build_mmdit, 0, "random tiny SD3 MMDiT (diffusion model only)"),
            "text_encoders": (build_clip_l, 1, "random CLIP-L text encoder"),
            "vae": (build_vae, 2, "random 16-channel SD3-style VAE")}


def all_current() -> bool:
    return all(is_current(p, VERSION) for p in paths().values())


def tiny_flow_paths() -> dict:
    """folder name -> path of each cached tiny file, generating the missing/stale ones first (process-safe)."""
    out = paths()
    for folder, path in out.items():
        build, offset, desc = BUILDERS[folder]
        cached_build(path, VERSION, lambda b=build, o=offset: b(SEED + o), desc, seed=SEED + offset)
    return out


def register_model_dirs() -> dict:
    """Add the three folders to ComfyUI's folder_paths (in-process); returns tiny_flow_paths()."""
    import folder_paths
    out = tiny_flow_paths()
    for folder, path in out.items():
        if str(path.parent) not in folder_paths.get_folder_paths(folder):
            folder_paths.add_model_folder_path(folder, str(path.parent))
    return out
