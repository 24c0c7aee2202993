"""Assemble the scenes SD1.5-format checkpoint ``ddiminv-scenes-sd15.safetensors`` from the committed weights
(``weights/vae.safetensors``, ``weights/unet_lowrank.safetensors``), exactly as :mod:`ddiminv_dev.learned.build`
assembles the learned model (same layout, same seeded random CLIP-L; core ``CheckpointLoaderSimple`` detects
``SD15`` and loads it unmodified). Built once into ``.cache/models/checkpoints``; the version hashes the weights.
"""
from __future__ import annotations

from pathlib import Path

from ..learned import build as LB

CKPT_NAME = "ddiminv-scenes-sd15.safetensors"
MODEL_DIR = LB.MODEL_DIR
WEIGHTS = Path(__file__).resolve().parent / "weights"


def version(weights_dir=None) -> str:
    return "scenes-" + LB.version(weights_dir if weights_dir is not None else WEIGHTS)


CHECKPOINT = LB.Checkpoint(CKPT_NAME, WEIGHTS, version, LB.build_state_dict,
                           "scenes SD1.5-format checkpoint (trained on rendered scenes)")
checkpoint_path, is_built = CHECKPOINT.checkpoint_path, CHECKPOINT.is_built
register_model_dir = CHECKPOINT.register_model_dir
