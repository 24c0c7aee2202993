"""Assemble the scenes flow DiT checkpoint ``ddiminv-scenes-sd3.safetensors`` from its committed weights
(``weights_dit/vae16.safetensors``, ``weights_dit/dit_lowrank.safetensors``), as :mod:`.build` assembles the SD1.5
scenes model: one file that core ``CheckpointLoaderSimple`` detects as ``supported_models.SD3`` (flow, shift 3)
and loads unmodified, returning MODEL, CLIP (SD3's text encoder with clip_l only) and VAE (a 16-channel TAESD).

Layout (SD3's single-file layout):

* ``model.diffusion_model.*``: the MMDiT (:func:`.dit.shipped_state_dict`: factors merged, embedders at SD3's
  4096 / 2048 input widths), fp16;
* ``text_encoders.clip_l.transformer.text_model.*``: the seeded random CLIP-L of :mod:`ddiminv_dev.tiny_checkpoint`
  (never committed), the only text encoder in the file, so ``SD3.clip_target`` builds ``SD3ClipModel`` with
  clip_l alone, which zero-pads the clip_g / T5 parts;
* ``first_stage_model.taesd_encoder.*``, ``first_stage_model.taesd_decoder.*``, ``vae_scale``, ``vae_shift``:
  the TAESD (core's VAE class reads 16 latent channels from ``taesd_decoder.1.weight``).

Built once into ``.cache/models/checkpoints``; the version hashes the weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..learned import build as LB
from . import dit

CKPT_NAME = "ddiminv-scenes-sd3.safetensors"
MODEL_DIR = LB.MODEL_DIR
WEIGHTS = Path(__file__).resolve().parent / "weights_dit"
BUILDER_VERSION = "1"


def weight_paths(weights_dir=None) -> tuple[Path, Path]:
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS
    return d / dit.VAE_FILE, d / dit.DIT_FILE


def has_weights(weights_dir=None) -> bool:
    return all(p.exists() for p in weight_paths(weights_dir))


def version(weights_dir=None) -> str:
    import hashlib

    from .. import tiny_checkpoint
    h = hashlib.sha256()
    for p in weight_paths(weights_dir):
        h.update(p.read_bytes())
    return f"scenes-sd3-b{BUILDER_VERSION}-clip{tiny_checkpoint.VERSION}-{h.hexdigest()[:16]}"


def build_state_dict(weights_dir=None) -> dict:
    from safetensors.torch import load_file
    vae_path, dit_path = weight_paths(weights_dir)
    sd = {"model.diffusion_model." + k: v.to(torch.float16).contiguous()
          for k, v in dit.shipped_state_dict(load_file(str(dit_path))).items()}
    sd.update({"text_encoders.clip_l.transformer." + k: v for k, v in dit.clip_l_state_dict().items()})
    sd.update({"first_stage_model." + k: v.to(torch.float16).contiguous() for k, v in load_file(str(vae_path)).items()})
    return sd


CHECKPOINT = LB.Checkpoint(CKPT_NAME, WEIGHTS, version, build_state_dict,
                           "scenes SD3-format flow DiT checkpoint (clip_l only, 16-channel TAESD)")
checkpoint_path, is_built = CHECKPOINT.checkpoint_path, CHECKPOINT.is_built
register_model_dir = CHECKPOINT.register_model_dir
