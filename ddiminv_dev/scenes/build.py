"""Assemble the scenes SD1.5-format checkpoint ``ddiminv-scenes-sd15.safetensors`` from the committed weights
(``weights/vae.safetensors``, ``weights/unet_lowrank.safetensors``), exactly as :mod:`ddiminv_dev.learned.build`
assembles the learned model (same layout, same seeded random CLIP-L; core ``CheckpointLoaderSimple`` detects
``SD15`` and loads it unmodified). Built once into ``.cache/models/checkpoints``; the version hashes the weights.
"""
from __future__ import annotations

from pathlib import Path

from ..cache import cached_build, is_current
from ..learned import build as LB

CKPT_NAME = "ddiminv-scenes-sd15.safetensors"
MODEL_DIR = LB.MODEL_DIR
WEIGHTS = Path(__file__).resolve().parent / "weights"


def version(weights_dir=None) -> str:
    return "scenes-" + LB.version(weights_dir if weights_dir is not None else WEIGHTS)


def checkpoint_path(weights_dir=None, path=None) -> Path:
    """Path of the assembled checkpoint (built first if missing or stale)."""
    wd = Path(weights_dir) if weights_dir is not None else WEIGHTS
    path = Path(path) if path is not None else MODEL_DIR / CKPT_NAME
    return cached_build(path, version(wd), lambda: LB.build_state_dict(wd),
                        "scenes SD1.5-format checkpoint (trained on rendered scenes)", seed=0)


def is_built() -> bool:
    return is_current(MODEL_DIR / CKPT_NAME, version())


def register_model_dir(weights_dir=None) -> Path:
    """Build the checkpoint if needed and add its folder to ComfyUI's "checkpoints" search path (in-process).
    With ``weights_dir`` (e.g. a training run's folder) it is built from those weights, as
    ``ddiminv-scenes-sd15-other.safetensors``."""
    import folder_paths
    path = checkpoint_path() if weights_dir is None else checkpoint_path(
        weights_dir, MODEL_DIR / CKPT_NAME.replace(".safetensors", "-other.safetensors"))
    if str(MODEL_DIR) not in folder_paths.get_folder_paths("checkpoints"):
        folder_paths.add_model_folder_path("checkpoints", str(MODEL_DIR))
    return path
